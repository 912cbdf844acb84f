"""Kernels against independent references: numpy indexing and torch.nn.functional."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from embedding_server.core import devices, kernels
from embedding_server.core.lookup import Limits, Lookups
from embedding_server.core.tables import Table
from embedding_server.errors import DeadlineExceeded

from .conftest import make_store

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _table(rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator).to(dtype)


@pytest.mark.parametrize("shape", [(), (1,), (17,), (4, 5), (2, 3, 4)])
@pytest.mark.parametrize("dim", [1, 3, 16, 127, 1025])
def test_gather_equals_numpy_indexing(shape: tuple[int, ...], dim: int) -> None:
    table = _table(50, dim, torch.float32)
    ids = np.random.default_rng(dim).integers(0, 50, size=shape)
    out = kernels.gather(table, torch.from_numpy(ids))
    assert out.shape == (*shape, dim)
    np.testing.assert_array_equal(out.numpy(), table.numpy()[ids])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (17,), (4, 5), (2, 3, 4)])
def test_host_take_gives_the_bits_of_the_torch_gather(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    table = _table(50, 16, dtype)
    ids = np.random.default_rng(len(shape)).integers(0, 50, size=shape)
    assert kernels.takes_on_host(table, ids)
    expected = devices.to_host(kernels.gather(table, torch.from_numpy(ids)))
    taken = kernels.host_take(Table(name="t", weights=table, source="test").host_array(), ids)
    assert taken.dtype == expected.dtype and taken.shape == expected.shape
    assert taken.tobytes() == expected.tobytes()


def test_a_tables_numpy_view_follows_its_rows_and_is_never_pickled() -> None:
    table = Table(name="t", weights=_table(20, 4, torch.bfloat16), source="test")
    view = table.host_array()
    assert table.host_array() is view  # made once
    table.weights[3] = 2.0  # a row update, in place
    assert view[3].tobytes() == table.weights[3].view(torch.int16).numpy().tobytes()
    copy = pickle.loads(pickle.dumps(table))  # what a worker process receives
    assert copy._views == {} and torch.equal(copy.weights, table.weights)


def test_host_take_only_takes_small_gathers_from_plain_host_tables() -> None:
    table = _table(50, 16, torch.float32)
    limit = kernels.HOST_TAKE_ELEMENTS // 16
    assert kernels.takes_on_host(table, np.zeros(limit, dtype=np.int64))
    assert not kernels.takes_on_host(table, np.zeros(limit + 1, dtype=np.int64))
    codes, qparams = kernels.quantize(table)
    quantized = kernels.QuantizedRows(codes, qparams)
    assert not kernels.takes_on_host(quantized, np.zeros(1, dtype=np.int64))


@pytest.mark.parametrize("storage", DTYPES)
@pytest.mark.parametrize("output", ["float32", "float16", "bfloat16"])
def test_lookups_on_both_sides_of_the_host_take_limit_give_the_same_bits(
    storage: torch.dtype, output: str
) -> None:
    """Small gathers go through numpy, larger ones and conversions through torch: the
    bytes are the torch gather's either way."""
    table = _table(3000, 16, storage)
    store = make_store({"t": table})
    lookups = Lookups(store, Limits(1 << 20, 1 << 40, 1 << 24, 1 << 30))
    limit = kernels.HOST_TAKE_ELEMENTS // 16
    rng = np.random.default_rng(5)
    for count in (1, limit, limit + 1):
        ids = rng.integers(0, 3000, size=count)
        out = lookups.lookup("t", ids, output)
        wanted = getattr(torch, output)
        expected = devices.to_host(kernels.gather(table, torch.from_numpy(ids)), wanted)
        assert out.vectors.tobytes() == expected.tobytes()
        assert out.shape == (count, 16) and out.kernel == "gather"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_cells", [1, 7, 100, 1 << 24])
def test_one_hot_matmul_equals_gather_bit_for_bit(dtype: torch.dtype, chunk_cells: int) -> None:
    table = _table(23, 5, dtype, seed=1)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 23, size=(3, 7)))
    dense = kernels.one_hot_matmul(table, ids, chunk_cells)
    gathered = torch.nn.functional.embedding(ids, table)
    assert dense.shape == gathered.shape == (3, 7, 5)
    assert dense.dtype == dtype
    # Bit for bit, not approximately.
    assert torch.equal(
        dense.view(torch.int16 if dtype != torch.float32 else torch.int32),
        gathered.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


def test_one_hot_matmul_of_no_ids_and_of_a_scalar() -> None:
    table = _table(10, 4, torch.float32)
    assert kernels.one_hot_matmul(table, torch.zeros(0, dtype=torch.int64), 64).shape == (0, 4)
    scalar = kernels.one_hot_matmul(table, torch.tensor(3), 64)
    assert torch.equal(scalar, table[3])


def test_negative_zero_rows_differ_on_the_dense_path() -> None:
    # Why the loader turns -0.0 into +0.0: the one-hot sum cannot keep the sign.
    table = torch.tensor([[-0.0, 1.0], [2.0, 3.0]])
    dense = kernels.one_hot_matmul(table, torch.tensor([0]), 64)
    assert torch.signbit(table[0, 0]) and not torch.signbit(dense[0, 0])


def test_one_hot_matmul_stops_at_the_deadline() -> None:
    table = _table(100, 4, torch.float32)
    with pytest.raises(DeadlineExceeded):
        kernels.one_hot_matmul(table, torch.arange(100), 10, deadline=time.monotonic() - 1)


def test_timed_reports_a_positive_duration() -> None:
    table = _table(1000, 64, torch.float32)
    out, seconds = devices.timed(
        torch.device("cpu"), lambda: kernels.gather(table, torch.arange(1000))
    )
    assert out.shape == (1000, 64)
    assert 0 < seconds < 10
