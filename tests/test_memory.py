"""What a table needs and where: estimates per storage dtype and cache, refusals before
anything is allocated, out-of-memory errors as clear answers, device caches only in the
processes that serve from them, and memory metrics by device."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_server import metrics
from embedding_server.config import TableSpec
from embedding_server.core import devices, kernels, sources
from embedding_server.core import store as store_module
from embedding_server.core.cache import CachedRows
from embedding_server.core.sources import (
    LOAD_STAGING_BYTES,
    RowSource,
    TableLoadError,
    footprint,
    load_table,
)
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table

from .conftest import BIN, free_port, random_table, server_env

CPU = torch.device("cpu")
META = torch.device("meta")  # a device with shapes and no memory: stands in for CUDA here


def _source(rows: int, dim: int, dtype: torch.dtype) -> RowSource:
    return RowSource((rows, dim), dtype, lambda start, stop: torch.zeros(stop - start, dim))


@pytest.mark.parametrize(
    ("file_dtype", "stored_as", "weights_bytes"),
    [
        (torch.float32, None, 1000 * 64 * 4),
        (torch.float64, None, 1000 * 64 * 4),  # float64 files are stored as float32
        (torch.float16, None, 1000 * 64 * 2),
        (torch.float16, "float32", 1000 * 64 * 4),  # twice the file
        (torch.float32, "bfloat16", 1000 * 64 * 2),
        (torch.float32, "int8", 1000 * 64 + 1000 * 2 * 4),  # codes plus scale and bias per row
    ],
)
def test_footprint_follows_the_storage_dtype(
    file_dtype: torch.dtype, stored_as: str | None, weights_bytes: int
) -> None:
    needs = footprint(_source(1000, 64, file_dtype), stored_as, META)
    assert needs == {META: weights_bytes, CPU: LOAD_STAGING_BYTES}


def test_footprint_of_a_cached_table_counts_each_processs_cache() -> None:
    source = _source(10_000, 32, torch.float32)
    one = footprint(source, "float16", CPU, cache=(500, META))
    assert one == {CPU: 10_000 * 32 * 2 + LOAD_STAGING_BYTES, META: 500 * 32 * 2}
    three = footprint(source, "float16", CPU, cache=(500, META), cache_copies=3)
    assert three[META] == 3 * 500 * 32 * 2
    # A cache larger than the table holds the whole table, no more.
    assert footprint(source, None, CPU, cache=(10**9, META))[META] == 10_000 * 32 * 4


def test_a_table_that_does_not_fit_is_refused_before_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "t.npy", random_table(1000, 64))
    spec = TableSpec("t", tmp_path / "t.npy", dtype="float32")
    free = 1000 * 64 * 4 + LOAD_STAGING_BYTES + 100
    monkeypatch.setattr(sources, "available_bytes", lambda device: free)
    assert load_table(spec, CPU).rows == 1000  # fits, barely
    reserve = {CPU: 2 << 20}
    with pytest.raises(TableLoadError) as refused:
        load_table(spec, CPU, keep_free=lambda device: reserve.get(device, 0))
    message = str(refused.value)
    assert message.startswith(
        "table 't' needs 128.24 MiB on cpu (1,000 x 64 stored as float32); only 126.24 MiB "
        "are free there after 2.00 MiB kept for the worker processes: store it smaller"
    )
    assert "cache_rows" in message


def test_running_out_of_memory_while_loading_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "t.npy", random_table(10, 4))

    def out_of_memory(*args: object, **kwargs: object) -> Table:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sources, "materialise", out_of_memory)
    with pytest.raises(TableLoadError, match="ran out of memory while loading it"):
        load_table(TableSpec("t", tmp_path / "t.npy"), CPU)


def test_a_table_bigger_than_memory_stops_the_server_with_one_line(tmp_path: Path) -> None:
    """A sparse .npy file larger than the machine's free memory: refused in one line and
    exit status 2, before anything is allocated (under an address-space limit, so a
    server that tried to load it would fail fast instead of swapping)."""
    available = devices.available_bytes(CPU)
    rows = int(4 * available // (1024 * 4)) + 1
    np.lib.format.open_memmap(tmp_path / "huge.npy", "w+", np.float32, (rows, 1024)).flush()
    # Address space for the file's mapping and the server, not for a copy of the table.
    limit = rows * 4096 + (16 << 30)

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(free_port()),
         "--metrics-port", "0", "--device", "cpu", "--table", f"t={tmp_path / 'huge.npy'}"],
        capture_output=True, text=True, timeout=120, env=server_env(), preexec_fn=limit_memory,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    needed = (rows * 4096 + LOAD_STAGING_BYTES) / 2**30
    assert last.startswith(f"embedding-server: error: table 't' needs {needed:.2f} GiB")
    assert "GiB on cpu" in last and "are free there" in last


@pytest.fixture
def store_with(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A store serving table t from a float16 file stored as float32, reloadable from
    files in tmp_path."""

    def build(weights: np.ndarray, **spec: object) -> TableStore:
        path = tmp_path / "t.npy"
        np.save(path, weights)
        store = TableStore()
        store.files = store.files.__class__((str(tmp_path),), "")
        store.add(load_table(TableSpec("t", path, **spec), CPU))  # type: ignore[arg-type]
        return store

    return build, tmp_path


def test_a_reload_is_estimated_in_the_tables_storage_dtype(
    store_with, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    build, folder = store_with
    store = build(random_table(100, 8).astype(np.float16), dtype="float32")
    new = folder / "v2.npy"
    np.save(new, random_table(1000, 8).astype(np.float16))  # 16 KB as a file, 32 KB stored
    monkeypatch.setattr(store_module, "available_bytes", lambda d: LOAD_STAGING_BYTES + 20_000)
    with pytest.raises(store_module.OverLimit, match=r"needs \d+ MiB on cpu .*stored as float32"):
        store.reload("t", str(new))
    assert store.get("t").version == 1 and store.get("t").rows == 100
    monkeypatch.setattr(store_module, "available_bytes", lambda d: LOAD_STAGING_BYTES + 40_000)
    assert store.reload("t", str(new)).weights.dtype == torch.float32


def test_running_out_of_memory_in_a_reload_keeps_the_old_version(
    store_with, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    build, folder = store_with
    store = build(random_table(100, 8))
    np.save(folder / "v2.npy", random_table(100, 8, seed=5))

    def out_of_memory(*args: object, **kwargs: object) -> Table:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(store_module, "materialise", out_of_memory)
    with pytest.raises(store_module.OverLimit, match="ran out of memory for the new version"):
        store.reload("t", str(folder / "v2.npy"))
    assert store.get("t").version == 1


def test_a_device_out_of_memory_in_a_lookup_is_resource_exhausted(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    weights = random_table(100, 8)
    server = start_server({"t": weights})
    real_gather = kernels.gather
    failing = {"left": 1}

    def gather(*args: object, **kwargs: object) -> torch.Tensor:
        if failing["left"]:
            failing["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_gather(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "gather", gather)
    ids = np.arange(10)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        with pytest.raises(EmbeddingError) as refused:
            client.lookup(ids, padding_id=0)  # a torch gather, not numpy's take
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no memory left for this request on table 't' (10 ids)" in refused.value.details
        expected = weights[ids].copy()
        expected[0] = 0
        np.testing.assert_array_equal(client.lookup(ids, padding_id=0), expected)


def test_the_supervisor_keeps_no_device_cache_of_its_own(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", random_table(1000, 16))
    spec = TableSpec("t", tmp_path / "t.npy", cache_rows=100)
    single = load_table(spec, CPU)
    assert single.cache is not None and single.cache.cache_bytes == 100 * 16 * 4
    shared = load_table(spec, CPU, shared=True, cache_copies=2)
    assert shared.cache is not None and shared.cache.cache_bytes == 0
    worker_copy = pickle.loads(pickle.dumps(shared.cache))  # as a worker receives it
    assert worker_copy.cache_bytes == 100 * 16 * 4
    store = TableStore(shared=True, cache_copies=2)
    store.files = store.files.__class__((str(tmp_path),), "")
    store.add(shared)
    reloaded = store.reload("t")
    assert reloaded.cache is not None and reloaded.cache.cache_bytes == 0


def test_a_cached_tables_bytes_are_reported_where_they_are() -> None:
    host = torch.from_numpy(random_table(300, 8))
    table = Table(name="split", weights=host, source="test")
    table.cache = CachedRows(host, 50, META, allocate=False)
    assert table.memory() == {CPU: 300 * 8 * 4}  # no cache yet: nothing on the device
    table.cache.cache  # noqa: B018  # taken on first use
    assert table.memory() == {CPU: 300 * 8 * 4, META: 50 * 8 * 4}
    metrics.publish_table(table)

    def reported(device: str) -> float | None:
        labels = {"table": "split", "device": device, "dtype": "float32"}
        return REGISTRY.get_sample_value("embedding_table_bytes", labels)

    assert reported("cpu") == 300 * 8 * 4  # the host table, under cpu
    assert reported("meta") == 50 * 8 * 4  # the cache, under its device
    usage = metrics.DeviceMemory(lambda: list(table.memory().items()), host_tables=False)
    assert usage.usage() == ({}, {})  # a worker: the host table is not its to count
    everything = metrics.DeviceMemory(lambda: list(table.memory().items())).usage()[0]
    assert everything == {"cpu": 300 * 8 * 4, "meta": 50 * 8 * 4}


def test_ids_stay_on_the_host_for_a_cached_tables_gathers() -> None:
    host = torch.from_numpy(random_table(30, 4))
    cached = CachedRows(host, 10, META, allocate=False)
    assert kernels.ids_device(cached, dense=False) == CPU
    assert kernels.ids_device(cached, dense=True) == META  # the one-hot compares on the device
    assert kernels.ids_device(host.to(META), dense=False) == META


def test_int8_snapshot_dequantizes_on_the_host_in_chunks(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", random_table(5000, 7))
    table = load_table(TableSpec("q", tmp_path / "t.npy", dtype="int8"), CPU)
    rows = table.rows_for_kernels()
    assert isinstance(rows, kernels.QuantizedRows)
    whole = kernels.dequantize(table.weights, table.qparams)  # type: ignore[arg-type]
    assert torch.equal(rows.to_host().view(torch.int32), whole.view(torch.int32))


# A handler-pool thread holding ten 8 MiB answers at once, then freeing them, 12 times;
# prints the pages it faulted in each time (resource's per-thread count).
_ANSWERS_IN_A_THREAD = """
import resource, sys, threading
from embedding_server.process.server import tune_allocator
if sys.argv[1] == "tuned" and not tune_allocator():
    print("untunable")
    sys.exit()
faults = []
def answers():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        held = [b"x" * (8 << 20) for _ in range(10)]
        del held
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=answers)
thread.start()
thread.join()
print(*faults)
"""


def test_the_allocator_tuning_keeps_large_answers_pages_in_every_thread() -> None:
    """With `--malloc-tune` (the default), answers built and freed call after call in a
    thread other than the main one reuse their pages: after the first round none is
    faulted in again. Untuned, glibc unmaps a thread arena's emptied heap each round."""

    def faults(mode: str) -> list[int]:
        done = subprocess.run(
            [BIN / "python", "-c", _ANSWERS_IN_A_THREAD, mode],
            env=server_env(), capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        if done.stdout.strip() == "untunable":
            pytest.skip("glibc is not this platform's allocator")
        return [int(n) for n in done.stdout.split()]

    pages = (8 << 20) // 4096
    tuned, untuned = faults("tuned"), faults("untuned")  # tuned first: it may skip
    assert min(untuned[1:]) > pages  # the check can fail: untuned, the pages come back
    assert max(tuned[1:]) < pages // 8, tuned
