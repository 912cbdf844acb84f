"""Property-based fuzzing of the live server: arbitrary and malformed requests never get
UNKNOWN or INTERNAL, valid ones get exactly the right rows, and the server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from embedding_client import EmbeddingClient
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.process.server import EmbeddingServer

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
DTYPES = {0: np.float32, 1: np.float32, 2: np.float16, 3: ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def channel(server: EmbeddingServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


def _raw(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, bytes]:
    call = channel.unary_unary(f"/embedding.v1.EmbeddingService/{method}")
    try:
        return grpc.StatusCode.OK, call(payload, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), b""


@FUZZ
@given(payload=st.binary(max_size=300), dense=st.booleans())
def test_malformed_bytes_never_crash_or_answer_internal(
    channel: grpc.Channel, payload: bytes, dense: bool
) -> None:
    code, _ = _raw(channel, "LookupDense" if dense else "Lookup", payload)
    assert code not in NEVER, (code, payload)


requests = st.builds(
    dict,
    table=st.sampled_from(["", "main", "odd", "half", "nope", "main\x00", "é" * 3]),
    ids=st.one_of(
        st.lists(st.integers(-5, 1100), max_size=64),
        st.lists(INT64, max_size=8),
    ),
    as_bytes=st.booleans(),
    cut=st.integers(0, 7),
    shape=st.one_of(
        st.none(), st.lists(st.integers(-3, 70), max_size=4), st.lists(INT64, max_size=3)
    ),
    dtype=st.integers(0, 6),
    dense=st.booleans(),
)


@FUZZ
@given(spec=requests)
def test_arbitrary_requests_get_a_proper_status_and_right_rows(
    channel: grpc.Channel, tables: dict[str, np.ndarray], spec: dict
) -> None:
    ids = np.asarray(spec["ids"], dtype=np.int64)
    request = pb.LookupRequest(table=spec["table"], dtype=spec["dtype"])
    if spec["as_bytes"]:
        data = ids.astype("<i8").tobytes()
        request.ids = data[: len(data) - spec["cut"]] if spec["cut"] and data else data
    else:
        request.ids_list.extend(ids.tolist())
    if spec["shape"] is not None:
        request.ids_shape.SetInParent()
        request.ids_shape.dims.extend(spec["shape"])
    code, answer = _raw(channel, "LookupDense" if spec["dense"] else "Lookup",
                        request.SerializeToString())  # fmt: skip
    assert code not in NEVER, (code, request)

    name = spec["table"] or "main"
    shape = tuple(spec["shape"]) if spec["shape"] is not None else (len(ids),)
    valid = (
        name in ("main", "odd", "half")
        and spec["dtype"] in DTYPES
        and not (spec["as_bytes"] and spec["cut"] and len(ids))
        and all(d >= 0 for d in shape)
        and int(np.prod(shape, dtype=object)) == len(ids)
        and bool(np.all((ids >= 0) & (ids < len(tables[name]))))
        and not (spec["dense"] and len(ids) * tables[name].size > 50_000_000)
    )
    event(f"valid request: {valid}, status {code.name}")
    if not valid:
        assert code != grpc.StatusCode.OK, request
        return
    assert code == grpc.StatusCode.OK, (code, request)
    response = pb.LookupResponse.FromString(answer)
    out_dtype = DTYPES[spec["dtype"]]
    vectors = np.frombuffer(response.vectors, dtype=out_dtype).reshape(tuple(response.shape))
    expected = tables[name][ids.reshape(shape)].astype(out_dtype)
    assert vectors.tobytes() == expected.tobytes()


def test_server_is_healthy_and_correct_after_fuzzing(
    server: EmbeddingServer, tables: dict[str, np.ndarray]
) -> None:
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        assert client.health() == "SERVING"
        np.testing.assert_array_equal(
            client.lookup([[1, 2], [3, 999]]), tables["main"][[[1, 2], [3, 999]]]
        )
