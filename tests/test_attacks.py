"""Attacks through real connections (issue 28's list and neighbours): each is refused early
with a precise code and a bounded message, costs the server no more memory or time than a
normal call of its size, and harms no other caller."""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from embedding_client import EmbeddingClient, EmbeddingError, Security
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_client.proto import grpc_service_pb2 as oip
from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc
from embedding_client.shards import Shard
from embedding_server.core.sharding import ShardRows
from embedding_server.core.sources import write_table

from .conftest import (
    BIN,
    ServerFactory,
    admin_settings,
    free_port,
    random_table,
    server_env,
    spawn_server,
    until,
    wait_serving,
)

TABLE = random_table(300, 8, seed=41)
MAX_DETAILS = 1000  # every message quotes caller text in part: far below this
LOOKUP = "/embedding.v1.EmbeddingService/Lookup"


def _code(call: Any, request: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=20, **kwargs)
    except grpc.RpcError as exc:
        assert len(exc.details() or "") <= MAX_DETAILS, exc.details()[:300]
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def _infer(shape: list[int], raw: bytes = b"", **parameters: Any) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="t")
    tensor = request.inputs.add(name="ids", datatype="INT64", shape=shape)
    del tensor  # raw contents go beside the inputs
    request.raw_input_contents.append(raw)
    for name, value in parameters.items():
        setattr(request.parameters[name], value[0], value[1])
    return request


# ------------------------------------------------------------- 1. zero ids, huge dimensions


def test_zero_ids_with_huge_dims_are_refused_before_anything_is_sized(tmp_path: Path) -> None:
    """23-byte requests of no ids shaped [2^62, 2^62, 0] or [3, 2^62, 0], on every lookup
    RPC and ModelInfer: INVALID_ARGUMENT (was INTERNAL: a ValueError in reshape). Pooled
    [2^26, 0] (11 bytes, 2^26 empty bags) is RESOURCE_EXHAUSTED on the bag count before
    any bag is made (it allocated 512 MiB first), [2^40, 0] too large a shape (was a
    MemoryError). The server's peak memory does not move; a normal call follows."""
    np.save(tmp_path / "t.npy", TABLE)
    port = free_port()
    process = spawn_server(tmp_path / "t.npy", port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            assert _code(stub.Lookup, pb.LookupRequest(ids_list=[1]))[0] == grpc.StatusCode.OK
            before = _peak_rss(process.pid)
            for dims in ([2**62, 2**62, 0], [3, 2**62, 0], [2**40, 0]):
                shape = pb.Shape(dims=dims)
                for call in (stub.Lookup, stub.LookupDense):
                    for pooling in (pb.POOLING_NONE, pb.POOLING_SUM):
                        request = pb.LookupRequest(ids_shape=shape, pooling=pooling)
                        code, details = _code(call, request)
                        assert code == grpc.StatusCode.INVALID_ARGUMENT, (dims, code, details)
                        assert "is too large" in details
                many = pb.LookupManyRequest()
                many.features.add(feature="f", lookup=pb.LookupRequest(ids_shape=shape))
                assert _code(stub.LookupMany, many)[0] == grpc.StatusCode.INVALID_ARGUMENT
                code, details = _code(infer, _infer(dims))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "is too large" in details
            bags = pb.LookupRequest(ids_shape=pb.Shape(dims=[2**26, 0]), pooling=pb.POOLING_SUM)
            assert len(bags.SerializeToString()) < 16
            for call in (stub.Lookup, stub.LookupDense):
                code, details = _code(call, bags)
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert details.startswith("67108864 bags in one request")
            many = pb.LookupManyRequest()
            many.features.add(feature="f", lookup=bags)
            code, details = _code(stub.LookupMany, many)
            assert (code, details[:13]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "feature 'f': ")
            code, details = _code(infer, _infer([2**26, 0], pooling=("string_param", "sum")))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            grown = _peak_rss(process.pid) - before
            answer = stub.Lookup(pb.LookupRequest(ids_list=[7]), timeout=10)
    finally:
        process.terminate()
        process.communicate(timeout=60)
    assert grown < 64 << 20, f"peak memory grew {grown >> 20} MiB"
    np.testing.assert_array_equal(np.frombuffer(answer.vectors, "<f4"), TABLE[7])


# ------------------------------------------------------------- 2-4. the inference protocol


def test_model_infer_quotes_caller_text_in_part(start_server: ServerFactory) -> None:
    """A 100 KB parameter value or a shape of 100,000 dims in a ModelInfer: the refusal
    says what is wrong in under 1,000 characters (a whole value in the message turned
    INVALID_ARGUMENT into a transport error)."""
    server = start_server({"t": TABLE})
    big = "x" * 100_000
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        cases = [
            (_infer([1], b"\x01" + b"\x00" * 7, datatype=("string_param", big)), "datatype 'xxx"),
            (_infer([1], b"\x01" + b"\x00" * 7, padding_id=("string_param", big)),
             "must be an integer row id, got 'xxx"),
            (_infer([1], b"\x01" + b"\x00" * 7, dense=("string_param", big)), "true or false"),
            (_infer([1] * 100_000), "has 100000 dims; at most 16"),
        ]  # fmt: skip
        for request, said in cases:
            code, details = _code(infer, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details[:200]
            assert said in details, details[:200]


def test_model_infer_refuses_a_padding_id_past_int64_and_two_kinds_of_contents(
    start_server: ServerFactory,
) -> None:
    """padding_id as uint64 2^63 or 2^64 - 1: INVALID_ARGUMENT (was INTERNAL). Ids sent both
    as raw bytes and as typed contents, which the protocol forbids: INVALID_ARGUMENT naming
    it (raw won silently, even when the two disagreed). A bool where an integer goes:
    refused too."""
    server = start_server({"t": TABLE})
    one = np.array([1], "<i8").tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for value in (2**63, 2**64 - 1):
            code, details = _code(infer, _infer([1], one, padding_id=("uint64_param", value)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details == f"parameter 'padding_id' {value} is not an int64 row id"
        code, details = _code(infer, _infer([1], one, padding_id=("bool_param", True)))
        assert (code, details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameter 'padding_id' must be an integer row id, got True",
        )
        both = _infer([1], one)
        both.inputs[0].contents.int64_contents.append(2)
        code, details = _code(infer, both)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "sent twice, as typed contents and as raw_input_contents" in details
        fine = _infer([1], one, padding_id=("uint64_param", 1))
        answer = infer(fine, timeout=10)
    np.testing.assert_array_equal(
        np.frombuffer(answer.raw_output_contents[0], "<f4"), np.zeros(8, np.float32)
    )


# ------------------------------------------------------------- 5 and 11. credentials


def test_two_authorization_headers_are_refused(start_server: ServerFactory) -> None:
    """[wrong, admin] let the admin one win (the last Bearer entry counted): any call with
    more than one authorization entry is UNAUTHENTICATED, whatever their order."""
    server = start_server(
        {"t": TABLE}, auth_tokens=("data-token",), admin_tokens=("admin-token",)
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        lookups = pb_grpc.EmbeddingServiceStub(channel)
        admin = pb_grpc.EmbeddingAdminStub(channel)
        pairs = [("wrong", "admin-token"), ("admin-token", "wrong"),
                 ("admin-token", "admin-token"), ("data-token", "admin-token")]  # fmt: skip
        calls = [(lookups.Lookup, pb.LookupRequest(ids_list=[1])),
                 (admin.ReloadTable, pb.ReloadTableRequest(table="t"))]  # fmt: skip
        for first, second in pairs:
            metadata = (("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}"))
            for call, request in calls:
                code, details = _code(call, request, metadata=metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (first, second, details)
                assert details.startswith("2 'authorization' metadata entries: send exactly one")
        ok = lookups.Lookup(
            pb.LookupRequest(ids_list=[1]), timeout=10,
            metadata=(("authorization", "Bearer data-token"),),
        )  # fmt: skip
    assert list(ok.shape) == [1, 8]


def test_callers_without_a_credential_hold_no_place(start_server: ServerFactory) -> None:
    """On a server with tokens, 40 unary calls that send headers without a token and no
    message (300 on one connection filled --max-inflight and refused everyone for
    seconds) are refused as they arrive, before their message; health Watch streams,
    which need no credential, stop at --max-health-watches; callers with a token are
    served throughout."""
    server = start_server(
        {"t": TABLE}, auth_tokens=("data-token",), max_inflight=16, max_health_watches=4
    )  # fmt: skip
    target = f"127.0.0.1:{server.port}"
    never = threading.Event()

    def nothing() -> Any:
        never.wait(30)
        yield from ()

    with (
        grpc.insecure_channel(target) as channel,
        EmbeddingClient(target, security=Security(token="data-token"), max_attempts=1) as ok,
    ):
        silent = channel.stream_unary(LOOKUP)
        try:
            refused = [silent.future(nothing(), timeout=20) for _ in range(40)]
            for future in refused:
                assert future.exception(timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
            np.testing.assert_array_equal(ok.lookup([3]), TABLE[[3]])
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=20) for _ in range(4)]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as fifth:
                next(health.Watch(health_pb2.HealthCheckRequest(), timeout=20))
            assert fifth.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(--max-health-watches): use Check" in fifth.value.details()
            assert ok.health() == "SERVING"  # Check is not limited
            np.testing.assert_array_equal(ok.lookup([4]), TABLE[[4]])
            for watch in watches:
                watch.cancel()
            until(lambda: server._interceptor._watches == 0)
        finally:
            never.set()


# ------------------------------------------------------------- 6. paths swapped while resolved


def test_paths_swapped_while_the_server_resolves_them_get_a_clear_code(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory on a reload's and a snapshot's path swapped with a symlink as fast as
    possible while the server resolves it: every answer has a precise code, never
    INTERNAL, and nothing is logged as a server error (it was INTERNAL, EINVAL from
    realpath, with a traceback each time)."""
    tables, snapshots = tmp_path / "tables", tmp_path / "snapshots"
    for folder in (tables, snapshots, tables / "real", snapshots / "real"):
        folder.mkdir()
    np.save(tables / "real" / "t.npy", TABLE)
    server = start_server(
        {"t": TABLE}, **{**admin_settings(), "table_dirs": (str(tables),),
                         "snapshot_dir": str(snapshots)}
    )  # fmt: skip
    caplog.set_level(logging.ERROR)
    stop = threading.Event()

    def swap(root: Path) -> None:
        moving, scratch = root / "moving", root / "scratch"
        while not stop.is_set():
            for make in (lambda: moving.symlink_to(root / "real"), lambda: moving.mkdir()):
                try:
                    make()
                    if moving.is_symlink():
                        moving.unlink()
                    else:
                        moving.rename(scratch)
                        os.rmdir(scratch)
                except OSError:
                    pass

    swappers = [threading.Thread(target=swap, args=(root,)) for root in (tables, snapshots)]
    codes: dict[str, int] = {}
    try:
        for thread in swappers:
            thread.start()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            admin = pb_grpc.EmbeddingAdminStub(channel)
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                for call, request in (
                    (admin.ReloadTable, pb.ReloadTableRequest(table="t", source="moving/t.npy")),
                    (admin.SnapshotTable,
                     pb.SnapshotTableRequest(table="t", path="moving/s.npy", overwrite=True)),
                ):  # fmt: skip
                    code, _ = _code(call, request)
                    codes[code.name] = codes.get(code.name, 0) + 1
    finally:
        stop.set()
        for thread in swappers:
            thread.join(timeout=10)
    assert sum(codes.values()) > 50, codes
    assert set(codes) <= {"OK", "FAILED_PRECONDITION", "INVALID_ARGUMENT"}, codes
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------- 7-8. shards


@pytest.mark.parametrize(
    "shard", ["0/4294967296", "0/9223372036854775808", "1/99999999999999999999"]
)
def test_a_shard_count_past_the_wire_stops_start_up_with_one_line(shard: str) -> None:
    """ShardOf's numbers are uint32 on the wire: `--shard 0/4294967297` started and every
    ListTables was INTERNAL; a count of 2^63 or more stopped start-up with a traceback."""
    done = subprocess.run(
        [str(BIN / "embedding-server"), "--port", "0", "--shard", shard],
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert "at most 4294967295 shards (the wire's ShardOf carries 32-bit numbers)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_shard_file_claiming_more_rows_than_it_could_hold_is_refused_at_once(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A per-shard file whose metadata says shard 0/2 of 2^27 rows while it holds 481:
    refused in well under a second, as damaged (it cost ~1.6 GiB and 7-9 s first)."""
    layout = ShardRows.of(Shard(0, 2), 962)
    metadata = {**layout.metadata(), "embedding.rows": str(1 << 27)}
    rows = random_table(int(layout.owned.size), 8, seed=3)
    with open(tmp_path / "lying.safetensors", "wb") as out:
        write_table(out, ".safetensors", {"t": torch.from_numpy(rows)}, metadata)
    server = start_server(
        {"t": TABLE}, **admin_settings(tmp_path), shard=Shard(0, 2)
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        started = time.monotonic()
        code, details = _code(
            pb_grpc.EmbeddingAdminStub(channel).ReloadTable,
            pb.ReloadTableRequest(table="t", source="lying.safetensors"),
        )
        took = time.monotonic() - started
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "it is damaged" in details and "134217728 rows" in details
    assert took < 1.0, took


# ------------------------------------------------------------- 9-10. LookupMany


def test_lookup_many_is_bounded_by_its_features(start_server: ServerFactory) -> None:
    """100,000 features of no ids blocked the event loop for 2-3.6 s: past --max-features
    a call is refused before any lookup, and a feature of no ids counts one id against
    --max-ids; other callers are answered meanwhile."""
    server = start_server({"t": TABLE}, max_features=64, max_ids=100)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        many = pb_grpc.EmbeddingServiceStub(channel).LookupMany
        flood = pb.LookupManyRequest()
        for k in range(100_000):
            flood.features.add(feature=f"f{k}", lookup=pb.LookupRequest(table="t"))
        started = time.monotonic()
        code, details = _code(many, flood)
        assert time.monotonic() - started < 2
        assert (code, details) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "100000 features in one request; this server takes at most 64 "
            "(--max-features): split them over calls",
        )
        empty = pb.LookupManyRequest()
        for k in range(60):
            empty.features.add(feature=f"f{k}", lookup=pb.LookupRequest(table="t", ids_list=[]))
        empty.features.add(feature="big", lookup=pb.LookupRequest(table="t", ids_list=[1] * 41))
        code, details = _code(many, empty)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.startswith("101 ids over 61 features in one request")
        del empty.features[-1]
        answer = many(empty, timeout=10)
    assert len(answer.results) == 60


def test_lookup_many_dense_counts_the_work_of_all_its_features(
    start_server: ServerFactory,
) -> None:
    """--max-dense-macs was checked per feature: 50 features each at the limit were 50x
    the limit in one call. Their sum is checked now; features within it run."""
    limit = 10 * 300 * 8  # ten ids over the 300 x 8 table
    server = start_server({"t": TABLE}, max_dense_macs=limit)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        many = pb_grpc.EmbeddingServiceStub(channel).LookupManyDense
        request = pb.LookupManyRequest()
        for k in range(50):
            request.features.add(feature=f"f{k}", lookup=pb.LookupRequest(ids_list=[1] * 10))
        code, details = _code(many, request)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.startswith(f"LookupManyDense of 50 features costs {50 * limit} multiply")
        within = pb.LookupManyRequest()
        for k in range(2):
            within.features.add(feature=f"f{k}", lookup=pb.LookupRequest(ids_list=[k] * 5))
        answer = many(within, timeout=10)
    assert [list(r.result.shape) for r in answer.results] == [[5, 8], [5, 8]]


# ------------------------------------------------------------- 12. HTTP/2 rapid reset


def test_a_rapid_reset_flood_on_one_connection_harms_no_other(tmp_path: Path) -> None:
    """Streams opened and reset at once, as fast as one Python connection can (~50,000 in
    3 s), while 4 callers look up on their own connections: every one of their calls is
    answered (47-95% ended CANCELLED, during and after the flood, before one connection
    was held to --max-calls-per-connection streams)."""
    import h2.config
    import h2.connection
    import h2.events

    np.save(tmp_path / "t.npy", TABLE)
    port = free_port()
    process = spawn_server(tmp_path / "t.npy", port)
    outcomes: dict[str, int] = {}
    stop = threading.Event()

    def caller() -> None:
        with EmbeddingClient(f"127.0.0.1:{port}", max_attempts=1, timeout=10) as client:
            while not stop.is_set():
                try:
                    ok = np.array_equal(client.lookup([1, 2, 3]), TABLE[[1, 2, 3]])
                    outcome = "OK" if ok else "WRONG"
                except EmbeddingError as exc:
                    outcome = f"{exc.code.name}: {exc.details}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                time.sleep(0.002)

    callers = [threading.Thread(target=caller) for _ in range(4)]
    sent = 0
    try:
        for thread in callers:
            thread.start()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            headers = [(":method", "POST"), (":scheme", "http"), (":path", LOOKUP),
                       (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
                       ("te", "trailers")]  # fmt: skip
            deadline = time.monotonic() + 3
            closed = False
            while time.monotonic() < deadline and not closed:
                for _ in range(200):
                    stream = conn.get_next_available_stream_id()
                    conn.send_headers(stream, headers)
                    conn.reset_stream(stream)
                    sent += 1
                sock.sendall(conn.data_to_send())
                while not closed and select.select([sock], [], [], 0)[0]:
                    data = sock.recv(1 << 16)
                    events = conn.receive_data(data) if data else []
                    closed = not data or any(
                        isinstance(e, h2.events.ConnectionTerminated) for e in events
                    )
                    sock.sendall(conn.data_to_send())
        time.sleep(1.0)  # and after it
    finally:
        stop.set()
        for thread in callers:
            thread.join(timeout=30)
        process.terminate()
        process.communicate(timeout=60)
    assert sent > 5_000, sent
    failed = {k: v for k, v in outcomes.items() if k != "OK"}
    assert not failed, failed
    assert outcomes["OK"] > 100, outcomes


# ------------------------------------------------------------- 13. the metrics port


def test_silent_connections_to_the_metrics_port_are_bounded(tmp_path: Path) -> None:
    """300 connections that never send a request to /metrics (each held a thread and a
    descriptor for good; ~1,000 starved the gRPC port and broke scraping): at most 16 are
    kept, for at most the timeout; the process's threads stay few, gRPC callers are
    served, and a scrape succeeds once the silent ones are dropped."""
    np.save(tmp_path / "t.npy", TABLE)
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", str(metrics_port), "--table", f"t={tmp_path / 't.npy'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    silent: list[socket.socket] = []
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        threads_before = _threads(process.pid)
        for _ in range(300):
            silent.append(socket.create_connection(("127.0.0.1", metrics_port)))
        time.sleep(0.5)
        assert _threads(process.pid) <= threads_before + 16 + 2
        with EmbeddingClient(f"127.0.0.1:{port}", max_attempts=1, timeout=10) as client:
            np.testing.assert_array_equal(client.lookup([5]), TABLE[[5]])
        started = time.monotonic()
        text = ""
        while not text and time.monotonic() - started < 15:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_port}/metrics", timeout=2
                ) as r:
                    text = r.read().decode()
            except OSError:
                time.sleep(0.2)
        assert "grpc_server_handled_total" in text
        assert time.monotonic() - started < 12  # within the 10 s timeout and a little
    finally:
        for sock in silent:
            sock.close()
        process.terminate()
        process.communicate(timeout=60)


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Threads:\s+(\d+)$", status, re.MULTILINE)
    assert match
    return int(match.group(1))


# ------------------------------------------------------------- and ids counted before decoding


def test_ids_are_counted_before_they_are_decoded(start_server: ServerFactory) -> None:
    """A 15 MiB list of 1-byte varints is 15 million ids: decoding them before --max-ids
    refused them raised the server's peak memory by ~380 MiB (~280 now: protobuf's own
    parse). The count comes first, so a request over the limit is refused for its size
    even when its shape is wrong too, on Lookup and on ModelInfer's typed contents."""
    server = start_server({"t": TABLE}, max_ids=10)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        lookup = pb_grpc.EmbeddingServiceStub(channel).Lookup
        request = pb.LookupRequest(ids_list=[1] * 11, ids_shape=pb.Shape(dims=[5]))
        code, details = _code(lookup, request)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert details.startswith("11 ids in one request; this server takes at most 10")
        typed = oip.ModelInferRequest(model_name="t")
        typed.inputs.add(name="ids", datatype="INT64", shape=[5])
        typed.inputs[0].contents.int64_contents.extend([1] * 11)
        code, details = _code(oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer, typed)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert details.startswith("11 ids in one request; this server takes at most 10")
