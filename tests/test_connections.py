"""Connections and streams a caller can hold are bounded: silent TCP connections are
closed, connections past the cap are refused at once, idle streams are cancelled, and
normal callers are served all the while. Attacks go through real sockets on loopback."""

from __future__ import annotations

import logging
import re
import resource
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_server.transport.connections import established_sockets

from .conftest import (
    BIN,
    ServerFactory,
    free_port,
    grpc_count,
    random_table,
    server_env,
    wait_serving,
)

WEIGHTS = random_table(100, 8, seed=9)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _silent(port: int, count: int, send: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if send:
            sock.sendall(send)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b"" or _closed_by_server(sock)
    except BlockingIOError:
        return False
    except OSError:
        return True


def _wait_closed(sockets: list[socket.socket], timeout: float) -> float:
    """Seconds until the server closed every socket (fails past `timeout`)."""
    started = time.monotonic()
    while not all(_closed_by_server(s) for s in sockets):
        assert time.monotonic() - started < timeout, (
            f"{sum(not _closed_by_server(s) for s in sockets)} of {len(sockets)} still open"
        )
        time.sleep(0.1)
    return time.monotonic() - started


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_silent_and_half_preface_connections_are_closed_after_the_handshake_timeout(
    start_server: ServerFactory,
) -> None:
    server = start_server({"t": WEIGHTS}, handshake_timeout_s=1.0)
    sockets = _silent(server.port, 20) + _silent(server.port, 20, PREFACE[:10])
    try:
        with EmbeddingClient(f"127.0.0.1:{server.port}", timeout=5, max_attempts=1) as client:
            np.testing.assert_array_equal(client.lookup([3]), WEIGHTS[[3]])
        assert _wait_closed(sockets, timeout=5) >= 0.5  # not at once: after the timeout
    finally:
        for sock in sockets:
            sock.close()


def test_past_the_cap_connections_are_refused_at_once_and_connected_callers_go_on(
    start_server: ServerFactory,
) -> None:
    server = start_server({"t": WEIGHTS}, max_connections=16, handshake_timeout_s=4.0)
    target = f"127.0.0.1:{server.port}"
    with EmbeddingClient(target, timeout=5, max_attempts=1) as connected:
        connected.lookup([1])  # this caller holds one of the 16
        held = _silent(server.port, 15)
        extra = _silent(server.port, 40)
        try:
            _wait_closed(extra, timeout=1.0)  # refused at once, not after the timeout
            assert not any(_closed_by_server(s) for s in held)
            for _ in range(20):  # the caller already connected is served meanwhile
                np.testing.assert_array_equal(connected.lookup([7]), WEIGHTS[[7]])
            started = time.monotonic()
            with (
                EmbeddingClient(target, timeout=5, max_attempts=1) as late,
                pytest.raises(EmbeddingError) as refused,
            ):
                late.lookup([1])
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2.0  # fast, not a hang to the deadline
            _wait_closed(held, timeout=10)  # the silent ones time out of their handshake
            with EmbeddingClient(target, timeout=5, max_attempts=1) as later:
                np.testing.assert_array_equal(later.lookup([2]), WEIGHTS[[2]])
        finally:
            for sock in held + extra:
                sock.close()
    assert _metric(server.metrics_port, "embedding_grpc_connection_limit") == 16


@pytest.fixture
def low_fd_server(tmp_path: Path) -> Iterator[tuple[str, int, subprocess.Popen[str]]]:
    """A server process whose open-file limit is 256 (hard), like a small container."""
    np.save(tmp_path / "t.npy", WEIGHTS)
    port, metrics_port = free_port(), free_port()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--table", f"t={tmp_path / 't.npy'}", "--handshake-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
        preexec_fn=limit,
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        yield f"127.0.0.1:{port}", metrics_port, process
    finally:
        process.kill()
        process.communicate(timeout=30)


def test_an_attacker_cannot_use_up_the_file_descriptors(
    low_fd_server: tuple[str, int, subprocess.Popen[str]],
) -> None:
    """600 silent connections against 256 descriptors: before, every call then failed
    (seen with 1,100 against 1,024). Now the cap (lowered to fit) refuses the excess, the
    connected caller keeps its answers, and a new one gets in once the silent ones time
    out."""
    target, metrics_port, process = low_fd_server
    port = int(target.rpartition(":")[2])
    with EmbeddingClient(target, timeout=5, max_attempts=1) as connected:
        connected.lookup([1])
        flood: list[socket.socket] = []
        try:
            for _ in range(600):
                try:
                    flood.extend(_silent(port, 1))
                except OSError:
                    break
            time.sleep(0.5)
            for _ in range(20):
                np.testing.assert_array_equal(connected.lookup([5]), WEIGHTS[[5]])
            deadline = time.monotonic() + 5  # sampled once a second
            while (open_now := _metric(metrics_port, "embedding_grpc_connections")) < 100:
                assert time.monotonic() < deadline, f"{open_now} connections counted"
                time.sleep(0.2)
            assert open_now <= 128  # the cap: 256 descriptors less 128 for the server
            _wait_closed(flood, timeout=10)
        finally:
            for sock in flood:
                sock.close()
        with EmbeddingClient(target, timeout=5, max_attempts=1) as later:
            np.testing.assert_array_equal(later.lookup([6]), WEIGHTS[[6]])
    assert process.poll() is None
    assert _metric(metrics_port, "embedding_grpc_connection_limit") == 256 - 128
    assert _metric(metrics_port, "embedding_grpc_connections_opened_total") >= 100
    deadline = time.monotonic() + 5  # sampled once a second
    while _metric(metrics_port, "embedding_grpc_connections_closed_total") < 100:
        assert time.monotonic() < deadline, "closed connections not counted"
        time.sleep(0.2)


def test_idle_streams_are_cancelled_and_free_their_places(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, eight streams that sent nothing locked every other stream caller out for
    as long as they stayed open. Each cancellation is logged with the caller and counted."""
    caplog.set_level(logging.INFO, logger="embedding_server.transport.interceptor")
    cancelled_before = grpc_count("bidi_stream", "LookupStream", "CANCELLED")
    idle_before = (
        REGISTRY.get_sample_value(
            "embedding_stream_idle_timeouts_total", {"grpc_method": "LookupStream"}
        )
        or 0.0
    )
    server = start_server({"t": WEIGHTS}, max_streams=3, stream_idle_s=2.0)
    target = f"127.0.0.1:{server.port}"
    release = threading.Event()
    outcomes: list[str] = []

    def idle_stream(client: EmbeddingClient) -> None:
        def batches() -> Iterator[list[int]]:
            yield [1]
            release.wait(30)  # then nothing: the stream sits idle

        try:
            for _ in client.lookup_stream(batches(), "t"):
                pass
            outcomes.append("ended")
        except EmbeddingError as exc:
            outcomes.append(f"{exc.code.name}: {exc.details}")

    clients = [EmbeddingClient(target, timeout=30, max_attempts=1) for _ in range(3)]
    holders = [threading.Thread(target=idle_stream, args=(c,)) for c in clients]
    try:
        for thread in holders:
            thread.start()
        time.sleep(0.3)
        with EmbeddingClient(target, timeout=5, max_attempts=1) as other:
            np.testing.assert_array_equal(other.lookup([2]), WEIGHTS[[2]])  # unary goes on
            with pytest.raises(EmbeddingError) as full:
                list(other.lookup_stream([[1]], "t"))
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            for thread in holders:
                thread.join(timeout=10)
            assert not any(t.is_alive() for t in holders), "idle streams were not cancelled"
            assert len(outcomes) == 3 and all(o.startswith("CANCELLED") for o in outcomes)
            said = (
                "CANCELLED: the stream waited over 2 s for its next message "
                "(--stream-idle-timeout): cancelled ("
            )  # then the client's hint
            assert all(o.startswith(said) for o in outcomes), outcomes
            (result,) = other.lookup_stream([[4]], "t")  # a place is free again
            np.testing.assert_array_equal(result.vectors, WEIGHTS[[4]])
    finally:
        release.set()
        for thread in holders:
            thread.join(timeout=10)
        for client in clients:
            client.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    assert b'embedding_stream_idle_timeouts_total{grpc_method="LookupStream"}' in text
    idle = REGISTRY.get_sample_value(
        "embedding_stream_idle_timeouts_total", {"grpc_method": "LookupStream"}
    )
    assert idle == idle_before + 3  # (other tests of this process may have counted some)
    assert grpc_count("bidi_stream", "LookupStream", "CANCELLED") == cancelled_before + 3
    logged = [r.getMessage() for r in caplog.records if "idle for over" in r.getMessage()]
    assert len(logged) == 3, logged
    for line in logged:
        assert re.fullmatch(
            r"LookupStream stream from ipv4:127\.0\.0\.1:\d+ idle for over 2 s: cancelled", line
        ), line


def test_idle_streams_are_reaped_after_every_stream_had_closed(start_server: ServerFactory) -> None:
    """The reaper stops when no stream is open and starts again with the next one: an
    idle stream opened after a quiet spell is cancelled too."""
    server = start_server({"t": WEIGHTS}, stream_idle_s=0.4)  # the reaper looks every 0.1 s
    with EmbeddingClient(f"127.0.0.1:{server.port}", timeout=10, max_attempts=1) as client:
        (first,) = client.lookup_stream([[1]], "t")  # opens, is answered, closes
        np.testing.assert_array_equal(first.vectors, WEIGHTS[[1]])
        time.sleep(0.5)  # no stream open: the reaper has ended
        quiet = threading.Event()

        def silent() -> Iterator[list[int]]:
            quiet.wait(30)
            yield [2]

        try:
            with pytest.raises(EmbeddingError) as raised:
                list(client.lookup_stream(silent(), "t"))
        finally:
            quiet.set()
    assert raised.value.code == grpc.StatusCode.CANCELLED, raised.value


def test_a_busy_stream_is_not_idle(start_server: ServerFactory) -> None:
    server = start_server({"t": WEIGHTS}, stream_idle_s=1.0)
    with EmbeddingClient(f"127.0.0.1:{server.port}", timeout=30, max_attempts=1) as client:

        def batches() -> Iterator[list[int]]:
            for k in range(12):
                time.sleep(0.2)  # well inside the idle timeout each time, 2.4 s in all
                yield [k]

        results = list(client.lookup_stream(batches(), "t"))
    assert [r.vectors.tolist() for r in results] == [WEIGHTS[[k]].tolist() for k in range(12)]


def test_a_stream_answering_longer_than_the_idle_timeout_is_not_idle(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """Idle means waiting for the caller's next message: a stream whose answer takes
    three idle timeouts is not cancelled, while one beside it that sends nothing is."""
    server = start_server({"t": WEIGHTS, "slow": WEIGHTS}, stream_idle_s=0.5)
    target = f"127.0.0.1:{server.port}"
    quiet = threading.Event()
    outcomes: dict[str, str] = {}

    def stream(name: str, batches: Iterator[list[int]], table: str) -> None:
        with EmbeddingClient(target, timeout=30, max_attempts=1) as client:
            try:
                rows = [r.vectors for r in client.lookup_stream(batches, table)]
                outcomes[name] = "OK" if np.array_equal(rows[0], WEIGHTS[[5]]) else "WRONG"
            except EmbeddingError as exc:
                outcomes[name] = exc.code.name

    def silent() -> Iterator[list[int]]:
        quiet.wait(30)  # sends nothing
        yield [1]

    busy = threading.Thread(target=stream, args=("busy", iter([[5]]), "slow"))
    idle = threading.Thread(target=stream, args=("idle", silent(), "t"))
    try:
        busy.start()
        assert slow_lookups.entered.wait(10)
        idle.start()
        idle.join(timeout=10)  # cancelled after ~0.5 s, while the busy one is answering
        assert outcomes == {"idle": "CANCELLED"}
        time.sleep(1.0)  # the busy stream is answering for 3 idle timeouts in all
        slow_lookups.release.set()
        busy.join(timeout=10)
    finally:
        quiet.set()
        slow_lookups.release.set()
        busy.join(timeout=10)
        idle.join(timeout=10)
    assert outcomes == {"idle": "CANCELLED", "busy": "OK"}


def test_connections_asked_to_go_at_their_age_lose_no_call_and_keep_their_streams(
    start_server: ServerFactory,
) -> None:
    """Connections reach their 0.3 s max age many times over: each is sent a GOAWAY and
    the caller reconnects; 8 callers without retries (grpc still resends what no server
    saw) lose no call, and a stream open across those ages is answered to its end (no
    age grace cuts it: it finishes on its connection)."""
    server = start_server({"t": WEIGHTS}, connection_age_s=0.3)
    target = f"127.0.0.1:{server.port}"
    seen: set[int] = set()  # the server's connections, by socket inode
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with EmbeddingClient(target, timeout=10, max_attempts=1) as client:
            while not stop.is_set():
                ids = rng.integers(0, len(WEIGHTS), 16)
                try:
                    assert np.array_equal(client.lookup(ids), WEIGHTS[ids])
                    answered[0] += 1
                except EmbeddingError as exc:
                    failures.append(f"{exc.code.name}: {exc.details}")

    def batches() -> Iterator[list[int]]:
        for k in range(15):
            time.sleep(0.2)  # 3 s in all: ten connection ages
            yield [k]

    def watch() -> None:
        while not stop.is_set():
            seen.update(established_sockets(server.port))
            time.sleep(0.02)

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(8)]
    threads.append(threading.Thread(target=watch))
    try:
        for thread in threads:
            thread.start()
        with EmbeddingClient(target, timeout=30, max_attempts=1) as streaming:
            results = list(streaming.lookup_stream(batches(), "t"))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:5]
    assert answered[0] > 100
    assert [r.vectors.tolist() for r in results] == [WEIGHTS[[k]].tolist() for k in range(15)]
    assert len(seen) > 30, len(seen)  # the callers did reconnect, many times
