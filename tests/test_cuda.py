"""CUDA-only checks: tables on the device, dtypes there, both paths agreeing on the GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_client import EmbeddingClient
from embedding_server import kernels
from embedding_server.config import TableSpec
from embedding_server.server import resolve_device
from embedding_server.tables import load_table

from .conftest import ServerFactory, random_table

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_device_picks_cuda() -> None:
    assert resolve_device("auto").type == "cuda"


def test_tables_load_onto_the_device(tmp_path: Path) -> None:
    weights = random_table(1000, 33)
    np.save(tmp_path / "t.npy", weights)
    table = load_table(TableSpec("t", tmp_path / "t.npy"), torch.device("cuda:0"))
    assert table.device == "cuda:0"
    np.testing.assert_array_equal(table.weights.cpu().numpy(), weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_hot_matmul_equals_gather_on_cuda(dtype: torch.dtype) -> None:
    table = torch.randn(5000, 129, device="cuda").to(dtype)
    ids = torch.randint(0, 5000, (64, 3), device="cuda")
    dense = kernels.one_hot_matmul(table, ids, chunk_cells=100_000)
    gathered = kernels.gather(table, ids)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(dense.view(view), gathered.view(view))


def test_server_on_cuda(start_server: ServerFactory) -> None:
    weights = random_table(2000, 128, seed=3)
    server = start_server({"gpu": torch.from_numpy(weights).cuda()})
    ids = np.random.default_rng(0).integers(0, 2000, size=(32, 4))
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        (info,) = client.tables()
        assert info.device == "cuda:0"
        np.testing.assert_array_equal(client.lookup(ids), weights[ids])
        assert client.lookup_dense(ids).tobytes() == client.lookup(ids).tobytes()
        half = client.lookup(ids, dtype="bfloat16")
        np.testing.assert_array_equal(
            half.astype(np.float32),
            torch.from_numpy(weights[ids]).bfloat16().float().numpy(),
        )
