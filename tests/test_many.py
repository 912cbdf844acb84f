"""LookupMany: several features (tables, dtypes, pooling) in one call, all or nothing."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from embedding_client import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError, Feature

from .conftest import ServerFactory, random_table

USERS = random_table(500, 16, seed=61)
ITEMS = random_table(80, 8, seed=62)


@pytest.fixture
def target(start_server: ServerFactory) -> str:
    server = start_server({"users": USERS, "items": ITEMS}, max_ids=1000)
    return f"127.0.0.1:{server.port}"


def test_one_call_answers_every_feature(target: str) -> None:
    history = np.array([[3, 7, 0], [9, 0, 0]])
    features = {
        "users": [1, 2],  # bare ids: the table named like the feature
        "item": Feature([[5, 6]], table="items", dtype="float16"),
        "history": Feature(history, table="items", pooling="mean", padding_id=0),
    }
    with EmbeddingClient(target) as client:
        for dense in (False, True):
            results = client.lookup_many(features, dense=dense)
            assert list(results) == ["users", "item", "history"]
            np.testing.assert_array_equal(results["users"].vectors, USERS[[1, 2]])
            assert results["users"].table == "users"
            assert results["item"].vectors.dtype == np.float16
            np.testing.assert_array_equal(
                results["item"].vectors, ITEMS[[[5, 6]]].astype(np.float16)
            )
            expected = np.stack([ITEMS[[3, 7]].mean(0), ITEMS[[9]].mean(0)])
            np.testing.assert_allclose(results["history"].vectors, expected, rtol=1e-6)
        assert client.lookup_many({}) == {}


def test_a_refused_feature_fails_the_call_and_is_named(target: str) -> None:
    with EmbeddingClient(target, max_attempts=1) as client:
        cases = [
            ({"users": [1], "items": [80]}, grpc.StatusCode.INVALID_ARGUMENT,
             "feature 'items': id 80 at position 0 is out of range"),
            ({"users": [1], "nope": [0]}, grpc.StatusCode.NOT_FOUND,
             "feature 'nope': unknown table 'nope'"),
            ({"a": Feature(np.zeros(600, np.int64), table="users"),
              "b": Feature(np.zeros(600, np.int64), table="items")},
             grpc.StatusCode.RESOURCE_EXHAUSTED, "1200 ids over 2 features"),
            ({"users": Feature([1, 2], pooling="mean", padding_id=900)},
             grpc.StatusCode.INVALID_ARGUMENT, "feature 'users': padding_id 900"),
        ]  # fmt: skip
        for features, code, message in cases:
            with pytest.raises(EmbeddingError) as refused:
                client.lookup_many(features)
            assert refused.value.code == code
            assert message in refused.value.details
        np.testing.assert_array_equal(client.lookup([4], "users"), USERS[[4]])


def test_duplicate_feature_names_are_refused(target: str) -> None:
    from embedding_client import codec
    from embedding_client.proto import embedding_pb2 as pb
    from embedding_client.proto import embedding_pb2_grpc as pb_grpc

    request = pb.LookupManyRequest()
    for _ in range(2):
        request.features.add(
            feature="f", lookup=codec.encode_lookup_request([1], "users", "float32")
        )
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.EmbeddingServiceStub(channel).LookupMany(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feature name(s) given twice: 'f'" in refused.value.details()


def test_async_client(target: str) -> None:
    async def run() -> dict[str, object]:
        async with AsyncEmbeddingClient(target) as client:
            return await client.lookup_many({"users": [7], "items": [[1, 2]]})  # type: ignore[return-value]

    results = asyncio.run(run())
    assert list(results) == ["users", "items"]
    np.testing.assert_array_equal(results["users"].vectors, USERS[[7]])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(results["items"].vectors, ITEMS[[[1, 2]]])  # type: ignore[attr-defined]
    assert results["users"].table == "users" and results["users"].version == 1  # type: ignore[attr-defined]
