"""Faults and load, bounded and on loopback: SIGTERM and kill -9 under load, backpressure,
cancelled calls, oversized requests."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_client.proto import grpc_service_pb2 as oip
from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc
from embedding_server.core.lookup import Lookups
from embedding_server.transport.interceptor import StatusInterceptor

from .conftest import (
    BIN,
    LateLookups,
    ServerFactory,
    exactly,
    free_port,
    grpc_count,
    random_table,
    server_env,
    spawn_server,
    until,
    wait_serving,
)

WEIGHTS = random_table(5000, 32, seed=21)


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


# A call the client could not even send to the stopped server: the only failure a stop
# may cause when it was the client's one address (with another, grpc moves there).
NEVER_SENT = "failed to connect to all addresses"


def test_sigterm_under_load_loses_no_call(tmp_path: Path) -> None:
    """SIGTERM under 8 callers without retries: every call the server could take is
    answered, during the stop too (the connections are asked to go at their 1 s max
    age, new ones refused); the calls that fail are those that found no server to
    connect to, never one cut off, cancelled or refused by the server."""
    np.save(tmp_path / "t.npy", WEIGHTS)
    port = free_port()
    process = spawn_server(tmp_path / "t.npy", port, "--grace", "10", "--connection-max-age", "1")
    with Load(f"127.0.0.1:{port}", threads=8, max_attempts=1, timeout=10) as load:
        time.sleep(1.5)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        time.sleep(0.3)
    assert process.returncode == 0, output
    assert load.wrong == 0
    before = [error for started, error in load.calls if started < sigterm_at]
    assert len(before) > 20 and before == [None] * len(before), before
    during = [started for started, error in load.calls if started > sigterm_at and not error]
    assert during, "no call was answered after SIGTERM: the server stopped serving at once"
    failed = [f"{e.code.name}: {e.details}" for _, e in load.calls if e]
    assert all(f.startswith(f"UNAVAILABLE: {NEVER_SENT}") for f in failed), failed[:5]
    assert "calls still running after the" not in output
    assert "Closing acceptor" in output  # grpc's own line as the server stops listening


def test_sigterm_finishes_every_received_call_queued_and_dense(tmp_path: Path) -> None:
    """64 callers, half LookupDense of 128 ids over 160,000 x 64 rows (running long), half
    Lookup of 256 ids with a padding id (the general way: queued behind the 4-call handler
    pool; a plain lookup is answered on the event loop at once). Health turns NOT_SERVING
    first; every call sent before SIGTERM, and every one the server takes after, is
    answered in full (before: calls that arrived during the stop were refused with
    UNAVAILABLE, and grpc's stop cancelled some)."""
    # Dense answers of 32 KiB, inside a client's first flow-control window: a larger one
    # finishing on a connection that grpc has just told to go away can be cut off by
    # grpc's own close (docs/usage.md#shutdown, "what is left"), drain or not.
    big = random_table(160_000, 64, seed=22)
    np.save(tmp_path / "big.npy", big)
    port = free_port()
    process = spawn_server(tmp_path / "big.npy", port, "--grace", "30", "--connection-max-age", "1")
    target = f"127.0.0.1:{port}"
    stop = threading.Event()
    lock = threading.Lock()
    calls: list[tuple[float, float, str, bool]] = []  # (sent, ended, code, dense)
    health: list[tuple[float, str]] = []

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        dense = seed % 2 == 0
        with EmbeddingClient(target, max_attempts=1, timeout=60) as client:
            while not stop.is_set():
                ids = rng.integers(0, len(big), size=128 if dense else 256)
                sent = time.monotonic()
                try:
                    if dense:
                        got, want = client.lookup_dense(ids), big[ids]
                    else:  # row 0 the padding: zeros
                        got = client.lookup(ids, padding_id=0)
                        want = np.where((ids == 0)[:, None], np.float32(0), big[ids])
                    code = "OK" if np.array_equal(got, want) else "WRONG"
                except EmbeddingError as exc:
                    code = f"{exc.code.name}: {exc.details}"
                with lock:
                    calls.append((sent, time.monotonic(), code, dense))
                if code != "OK":
                    return  # refused: the server is going away

    def prober() -> None:
        with EmbeddingClient(target, max_attempts=1, timeout=1) as client:
            while not stop.is_set():
                try:
                    status = client.health()
                except EmbeddingError as exc:
                    status = exc.code.name
                health.append((time.monotonic(), status))
                time.sleep(0.02)

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(64)]
    threads.append(threading.Thread(target=prober))
    try:
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        exited_at = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    before = [c for c in calls if c[0] < sigterm_at]
    in_flight = [c for c in calls if c[0] < sigterm_at < c[1] and c[2] == "OK"]
    lost = [(round(c[0] - sigterm_at, 3), round(c[1] - sigterm_at, 3), *c[2:])
            for c in before if c[2] != "OK"]  # fmt: skip
    assert not lost, f"{len(lost)} of {len(before)} calls sent before SIGTERM failed: {lost[:5]}"
    # After it, calls go on over the open connections until each is asked to go; then
    # the callers find no server to connect to (their only one), and nothing else fails.
    other = [c for c in calls if c[2] != "OK" and not c[2].startswith(f"UNAVAILABLE: {NEVER_SENT}")]
    assert not other, other[:5]  # never cut off, cancelled or refused by the server
    # The signal found calls running (dense) and in the handler pool (padded lookups: as
    # few as 3 in 3 of 25 runs; they take ~1 ms there, so most of those outstanding at
    # the signal were still on their way and are refused as new); all were answered.
    assert sum(c[3] for c in in_flight) >= 4 and sum(not c[3] for c in in_flight) >= 1, in_flight
    # Health said NOT_SERVING while the server still answered, before it exited.
    assert any(sigterm_at < at < exited_at and s == "NOT_SERVING" for at, s in health), health[-5:]
    assert "calls still running after the" not in output


def test_calls_queued_for_a_handler_thread_are_answered_on_stop(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """The one running place is taken by a call that waits; six calls queue behind it.
    A stop answers all seven; meanwhile the server takes no new connection (a caller
    that opens one is refused at once, so grpc sends its call elsewhere), and the stop
    ends soon after the last answer, its connections gone."""
    release = slow_lookups.release
    table = random_table(50, 4, seed=3)
    server = start_server({"t": table, "slow": table}, workers=1)
    target = f"127.0.0.1:{server.port}"
    results: dict[str, str] = {}

    def call(name: str, table_name: str) -> None:
        with EmbeddingClient(target, max_attempts=1, timeout=30) as client:
            try:
                ok = np.array_equal(client.lookup([1, 2], table_name), table[[1, 2]])
                results[name] = "OK" if ok else "WRONG"
            except EmbeddingError as exc:
                results[name] = f"{exc.code.name}: {exc.details}"

    # "slow" lookups go the general way (the handler pool) and hold their thread.
    threads = [threading.Thread(target=call, args=(f"queued-{k}", "slow")) for k in range(6)]
    threads.insert(0, threading.Thread(target=call, args=("slow", "slow")))
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 20})
    try:
        threads[0].start()
        until(lambda: server.pool.running == 1 and not server.pool.queued)
        for thread in threads[1:]:
            thread.start()
        until(lambda: server.pool.queued == 6)
        stopping.start()
        until(lambda: server.stopping)
        time.sleep(0.3)  # for it to stop listening (nothing to wait on from here)
        late = threading.Thread(target=call, args=("late", "t"))
        late.start()
        late.join(timeout=10)
        assert not late.is_alive() and server.pool.queued == 6  # refused, the rest held
        released_at = time.monotonic()
        release.set()
        for thread in threads:
            thread.join(timeout=30)
        stopping.join(timeout=30)
        stopped_in = time.monotonic() - released_at
    finally:
        release.set()
    assert not stopping.is_alive() and stopped_in < 5, stopped_in
    assert results.pop("late").startswith(f"UNAVAILABLE: {NEVER_SENT}")
    assert results == {"slow": "OK", **{f"queued-{k}": "OK" for k in range(6)}}


def test_a_call_received_before_the_drain_counts_as_running_until_it_ends(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """A Lookup opened before the drain began whose request message comes only after:
    it is answered, and while it runs it counts as running, so when it ends the drain
    still waits for the other call it began with."""
    table = random_table(20, 4, seed=6)
    server = start_server({"t": table, "slow": table}, workers=4)
    target = f"127.0.0.1:{server.port}"
    drained: list[bool] = []
    draining = threading.Thread(
        target=lambda: drained.append(server._interceptor.drain(timeout=20))
    )
    with (
        grpc.insecure_channel(target) as channel,
        EmbeddingClient(target, max_attempts=1, timeout=30) as client,
    ):
        held = threading.Thread(target=client.lookup, args=([1], "slow"))
        late = LateLookups(channel, "t", [7])
        try:
            held.start()
            assert slow_lookups.entered.wait(10)
            call = late.open()
            time.sleep(0.5)  # for the call to open on the server (nothing to time)
            draining.start()
            until(lambda: server.draining)
            late.send.set()
            answer = call.result(timeout=10)
            np.testing.assert_array_equal(
                np.frombuffer(answer.vectors, "<f4").reshape(1, 4), table[[7]]
            )
            time.sleep(0.3)
            assert draining.is_alive()  # the held call still runs: the drain waits for it
            slow_lookups.release.set()
            draining.join(timeout=20)
            assert drained == [True]
        finally:
            late.send.set()
            slow_lookups.release.set()
            for thread in (held, draining):
                if thread.ident is not None:  # started
                    thread.join(timeout=20)


def test_calls_that_arrive_while_draining_are_refused_and_counted(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """In a stop's last phase (here at once: no connection max age to wait for), while
    it waits for a running call, unary and stream calls that arrive on an open
    connection are refused with UNAVAILABLE and what to do, each counted as started and
    handled under its own type and method; health and the inference protocol's probes
    still answer (NOT_SERVING; live, not ready), and the running call ends well."""
    release = slow_lookups.release
    table = random_table(50, 4, seed=5)
    server = start_server({"t": table, "slow": table}, workers=4, connection_age_s=0)
    target = f"127.0.0.1:{server.port}"
    slow_result: list[np.ndarray] = []

    def slow_call() -> None:
        with EmbeddingClient(target, max_attempts=1, timeout=30) as client:
            slow_result.append(client.lookup([1, 2], "slow"))

    slow = threading.Thread(target=slow_call)
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 20})
    refusal = "the server is shutting down: retry on another server"
    cells = [(kind, method, code) for kind, method in
             (("unary", "Lookup"), ("bidi_stream", "LookupStream"))
             for code in (None, "UNAVAILABLE")]  # fmt: skip
    try:
        slow.start()
        until(lambda: server.pool.running == 1)
        before = {cell: grpc_count(*cell) for cell in cells}
        with (
            EmbeddingClient(target, max_attempts=1, timeout=10) as client,
            grpc.insecure_channel(target) as channel,
        ):
            probes = oip_grpc.GRPCInferenceServiceStub(channel)
            assert probes.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
            assert client.health() == "SERVING"  # both connections open before the stop
            stopping.start()
            until(lambda: server.draining)
            for _ in range(2):  # the second call is refused by the handler made for the first
                with pytest.raises(EmbeddingError, match=exactly(f"UNAVAILABLE: {refusal}")):
                    client.lookup([3], "t")
            with pytest.raises(EmbeddingError, match=exactly(f"UNAVAILABLE: {refusal}")):
                list(client.lookup_stream(iter([np.array([3])]), table="t"))
            assert client.health() == "NOT_SERVING"
            assert probes.ServerLive(oip.ServerLiveRequest(), timeout=10).live
            assert not probes.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
            model = oip.ModelReadyRequest(name="t")
            assert not probes.ModelReady(model, timeout=10).ready
        counted = {cell: grpc_count(*cell) - before[cell] for cell in cells}
        assert counted == {
            ("unary", "Lookup", None): 2, ("unary", "Lookup", "UNAVAILABLE"): 2,
            ("bidi_stream", "LookupStream", None): 1,
            ("bidi_stream", "LookupStream", "UNAVAILABLE"): 1,
        }  # fmt: skip
        release.set()
        slow.join(timeout=30)
        stopping.join(timeout=30)
    finally:
        release.set()
    assert not stopping.is_alive() and not slow.is_alive()
    np.testing.assert_array_equal(slow_result[0], table[[1, 2]])


def test_a_handler_that_aborts_keeps_its_code(caplog: pytest.LogCaptureFixture) -> None:
    """The interceptor's contract with handlers that set their own status (grpc's health
    service does, for a service it does not know): the caller gets the handler's code and
    message, the call is counted under that code, and it is not logged as a server bug."""

    async def aborting(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler's own words")
        return b""  # never reached

    async def serve_and_call() -> grpc.aio.AioRpcError:
        interceptor = StatusInterceptor()
        interceptor.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(
                "test.Aborting", {"Call": grpc.unary_unary_rpc_method_handler(aborting)}
            ),)
        )  # fmt: skip
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((interceptor,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await channel.unary_unary("/test.Aborting/Call")(b"", timeout=10)
            return raised.value
        finally:
            await server.stop(0)

    caplog.set_level(logging.ERROR, logger="embedding_server.transport.interceptor")
    before = grpc_count("unary", "Call", "FAILED_PRECONDITION", service="test.Aborting")
    error = asyncio.run(serve_and_call())
    assert (error.code(), error.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION, "the handler's own words"
    )  # fmt: skip
    assert grpc_count("unary", "Call", "FAILED_PRECONDITION", service="test.Aborting") == (
        before + 1
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_call_the_caller_cancels_or_outlives_its_deadline_is_counted_so(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """Lookups held in the handler pool: one its caller cancels is counted CANCELLED (one
    cancelled under a second before its deadline too), one whose deadline passes
    DEADLINE_EXCEEDED, none OK (they were, before: the
    dashboard's error rate left them out); the server still answers after."""
    table = random_table(10, 4, seed=11)
    server = start_server({"t": table, "slow": table}, workers=4)
    codes = ("OK", "CANCELLED", "DEADLINE_EXCEEDED")
    before = {code: grpc_count("unary", "Lookup", code) for code in codes}

    def counted() -> dict[str, float]:
        return {code: grpc_count("unary", "Lookup", code) - before[code] for code in codes}

    request = pb.LookupRequest(table="slow", ids_list=[1])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        lookup = pb_grpc.EmbeddingServiceStub(channel).Lookup
        try:
            cancelled = lookup.future(request, timeout=30)
            assert slow_lookups.entered.wait(10)
            cancelled.cancel()
            until(lambda: counted()["CANCELLED"] == 1)
            near_its_deadline = lookup.future(request, timeout=0.9)  # cancelled ~0.8 s before
            until(lambda: slow_lookups.started == 2)
            near_its_deadline.cancel()
            until(lambda: counted()["CANCELLED"] == 2)
            with pytest.raises(grpc.RpcError) as late:
                lookup(request, timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            until(lambda: counted()["DEADLINE_EXCEEDED"] == 1)
            assert counted()["OK"] == 0
        finally:
            slow_lookups.release.set()
        answer = lookup(pb.LookupRequest(table="t", ids_list=[2]), timeout=10)
    np.testing.assert_array_equal(np.frombuffer(answer.vectors, "<f4"), table[2])
    assert counted() == {"OK": 1, "CANCELLED": 2, "DEADLINE_EXCEEDED": 1}


def test_a_stream_grpc_stops_taking_answers_from_is_counted_cancelled() -> None:
    """When a caller cancels a stream just as an answer is ready, grpc may, instead of
    cancelling the handler, stop taking its answers (it closes the handler's generator):
    counted CANCELLED too, not OK. Driven here through the interceptor itself, as grpc
    does, since the race cannot be made to happen on purpose through a connection."""

    async def echo(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield request

    class Context:
        def time_remaining(self) -> float:
            return 20.0

    async def call_and_close() -> None:
        interceptor = StatusInterceptor()
        handler = grpc.stream_stream_rpc_method_handler(echo)
        stream = interceptor._streaming(handler, "test.Echo", "Stream").stream_stream

        async def requests() -> Any:
            yield b"one"
            yield b"two"

        answers = stream(requests(), Context())
        assert await anext(answers) == b"one"
        await answers.aclose()  # grpc stopped taking answers

    before = grpc_count("bidi_stream", "Stream", "CANCELLED", service="test.Echo")
    ok = grpc_count("bidi_stream", "Stream", "OK", service="test.Echo")
    asyncio.run(call_and_close())
    assert grpc_count("bidi_stream", "Stream", "CANCELLED", service="test.Echo") == before + 1
    assert grpc_count("bidi_stream", "Stream", "OK", service="test.Echo") == ok


def test_a_stop_past_its_grace_says_calls_were_still_running(
    start_server: ServerFactory, slow_lookups: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A call still running (its handler thread held) when the grace period ends: the
    stop does not wait longer, and says so."""
    caplog.set_level(logging.WARNING, logger="embedding_server")
    table = random_table(10, 4, seed=6)
    server = start_server({"slow": table}, workers=2)
    outcome: list[str] = []

    def call() -> None:
        with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=30) as client:
            try:
                client.lookup([1], "slow")
                outcome.append("OK")
            except EmbeddingError as exc:
                outcome.append(exc.code.name)

    caller = threading.Thread(target=call)
    try:
        caller.start()
        assert slow_lookups.entered.wait(10)
        started = time.monotonic()
        server.stop(grace=0.5)
        assert time.monotonic() - started < 5
    finally:
        slow_lookups.release.set()
        caller.join(timeout=30)
    assert "calls still running after the 0.5 s grace period: cancelling" in caplog.messages
    assert outcome and outcome[0] != "OK"  # cut off at the end of the grace period


def test_an_unexpected_error_is_internal_logged_and_counted(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a handler reaches the caller as INTERNAL naming only the error's type (the
    rest is in the server log, with the method and traceback), is counted and timed under
    INTERNAL, and the server goes on answering."""

    def broken(self: Lookups, table_name: str, *args: object, **kwargs: object) -> object:
        raise ZeroDivisionError("a bug's own words, for the log only")

    monkeypatch.setattr(Lookups, "lookup", broken)
    monkeypatch.setattr(Lookups, "plain", broken)  # the short way of plain lookups
    server = start_server({"t": random_table(10, 4)})
    caplog.set_level(logging.ERROR, logger="embedding_server.transport.interceptor")
    timed = {"grpc_type": "unary", "grpc_service": "embedding.v1.EmbeddingService",
             "grpc_method": "Lookup", "grpc_code": "INTERNAL"}  # fmt: skip

    def counted() -> tuple[float, float, float]:
        timings = REGISTRY.get_sample_value("grpc_server_handling_seconds_count", timed)
        started = grpc_count("unary", "Lookup")
        return started, grpc_count("unary", "Lookup", "INTERNAL"), timings or 0.0

    before = counted()
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=10) as client:
        with pytest.raises(
            EmbeddingError,
            match=exactly("INTERNAL: internal error (ZeroDivisionError); see the server log"),
        ):
            client.lookup([1], "t")
        assert client.health() == "SERVING"
        assert [t.name for t in client.tables()] == ["t"]
    after = counted()
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1, 1, 1)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == (
        "/embedding.v1.EmbeddingService/Lookup failed on an unexpected error"
    )
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_health_answers_are_counted_under_the_code_the_prober_gets(
    start_server: ServerFactory,
) -> None:
    """grpc's health service answers a service it does not know by aborting the call with
    NOT_FOUND itself: the counters must still say NOT_FOUND, not OK or INTERNAL."""
    server = start_server({"t": random_table(10, 4)})

    def handled(code: str) -> float:
        return grpc_count("unary", "Check", code, service="grpc.health.v1.Health")

    before = {code: handled(code) for code in ("OK", "NOT_FOUND")}
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=10) as client:
        assert client.health() == "SERVING"
        with pytest.raises(EmbeddingError) as raised:
            client.health("no.such.Service")
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
    # grpc.aio's abort sends the status before the handler's exception reaches the
    # interceptor, which counts it: a moment after the caller has its answer.
    until(lambda: handled("NOT_FOUND") > before["NOT_FOUND"])
    assert {code: handled(code) - before[code] for code in before} == {"OK": 1, "NOT_FOUND": 1}


def test_one_hot_matmuls_wait_for_a_place_within_their_deadline(
    start_server: ServerFactory, held_matmuls: SimpleNamespace
) -> None:
    """With --dense-concurrency 1, a second LookupDense waits for the first and gives up
    at its deadline; lookups go on meanwhile."""
    release, started = held_matmuls.release, held_matmuls.entered
    table = random_table(50, 4, seed=4)
    server = start_server({"t": table}, dense_concurrency=1)
    target = f"127.0.0.1:{server.port}"
    first: list[np.ndarray] = []
    with EmbeddingClient(target, max_attempts=1, timeout=30) as client:
        running = threading.Thread(target=lambda: first.append(client.lookup_dense([1, 2])))
        running.start()
        try:
            assert started.wait(10)
            with pytest.raises(EmbeddingError) as waited:
                client.lookup_dense([3], timeout=2)
            assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--dense-concurrency" in waited.value.details
            np.testing.assert_array_equal(client.lookup([3]), table[[3]])
        finally:
            release.set()
            running.join(timeout=30)
        np.testing.assert_array_equal(first[0], table[[1, 2]])
        np.testing.assert_array_equal(client.lookup_dense([3]), table[[3]])  # the place is free


def test_kill9_and_restart_under_load(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", WEIGHTS)
    port = free_port()
    process = spawn_server(tmp_path / "t.npy", port)
    with Load(f"127.0.0.1:{port}", threads=4, wait_for_ready=True, timeout=30) as load:
        time.sleep(1.0)
        process.kill()  # SIGKILL: no drain, connections die mid-call
        process.communicate(timeout=30)
        killed_at = load.ok
        time.sleep(0.5)
        process = spawn_server(tmp_path / "t.npy", port)
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
    server = start_server({"t": random_table(100, 4)}, max_request_bytes=4096)
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
    process = spawn_server(path, free_port())
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


def test_a_call_that_outlives_the_grace_is_cut_off_and_the_process_exits_0() -> None:
    """A LookupDense of 4,000 ids over 1,000,000 x 32 rows runs for many seconds; SIGTERM
    with a 1 s grace: the call is cancelled, the log says so, and the process exits 0
    within seconds (it aborted with status 134 before: "terminate called without an
    active exception", a crash to Kubernetes and systemd)."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--demo-rows", "1000000", "--demo-dim", "32", "--grace", "1",
         "--max-dense-macs", "200000000000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    errors: list[EmbeddingError] = []

    def dense() -> None:
        with EmbeddingClient(f"127.0.0.1:{port}", max_attempts=1, timeout=120) as client:
            try:
                client.lookup_dense(np.arange(4000) * 250)
            except EmbeddingError as exc:
                errors.append(exc)

    caller = threading.Thread(target=dense)
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        caller.start()
        time.sleep(2.0)  # the matmul is under way (it takes far longer than that)
        assert caller.is_alive()
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
        caller.join(timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert took < 10, took
    assert "calls still running after the 1.0 s grace period: cancelling" in output
    assert "stopped; calls cut off at the grace period" in output
    assert "terminate called" not in output
    assert errors and errors[0].code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    """An open client connection holds a stop for up to the grace period (it is asked to
    go at its max age, here 600 s): Ctrl-C again, or a second SIGTERM, stops at once. A
    second signal within half a second (one sent to the process group and to the
    process) does not count."""
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    port = free_port()
    process = spawn_server(path, port, "--grace", "60", "--connection-max-age", "600")
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", max_attempts=1, timeout=10) as client:
            assert client.lookup([1]).shape == (1, WEIGHTS.shape[1])
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)
            process.send_signal(signal.SIGINT)  # within half a second: the same signal
            time.sleep(1.5)
            assert process.poll() is None  # still waiting for the client to leave
            assert client.lookup([2]).shape == (1, WEIGHTS.shape[1])  # and answering it
            process.send_signal(signal.SIGINT)
            output = process.communicate(timeout=10)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "received SIGINT again: stopping now" in output
    assert "waiting up to 60.0 s for 1 open ones to close" in output
