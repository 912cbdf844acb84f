"""LookupStream: many small lookups over one stream, errors per message, drain on shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from embedding_client import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server.process.server import EmbeddingServer
from embedding_server.transport.interceptor import StatusInterceptor

from .conftest import ServerFactory, grpc_count, random_table, until


def test_stream_answers_every_batch_in_order(
    client: EmbeddingClient, tables: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 1000, size=int(rng.integers(0, 50))) for _ in range(200)]
    batches.append(np.array(7))  # a scalar id
    results = list(client.lookup_stream(iter(batches), table="main", dtype="float16"))
    assert len(results) == len(batches)
    for ids, result in zip(batches, results, strict=True):
        assert result.table == "main" and result.version == 1
        np.testing.assert_array_equal(result.vectors, tables["main"][ids].astype(np.float16))


def test_a_refused_batch_does_not_end_the_stream(server: EmbeddingServer) -> None:
    requests = [
        pb.LookupRequest(table="main", ids_list=[1, 2]),
        pb.LookupRequest(table="main", ids_list=[5000]),
        pb.LookupRequest(table="nope", ids_list=[1]),
        pb.LookupRequest(table="main", ids=b"\x01\x02"),
        pb.LookupRequest(table="main", ids_list=[3]),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answers = list(pb_grpc.EmbeddingServiceStub(channel).LookupStream(iter(requests)))
    assert [a.sequence for a in answers] == [0, 1, 2, 3, 4]
    assert [a.HasField("result") for a in answers] == [True, False, False, False, True]
    codes = [a.error.code for a in answers if a.HasField("error")]
    assert codes == [
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
    ]
    assert "id 5000 at position 0 is out of range" in answers[1].error.message


def test_client_raises_the_first_refused_batch(client: EmbeddingClient) -> None:
    stream = client.lookup_stream([[1], [2000], [3]], table="main")
    assert next(stream).vectors.shape == (1, 16)
    with pytest.raises(EmbeddingError) as raised:
        next(stream)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "id 2000" in raised.value.details


def test_async_stream(server: EmbeddingServer, tables: dict[str, np.ndarray]) -> None:
    async def run() -> list[np.ndarray]:
        async with AsyncEmbeddingClient(f"127.0.0.1:{server.port}") as client:
            return [r.vectors async for r in client.lookup_stream([[1, 2], [3]], table="main")]

    first, second = asyncio.run(run())
    np.testing.assert_array_equal(first, tables["main"][[1, 2]])
    np.testing.assert_array_equal(second, tables["main"][[3]])


def test_stream_needs_a_token_when_auth_is_on(start_server: ServerFactory) -> None:
    server = start_server({"t": random_table(10, 4)}, auth_tokens=("tok",))
    with (
        EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as anonymous,
        pytest.raises(EmbeddingError) as raised,
    ):
        list(anonymous.lookup_stream([[1]]))
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_drain_does_not_wait_for_idle_streams(start_server: ServerFactory) -> None:
    weights = random_table(500, 8, seed=8)
    server = start_server({"t": weights}, grace_s=30)
    release = threading.Event()
    answers: list[pb.LookupStreamResponse] = []
    status: list[grpc.StatusCode] = []

    def requests():  # type: ignore[no-untyped-def]
        yield pb.LookupRequest(ids_list=[1])
        yield pb.LookupRequest(ids_list=[2, 3])
        release.wait(60)  # then the stream sits idle, open, with nothing in progress

    def consume() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            try:
                for answer in pb_grpc.EmbeddingServiceStub(channel).LookupStream(requests()):
                    answers.append(answer)
            except grpc.RpcError as exc:
                status.append(exc.code())

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 20
    while len(answers) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(answers) == 2
    started = time.monotonic()
    server.stop()  # grace 30 s: an idle stream must not hold it that long
    elapsed = time.monotonic() - started
    consumer.join(timeout=30)
    release.set()
    assert elapsed < 5, f"stop took {elapsed:.1f} s"
    assert status and status[0] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    np.testing.assert_array_equal(
        np.frombuffer(answers[1].result.vectors, "<f4").reshape(2, 8), weights[[2, 3]]
    )


def test_a_drain_that_runs_out_of_time_ends_idle_streams_only(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """When the drain's wait ends with an answer still in progress, it ends the streams
    that wait for a message and leaves the one answering alone: that answer arrives."""
    table = random_table(20, 4, seed=12)
    server = start_server({"t": table, "slow": table}, workers=4)
    release = threading.Event()
    answers: list[pb.LookupStreamResponse] = []
    status: list[tuple[grpc.StatusCode, str]] = []

    def stream(first: pb.LookupRequest) -> None:
        def requests():  # type: ignore[no-untyped-def]
            yield first
            release.wait(60)

        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            try:
                for answer in pb_grpc.EmbeddingServiceStub(channel).LookupStream(requests()):
                    answers.append(answer)
            except grpc.RpcError as exc:
                status.append((exc.code(), exc.details()))

    idle = threading.Thread(target=stream, args=(pb.LookupRequest(table="t", ids_list=[1]),))
    busy = threading.Thread(target=stream, args=(pb.LookupRequest(table="slow", ids_list=[2]),))
    try:
        idle.start()
        deadline = time.monotonic() + 20
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) == 1  # the idle stream's one answer
        busy.start()
        assert slow_lookups.entered.wait(20)
        assert server._interceptor.drain(timeout=0.3) is False  # the busy one still runs
        idle.join(timeout=20)
        assert status == [
            (grpc.StatusCode.CANCELLED, "the server is shutting down: reopen the stream elsewhere")
        ]
        slow_lookups.release.set()
        deadline = time.monotonic() + 20
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) == 2 and len(status) == 1  # answered, not ended
        np.testing.assert_array_equal(
            np.frombuffer(answers[1].result.vectors, "<f4").reshape(1, 4), table[[2]]
        )
    finally:
        release.set()
        slow_lookups.release.set()
        idle.join(timeout=30)
        busy.join(timeout=30)


def test_a_stream_answering_as_the_stop_begins_ends_after_that_answer_with_what_to_do(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """A stop begins while a stream computes an answer: the answer is delivered, then the
    stream ends with UNAVAILABLE saying to resend the rest elsewhere (a stream holds its
    connection open and cannot be handed to another server), counted so; a stream opened
    during the stop is refused the same way; unary calls on the open connection are still
    answered."""
    table = random_table(20, 4, seed=9)
    server = start_server({"t": table, "slow": table}, workers=4)
    target = f"127.0.0.1:{server.port}"
    more = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield pb.LookupRequest(table="slow", ids_list=[1])
        more.wait(30)
        yield pb.LookupRequest(table="t", ids_list=[2])

    def silent():  # type: ignore[no-untyped-def]
        more.wait(30)
        yield from ()

    stopping = threading.Thread(target=server.stop, kwargs={"grace": 20})

    def counts() -> tuple[float, float]:
        started = grpc_count("bidi_stream", "LookupStream")
        return started, grpc_count("bidi_stream", "LookupStream", "UNAVAILABLE")

    before = counts()
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.EmbeddingServiceStub(channel)
    try:
        stream = stub.LookupStream(requests(), timeout=30)
        assert slow_lookups.entered.wait(10)
        stopping.start()
        until(lambda: server.stopping and server._interceptor._streams_closed)
        with pytest.raises(grpc.RpcError) as late_stream:  # it sends nothing: refused anyway
            next(stub.LookupStream(silent(), timeout=10))
        unary = stub.Lookup(pb.LookupRequest(table="t", ids_list=[4]), timeout=10)
        slow_lookups.release.set()
        first = next(stream)
        with pytest.raises(grpc.RpcError) as raised:  # ended with no further message sent
            next(stream)
        after = counts()
    finally:
        more.set()
        slow_lookups.release.set()
        channel.close()
        stopping.join(timeout=30)
    np.testing.assert_array_equal(
        np.frombuffer(first.result.vectors, "<f4").reshape(1, 4), table[[1]]
    )
    np.testing.assert_array_equal(np.frombuffer(unary.vectors, "<f4").reshape(1, 4), table[[4]])
    for refused in (raised.value, late_stream.value):
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.details() == "the server is shutting down: resend the rest elsewhere"
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)  # started, refused
    assert not stopping.is_alive()


def test_drain_waits_for_each_stream_answer_in_progress_and_no_longer() -> None:
    """The drain's count of stream answers in progress, through the interceptor itself:
    it waits while any is, returns as the last one ends (not at its timeout), and refuses
    new ones once it began."""
    interceptor = StatusInterceptor()
    assert interceptor._enter() and interceptor._enter()  # two answers in progress
    interceptor._leave()
    assert interceptor.drain(timeout=0.3) is False  # one is still running
    assert not interceptor._enter()  # draining: no new answer starts
    ending = threading.Timer(0.3, interceptor._leave)
    started = time.monotonic()
    ending.start()
    try:
        assert interceptor.drain(timeout=20) is True
        assert time.monotonic() - started < 5  # woken as the count reached 0
    finally:
        ending.cancel()


def test_a_drain_waits_for_the_last_call_to_its_timeout_without_spinning() -> None:
    """The drain sleeps between looks, however the count moved before it (a call that
    ended before it began, one that ends while another still runs), and waits for the
    last call up to its own timeout, not less."""
    interceptor = StatusInterceptor()
    assert interceptor._enter()
    interceptor._leave()  # a call answered before the drain
    assert interceptor._enter() and interceptor._enter()  # two running as it begins
    endings = [threading.Timer(0.3, interceptor._leave), threading.Timer(1.4, interceptor._leave)]
    started, cpu = time.monotonic(), time.thread_time()
    for ending in endings:
        ending.start()
    try:
        assert interceptor.drain(timeout=2.0) is True  # the last ended 0.6 s before its end
        waited, spent = time.monotonic() - started, time.thread_time() - cpu
        assert waited >= 1.3
        assert spent < 0.25, f"the drain spun: {spent:.2f} s of CPU in {waited:.2f} s"
    finally:
        for ending in endings:
            ending.cancel()


def test_a_stream_cancelled_during_an_answer_leaves_nothing_running(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """A caller cancels its stream while the server computes an answer: the stream is
    counted as CANCELLED, and once that answer is done it no longer counts as running,
    so a stop does not wait for it."""
    table = random_table(20, 4, seed=10)
    server = start_server({"slow": table}, workers=4)
    more = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield pb.LookupRequest(table="slow", ids_list=[1])
        more.wait(30)

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    cancelled = grpc_count("bidi_stream", "LookupStream", "CANCELLED")
    try:
        call = pb_grpc.EmbeddingServiceStub(channel).LookupStream(requests(), timeout=30)
        assert slow_lookups.entered.wait(10)
        call.cancel()
        until(lambda: grpc_count("bidi_stream", "LookupStream", "CANCELLED") > cancelled)
        slow_lookups.release.set()  # the answer completes after the caller left
        time.sleep(0.5)
        started = time.monotonic()
        server.stop(grace=20)
        assert time.monotonic() - started < 5
    finally:
        more.set()
        slow_lookups.release.set()
        channel.close()


def test_streams_past_the_limit_are_refused_not_queued(start_server: ServerFactory) -> None:
    server = start_server({"t": random_table(10, 4)}, max_streams=2, workers=4)
    release = threading.Event()
    target = f"127.0.0.1:{server.port}"

    def held():  # type: ignore[no-untyped-def]
        yield pb.LookupRequest(ids_list=[1])
        release.wait(30)

    channels = [grpc.insecure_channel(target) for _ in range(2)]
    open_streams = [pb_grpc.EmbeddingServiceStub(c).LookupStream(held()) for c in channels]
    for stream in open_streams:
        assert next(stream).HasField("result")  # two streams open and answered
    try:
        with EmbeddingClient(target, max_attempts=1, timeout=10) as client:
            with pytest.raises(EmbeddingError) as raised:
                list(client.lookup_stream([[1]]))
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert raised.value.details == (
                "2 streams are open, the most this server takes (--max-streams): "
                "use unary Lookup, or retry later"
            )
            assert client.lookup([2]).shape == (1, 4)  # unary calls still get a thread
        release.set()
        for stream in open_streams:
            assert list(stream) == []  # the held streams end once their requests do
        started = time.monotonic()
        server.stop(grace=20)  # the refused stream left nothing counted as running
        assert time.monotonic() - started < 5
    finally:
        release.set()
        for channel in channels:
            channel.close()
