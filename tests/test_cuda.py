"""CUDA-only checks: tables on the device, dtypes there, both paths agreeing on the GPU,
and what only a GPU proves of issue 15's fixes (streams, timing, deadlines, pinned memory,
TF32, memory of reloads across processes). `bash bench/device.sh check` runs them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient, EmbeddingError, Feature
from embedding_server.config import TableSpec
from embedding_server.core import devices, kernels
from embedding_server.core.cache import CachedRows
from embedding_server.core.devices import to_host
from embedding_server.core.sources import load_table
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.process.server import EmbeddingServer, resolve_device

from .conftest import (
    BIN,
    TEST_CONFIG,
    ServerFactory,
    admin_settings,
    free_port,
    random_table,
    server_env,
    wait_serving,
)

GPU = torch.device("cuda", 0)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_device_picks_cuda() -> None:
    assert resolve_device("auto").type == "cuda"


def test_tables_load_onto_the_device(tmp_path: Path) -> None:
    weights = random_table(1000, 33)
    np.save(tmp_path / "t.npy", weights)
    table = load_table(TableSpec("t", tmp_path / "t.npy"), torch.device("cuda:0"))
    assert table.device == "cuda:0"
    np.testing.assert_array_equal(table.weights.cpu().numpy(), weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_hot_matmul_equals_gather_on_cuda(dtype: torch.dtype) -> None:
    table = torch.randn(5000, 129, device="cuda").to(dtype)
    ids = torch.randint(0, 5000, (64, 3), device="cuda")
    dense = kernels.one_hot_matmul(table, ids, chunk_cells=100_000)
    gathered = kernels.gather(table, ids)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(dense.view(view), gathered.view(view))


def test_server_on_cuda(start_server: ServerFactory) -> None:
    weights = random_table(2000, 128, seed=3)
    server = start_server({"gpu": torch.from_numpy(weights).cuda()})
    ids = np.random.default_rng(0).integers(0, 2000, size=(32, 4))
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        (info,) = client.tables()
        assert info.device == "cuda:0"
        np.testing.assert_array_equal(client.lookup(ids), weights[ids])
        assert client.lookup_dense(ids).tobytes() == client.lookup(ids).tobytes()
        half = client.lookup(ids, dtype="bfloat16")
        np.testing.assert_array_equal(
            half.astype(np.float32),
            torch.from_numpy(weights[ids]).bfloat16().float().numpy(),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_results_leave_the_device_through_pinned_memory(dtype: torch.dtype) -> None:
    vectors = torch.randn(1000, 64, device="cuda").to(dtype)
    host = to_host(vectors)
    view = torch.int16 if dtype == torch.bfloat16 else dtype
    assert host.tobytes() == vectors.cpu().view(view).numpy().tobytes()


def test_batching_on_cuda(start_server: ServerFactory) -> None:
    weights = random_table(3000, 64, seed=5)
    server = start_server({"gpu": torch.from_numpy(weights).cuda()}, batching=True)
    rng = np.random.default_rng(1)
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        for _ in range(20):
            ids = rng.integers(0, 3000, size=int(rng.integers(1, 500)))
            np.testing.assert_array_equal(client.lookup(ids), weights[ids])


def test_processes_share_the_device_table(tmp_path: Path) -> None:
    """Two worker processes on one GPU table (CUDA IPC), same bytes as numpy."""
    weights = random_table(4000, 32, seed=6)
    np.save(tmp_path / "t.npy", weights)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--device", "cuda", "--processes", "2",
         "--table", f"t={tmp_path / 't.npy'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        ids = np.arange(0, 4000, 7)
        for _ in range(8):  # separate connections: both workers answer
            with EmbeddingClient(f"127.0.0.1:{port}", wait_for_ready=True) as client:
                np.testing.assert_array_equal(client.lookup(ids), weights[ids])
                assert client.tables()[0].device == "cuda:0"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output


@contextlib.contextmanager
def _serving(store: TableStore, **overrides: object) -> Iterator[EmbeddingServer]:
    server = EmbeddingServer(replace(TEST_CONFIG, **overrides), store)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


def _store(*tables: tuple[TableSpec, torch.device]) -> TableStore:
    store = TableStore()
    for spec, device in tables:
        store.add(load_table(spec, device))
    return store


def test_tf32_forced_on_by_nvidias_variable_leaves_the_one_hot_exact() -> None:
    """Under TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (NVIDIA's containers) torch starts with
    TF32 on: a plain float32 matmul rounds the table to TF32. The dense path turns it off
    and still equals the gather bit for bit."""
    probe = (
        "import torch\n"
        "from embedding_server.core import kernels\n"
        "torch.manual_seed(0)\n"
        "table = torch.randn(4096, 256, device='cuda')\n"
        "ids = torch.randint(0, 4096, (512,), device='cuda')\n"
        "hot = torch.nn.functional.one_hot(ids, 4096).float()\n"
        "rounded = not torch.equal(hot @ table, table[ids])\n"
        "dense = kernels.one_hot_matmul(table, ids, chunk_cells=1 << 20)\n"
        "same = dense.view(torch.int32) == kernels.gather(table, ids).view(torch.int32)\n"
        "exact = bool(same.all())\n"
        "print(rounded, exact)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
        env={**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rounded, exact = done.stdout.split()
    if rounded != "True":
        pytest.skip("TF32 changed no float32 matmul on this GPU: nothing to prove here")
    assert exact == "True"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_timed_waits_for_a_kernel_on_the_second_device() -> None:
    second = torch.device("cuda", 1)
    table = torch.randn(200_000, 256, device=second)
    ids = torch.randint(0, 200_000, (1 << 20,), device=second)
    with devices.on_device(second):
        rows, seconds = devices.timed(second, lambda: kernels.gather(table, ids))
        assert torch.cuda.current_device() == 1
    assert seconds > 1e-5  # the gather's own time, not ~0 from cuda:0's stream
    assert torch.equal(rows[:1000].cpu(), table.cpu()[ids[:1000].cpu()])


def test_lookup_dense_stops_at_its_deadline_on_the_device() -> None:
    """Seconds of one-hot work with a 0.5 s deadline: the server gives up within about a
    second (its record of the call says DEADLINE_EXCEEDED), and the dense slot is free
    for the next call (with --dense-concurrency 1 it would wait for the first).

    The work: 262,144 ids x 1M rows: 512 blocks that each read the whole 512 MB table,
    several seconds even at the H200's 4.8 TB/s (262,144 x 1M x 128 multiply-adds)."""
    table = torch.randn(1_000_000, 128)
    store = TableStore()
    store.add(Table(name="big", weights=table.to(GPU), source="test"))
    labels = {"method": "LookupDense", "table": "big", "code": "DEADLINE_EXCEEDED"}
    with _serving(store, max_dense_macs=10**17, dense_concurrency=1) as server:
        before = REGISTRY.get_sample_value("embedding_request_duration_seconds_count", labels)
        with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            started = time.monotonic()
            with pytest.raises(EmbeddingError) as late:
                client.lookup_dense(np.arange(262_144), "big", timeout=0.5)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            while time.monotonic() - started < 3:
                after = REGISTRY.get_sample_value(
                    "embedding_request_duration_seconds_count", labels
                )
                if (after or 0) > (before or 0):
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the server was still computing 3 s after the call")
            small = client.lookup_dense([1, 2, 3], "big", timeout=5)
            np.testing.assert_array_equal(small, table[[1, 2, 3]].numpy())


def test_cached_rows_on_the_device_count_and_answer_as_on_the_cpu() -> None:
    host = torch.from_numpy(random_table(5000, 48, seed=11))
    counts: dict[str, list[int]] = {"cpu": [0, 0, 0], "cuda": [0, 0, 0]}

    def recorder(name: str) -> Callable[[int, int, int], None]:
        def record(hits: int, misses: int, evictions: int) -> None:
            for i, n in enumerate((hits, misses, evictions)):
                counts[name][i] += n

        return record

    caches = {
        name: CachedRows(host.clone(), 300, torch.device(name), recorder(name))
        for name in ("cpu", "cuda")
    }
    rng = np.random.default_rng(3)
    for _ in range(60):
        ids = torch.from_numpy(np.minimum(rng.zipf(1.3, size=(8, 16)), 4999))
        with devices.on_device(GPU):
            on_gpu = caches["cuda"].take(ids).cpu()
        on_cpu = caches["cpu"].take(ids)
        assert torch.equal(on_gpu, on_cpu) and torch.equal(on_cpu, host[ids])
    assert counts["cuda"] == counts["cpu"] and counts["cpu"][2] > 0  # evictions happened


def test_updates_of_a_cached_device_table_are_seen_whole_under_concurrent_lookups(
    tmp_path: Path,
) -> None:
    """Readers on their own streams, a writer updating rows: every row read is one whole
    version of that row, and the last version is what stays. Half the readers read the
    updated rows (cached: hits, and the writer's cache writes), half random rows of the
    whole table (more than the cache holds: misses and evictions meanwhile)."""
    rows, dim = 2000, 32
    np.save(tmp_path / "t.npy", np.zeros((rows, dim), np.float32))
    store = _store((TableSpec("t", tmp_path / "t.npy", cache_rows=512), GPU))
    ids = np.arange(0, rows, 7)
    stop, bad = threading.Event(), []

    def read(target: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with EmbeddingClient(target) as client:
            while not stop.is_set():
                wanted = ids if seed % 2 else rng.integers(0, rows, size=100)
                got = client.lookup(wanted, "t")
                versions = got[:, 0]
                if not (got == versions[:, None]).all():  # a row mixing two versions
                    bad.append(got)

    with _serving(store, **admin_settings(tmp_path)) as server:
        target = f"127.0.0.1:{server.port}"
        readers = [threading.Thread(target=read, args=(target, seed)) for seed in range(6)]
        for reader in readers:
            reader.start()
        try:
            with EmbeddingClient(target) as writer:
                for version in range(1, 31):
                    writer.update_rows(ids, np.full((ids.size, dim), version, np.float32), "t")
                final = writer.lookup(ids, "t")
        finally:
            stop.set()
            for reader in readers:
                reader.join(timeout=30)
    assert not bad, bad[0]
    assert (final == 30).all()


def test_int8_padding_and_pooling_on_the_device_match_the_cpu(tmp_path: Path) -> None:
    weights = random_table(3000, 40, seed=12)
    np.save(tmp_path / "t.npy", weights)
    specs = [TableSpec("f", tmp_path / "t.npy"), TableSpec("q", tmp_path / "t.npy", dtype="int8")]
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 3000, size=(64, 5))
    answers: dict[str, dict[str, np.ndarray]] = {}
    for device in ("cpu", "cuda"):
        store = _store(*((spec, torch.device(device)) for spec in specs))
        with _serving(store) as server, EmbeddingClient(f"127.0.0.1:{server.port}") as client:
            answers[device] = {
                f"{table} {kind}": call(client, table)
                for table in ("f", "q")
                for kind, call in {
                    "plain": lambda c, t: c.lookup(ids, t),
                    "padding": lambda c, t: c.lookup(ids, t, padding_id=int(ids[0, 0])),
                    "dense": lambda c, t: c.lookup_dense(ids, t, padding_id=int(ids[0, 0])),
                    "sum": lambda c, t: c.lookup(ids, t, pooling="sum"),
                    "mean": lambda c, t: c.lookup(ids, t, pooling="mean"),
                    "max": lambda c, t: c.lookup(ids, t, pooling="max"),
                    "dense max": lambda c, t: c.lookup_dense(ids, t, pooling="max"),
                }.items()
            }
    for key, on_cpu in answers["cpu"].items():
        on_gpu = answers["cuda"][key]
        if key.endswith(("sum", "mean")):  # the device adds in its own order
            np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            assert on_gpu.tobytes() == on_cpu.tobytes(), key
    np.testing.assert_array_equal(answers["cuda"]["f plain"], weights[ids])


def test_many_and_stream_on_the_device(start_server: ServerFactory) -> None:
    users, items = random_table(500, 16, seed=13), random_table(800, 24, seed=14)
    server = start_server({"users": torch.from_numpy(users).cuda(),
                           "items": torch.from_numpy(items).cuda()})  # fmt: skip
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        many = client.lookup_many(
            {"users": [1, 2, 3], "clicked": Feature([[5, 6], [7, 8]], table="items",
                                                     pooling="mean", dtype="float16")}
        )  # fmt: skip
        np.testing.assert_array_equal(many["users"].vectors, users[[1, 2, 3]])
        np.testing.assert_allclose(
            many["clicked"].vectors.astype(np.float32),
            items[[[5, 6], [7, 8]]].mean(axis=1), rtol=2e-3, atol=1e-3,
        )  # fmt: skip
        batches = [np.arange(k, k + 50) for k in range(0, 450, 50)]
        for batch, result in zip(batches, client.lookup_stream(batches, "users"), strict=True):
            np.testing.assert_array_equal(result.vectors, users[batch])


def test_pinned_memory_stays_within_its_budget_under_concurrent_calls(
    start_server: ServerFactory,
) -> None:
    """Results of 2-6 MB from 24 callers at once, some over a block (8 MiB): all exact,
    and the pinned memory torch holds grows by at most the 4 blocks allowed."""
    weights = random_table(20_000, 256, seed=15)
    server = start_server({"t": torch.from_numpy(weights).cuda()},
                          pinned_staging_bytes=32 << 20)  # fmt: skip
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    rng = np.random.default_rng(5)
    requests = [rng.integers(0, 20_000, size=int(rng.choice([2048, 6000, 9000])))
                for _ in range(240)]  # fmt: skip

    def call(ids: np.ndarray) -> bool:
        with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
            return bool(np.array_equal(client.lookup(ids), weights[ids]))

    with ThreadPoolExecutor(24) as pool:
        assert all(pool.map(call, requests))
    grown = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - before
    assert grown <= 32 << 20, f"pinned memory grew by {grown / 2**20:.0f} MiB"


def test_reloads_with_processes_free_each_old_version(tmp_path: Path) -> None:
    """Two worker processes on a CUDA table of over a third of the free memory, reloaded
    three times: each reload fits beside the version serving (so the one before it was
    freed, not kept for the workers), every answer comes from the version reported, and
    the device's memory goes back to what one version takes. Then a worker killed with
    SIGKILL is replaced and the loss is logged."""
    free, _ = torch.cuda.mem_get_info(GPU)
    budget = 8 << 30
    if free < budget + (2 << 30):
        pytest.skip(f"needs {(budget >> 30) + 2} GiB free on the GPU")
    blocker = torch.empty(free - budget, dtype=torch.uint8, device=GPU)  # leave 8 GiB
    rows, dim = (int(2.6 * 2**30) // 4096), 1024  # 2.6 GiB float32 a version
    files = []
    for version in range(1, 5):
        path = tmp_path / f"v{version}.npy"
        mapped = np.lib.format.open_memmap(path, "w+", np.float32, (rows, dim))  # sparse zeros
        mapped[:4] = version
        mapped.flush()
        del mapped
        files.append(path)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--device", "cuda", "--processes", "2",
         "--table", f"t={files[0]}", "--table-dir", str(tmp_path),
         "--allow-loopback-admin", "true"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout=180)
        time.sleep(2)
        serving_one = torch.cuda.mem_get_info(GPU)[0]
        for version in (2, 3, 4):
            with EmbeddingClient(f"127.0.0.1:{port}", timeout=180) as client:
                info = client.reload_table("t", str(files[version - 1]))
                assert info.version == version
                for _ in range(6):  # separate connections reach both workers
                    with EmbeddingClient(f"127.0.0.1:{port}", wait_for_ready=True) as each:
                        result = each.lookup_result([0, 3, 5])
                        assert result.version == version
                        assert (result.vectors[:2] == version).all()
                        assert (result.vectors[2] == 0).all()
        time.sleep(2 * 5 + 1)  # the supervisor frees released versions every 5 s
        settled = torch.cuda.mem_get_info(GPU)[0]
        assert abs(settled - serving_one) < 0.25 * rows * dim * 4, (settled, serving_one)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                  text=True).stdout.split()  # fmt: skip
        workers = [int(c) for c in children
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]  # fmt: skip
        assert len(workers) == 2, children
        os.kill(workers[-1], signal.SIGKILL)
        time.sleep(5)
        for _ in range(6):
            with EmbeddingClient(f"127.0.0.1:{port}", wait_for_ready=True) as each:
                assert (each.lookup([0])[0] == 4).all()
    finally:
        del blocker
        torch.cuda.empty_cache()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    assert "died (exit status -9) holding CUDA tables 't'" in output, output[-3000:]


def test_processes_report_every_processs_device_memory(tmp_path: Path) -> None:
    """With two workers each holding a device cache, /metrics sums every process's
    allocator: the supervisor's table plus two caches at least."""
    weights = random_table(100_000, 64, seed=16)
    np.save(tmp_path / "t.npy", weights)
    config = tmp_path / "tables.toml"
    config.write_text(
        f'[[table]]\nname = "plain"\nsource = "{tmp_path / "t.npy"}"\n'
        f'[[table]]\nname = "cached"\nsource = "{tmp_path / "t.npy"}"\ncache_rows = 50000\n'
    )
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--device", "cuda", "--processes", "2", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout=120)
        time.sleep(2.5)  # the workers sample once a second
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(("embedding_device_memory_allocated_bytes", "embedding_table_bytes"))
        }
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    table, cache = weights.nbytes, 50_000 * 64 * 4
    assert samples['embedding_device_memory_allocated_bytes{device="cuda:0"}'] >= table + 2 * cache
    assert samples['embedding_table_bytes{device="cpu",dtype="float32",table="cached"}'] == table
    assert samples['embedding_table_bytes{device="cuda:0",dtype="float32",table="cached"}'] == cache
    assert process.returncode == 0, output
