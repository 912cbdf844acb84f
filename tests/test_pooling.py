"""Pooled lookups (EmbeddingBag) and padding ids, on both RPC paths, over a real server."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from embedding_client import EmbeddingClient, EmbeddingError, Pooling, codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server.process.server import EmbeddingServer

from .conftest import ServerFactory, random_table

WEIGHTS = random_table(300, 12, seed=51)


@pytest.fixture(scope="module")
def pooled_server() -> Iterator[EmbeddingServer]:
    from .conftest import TEST_CONFIG, make_store

    server = EmbeddingServer(TEST_CONFIG, make_store({"t": WEIGHTS}))
    server.start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def client(pooled_server: EmbeddingServer) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(f"127.0.0.1:{pooled_server.port}", max_attempts=1) as instance:
        yield instance


def reference(
    ids: np.ndarray,
    offsets: list[int],
    mode: str,
    weights: np.ndarray | None = None,
    padding_id: int | None = None,
) -> np.ndarray:
    """What torch's embedding_bag computes, in float64 with numpy."""
    flat = ids.reshape(-1)
    scale = np.ones(flat.size) if weights is None else weights.astype(np.float64)
    ends = [*offsets[1:], flat.size]
    out = np.zeros((len(offsets), WEIGHTS.shape[1]))
    for bag, (start, stop) in enumerate(zip(offsets, ends, strict=True)):
        keep = np.arange(start, stop)
        if padding_id is not None:
            keep = keep[flat[keep] != padding_id]
        if keep.size == 0:
            continue
        rows = WEIGHTS[flat[keep]].astype(np.float64)
        if mode == "max":
            out[bag] = rows.max(axis=0)
        else:
            out[bag] = (rows * scale[keep, None]).sum(axis=0)
            if mode == "mean":
                out[bag] /= keep.size
    return out


def _agree(client: EmbeddingClient, ids: object, expected: np.ndarray, **kwargs: object) -> None:
    """Lookup matches `expected` (max exactly, sum/mean to float32 rounding) and
    LookupDense matches Lookup the same way."""
    gathered = client.lookup(ids, "t", **kwargs)  # type: ignore[arg-type]
    dense = client.lookup_dense(ids, "t", **kwargs)  # type: ignore[arg-type]
    assert gathered.shape == dense.shape == expected.shape
    pooling = kwargs.get("pooling")
    mode = pooling if isinstance(pooling, str) else getattr(pooling, "mode", None)
    if mode in (None, "max"):
        assert gathered.tobytes() == dense.tobytes()
        np.testing.assert_array_equal(gathered, expected.astype(np.float32))
    else:
        np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dense, gathered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bags_by_offsets_lengths_and_last_axis(client: EmbeddingClient, mode: str) -> None:
    ids = np.random.default_rng(1).integers(0, 300, size=20)
    offsets = [0, 3, 3, 10, 19]  # bag 1 is empty
    expected = reference(ids, offsets, mode)
    _agree(client, ids, expected, pooling=Pooling(mode, offsets=offsets))
    _agree(client, ids, expected, pooling=Pooling(mode, lengths=[3, 0, 7, 9, 1]))
    grid = ids.reshape(2, 2, 5)  # bags along the last axis: response [2, 2, dim]
    expected_grid = reference(grid, [0, 5, 10, 15], mode).reshape(2, 2, -1)
    _agree(client, grid, expected_grid, pooling=mode)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_padding_is_skipped_in_bags(client: EmbeddingClient, mode: str) -> None:
    ids = np.array([[5, 0, 7, 0], [0, 0, 0, 0], [1, 2, 3, 0]])  # 0 pads; row 1 only padding
    expected = reference(ids, [0, 4, 8], mode, padding_id=0)
    assert not expected[1].any()
    _agree(client, ids, expected, pooling=mode, padding_id=0)


def test_weighted_sum(client: EmbeddingClient) -> None:
    ids = np.array([4, 4, 9, 250, 17, 3])
    weights = np.array([0.5, 0.25, -2.0, 1.0, 3.0, 0.0], dtype=np.float32)
    expected = reference(ids, [0, 2, 5], "sum", weights)
    _agree(client, ids, expected, pooling=Pooling("sum", offsets=[0, 2, 5], weights=weights))


def test_padding_id_in_a_plain_lookup_gives_zero_rows(client: EmbeddingClient) -> None:
    ids = np.array([[3, 299], [299, 8]])
    expected = WEIGHTS[ids].copy()
    expected[ids == 299] = 0
    _agree(client, ids, expected, padding_id=299)


def test_empty_ids_and_empty_bags_give_zeros(client: EmbeddingClient) -> None:
    empty = np.zeros(0, dtype=np.int64)
    vectors = client.lookup(empty, "t", pooling=Pooling("mean", lengths=[0, 0, 0]))
    assert vectors.shape == (3, 12) and not vectors.any()
    assert client.lookup(np.zeros((4, 0), np.int64), "t", pooling="max").shape == (4, 12)


def test_half_precision_output_of_pooled_lookups(client: EmbeddingClient) -> None:
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    pooled = client.lookup(ids, "t", "bfloat16", pooling="mean")
    np.testing.assert_allclose(
        pooled.astype(np.float32), reference(ids, [0, 3], "mean"), rtol=1e-2, atol=1e-2
    )


@pytest.mark.parametrize(
    ("pooling", "ids", "padding_id", "message"),
    [
        (Pooling("sum", offsets=[1, 2]), [1, 2, 3], None, "offsets must start at 0"),
        (Pooling("sum", offsets=[0, 2, 1]), [1, 2, 3], None, "offsets must not decrease"),
        (Pooling("sum", offsets=[0, 4]), [1, 2, 3], None, "offsets[1] = 4 is past the 3 ids"),
        (Pooling("sum", lengths=[1, 1]), [1, 2, 3], None, "lengths add up to 2 but 3 ids"),
        (Pooling("sum", lengths=[4, -1]), [1, 2, 3], None, "lengths[1] = -1 is negative"),
        (Pooling("sum", offsets=[0], lengths=[3]), [1, 2, 3], None, "either offsets or lengths"),
        (Pooling("sum", offsets=[0, 1]), [[1, 2], [3, 4]], None, "need 1-D ids"),
        (Pooling("mean", weights=[1.0, 1.0]), [1, 2], None, "per-id weights need pooling SUM"),
        (Pooling("sum", weights=[1.0]), [1, 2], None, "2 ids need 8"),
        (Pooling("sum", weights=[1.0, np.inf]), [1, 2], None, "must be finite"),
        ("mean", 5, None, "needs bags"),
        ("sum", [1, 300], None, "id 300 at position 1 is out of range"),
        ("sum", [1, 2], 300, "padding_id 300 is not a row of table 't'"),
        (None, [1, 2], -1, "padding_id -1 is not a row"),
    ],
)
def test_bad_bags_are_invalid_argument_on_both_paths(
    client: EmbeddingClient, pooling: object, ids: object, padding_id: int | None, message: str
) -> None:
    for dense in (False, True):
        with pytest.raises(EmbeddingError) as refused:
            client.lookup_result(ids, "t", dense=dense, pooling=pooling, padding_id=padding_id)  # type: ignore[arg-type]
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in refused.value.details
    np.testing.assert_array_equal(client.lookup([1], "t"), WEIGHTS[[1]])  # nothing harmed


def test_raw_requests_the_client_would_not_build(pooled_server: EmbeddingServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{pooled_server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        ids = np.array([1, 2], dtype="<i8").tobytes()
        for request, message in (
            (pb.LookupRequest(table="t", ids=ids, lengths=[2]), "need pooling SUM, MEAN or MAX"),
            (pb.LookupRequest(table="t", ids=ids, pooling=7), "unknown pooling enum value 7"),  # type: ignore[arg-type]
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Lookup(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in refused.value.details()
        # LookupStream answers pooled requests too, and refuses a bad one in-band.
        good = codec.encode_lookup_request([[1, 2], [3, 4]], "t", "float32", pooling="sum")
        bad = pb.LookupRequest(table="t", ids=ids, lengths=[5], pooling=pb.POOLING_SUM)
        answers = list(stub.LookupStream(iter([good, bad, good]), timeout=10))
    assert [a.HasField("result") for a in answers] == [True, False, True]
    first = codec.decode_vectors(answers[0].result)
    np.testing.assert_allclose(
        first, reference(np.array([[1, 2], [3, 4]]), [0, 2], "sum"), rtol=1e-6
    )
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "lengths[0] = 5 is more than the 2 ids sent" in answers[1].error.message
    assert answers[2].result.vectors == answers[0].result.vectors


def test_pooled_lookups_bypass_the_batcher(start_server: ServerFactory) -> None:
    server = start_server({"t": WEIGHTS}, batching=True)
    ids = np.array([[1, 2, 3], [4, 5, 0]])
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        np.testing.assert_allclose(
            client.lookup(ids, "t", pooling="mean", padding_id=0),
            reference(ids, [0, 3], "mean", padding_id=0), rtol=1e-6,
        )  # fmt: skip
        plain = client.lookup(ids, "t", padding_id=0)
    assert not plain[1, 2].any()
    np.testing.assert_array_equal(plain[0], WEIGHTS[[1, 2, 3]])


def test_bags_are_counted(client: EmbeddingClient, pooled_server: EmbeddingServer) -> None:
    from prometheus_client import REGISTRY

    labels = {"method": "Lookup", "table": "t"}
    before = REGISTRY.get_sample_value("embedding_request_bags_sum", labels) or 0.0
    client.lookup(np.zeros((7, 3), np.int64), "t", pooling="sum")
    assert REGISTRY.get_sample_value("embedding_request_bags_sum", labels) == before + 7
    kernel = {"kernel": "embedding_bag", "table": "t", "device": "cpu"}
    assert (REGISTRY.get_sample_value("embedding_kernel_seconds_count", kernel) or 0) > 0
