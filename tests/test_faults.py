"""Faults and load, bounded and on loopback: SIGTERM and kill -9 under load, backpressure,
cancelled calls, oversized requests."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc

from .conftest import BIN, ServerFactory, free_port, random_table, server_env, wait_serving

WEIGHTS = random_table(5000, 32, seed=21)


def _spawn(path: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--table", f"t={path}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    wait_serving(f"127.0.0.1:{port}", process)
    return process


class Load:
    """Client threads calling Lookup until stopped, checking every answer's rows."""

    def __init__(self, target: str, threads: int, **client_options: object) -> None:
        self.ok = 0
        self.errors: list[EmbeddingError] = []
        self.wrong = 0
        # (monotonic start time, error or None) of every call
        self.calls: list[tuple[float, EmbeddingError | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(target, seed, client_options))
            for seed in range(threads)
        ]

    def _run(self, target: str, seed: int, options: dict[str, object]) -> None:
        rng = np.random.default_rng(seed)
        with EmbeddingClient(target, **options) as client:  # type: ignore[arg-type]
            while not self._stop.is_set():
                ids = rng.integers(0, len(WEIGHTS), size=int(rng.integers(1, 2000)))
                started = time.monotonic()
                try:
                    vectors = client.lookup(ids)
                except EmbeddingError as exc:
                    with self._lock:
                        self.errors.append(exc)
                        self.calls.append((started, exc))
                    time.sleep(0.01)
                    continue
                with self._lock:
                    self.ok += 1
                    self.wrong += not np.array_equal(vectors, WEIGHTS[ids])
                    self.calls.append((started, None))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_sigterm_under_load_loses_no_call(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", WEIGHTS)
    port = free_port()
    process = _spawn(tmp_path / "t.npy", port, "--grace", "10")
    with Load(f"127.0.0.1:{port}", threads=8, max_attempts=1, timeout=10) as load:
        time.sleep(1.5)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        time.sleep(0.3)
    assert process.returncode == 0, output
    assert load.wrong == 0
    # Every call that started well before SIGTERM, those still in flight then included,
    # was answered in full (one that left the client a few ms before the signal may reach
    # the server after the drain began: it is refused below, not lost).
    before = [error for started, error in load.calls if started < sigterm_at - 0.1]
    assert len(before) > 20 and before == [None] * len(before), before
    # Later calls are refused with a code the client's retry policy retries: UNAVAILABLE
    # from the draining server, a closed port or a stream the server's GOAWAY turned away,
    # or CANCELLED from grpc's own stop for a call that arrived in that instant.
    refusals = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert all(error.code in refusals for _, error in load.calls if error), load.errors


def test_kill9_and_restart_under_load(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", WEIGHTS)
    port = free_port()
    process = _spawn(tmp_path / "t.npy", port)
    with Load(f"127.0.0.1:{port}", threads=4, wait_for_ready=True, timeout=30) as load:
        time.sleep(1.0)
        process.kill()  # SIGKILL: no drain, connections die mid-call
        process.communicate(timeout=30)
        killed_at = load.ok
        time.sleep(0.5)
        process = _spawn(tmp_path / "t.npy", port)
        time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    print(f"kill -9 under load: {load.ok} calls ok, {len(load.errors)} failed: {load.errors[:3]}")
    assert load.wrong == 0
    assert load.ok > killed_at + 10, "calls did not resume after the restart"
    assert load.errors == [], "calls failed despite wait_for_ready and retries"


def test_backpressure_refuses_fast_past_the_inflight_bound(start_server: ServerFactory) -> None:
    server = start_server(
        {"big": random_table(20_000, 64)}, workers=2, max_inflight=2, dense_chunk_cells=20_000
    )
    ids = np.random.default_rng(0).integers(0, 20_000, size=2000)
    outcomes: list[tuple[str, float]] = []

    def call() -> None:
        started = time.monotonic()
        with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=60) as client:
            try:
                client.lookup_dense(ids)
                outcomes.append(("OK", time.monotonic() - started))
            except EmbeddingError as exc:
                outcomes.append((exc.code.name, time.monotonic() - started))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED"]
    accepted = [seconds for code, seconds in outcomes if code == "OK"]
    assert len(refused) + len(accepted) == 8, outcomes
    assert refused and accepted, outcomes
    assert max(refused) < min(accepted), outcomes  # refusals do not wait for the work
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        assert client.health() == "SERVING"


def test_cancelled_call_harms_nothing(start_server: ServerFactory) -> None:
    server = start_server({"big": random_table(20_000, 64)}, dense_chunk_cells=20_000)
    ids = np.random.default_rng(1).integers(0, 20_000, size=3000)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.LookupRequest(ids=ids.astype("<i8").tobytes())
        future = stub.LookupDense.future(request)
        time.sleep(0.2)
        assert future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
        answer = stub.Lookup(pb.LookupRequest(ids=ids[:5].astype("<i8").tobytes()))
    assert list(answer.shape) == [5, 64]


def test_request_over_the_receive_limit(start_server: ServerFactory) -> None:
    server = start_server({"t": random_table(100, 4)}, max_message_bytes=4096)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        with pytest.raises(EmbeddingError) as raised:
            client.lookup(np.zeros(1000, dtype=np.int64))  # 8,000 bytes of ids
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in raised.value.details
        assert client.lookup([1]).shape == (1, 4)


def test_a_burst_of_signals_still_stops_cleanly(tmp_path: Path) -> None:
    """Signals arriving while the handler of the last one runs (a deadlock when the
    handler took a lock) still end in one clean stop."""
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    process = _spawn(path, free_port())
    for _ in range(50):
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGHUP)
    try:
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopped" in output
