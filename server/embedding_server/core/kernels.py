"""The two ways to compute W[ids]: a gather and a one-hot matrix product.

Plain functions of tensors, testable without a server. Both return shape
ids.shape + [dim] in the table's dtype, on the table's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import torch

from embedding_server.core import devices
from embedding_server.core.cache import CachedRows


@dataclass(frozen=True)
class QuantizedRows:
    """A row-wise quantized table: 8-bit codes and, per row, a float32 scale and bias
    (value = code * scale + bias). Kernels read it like a float32 table: a slice or a
    gather dequantizes just those rows, never the whole table."""

    codes: torch.Tensor  # uint8 [rows, dim]
    qparams: torch.Tensor  # float32 [rows, 2]: scale, bias

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return dequantize(self.codes[rows], self.qparams[rows])

    def to_host(self) -> torch.Tensor:
        """The whole table dequantized into host memory (float32), in chunks of rows moved
        to the host first: never a float32 copy of the whole table on the device (4x its
        codes). The same operations as on the device, so the same bits."""
        rows, dim = self.codes.shape
        out = torch.empty((rows, dim), dtype=torch.float32)
        step = max(1, (16 << 20) // dim)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            out[start:stop] = dequantize(
                self.codes[start:stop].cpu(), self.qparams[start:stop].cpu()
            )
        return out

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) dequantized: only the rows asked for are read and
        converted (index_select: ~9x faster than advanced indexing on the CPU here)."""
        flat = ids.reshape(-1)
        rows = dequantize(self.codes.index_select(0, flat), self.qparams.index_select(0, flat))
        return rows.reshape(*ids.shape, self.codes.shape[1])


# What the kernels read: a float table, a quantized one, or one cached on a device.
Rows = torch.Tensor | QuantizedRows | CachedRows


def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise 8-bit quantization of float rows [n, dim]: codes (uint8) and per-row
    (scale, bias) with scale = (max - min) / 255, bias = min; the error of any element
    is at most scale / 2 (plus float32 rounding)."""
    rows = rows.to(torch.float32)
    low = rows.amin(dim=1, keepdim=True)
    high = rows.amax(dim=1, keepdim=True)
    scale = (high - low) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant rows: code 0
    codes = torch.round((rows - low) / safe).clamp_(0, 255).to(torch.uint8)
    return codes, torch.cat([scale, low], dim=1)


def dequantize(codes: torch.Tensor, qparams: torch.Tensor) -> torch.Tensor:
    """code * scale + bias in float32, in place on the converted codes (the same two
    roundings on every path, so a gather and a one-hot matmul agree bit for bit)."""
    rows = codes.to(torch.float32)
    return rows.mul_(qparams[..., 0:1]).add_(qparams[..., 1:2])


def ids_device(table: Rows, dense: bool) -> torch.device:
    """Where a kernel over `table` wants its ids: on the table's device, except for the
    gathers of a cached table, which look the ids up in host memory first (so they
    would only come back from the device)."""
    if isinstance(table, CachedRows) and not dense:
        return torch.device("cpu")
    return table.device


def gather(table: Rows, ids: torch.Tensor, padding_id: int | None = None) -> torch.Tensor:
    """W[ids]: one row read per id (`torch.nn.functional.embedding`, or the fused
    dequantizing gather of a quantized table); rows of `padding_id` come back as zeros."""
    if isinstance(table, torch.Tensor):
        rows = torch.nn.functional.embedding(ids, table)
    else:
        rows = table.take(ids)
    if padding_id is not None:
        rows.masked_fill_((ids == padding_id).unsqueeze(-1).to(rows.device), 0)
    return rows


def pooled_gather(
    table: Rows,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    mode: str,
    weights: torch.Tensor | None = None,
    padding_id: int | None = None,
) -> torch.Tensor:
    """Each bag's rows reduced by `mode` (sum, mean, max) in one pass
    (`torch.nn.functional.embedding_bag`): [bags, dim]; an empty bag gives zeros.

    Parameters
    ----------
    ids : 1-D; bag b is ids[offsets[b]:offsets[b + 1]], the last one runs to the end
    weights : per id, multiplying its row (sum only)
    padding_id : skipped in every bag, and not counted by mean
    """
    if offsets.numel() == 0:
        return torch.zeros((0, table.shape[1]), dtype=table.dtype, device=table.device)
    if not isinstance(table, torch.Tensor):
        # Take only the rows the bags read (dequantized, or through the cache), plus one
        # zero row that padding points at, then pool those with local indices.
        # (A cached table's ids are in host memory: see `ids_device`.)
        zero = torch.zeros((1, table.shape[1]), dtype=table.dtype, device=table.device)
        local = torch.arange(ids.numel(), device=table.device)
        if padding_id is not None:
            local[(ids == padding_id).to(table.device)] = ids.numel()
        table = torch.cat([table.take(ids), zero])
        ids, padding_id = local, ids.numel()
    return torch.nn.functional.embedding_bag(
        ids,
        table,
        offsets,
        mode=mode,
        per_sample_weights=None if weights is None else weights.to(table.dtype),
        padding_idx=padding_id,
    )


def exact_matmul() -> None:
    """Make float matmuls exact enough for the dense path to agree with the gather bit for
    bit: IEEE float32 (no TF32) and no reduced-precision reductions. Process-wide
    settings, so set before every dense call.

    `torch.set_float32_matmul_precision` sets torch's legacy TF32 flag and its newer
    (torch >= 2.9) `fp32_precision` together. Setting only the newer one is not enough:
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (set in NVIDIA's containers) starts the legacy one
    at TF32, and torch then refuses every float32 matmul as a mix of the two APIs.
    """
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def one_hot_matmul(
    table: Rows,
    ids: torch.Tensor,
    chunk_cells: int,
    deadline: float | None = None,
    padding_id: int | None = None,
) -> torch.Tensor:
    """one_hot(ids, rows) @ W, materialising at most `chunk_cells` one-hot cells at once;
    `padding_id` gets an all-zero one-hot row, so its vector is zeros.

    The one-hot matrix is built in blocks of (ids chunk) x (vocabulary chunk); each
    output row sums one exact product (1.0 * w) and +0.0 terms, so for a finite table
    without negative zeros the result equals `gather` bit for bit in any float dtype.

    Parameters
    ----------
    table : [rows, dim] tensor
    ids : integer tensor of any shape, every value in [0, rows)
    chunk_cells : most one-hot cells (ids x rows) held at once; bounds memory
    deadline : time.monotonic() value after which DeadlineExceeded is raised between blocks
    """
    exact_matmul()
    rows, dim = table.shape
    flat = ids.reshape(-1)
    out = torch.empty((flat.numel(), dim), dtype=table.dtype, device=table.device)
    vocab_chunk = max(1, min(rows, chunk_cells))
    ids_chunk = max(1, chunk_cells // vocab_chunk)
    check = devices.paced(table.device, deadline)
    for first in range(0, flat.numel(), ids_chunk):
        chunk = flat[first : first + ids_chunk].unsqueeze(1)
        acc: torch.Tensor | None = None
        for vocab_start in range(0, rows, vocab_chunk):
            check()
            vocab = torch.arange(
                vocab_start, min(rows, vocab_start + vocab_chunk), device=table.device
            )
            hot = chunk == vocab
            if padding_id is not None:
                hot &= chunk != padding_id
            hot = hot.to(table.dtype)
            part = hot @ table[vocab_start : vocab_start + vocab_chunk]
            acc = part if acc is None else acc.add_(part)
        assert acc is not None
        out[first : first + chunk.shape[0]] = acc
    return out.reshape(*ids.shape, dim)


def pooled_matmul(
    table: Rows,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    mode: str,
    chunk_cells: int,
    deadline: float | None = None,
    weights: torch.Tensor | None = None,
    padding_id: int | None = None,
) -> torch.Tensor:
    """`pooled_gather` the dense way. Sum and mean: a multi-hot (or weighted) matrix of
    [bags, rows] times W, then mean divides by each bag's count; max: the one-hot rows of
    every id, then the largest per bag. Same arguments as `pooled_gather`, plus the
    one-hot cells held at once (`chunk_cells`) and a deadline."""
    exact_matmul()
    rows, dim = table.shape
    bags = offsets.numel()
    bag_of_id = (
        torch.searchsorted(offsets, torch.arange(ids.numel(), device=ids.device), right=True) - 1
    )
    counted = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
    if padding_id is not None:
        counted = ids != padding_id
    per_bag = torch.bincount(bag_of_id[counted], minlength=bags)
    if mode == "max":
        every = one_hot_matmul(table, ids, chunk_cells, deadline, padding_id)
        out = torch.full((bags, dim), float("-inf"), dtype=table.dtype, device=table.device)
        index = bag_of_id[counted].unsqueeze(1).expand(-1, dim)
        out.scatter_reduce_(0, index, every[counted], "amax", include_self=True)
        return out.masked_fill_((per_bag == 0).unsqueeze(1), 0)
    scale = counted.to(table.dtype) if weights is None else weights.to(table.dtype) * counted
    out = torch.zeros((bags, dim), dtype=table.dtype, device=table.device)
    vocab_chunk = max(1, min(rows, chunk_cells))
    bag_chunk = max(1, chunk_cells // vocab_chunk)
    check = devices.paced(table.device, deadline)
    for first in range(0, bags, bag_chunk):
        last = min(bags, first + bag_chunk)
        inside = (bag_of_id >= first) & (bag_of_id < last)
        chunk_ids, chunk_bags, chunk_scale = ids[inside], bag_of_id[inside] - first, scale[inside]
        for vocab_start in range(0, rows, vocab_chunk):
            check()
            vocab_stop = min(rows, vocab_start + vocab_chunk)
            hits = (chunk_ids >= vocab_start) & (chunk_ids < vocab_stop)
            hot = torch.zeros((last - first, vocab_stop - vocab_start), dtype=table.dtype,
                              device=table.device)  # fmt: skip
            hot.index_put_(
                (chunk_bags[hits], chunk_ids[hits] - vocab_start),
                chunk_scale[hits],
                accumulate=True,
            )
            out[first:last] += hot @ table[vocab_start:vocab_stop]
    if mode == "mean":
        out /= per_bag.clamp(min=1).to(table.dtype).unsqueeze(1)
    return out


# Up to this many output elements (16 MiB of float32) a plain gather from a host table is
# numpy's take: the same copy as torch's gather, without torch's per-call cost in a server
# (each torch call releases and retakes the GIL: with several handler threads, a wait for
# it each time). Measured with h2load on 2 cores (docs/performance.md): at B = 1,024 x 128
# ~800 vs ~980 us of server CPU per call, at B = 16,384 the same. Past it, torch's gather,
# which splits one large copy over the cores.
HOST_TAKE_ELEMENTS = 1 << 22


def takes_on_host(table: Rows, ids: np.ndarray) -> TypeGuard[torch.Tensor]:
    """Whether `host_take` serves this gather: a plain table in host memory, a small batch."""
    return (
        isinstance(table, torch.Tensor)
        and table.device.type == "cpu"
        and ids.size * table.shape[1] <= HOST_TAKE_ELEMENTS
    )


def host_take(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """W[ids] by numpy from `rows`, a host table's wire bits (`Table.host_array`): what
    `devices.to_host` would give from the torch gather, for the gathers `takes_on_host`
    admits."""
    return rows.take(ids, axis=0)
