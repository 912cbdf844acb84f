"""The two ways to compute W[ids]: a gather and a one-hot matrix product.

Plain functions of tensors, testable without a server. Both return shape
ids.shape + [dim] in the table's dtype, on the table's device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar, Union

import numpy as np
import torch

from embedding_server.errors import DeadlineExceeded

T = TypeVar("T")


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

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) dequantized: only the rows asked for are read and
        converted (index_select: ~9x faster than advanced indexing on the CPU here)."""
        flat = ids.reshape(-1)
        rows = dequantize(self.codes.index_select(0, flat), self.qparams.index_select(0, flat))
        return rows.reshape(*ids.shape, self.codes.shape[1])


# What the kernels read: a float table, a quantized one, or one cached on a device.
Rows = Union[torch.Tensor, QuantizedRows, "CachedRows"]


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


def gather(table: Rows, ids: torch.Tensor, padding_id: int | None = None) -> torch.Tensor:
    """W[ids]: one row read per id (`torch.nn.functional.embedding`, or the fused
    dequantizing gather of a quantized table); rows of `padding_id` come back as zeros."""
    if isinstance(table, torch.Tensor):
        rows = torch.nn.functional.embedding(ids, table)
    else:
        rows = table.take(ids)
    if padding_id is not None:
        rows.masked_fill_((ids == padding_id).unsqueeze(-1), 0)
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
        zero = torch.zeros((1, table.shape[1]), dtype=table.dtype, device=table.device)
        table = torch.cat([table.take(ids), zero])
        local = torch.arange(ids.numel(), device=ids.device)
        if padding_id is not None:
            local[ids == padding_id] = ids.numel()
        ids, padding_id = local, ids.numel()
    return torch.nn.functional.embedding_bag(
        ids,
        table,
        offsets,
        mode=mode,
        per_sample_weights=None if weights is None else weights.to(table.dtype),
        padding_idx=padding_id,
    )


def _exact_matmul() -> None:
    # The dense path must agree with the gather bit for bit: no TF32 and no
    # reduced-precision reductions. Set on every call since these are process-wide.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.allow_tf32 = False


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
    _exact_matmul()
    rows, dim = table.shape
    flat = ids.reshape(-1)
    out = torch.empty((flat.numel(), dim), dtype=table.dtype, device=table.device)
    vocab_chunk = max(1, min(rows, chunk_cells))
    ids_chunk = max(1, chunk_cells // vocab_chunk)
    check = _deadline_check(deadline)
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
    _exact_matmul()
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
    check = _deadline_check(deadline)
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


def _deadline_check(deadline: float | None) -> Callable[[], None]:
    def check() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("deadline exceeded during the one-hot matmul")

    return check


# bfloat16 has no numpy dtype; its bits leave the device as int16.
_WIRE_VIEW = {torch.bfloat16: torch.int16}


# Below this many output elements torch's CPU gather runs on one thread anyway (its
# parallel grain size), so numpy's take does the same copy without torch's per-call cost.
HOST_TAKE_ELEMENTS = 32_768


def takes_on_host(table: Rows, ids: np.ndarray) -> TypeGuard[torch.Tensor]:
    """Whether `host_take` serves this gather: a plain table in host memory, a small batch."""
    return (
        isinstance(table, torch.Tensor)
        and table.device.type == "cpu"
        and ids.size * table.shape[1] <= HOST_TAKE_ELEMENTS
    )


def host_take(table: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """W[ids] by numpy, as the bits `to_host` would give (bfloat16 as int16), for the
    gathers `takes_on_host` admits.

    In the server's threads each torch call releases and retakes the GIL and goes through
    the dispatcher: at B = 1 that cost ~70 us of CPU per call in the server (against a
    numpy take), though ~5 us in a loop.
    """
    rows: np.ndarray = table.view(_WIRE_VIEW.get(table.dtype, table.dtype)).numpy()
    return rows.take(ids, axis=0)


def to_host(vectors: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A numpy array of `vectors`' bits, converted to `dtype` first if given (bfloat16
    as int16: numpy has no bfloat16).

    From CUDA the copy goes through pinned host memory (torch caches those blocks), which
    the device copies into several times faster than into pageable memory.
    """
    if dtype is not None and vectors.dtype != dtype:
        vectors = vectors.to(dtype)
    vectors = vectors.view(_WIRE_VIEW.get(vectors.dtype, vectors.dtype))
    if vectors.device.type != "cuda":
        return vectors.numpy()
    staging = torch.empty(vectors.shape, dtype=vectors.dtype, pin_memory=True)
    staging.copy_(vectors, non_blocking=True)
    torch.cuda.current_stream(vectors.device).synchronize()
    return staging.numpy()


def timed(device: torch.device, kernel: Callable[[], T]) -> tuple[T, float]:
    """Run `kernel` and return its result with its device time in seconds.

    On CUDA the time comes from events around the launch (device time, not host
    time); on the CPU from a wall clock around the call.
    """
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        result = kernel()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    result = kernel()
    return result, time.perf_counter() - began


class CachedRows:
    """A table kept whole in host memory with its hot rows cached on a device.

    `take(ids)` serves every id from the device cache, first copying the rows that
    missed from the host (one batched copy) into slots chosen by CLOCK (second chance):
    a slot used recently survives one sweep of the hand. A request with more distinct ids
    than the cache holds is served from the host directly. Slices (the dense path) read
    the host table. Lookups on one cached table are serialised by its mutex; hits,
    misses and evictions go to `record(hits, misses, evictions)`.
    """

    def __init__(
        self,
        host: torch.Tensor,
        slots: int,
        device: torch.device,
        record: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.host = host
        self.slots = min(slots, host.shape[0])
        self.cache = torch.empty((self.slots, host.shape[1]), dtype=host.dtype, device=device)
        self.record = record or (lambda hits, misses, evictions: None)
        self._slot_of = np.full(host.shape[0], -1, dtype=np.int64)  # row -> slot, -1: absent
        self._row_in = np.full(self.slots, -1, dtype=np.int64)  # slot -> row, -1: free
        self._used = np.zeros(self.slots, dtype=bool)  # CLOCK's second-chance bits
        self._hand = 0
        self._mutex = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # Another process (a --processes worker) gets the same host table and a cache of
        # its own, empty: device caches are per process.
        return (CachedRows, (self.host, self.slots, self.cache.device, self.record))

    @property
    def shape(self) -> torch.Size:
        return self.host.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.host.dtype

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.host[rows].to(self.cache.device, non_blocking=True)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape), on the cache's device, through the cache."""
        flat = ids.reshape(-1).cpu().numpy()
        unique, inverse = np.unique(flat, return_inverse=True)
        with self._mutex:
            slots = self._slot_of[unique]
            missing = slots < 0
            misses = int(missing.sum())
            if unique.size > self.slots:  # cannot hold them all: straight from the host
                self.record(unique.size - misses, misses, 0)
                rows = self.host.index_select(0, torch.from_numpy(flat))
                return rows.to(self.cache.device).reshape(*ids.shape, self.host.shape[1])
            self._used[slots[~missing]] = True
            evicted = 0
            if misses:
                fresh, evicted = self._free_slots(misses, protect=slots[~missing])
                rows = torch.from_numpy(unique[missing])
                staged = self.host.index_select(0, rows)
                if self.cache.device.type == "cuda":
                    staged = staged.pin_memory()
                self.cache[torch.from_numpy(fresh).to(self.cache.device)] = staged.to(
                    self.cache.device, non_blocking=True
                )
                self._slot_of[unique[missing]] = fresh
                self._row_in[fresh] = unique[missing]
                self._used[fresh] = True
                slots[missing] = fresh
            index = torch.from_numpy(slots[inverse]).to(self.cache.device)
            out = self.cache.index_select(0, index)
        self.record(unique.size - misses, misses, evicted)
        return out.reshape(*ids.shape, self.host.shape[1])

    def _free_slots(self, count: int, protect: np.ndarray) -> tuple[np.ndarray, int]:
        """`count` slots for new rows, by CLOCK from the hand, vectorised: free or cold
        (not used since the hand last passed) slots are taken in order; hot ones passed
        over lose their bit (their second chance); never a slot in `protect` (rows this
        request reads). Returns the slots and how many rows were evicted from them."""
        # Look at a window ahead of the hand first (cost grows with the misses, not with
        # the cache), widening it only when it holds too few cold slots.
        span = min(self.slots, 2 * (count + protect.size) + 64)
        while True:
            order = (self._hand + np.arange(span)) % self.slots
            candidates = order[~np.isin(order, protect)]
            cold = np.flatnonzero(~self._used[candidates] | (self._row_in[candidates] < 0))
            if cold.size >= count or span == self.slots:
                break
            span = min(self.slots, span * 4)
        if cold.size >= count:
            chosen = candidates[cold[:count]]
            self._used[candidates[: cold[count - 1] + 1]] = False
        else:  # a whole sweep: every bit cleared, then the hot ones in order too
            self._used[candidates] = False
            hot = np.setdiff1d(np.arange(candidates.size), cold, assume_unique=True)
            chosen = candidates[np.concatenate([cold, hot[: count - cold.size]])]
        self._hand = int(chosen[-1] + 1) % self.slots
        rows = self._row_in[chosen]
        occupied = rows >= 0
        self._slot_of[rows[occupied]] = -1
        self._row_in[chosen] = -1
        return chosen, int(occupied.sum())

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite rows `ids` in the host table and in the cache where cached."""
        with self._mutex:
            self.host.index_copy_(0, ids.cpu(), rows.to(self.host.device))
            slots = self._slot_of[ids.cpu().numpy()]
            cached = slots >= 0
            if cached.any():
                self.cache[torch.from_numpy(slots[cached]).to(self.cache.device)] = rows[
                    torch.from_numpy(np.flatnonzero(cached)).to(rows.device)
                ].to(self.cache.device)
