"""Row-wise int8 storage: bounded error, dequantized in the gather, on both RPC paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient, Pooling
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server.config import TableSpec
from embedding_server.core import kernels
from embedding_server.core.filesystem import FileAccess
from embedding_server.core.sources import load_table
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.process.server import EmbeddingServer

from .conftest import TEST_CONFIG, random_table

WEIGHTS = random_table(400, 32, seed=81)


def _bound(weights: np.ndarray) -> np.ndarray:
    """Largest error row-wise 8-bit quantization may make in each row: half a step."""
    span = weights.max(axis=1, keepdims=True) - weights.min(axis=1, keepdims=True)
    return span / 255 / 2 + 1e-6


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Table:
    path = tmp_path_factory.mktemp("q") / "t.npy"
    np.save(path, WEIGHTS)
    return load_table(TableSpec("q", path, dtype="int8"), torch.device("cpu"))


@pytest.fixture(scope="module")
def served(quantized: Table) -> Iterator[tuple[EmbeddingServer, EmbeddingClient]]:
    store = TableStore()
    store.add(quantized)
    store.add(Table("f32", torch.from_numpy(WEIGHTS.copy()), "test"))
    server = EmbeddingServer(TEST_CONFIG, store)
    server.start()
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        yield server, client
    server.stop(grace=0)


def test_storage_is_a_quarter_and_the_error_is_bounded(quantized: Table) -> None:
    assert quantized.dtype == "int8"
    assert quantized.nbytes == WEIGHTS.size + 400 * 8  # codes + float32 scale, bias per row
    rows = quantized.rows_for_kernels()
    restored = rows[:].numpy()
    assert (np.abs(restored - WEIGHTS) <= _bound(WEIGHTS)).all()
    constant = kernels.quantize(torch.full((1, 5), 0.25))
    assert torch.equal(kernels.dequantize(*constant), torch.full((1, 5), 0.25))


def test_lookups_return_the_dequantized_rows_on_both_paths(
    served: tuple[EmbeddingServer, EmbeddingClient], quantized: Table
) -> None:
    _, client = served
    ids = np.random.default_rng(2).integers(0, 400, size=(9, 4))
    expected = quantized.rows_for_kernels()[:].numpy()[ids]
    gathered = client.lookup(ids, "q")
    np.testing.assert_array_equal(gathered, expected)
    assert client.lookup_dense(ids, "q").tobytes() == gathered.tobytes()
    assert (np.abs(gathered - WEIGHTS[ids]) <= _bound(WEIGHTS)[ids]).all()
    half = client.lookup(ids, "q", "bfloat16").astype(np.float32)
    np.testing.assert_allclose(half, expected, rtol=1e-2, atol=1e-2)
    (info,) = [t for t in client.tables() if t.name == "q"]
    assert (info.dtype, info.bytes) == ("int8", WEIGHTS.size + 400 * 8)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_pooled_lookups_of_an_int8_table(
    served: tuple[EmbeddingServer, EmbeddingClient], mode: str
) -> None:
    _, client = served
    ids = np.array([[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
    quantized_rows = client.lookup(ids, "q")
    keep = ids != 0
    expected = []
    for row, mask in zip(quantized_rows, keep, strict=True):
        picked = row[mask].astype(np.float64)
        if not mask.any():
            expected.append(np.zeros(32))
        else:
            expected.append(
                {"sum": picked.sum(0), "mean": picked.mean(0), "max": picked.max(0)}[mode]
            )
    gathered = client.lookup(ids, "q", pooling=mode, padding_id=0)
    dense = client.lookup_dense(ids, "q", pooling=Pooling(mode), padding_id=0)
    np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-5)
    if mode == "max":
        assert dense.tobytes() == gathered.tobytes()
    else:
        np.testing.assert_allclose(dense, gathered, rtol=1e-5, atol=1e-5)
    # Against the float32 table: within the quantization bound, pooled.
    exact = client.lookup(ids, "f32", pooling=mode, padding_id=0)
    assert np.abs(gathered - exact).max() <= _bound(WEIGHTS).max() * (3 if mode == "sum" else 1)


def test_updates_are_quantized_too(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    store = TableStore(files=FileAccess(snapshot_dir=str(tmp_path)))
    store.add(load_table(TableSpec("q", path, dtype="int8"), torch.device("cpu")))
    new = random_table(2, 32, seed=82) * 10
    store.update_rows("q", np.array([7, 9]), new)
    rows = store.get("q").rows_for_kernels()[7:10].numpy()
    assert (np.abs(rows[[0, 2]] - new) <= _bound(new)).all()
    np.testing.assert_array_equal(rows[1], store.get("q").rows_for_kernels()[8:9].numpy()[0])
    _, stamp, _, _ = store.snapshot("q", "snap.npy")
    assert stamp == (1, 1)
    saved = np.load(tmp_path / "snap.npy")
    assert saved.dtype == np.float32  # written dequantized
    np.testing.assert_array_equal(saved, store.get("q").rows_for_kernels()[:].numpy())


def test_int8_is_no_output_dtype(served: tuple[EmbeddingServer, EmbeddingClient]) -> None:
    server, _ = served
    request = pb.LookupRequest(
        table="q", ids=np.array([1], "<i8").tobytes(), dtype=pb.DTYPE_INT8_ROWWISE
    )
    target = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.EmbeddingServiceStub(channel).Lookup(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "int8 is a storage type" in refused.value.details()


def test_the_bytes_gauge_shows_the_saving(served: tuple[EmbeddingServer, EmbeddingClient]) -> None:
    labels = {"table": "q", "device": "cpu", "dtype": "int8"}
    assert REGISTRY.get_sample_value("embedding_table_bytes", labels) == WEIGHTS.size + 400 * 8
    f32 = {"table": "f32", "device": "cpu", "dtype": "float32"}
    assert REGISTRY.get_sample_value("embedding_table_bytes", f32) == WEIGHTS.size * 4


def test_only_known_storage_dtypes() -> None:
    with pytest.raises(ValueError, match="'int4' is not one of float32, float16, bfloat16, int8"):
        TableSpec.parse("t=/x.npy", "int4")
