"""CUDA-only checks: tables on the device, dtypes there, both paths agreeing on the GPU."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_client import EmbeddingClient
from embedding_server.config import TableSpec
from embedding_server.core import kernels
from embedding_server.core.devices import to_host
from embedding_server.core.sources import load_table
from embedding_server.process.server import resolve_device

from .conftest import BIN, ServerFactory, free_port, random_table, server_env, wait_serving

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_results_leave_the_device_through_pinned_memory(dtype: torch.dtype) -> None:
    vectors = torch.randn(1000, 64, device="cuda").to(dtype)
    host = to_host(vectors)
    view = torch.int16 if dtype == torch.bfloat16 else dtype
    assert host.tobytes() == vectors.cpu().view(view).numpy().tobytes()


def test_batching_on_cuda(start_server: ServerFactory) -> None:
    weights = random_table(3000, 64, seed=5)
    server = start_server({"gpu": torch.from_numpy(weights).cuda()}, batching=True)
    rng = np.random.default_rng(1)
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        for _ in range(20):
            ids = rng.integers(0, 3000, size=int(rng.integers(1, 500)))
            np.testing.assert_array_equal(client.lookup(ids), weights[ids])


def test_processes_share_the_device_table(tmp_path: Path) -> None:
    """Two worker processes on one GPU table (CUDA IPC), same bytes as numpy."""
    weights = random_table(4000, 32, seed=6)
    np.save(tmp_path / "t.npy", weights)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--device", "cuda", "--processes", "2",
         "--table", f"t={tmp_path / 't.npy'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        ids = np.arange(0, 4000, 7)
        for _ in range(8):  # separate connections: both workers answer
            with EmbeddingClient(f"127.0.0.1:{port}", wait_for_ready=True) as client:
                np.testing.assert_array_equal(client.lookup(ids), weights[ids])
                assert client.tables()[0].device == "cuda:0"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
