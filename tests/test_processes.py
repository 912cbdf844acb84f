"""`--processes N`: several server processes on one port, one shared copy of each table.

Each test runs a real `embedding-server --processes 2` and looks at its processes from
outside (/proc): which connections each worker holds, which memory they map.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_client import EmbeddingClient, EmbeddingError, Feature

from .conftest import BIN, free_port, random_table, server_env, wait_serving

WEIGHTS = random_table(3000, 24, seed=31)
CLIENTS = 12  # separate connections: all on one of 2 workers has odds 2**-11


@dataclass
class Running:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """Pids of the worker processes (the supervisor's children that serve; a child
        is listed under the thread that started it)."""
        pids = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue  # the thread ended
        return sorted(p for p in pids if "spawn_main" in _cmdline(p))

    def metric(self, line_prefix: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(line_prefix):
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no sample {line_prefix!r} on /metrics")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _start(path: Path, *extra: str) -> Running:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(  # a session of its own, so tests may signal its group
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--processes", "2", "--grace", "2", "--table", f"t={path}",
         "--allow-loopback-admin", "true", "--table-dir", str(path.parent), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
        start_new_session=True,
    )  # fmt: skip
    running = Running(process, port, metrics_port, path)
    wait_serving(running.target, process)
    deadline = time.monotonic() + 60
    # Health answers once the first worker serves; wait for both to listen.
    while len([p for p in running.workers() if _sockets(p, port, LISTEN)]) < 2:
        assert time.monotonic() < deadline, "workers did not all start"
        time.sleep(0.1)
    return running


def _stop(running: Running) -> str:
    running.process.send_signal(signal.SIGTERM)
    return running.process.communicate(timeout=60)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = tmp_path_factory.mktemp("processes") / "t.npy"
    np.save(path, WEIGHTS)
    running = _start(path)
    yield running
    _stop(running)


ESTABLISHED, LISTEN = "01", "0A"  # TCP states as /proc/net/tcp writes them


def _sockets(pid: int, port: int, state: str) -> int:
    """TCP sockets in `state` that process `pid` holds on local port `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state and fields[9] in inodes:
                count += 1
    return count


def _shared_mappings(pid: int) -> dict[str, int]:
    """torch's shared-memory segments process `pid` maps: inode -> mapped bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "/dev/shm/torch_" in line:
            span, _, _, _, inode = line.split()[:5]
            start, end = (int(x, 16) for x in span.split("-"))
            found[inode] = found.get(inode, 0) + end - start
    return found


def test_every_worker_serves_the_same_bytes(server: Running) -> None:
    rng = np.random.default_rng(1)
    clients = [EmbeddingClient(server.target, timeout=30) for _ in range(CLIENTS)]
    try:
        for _ in range(5):
            for client in clients:
                ids = rng.integers(0, len(WEIGHTS), size=(7, 3))
                np.testing.assert_array_equal(client.lookup(ids), WEIGHTS[ids])
                np.testing.assert_array_equal(client.lookup_dense(ids[0]), WEIGHTS[ids[0]])
        workers = server.workers()
        assert len(workers) == 2
        held = {pid: _sockets(pid, server.port, ESTABLISHED) for pid in workers}
        assert sum(held.values()) == CLIENTS
        assert all(count > 0 for count in held.values()), held
    finally:
        for client in clients:
            client.close()


def test_the_table_is_one_shared_copy(server: Running) -> None:
    """The supervisor and both workers map the same shared-memory segment, sized like
    the table: one copy in memory, not one per process."""
    pids = [server.process.pid, *server.workers()]
    mappings = [_shared_mappings(pid) for pid in pids]
    table_inodes = [
        {inode for inode, size in found.items() if size >= WEIGHTS.nbytes} for found in mappings
    ]
    assert all(len(inodes) == 1 for inodes in table_inodes), mappings
    assert table_inodes[0] == table_inodes[1] == table_inodes[2]


def test_metrics_add_up_over_workers(server: Running) -> None:
    sample = (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Lookup",'
        'grpc_service="embedding.v1.EmbeddingService",grpc_type="unary"}'
    )
    before = server.metric(sample)
    clients = [EmbeddingClient(server.target, timeout=30) for _ in range(CLIENTS)]
    try:
        for client in clients:
            for _ in range(3):
                client.lookup([1, 2])
    finally:
        for client in clients:
            client.close()
    assert server.metric(sample) - before == 3 * CLIENTS
    assert server.metric('embedding_table_rows{table="t"}') == len(WEIGHTS)
    assert server.metric('embedding_inflight_requests{method="Lookup"}') == 0
    # The table once, under the device `auto` chose: the supervisor's, counted by it alone.
    with EmbeddingClient(server.target) as client:
        (info,) = client.tables()
    held = server.metric(f'embedding_device_memory_allocated_bytes{{device="{info.device}"}}')
    if info.device == "cpu":
        assert held == WEIGHTS.nbytes
    else:  # CUDA: every process's allocator, the supervisor's holding the table
        assert held >= WEIGHTS.nbytes
    for process in ("supervisor", "worker-0", "worker-1"):
        assert server.metric(f'embedding_process_pss_bytes{{process="{process}"}}') > 0


def test_a_reload_reaches_every_worker(server: Running) -> None:
    new = random_table(4000, 24, seed=32)
    other = server.path.with_name("t2.npy")
    np.save(other, new)
    clients = [EmbeddingClient(server.target, timeout=60) for _ in range(CLIENTS)]
    try:
        version = clients[0].tables()[0].version
        info = clients[0].reload_table("t", source=str(other))
        assert (info.version, info.rows) == (version + 1, 4000)
        for client in clients:  # answered only once every worker serves it
            result = client.lookup_result([3999, 5])
            assert result.version == version + 1
            np.testing.assert_array_equal(result.vectors, new[[3999, 5]])
        with pytest.raises(EmbeddingError) as refused:
            clients[1].reload_table("t", source=str(other.with_name("missing.npy")))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "missing.npy" in refused.value.details
        with pytest.raises(EmbeddingError) as refused:  # checked in the supervisor too
            clients[1].reload_table("t", source=f"{server.path.parent}/../../../etc/passwd")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not inside a table directory" in refused.value.details
        np.save(other, WEIGHTS)
        server.process.send_signal(signal.SIGHUP)  # re-reads t's file, now t2.npy
        deadline = time.monotonic() + 30
        while not all(c.lookup_result([0]).version == version + 2 for c in clients):
            assert time.monotonic() < deadline, "SIGHUP did not reach every worker"
            time.sleep(0.1)
        for client in clients:
            np.testing.assert_array_equal(client.lookup([2999]), WEIGHTS[[2999]])
    finally:
        for client in clients:
            client.close()
    assert server.metric('embedding_table_reloads_total{result="failed",table="t"}') == 2


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    running = _start(path)
    try:
        victim = running.workers()[0]
        subprocess.run(["kill", "-9", str(victim)], check=True)
        deadline = time.monotonic() + 60
        while True:
            workers = running.workers()
            if len(workers) == 2 and victim not in workers:
                break
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.2)
        with EmbeddingClient(running.target, timeout=30, wait_for_ready=True) as client:
            np.testing.assert_array_equal(client.lookup([4, 5]), WEIGHTS[[4, 5]])
        workers = running.workers()
    finally:
        output = _stop(running)
    assert running.process.returncode == 0, output
    assert f"(pid {victim}) exited with status -9; starting a new one" in output
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_every_process_sets_up_torch_and_the_allocator(tmp_path: Path) -> None:
    """The workers are spawned, not forked: each sets torch's threads per call and the
    allocator itself, as the supervisor does."""
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    running = _start(path, "--torch-threads", "3")
    output = _stop(running)
    for process in (
        "embedding_server:",
        "embedding_server[worker 0]:",
        "embedding_server[worker 1]:",
    ):
        lines = [line for line in output.splitlines() if f" INFO {process} " in line]
        assert any(line.endswith("torch threads per call: 3") for line in lines), output
        assert any(line.endswith("allocator tuning (mallopt): on") for line in lines), output


def test_the_process_setup_sets_torchs_threads() -> None:
    code = (
        "import torch\n"
        "from embedding_server.config import ServerConfig\n"
        "from embedding_server.process.server import prepare_process\n"
        "prepare_process(ServerConfig(torch_threads=3, malloc_tune=False))\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run(
        [BIN / "python", "-c", code], env=server_env(), capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["3"]


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    process = subprocess.run(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(free_port()),
         "--metrics-port", "0", "--processes", "2", "--table", f"t={path}",
         "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k.pem")],
        capture_output=True, text=True, env=server_env(), timeout=120,
    )  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert "worker 0 did not start: cannot read TLS files" in process.stderr


def test_a_signal_to_the_whole_group_stops_in_order(tmp_path: Path) -> None:
    """Ctrl-C in a terminal (or `kill -- -PGID`) signals every process of the group at
    once, repeatedly here: the workers must not look dead and be replaced, and a burst of
    signals must not deadlock the supervisor's handler."""
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    running = _start(path)
    workers = running.workers()
    for _ in range(5):
        os.killpg(running.process.pid, signal.SIGINT)
    try:
        output = running.process.communicate(timeout=60)[0]
    finally:
        if running.process.poll() is None:
            running.process.kill()
    assert running.process.returncode == 0, output
    assert "starting a new one" not in output
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_row_updates_reach_every_worker_and_no_read_is_torn(tmp_path: Path) -> None:
    """Every row is one constant vector; a writer replaces rows through the admin RPC
    (run by the supervisor) while readers on separate connections (both workers) check
    that no answer mixes two versions of a row."""
    rows, dim = 64, 4096  # 16 KiB rows: a write takes long enough to overlap reads
    path = tmp_path / "t.npy"
    np.save(path, np.zeros((rows, dim), np.float32))
    running = _start(path)
    stop = threading.Event()
    torn: list[str] = []
    reads = [0]

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with EmbeddingClient(running.target) as client:
            while not stop.is_set():
                for row in client.lookup(rng.integers(0, rows, size=32), "t"):
                    if not (row == row[0]).all():
                        torn.append(f"a row mixes {np.unique(row)[:4]}")
                reads[0] += 1

    readers = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
    for thread in readers:
        thread.start()
    try:
        rng = np.random.default_rng(7)
        with EmbeddingClient(running.target) as writer:
            for k in range(1, 150):
                ids = rng.choice(rows, size=int(rng.integers(1, rows)), replace=False)
                info = writer.update_rows(ids, np.full((ids.size, dim), float(k), np.float32))
                assert (info.version, info.update_seq) == (1, k)
            last = writer.update_rows(np.arange(rows), np.full((rows, dim), -1.0, np.float32))
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=30)
    clients = [EmbeddingClient(running.target) for _ in range(CLIENTS)]
    try:
        for client in clients:  # every worker sees the last update and its update_seq
            result = client.lookup_result([0, rows - 1], "t")
            assert result.update_seq == last.update_seq == 150
            assert (result.vectors == -1).all()
    finally:
        for client in clients:
            client.close()
        _stop(running)
    assert reads[0] > 50, "the readers hardly ran"
    assert not torn, torn[:3]


def test_int8_cached_and_half_tables_across_processes(tmp_path: Path) -> None:
    """Every storage kind a worker can receive: int8 codes with their row params, a host
    table behind a per-worker cache, bfloat16; updates reach the shared ones."""
    half = random_table(300, 8, seed=33)
    np.save(tmp_path / "t.npy", WEIGHTS)
    np.save(tmp_path / "h.npy", half)
    (tmp_path / "tables.toml").write_text(
        '[[table]]\nname = "q"\nsource = "t.npy"\ndtype = "int8"\n'
        '[[table]]\nname = "c"\nsource = "h.npy"\ncache_rows = 50\n'
        '[[table]]\nname = "b"\nsource = "h.npy"\ndtype = "bfloat16"\n'
    )
    running = _start(tmp_path / "t.npy", "--config", str(tmp_path / "tables.toml"))
    clients = [EmbeddingClient(running.target, max_attempts=1) for _ in range(CLIENTS)]
    try:
        ids = np.arange(0, 294, 7)  # 42 ids
        for client in clients:
            assert np.abs(client.lookup(ids, "q") - WEIGHTS[ids]).max() < 0.05
            np.testing.assert_array_equal(client.lookup(ids, "c"), half[ids])
            pooled = client.lookup_many({"c": Feature(ids.reshape(-1, 3)[:4], pooling="mean")})
            np.testing.assert_allclose(
                pooled["c"].vectors, half[ids.reshape(-1, 3)[:4]].mean(1), rtol=1e-6
            )
        assert clients[0].update_rows([1], np.full((1, 24), 2.5, np.float32), "q").update_seq == 1
        assert clients[0].update_rows([7], np.full((1, 8), 0.5, np.float32), "b").update_seq == 1
        with pytest.raises(EmbeddingError) as refused:
            clients[0].update_rows([1], np.ones((1, 8), np.float32), "c")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        for client in clients:
            np.testing.assert_allclose(client.lookup([1], "q"), np.full((1, 24), 2.5), atol=1e-6)
            np.testing.assert_array_equal(client.lookup([7], "b"), np.full((1, 8), 0.5))
            seqs = {t.name: (t.dtype, t.version, t.update_seq) for t in client.tables()}
            assert seqs["q"] == ("int8", 1, 1) and seqs["c"] == ("float32", 1, 0)
    finally:
        for client in clients:
            client.close()
        _stop(running)
