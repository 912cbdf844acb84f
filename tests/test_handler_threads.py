"""Handler threads: --workers calls run at once; calls that wait long do not hold a place."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_client.proto import grpc_service_pb2 as oip
from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc
from embedding_server.core.tables import Table
from embedding_server.process.server import EmbeddingServer
from embedding_server.transport.inference import InferenceServicer

from .conftest import (
    TEST_CONFIG,
    LateLookups,
    ServerFactory,
    admin_settings,
    make_store,
    random_table,
    until,
)


def test_open_streams_do_not_take_the_only_running_place(start_server: ServerFactory) -> None:
    """Three streams open at once on a server of one running place and two threads: an
    open stream holds no thread (its messages are answered like calls)."""
    table = random_table(10, 4)
    server = start_server({"t": table}, workers=1, max_threads=2, max_streams=3)
    release = threading.Event()
    target = f"127.0.0.1:{server.port}"

    def held():  # type: ignore[no-untyped-def]
        yield pb.LookupRequest(ids_list=[1])
        release.wait(30)
        yield pb.LookupRequest(ids_list=[5])

    channels = [grpc.insecure_channel(target) for _ in range(3)]
    try:
        streams = [
            pb_grpc.EmbeddingServiceStub(c).LookupStream(held(), timeout=15) for c in channels
        ]
        for stream in streams:
            assert next(stream).HasField("result")  # three streams open on one place
        with EmbeddingClient(target, max_attempts=1, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup([2, 3]), table[[2, 3]])
        release.set()
        for stream in streams:  # and each stream is still there for its next request
            answer = next(stream)
            np.testing.assert_array_equal(
                np.frombuffer(answer.result.vectors, "<f4").reshape(1, 4), table[[5]]
            )
    finally:
        release.set()
        for channel in channels:
            channel.close()


def test_a_long_admin_call_does_not_take_the_only_running_place() -> None:
    """A reload (here one that waits until told) runs beside lookups with --workers 1."""
    table = random_table(10, 4)
    store = make_store({"t": table})
    entered, release = threading.Event(), threading.Event()

    def slow_reload(name: str, source: str) -> Table:
        entered.set()
        assert release.wait(30)
        return store.get(name)

    server = EmbeddingServer(
        replace(TEST_CONFIG, workers=1, **admin_settings()), store, reload=slow_reload
    )
    server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        with EmbeddingClient(target, max_attempts=1, timeout=20) as admin:
            reloading = threading.Thread(target=admin.reload_table, args=("t",))
            reloading.start()
            assert entered.wait(10)
            with EmbeddingClient(target, max_attempts=1, timeout=10) as client:
                for _ in range(3):  # padded: the general way, in the handler pool
                    padded = client.lookup([4, 0], padding_id=0)
                    np.testing.assert_array_equal(padded, [table[4], np.zeros(4)])
            assert reloading.is_alive()  # the reload still waits: the lookups ran beside it
            release.set()
            reloading.join(timeout=20)
    finally:
        release.set()
        server.stop(grace=0)


def test_a_one_hot_matmul_does_not_take_the_only_running_place(
    start_server: ServerFactory, held_matmuls: SimpleNamespace
) -> None:
    """A LookupDense held in its matmul waits as a reload does: with --workers 1, lookups
    that run in the handler pool (padded ones here) are answered meanwhile."""
    table = random_table(10, 4)
    server = start_server({"t": table}, workers=1)
    target = f"127.0.0.1:{server.port}"
    with EmbeddingClient(target, max_attempts=1, timeout=20) as dense_client:
        dense: list[np.ndarray] = []
        holder = threading.Thread(target=lambda: dense.append(dense_client.lookup_dense([3])))
        try:
            holder.start()
            assert held_matmuls.entered.wait(10)
            with EmbeddingClient(target, max_attempts=1, timeout=5) as client:
                padded = client.lookup([4, 0], padding_id=0)
            np.testing.assert_array_equal(padded, [table[4], np.zeros(4)])
            assert holder.is_alive()  # the one-hot matmul still waits: the lookup ran beside it
            assert held_matmuls.threads[0].startswith("rpc_")  # in the handler pool
        finally:
            held_matmuls.release.set()
            holder.join(timeout=20)
    np.testing.assert_allclose(dense[0], table[[3]])


def test_calls_in_the_handler_pool_run_at_most_workers_at_once(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """With --workers 1 a second lookup that runs in the pool starts only once the first
    has finished, though threads are free (--max-threads 4): calls that do not wait do
    not run side by side, trading the GIL."""
    table = random_table(10, 4)
    server = start_server({"slow": table}, workers=1, max_threads=4)
    answers: list[np.ndarray] = []
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=20) as client:
        calls = [
            threading.Thread(target=lambda i=i: answers.append(client.lookup([i], "slow")))
            for i in (1, 2)
        ]
        try:
            for call in calls:
                call.start()
            assert slow_lookups.entered.wait(10)
            time.sleep(0.5)  # time for the second to start, were it let
            assert slow_lookups.started == 1
            slow_lookups.release.set()
            for call in calls:
                call.join(timeout=20)
            assert slow_lookups.started == 2 and len(answers) == 2
        finally:
            slow_lookups.release.set()
            for call in calls:
                call.join(timeout=20)


def test_a_call_in_progress_is_counted_and_then_timed(
    start_server: ServerFactory, slow_lookups: SimpleNamespace
) -> None:
    """While a lookup runs, the dashboard's in-flight gauge counts it under its method;
    once answered the gauge is back, and grpc_server_handling_seconds holds its time."""
    server = start_server({"slow": random_table(10, 4)}, workers=4)
    handled = {"grpc_type": "unary", "grpc_service": "embedding.v1.EmbeddingService",
               "grpc_method": "Lookup", "grpc_code": "OK"}  # fmt: skip

    def inflight() -> float:
        return REGISTRY.get_sample_value("embedding_inflight_requests", {"method": "Lookup"}) or 0

    def seconds() -> float:
        return REGISTRY.get_sample_value("grpc_server_handling_seconds_sum", handled) or 0.0

    counted, timed = inflight(), seconds()
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=20) as client:
        call = threading.Thread(target=client.lookup, args=([1], "slow"))
        try:
            call.start()
            assert slow_lookups.entered.wait(10)
            assert inflight() == counted + 1
            time.sleep(0.3)
        finally:
            slow_lookups.release.set()
            call.join(timeout=20)
    assert inflight() == counted
    assert 0.3 <= seconds() - timed < 30


def test_handlers_written_as_plain_functions_run_in_the_handler_pool(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inference protocol's metadata calls are plain functions: the interceptor runs
    them in the handler pool with their request and context, never on the event loop."""
    threads: list[str] = []
    live = InferenceServicer.ServerLive

    def recorded(self: InferenceServicer, request: object, context: object) -> object:
        threads.append(threading.current_thread().name)
        return live(self, request, context)  # type: ignore[arg-type]

    monkeypatch.setattr(InferenceServicer, "ServerLive", recorded)
    server = start_server({"t": random_table(10, 4)})
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
    assert len(threads) == 1 and threads[0].startswith("rpc_")


@pytest.mark.parametrize("workers", [1, 4])
def test_more_calls_than_workers_all_answer(start_server: ServerFactory, workers: int) -> None:
    table = random_table(1000, 8)
    server = start_server({"t": table}, workers=workers)
    rng = np.random.default_rng(3)
    requests = [rng.integers(0, 1000, size=int(rng.integers(1, 200))) for _ in range(64)]
    results: list[np.ndarray | None] = [None] * len(requests)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1, timeout=30) as client:

        def call(i: int) -> None:
            results[i] = client.lookup(requests[i])

        callers = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(timeout=30)
    for ids, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result, table[ids])


def test_a_writer_holding_a_table_does_not_hold_other_calls(start_server: ServerFactory) -> None:
    """Plain lookups are answered on the server's event loop. While an update holds
    table "t" (its write lock), a lookup of "t" waits off the loop for it, and health,
    another table's lookups and ListTables are answered meanwhile; the waiting lookup
    then reads the updated rows."""
    weights, other = random_table(10, 4, seed=1), random_table(10, 4, seed=2)
    server = start_server({"t": weights, "u": other})
    table = server.store.get("t")
    target = f"127.0.0.1:{server.port}"
    answers: list[np.ndarray] = []
    holding = table.lock.writing()
    holding.__enter__()
    try:
        with EmbeddingClient(target, max_attempts=1, timeout=10) as client:
            waiting = threading.Thread(target=lambda: answers.append(client.lookup([3], "t")))
            waiting.start()
            until(lambda: server.pool.running == 1)  # in the pool, waiting for the writer
            assert client.health() == "SERVING"
            np.testing.assert_array_equal(client.lookup([1, 2], "u"), other[[1, 2]])
            assert {t.name for t in client.tables()} == {"t", "u"}
            assert not answers  # still waiting for the writer
            table.weights[3] = 7.0
            table.version += 1
            holding.__exit__(None, None, None)
            holding = None
            waiting.join(timeout=10)
    finally:
        if holding is not None:
            holding.__exit__(None, None, None)
    assert len(answers) == 1 and (answers[0] == 7.0).all()


def test_calls_whose_request_has_not_come_hold_no_thread(start_server: ServerFactory) -> None:
    """Five Lookup calls open with their request message not sent yet, on a server of one
    handler thread: they wait on the event loop, holding no thread, so a plain and a
    general-way lookup are answered meanwhile; once their requests come, they are too."""
    table = random_table(10, 4, seed=4)
    server = start_server({"t": table}, workers=1, max_threads=1)
    target = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(target) as channel:
        late = LateLookups(channel, "t", [6])
        try:
            waiting = [late.open() for _ in range(5)]
            time.sleep(0.5)  # for the calls to open on the server (nothing to time)
            with EmbeddingClient(target, max_attempts=1, timeout=5) as client:
                np.testing.assert_array_equal(client.lookup([1, 2], "t"), table[[1, 2]])
                padded = client.lookup([1, 2], "t", padding_id=2)  # the general way: the pool
                np.testing.assert_array_equal(padded, np.stack([table[1], np.zeros(4)]))
            assert not any(call.done() for call in waiting)
            late.send.set()
            for call in waiting:
                answer = call.result(timeout=10)
                np.testing.assert_array_equal(
                    np.frombuffer(answer.vectors, "<f4").reshape(1, 4), table[[6]]
                )
        finally:
            late.send.set()
