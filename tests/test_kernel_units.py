"""The kernels' corners, one at a time: every block boundary of the chunked one-hot and
multi-hot products, the empty and single bag, padding and weights in each dtype, the
deadline on each dense path, the exactness settings, quantization's types.

tests/test_kernels.py and tests/test_pooling.py compare the kernels on realistic calls;
these pin what those calls happened not to reach. Written against mutation testing's
survivors (`make mutate MODULE=kernels`).
"""

from __future__ import annotations

import time

import pytest
import torch

from embedding_server.core import kernels
from embedding_server.core.cache import CachedRows
from embedding_server.errors import DeadlineExceeded

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quarters(rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of small multiples of 1/4: every sum of a few is exact in any float dtype, so
    any order of adding gives the same bits."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, (rows, dim), generator=generator) / 4).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_cells", [1, 2, 3, 5, 7, 1000])
def test_one_hot_matmul_covers_every_row_in_every_blocking(
    dtype: torch.dtype, chunk_cells: int
) -> None:
    table = quarters(7, 3, dtype)
    ids = torch.tensor([[0, 6, 3], [6, 0, 1]])
    out = kernels.one_hot_matmul(table, ids, chunk_cells)
    assert out.dtype == dtype and out.shape == (2, 3, 3)
    assert torch.equal(out, kernels.gather(table, ids))
    every = torch.arange(7)
    assert torch.equal(kernels.one_hot_matmul(table, every, chunk_cells), table)
    padded = kernels.one_hot_matmul(table, ids, chunk_cells, padding_id=0)
    assert torch.equal(padded, kernels.gather(table, ids, padding_id=0))


BAGS = torch.tensor([0, 0, 2, 5, 5, 8])  # an empty first bag, an empty middle one
IDS = torch.tensor([4, 0, 6, 4, 1, 0, 0, 2, 5, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("chunk_cells", [1, 2, 3, 7, 13, 1000])
@pytest.mark.parametrize("padding_id", [None, 0])
def test_pooled_matmul_equals_pooled_gather_in_every_blocking(
    dtype: torch.dtype, mode: str, chunk_cells: int, padding_id: int | None
) -> None:
    table = quarters(7, 4, dtype, seed=1)
    dense = kernels.pooled_matmul(table, IDS, BAGS, mode, chunk_cells, padding_id=padding_id)
    gathered = kernels.pooled_gather(table, IDS, BAGS, mode, padding_id=padding_id)
    assert dense.dtype == gathered.dtype == dtype and dense.shape == (6, 4)
    assert torch.equal(dense, gathered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_cells", [1, 3, 1000])
@pytest.mark.parametrize("padding_id", [None, 0])
def test_weighted_sums_agree_and_padding_weighs_nothing(
    dtype: torch.dtype, chunk_cells: int, padding_id: int | None
) -> None:
    table = quarters(7, 4, dtype, seed=2)
    weights = torch.tensor([0.5, 2, 1, -1, 0.25, 4, 8, 1, 2, 0.5])
    dense = kernels.pooled_matmul(table, IDS, BAGS, "sum", chunk_cells, None, weights, padding_id)
    gathered = kernels.pooled_gather(table, IDS, BAGS, "sum", weights, padding_id)
    assert dense.dtype == gathered.dtype == dtype
    assert torch.equal(dense, gathered)
    if padding_id is not None:
        kept = torch.ne(IDS, padding_id)
        by_hand = torch.zeros((6, 4), dtype=torch.float32)
        for i, (row, weight) in enumerate(zip(IDS.tolist(), weights.tolist(), strict=True)):
            bag = int(torch.searchsorted(BAGS, torch.tensor(i), right=True)) - 1
            if kept[i]:
                by_hand[bag] += weight * table[row].float()
        assert torch.equal(dense.float(), by_hand)


@pytest.mark.parametrize("table", [quarters(5, 3, torch.float16), "int8"])
def test_no_bags_give_no_rows_and_one_bag_gives_one(table: torch.Tensor | str) -> None:
    rows = _quantized() if table == "int8" else table
    assert isinstance(rows, torch.Tensor | kernels.QuantizedRows)
    ids = torch.tensor([1, 4, 1])
    none = kernels.pooled_gather(rows, ids, torch.tensor([], dtype=torch.int64), "sum")
    assert none.shape == (0, 3) and none.dtype == rows.dtype
    one = kernels.pooled_gather(rows, ids, torch.tensor([0]), "sum")
    expected = kernels.gather(rows, ids).sum(dim=0, keepdim=True)
    assert one.shape == (1, 3) and torch.allclose(one.float(), expected.float())


def _quantized() -> kernels.QuantizedRows:
    codes, qparams = kernels.quantize(quarters(5, 3, torch.float32, seed=3))
    return kernels.QuantizedRows(codes, qparams)


def test_quantized_bags_skip_padding_and_take_weights() -> None:
    rows = _quantized()
    ids = torch.tensor([0, 2, 0, 4])
    offsets = torch.tensor([0, 2])
    weights = torch.tensor([2.0, 0.5, 3.0, 1.0])
    pooled = kernels.pooled_gather(rows, ids, offsets, "sum", weights, padding_id=0)
    plain = rows.take(ids)
    expected = torch.stack([0.5 * plain[1], 1.0 * plain[3]])
    assert torch.equal(pooled, expected)
    means = kernels.pooled_gather(rows, ids, offsets, "mean", padding_id=0)
    assert torch.equal(means, torch.stack([plain[1], plain[3]]))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_each_dense_pooled_path_stops_at_its_deadline(mode: str) -> None:
    table = quarters(50, 4, torch.float32)
    ids = torch.arange(50).repeat(4)
    offsets = torch.arange(0, 200, 10)
    with pytest.raises(DeadlineExceeded):
        kernels.pooled_matmul(table, ids, offsets, mode, 4, time.monotonic() - 1)


def test_exact_matmul_restores_full_float32_precision() -> None:
    matmul = torch.backends.cuda.matmul
    saved = (
        torch.get_float32_matmul_precision(),
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
    )
    try:
        torch.set_float32_matmul_precision("medium")
        matmul.allow_fp16_reduced_precision_reduction = True
        matmul.allow_bf16_reduced_precision_reduction = True
        kernels.exact_matmul()
        assert torch.get_float32_matmul_precision() == "highest"
        assert not matmul.allow_fp16_reduced_precision_reduction
        assert not matmul.allow_bf16_reduced_precision_reduction
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_fp16_reduced_precision_reduction = saved[1]
        matmul.allow_bf16_reduced_precision_reduction = saved[2]
        kernels.exact_matmul()


def test_quantization_works_in_float32_whatever_the_rows_dtype() -> None:
    rows = torch.tensor([[0.0, 1.0, 0.2], [2.0, 2.0, 2.0]], dtype=torch.float16)
    codes, qparams = kernels.quantize(rows)
    assert codes.dtype == torch.uint8 and qparams.dtype == torch.float32
    assert codes.tolist() == [[0, 255, 51], [0, 0, 0]]  # a constant row: code 0, bias it
    assert torch.equal(qparams, torch.tensor([[1 / 255, 0.0], [0.0, 2.0]], dtype=torch.float32))
    back = kernels.dequantize(codes, qparams)
    assert back.dtype == torch.float32 and back[1].tolist() == [2.0, 2.0, 2.0]


def test_cached_tables_pool_in_their_own_dtype_and_take_ids_on_the_host() -> None:
    host = quarters(40, 4, torch.float16, seed=4)
    cached = CachedRows(host.clone(), 10, torch.device("cpu"))
    ids = torch.tensor([3, 0, 39, 3, 0])
    offsets = torch.tensor([0, 2])
    pooled = kernels.pooled_gather(cached, ids, offsets, "sum", padding_id=0)
    assert pooled.dtype == torch.float16
    assert torch.equal(pooled, kernels.pooled_gather(host, ids, offsets, "sum", padding_id=0))
    meta = CachedRows(host, 10, torch.device("meta"), allocate=False)
    assert kernels.ids_device(meta, dense=False) == torch.device("cpu")
    assert kernels.ids_device(meta, dense=True) == torch.device("meta")
    assert kernels.ids_device(host.to("meta"), dense=False) == torch.device("meta")
