"""The service end to end: a real gRPC server on a free port, through the real client."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from embedding_client import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server.process.server import EmbeddingServer

from .conftest import WORKED_WEIGHTS, ServerFactory, random_table

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SHAPES = [(), (1,), (64,), (8, 5), (2, 3, 4)]


def _ids(shape: tuple[int, ...], rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, rows, size=shape)


@pytest.mark.parametrize("dtype", list(NUMPY_DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_lookup_equals_numpy_and_torch(
    client: EmbeddingClient, tables: dict[str, np.ndarray], shape: tuple[int, ...], dtype: str
) -> None:
    weights = tables["main"]
    ids = _ids(shape, len(weights), seed=len(shape))
    vectors = client.lookup(ids, table="main", dtype=dtype)
    assert vectors.shape == (*shape, weights.shape[1])
    assert vectors.dtype == np.dtype(NUMPY_DTYPES[dtype])
    # Reference 1: numpy indexing, rounded to the output dtype by ml_dtypes/numpy.
    np.testing.assert_array_equal(vectors, weights[ids].astype(NUMPY_DTYPES[dtype]))
    # Reference 2: torch.nn.functional.embedding, rounded by torch.
    expected = torch.nn.functional.embedding(torch.from_numpy(ids), torch.from_numpy(weights))
    torch_dtype = getattr(torch, dtype)
    np.testing.assert_array_equal(
        vectors.view(np.uint16 if dtype != "float32" else np.uint32),
        expected.to(torch_dtype).view(torch.int16 if dtype != "float32" else torch.int32)
        .numpy().view(np.uint16 if dtype != "float32" else np.uint32),
    )  # fmt: skip


@pytest.mark.parametrize("table", ["main", "odd", "worked", "half", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_lookup_dense_equals_lookup_bit_for_bit(
    client: EmbeddingClient, server: EmbeddingServer, table: str, shape: tuple[int, ...]
) -> None:
    rows = server.store.get(table).rows
    ids = _ids(shape, rows, seed=7)
    gathered = client.lookup(ids, table=table)
    dense = client.lookup_dense(ids, table=table)
    assert dense.shape == gathered.shape
    assert dense.tobytes() == gathered.tobytes()


def test_the_seeds_worked_example(client: EmbeddingClient) -> None:
    for method in (client.lookup, client.lookup_dense):
        vectors = method([0, 2, 1, 2], table="worked")
        np.testing.assert_array_equal(vectors, WORKED_WEIGHTS[[0, 2, 1, 2]])
        assert vectors.tolist() == [
            [np.float32(v) for v in row]
            for row in ([0.1, 0.2, 0.3, 0.4], [0.9, 0.0, 0.1, 0.2],
                        [0.5, 0.6, 0.7, 0.8], [0.9, 0.0, 0.1, 0.2])
        ]  # fmt: skip


def test_default_table_and_version_are_reported(client: EmbeddingClient) -> None:
    result = client.lookup_result([1, 2])
    assert result.table == "main"
    assert result.version == 1


def test_torch_tensor_and_nested_list_ids(
    client: EmbeddingClient, tables: dict[str, np.ndarray]
) -> None:
    expected = tables["main"][[[3, 1], [4, 1]]]
    np.testing.assert_array_equal(client.lookup(torch.tensor([[3, 1], [4, 1]])), expected)
    np.testing.assert_array_equal(client.lookup([[3, 1], [4, 1]]), expected)


@pytest.mark.parametrize("method", ["Lookup", "LookupDense"])
def test_empty_batch_returns_zero_rows(server: EmbeddingServer, method: str) -> None:
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        result = client.lookup_result([], table="odd", dense=method == "LookupDense")
    assert result.vectors.shape == (0, 3)


def test_ids_list_path_matches_bytes_path(
    server: EmbeddingServer, tables: dict[str, np.ndarray]
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        response = stub.Lookup(
            pb.LookupRequest(table="main", ids_list=[5, 6, 7, 8], ids_shape=pb.Shape(dims=[2, 2]))
        )
    assert list(response.shape) == [2, 2, 16]
    vectors = np.frombuffer(response.vectors, dtype="<f4").reshape(2, 2, 16)
    np.testing.assert_array_equal(vectors, tables["main"][[[5, 6], [7, 8]]])


def _raw_call(
    server: EmbeddingServer, request: pb.LookupRequest, dense: bool = False
) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            (stub.LookupDense if dense else stub.Lookup)(request, timeout=10)
    return raised.value


@pytest.mark.parametrize(
    ("request_", "dense", "code", "message"),
    [
        (pb.LookupRequest(table="main", ids_list=[0, 5, 1000]), False,
         grpc.StatusCode.INVALID_ARGUMENT,
         r"id 1000 at position 2 is out of range: table has 1000 rows, ids must be in \[0, 1000\)"),
        (pb.LookupRequest(table="main", ids_list=[0, 1, 2, -1], ids_shape=pb.Shape(dims=[2, 2])),
         True, grpc.StatusCode.INVALID_ARGUMENT, r"id -1 at position 3 \(index \[1, 1\]\)"),
        (pb.LookupRequest(table="main", ids_list=[2**63 - 1]), False,
         grpc.StatusCode.INVALID_ARGUMENT, "id 9223372036854775807 at position 0"),
        (pb.LookupRequest(table="main", ids=b"\x01\x02\x03"), False,
         grpc.StatusCode.INVALID_ARGUMENT, "3 bytes, not a multiple of 8"),
        (pb.LookupRequest(table="main", ids_list=[1, 2, 3], ids_shape=pb.Shape(dims=[2, 2])),
         False, grpc.StatusCode.INVALID_ARGUMENT, r"ids_shape \[2, 2\] holds 4 ids but 3"),
        (pb.LookupRequest(table="main", ids_list=[1], ids_shape=pb.Shape(dims=[-1])),
         False, grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
        (pb.LookupRequest(table="main", ids_list=[1], ids_shape=pb.Shape(dims=[2**62, 2**62])),
         False, grpc.StatusCode.INVALID_ARGUMENT,
         r"is too large: its nonzero dims span 21267647932558653966460912964485513216 cells"),
        (pb.LookupRequest(table="main", ids_list=[0, -1]), False,
         grpc.StatusCode.INVALID_ARGUMENT, r"id -1 at position 1 is out of range"),
        (pb.LookupRequest(table="main", ids_list=[1], dtype=42), False,
         grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype enum value 42"),
        (pb.LookupRequest(table="nope", ids_list=[1]), False,
         grpc.StatusCode.NOT_FOUND, "unknown table 'nope'; this server holds: bf16, half, main"),
        (pb.LookupRequest(table="main", ids=np.zeros(10_001, "<i8").tobytes()), False,
         grpc.StatusCode.RESOURCE_EXHAUSTED, "10001 ids in one request; .* at most 10000"),
        (pb.LookupRequest(table="main", ids=np.zeros(5000, "<i8").tobytes()), True,
         grpc.StatusCode.RESOURCE_EXHAUSTED, "costs 80000000 multiply-adds, over the limit"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_status(
    server: EmbeddingServer,
    request_: pb.LookupRequest,
    dense: bool,
    code: grpc.StatusCode,
    message: str,
) -> None:
    error = _raw_call(server, request_, dense)
    assert error.code() == code
    assert re.search(message, error.details()), error.details()


def test_bad_requests_harm_nothing_else(
    client: EmbeddingClient, tables: dict[str, np.ndarray]
) -> None:
    before = client.lookup([0, 999], table="main").copy()
    with pytest.raises(EmbeddingError):
        client.lookup([0, 1000], table="main")
    with pytest.raises(EmbeddingError):
        client.lookup_dense([-5], table="main")
    after = client.lookup([0, 999], table="main")
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(after, tables["main"][[0, 999]])
    assert client.health() == "SERVING"


def test_client_errors_carry_code_and_message(client: EmbeddingClient) -> None:
    with pytest.raises(EmbeddingError) as raised:
        client.lookup([1], table="missing")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert "unknown table 'missing'" in raised.value.details
    with pytest.raises(EmbeddingError) as raised:
        client.lookup([0.5])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(EmbeddingError) as raised:
        client.lookup([1], dtype="int4")
    assert "unknown dtype 'int4'" in raised.value.details


def test_no_default_table_and_empty_name(start_server: ServerFactory) -> None:
    server = start_server({})
    error = _raw_call(server, pb.LookupRequest(ids_list=[0]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no table name given and the server has no default table" in error.details()


def test_response_over_the_message_limit_is_refused(start_server: ServerFactory) -> None:
    server = start_server({"wide": random_table(10, 1000)}, max_message_bytes=100_000)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        assert client.lookup([1] * 20).shape == (20, 1000)
        with pytest.raises(EmbeddingError) as raised:
            client.lookup([1] * 30)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "response would be 120000 bytes" in raised.value.details
    assert "float16/bfloat16" in raised.value.details


def test_large_responses_pass_default_limits(start_server: ServerFactory) -> None:
    # 65,536 ids x 256 dims of float32 = 64 MiB: 16x gRPC's 4 MiB default.
    weights = random_table(1000, 256, seed=9)
    # No connection age: an answer this large finishing on a connection that grpc has told
    # to go away can be cut off by grpc's own close (docs/usage.md#shutdown).
    server = start_server({"big": weights}, max_ids=100_000, connection_age_s=0)
    ids = _ids((65_536,), 1000, seed=10)
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        vectors = client.lookup(ids)
    assert vectors.nbytes == 64 << 20
    np.testing.assert_array_equal(vectors, weights[ids])


def test_expired_deadline_is_honoured(start_server: ServerFactory) -> None:
    server = start_server({"t": random_table(2000, 64)}, dense_chunk_cells=1000)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        with pytest.raises(EmbeddingError) as raised:
            client.lookup_dense(np.arange(6000) % 2000, timeout=0.05)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.lookup([3]).shape == (1, 64)  # the server is fine afterwards


def test_list_tables(client: EmbeddingClient) -> None:
    by_name = {t.name: t for t in client.tables()}
    assert set(by_name) == {"main", "odd", "worked", "half", "bf16"}
    main = by_name["main"]
    assert (main.rows, main.dim, main.dtype, main.device) == (1000, 16, "float32", "cpu")
    assert (main.version, main.bytes, main.is_default) == (1, 1000 * 16 * 4, True)
    assert (by_name["half"].dtype, by_name["half"].bytes) == ("float16", 50 * 8 * 2)
    assert by_name["bf16"].dtype == "bfloat16"
    assert not by_name["odd"].is_default


def test_health_and_reflection(server: EmbeddingServer, client: EmbeddingClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("embedding.v1.EmbeddingService") == "SERVING"
    with pytest.raises(EmbeddingError) as raised:
        client.health("no.such.Service")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "embedding.v1.EmbeddingService" in services
    assert "grpc.health.v1.Health" in services


def test_async_client(server: EmbeddingServer, tables: dict[str, np.ndarray]) -> None:
    async def run() -> None:
        async with AsyncEmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            ids = [[1, 2], [3, 4]]
            gathered, dense = await asyncio.gather(
                client.lookup(ids), client.lookup_dense(ids, dtype="float16")
            )
            np.testing.assert_array_equal(gathered, tables["main"][ids])
            np.testing.assert_array_equal(dense, tables["main"][ids].astype(np.float16))
            assert await client.health() == "SERVING"
            assert len(await client.tables()) == 5
            with pytest.raises(EmbeddingError) as raised:
                await client.lookup([5000])
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def _scrape(server: EmbeddingServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        return str(response.read().decode())


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_show_traffic(start_server: ServerFactory) -> None:
    server = start_server({"m": random_table(100, 4)})
    before = _scrape(server)
    # Pre-registered before any traffic, so dashboards are not empty.
    assert (
        'embedding_request_duration_seconds_bucket{code="OK",le="1e-05",method="Lookup",table="m"}'
        in before
    )
    assert _sample(before, "embedding_table_rows", table="m") == 100
    assert _sample(before, "embedding_table_bytes", table="m") == 1600
    start_lookups = _sample(
        before, "grpc_server_handled_total", grpc_method="Lookup", grpc_code="OK"
    )

    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        for _ in range(3):
            client.lookup([1, 2, 3])
        client.lookup_dense([1, 2])
        with pytest.raises(EmbeddingError):
            client.lookup([100])
    after = _scrape(server)

    handled = _sample(after, "grpc_server_handled_total", grpc_method="Lookup", grpc_code="OK")
    assert handled - start_lookups == 3
    assert _sample(after, "grpc_server_handled_total", grpc_method="Lookup",
                   grpc_code="INVALID_ARGUMENT") >= 1  # fmt: skip
    assert _sample(after, "grpc_server_handling_seconds_count", grpc_method="LookupDense",
                   grpc_code="OK") >= 1  # fmt: skip
    assert _sample(after, "embedding_request_duration_seconds_count", method="Lookup", table="m",
                   code="OK") == 3  # fmt: skip
    assert _sample(after, "embedding_request_duration_seconds_count", method="Lookup", table="m",
                   code="INVALID_ARGUMENT") == 1  # fmt: skip
    assert _sample(after, "embedding_request_ids_sum", method="Lookup", table="m") == 9
    assert _sample(after, "embedding_kernel_seconds_count", kernel="gather", table="m") == 3
    assert _sample(after, "embedding_kernel_seconds_count", kernel="one_hot_matmul", table="m") == 1
    assert _sample(after, "embedding_response_bytes_total", method="Lookup", table="m") == 3 * 48
    assert _sample(after, "embedding_inflight_requests", method="Lookup") == 0
    assert _sample(after, "process_resident_memory_bytes") > 0
    assert _sample(after, "embedding_device_memory_allocated_bytes", device="cpu") >= 1600


def test_unknown_table_names_do_not_become_metric_labels(start_server: ServerFactory) -> None:
    server = start_server({"m": random_table(10, 4)})
    with (
        EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client,
        pytest.raises(EmbeddingError),
    ):
        client.lookup([1], table="attacker-chosen-name")
    assert "attacker-chosen-name" not in _scrape(server)


class _FlakyServicer(pb_grpc.EmbeddingServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls, then a fixed response."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.LookupResponse(
            vectors=np.ones(2, "<f4").tobytes(), dtype=pb.DTYPE_FLOAT32, shape=[1, 2]
        )


@pytest.mark.parametrize(("max_attempts", "succeeds"), [(5, True), (1, False)])
def test_client_retries_unavailable_by_service_config(max_attempts: int, succeeds: bool) -> None:
    from concurrent import futures

    servicer = _FlakyServicer(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", max_attempts=max_attempts) as client:
            if succeeds:
                np.testing.assert_array_equal(client.lookup([0]), [[1.0, 1.0]])
                assert servicer.calls == 3
            else:
                with pytest.raises(EmbeddingError) as raised:
                    client.lookup([0])
                assert raised.value.code == grpc.StatusCode.UNAVAILABLE
                assert raised.value.details == "warming up"
                assert servicer.calls == 1
    finally:
        server.stop(0)


@pytest.mark.parametrize("max_attempts", [1, 5])
def test_grpcs_transparent_retries_stay_on_even_without_retries(max_attempts: int) -> None:
    """max_attempts=1 means no retry of a call a server answered; grpc's transparent
    retries (a call no server saw: a stream refused, or cut by a connection's GOAWAY
    before the server took it) stay on, as in any grpc client without a retry policy.
    Off, a call crossing a connection's max age failed now and then: 'Stream removed
    (GOAWAY received; ... max_age)', seen once in ~2,000 calls under 64 callers."""
    from embedding_client.client import _channel_options

    options = dict(_channel_options(1 << 20, max_attempts))
    assert options["grpc.enable_retries"] == 1
    assert ("grpc.service_config" in options) == (max_attempts > 1)
