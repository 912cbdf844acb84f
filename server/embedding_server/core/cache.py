"""A table kept in host memory with its hot rows cached on a device (CLOCK eviction)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


class CachedRows:
    """A table kept whole in host memory with its hot rows cached on a device.

    `take(ids)` serves every id from the device cache, first copying the rows that
    missed from the host (one batched copy) into slots chosen by CLOCK (second chance):
    a slot used recently survives one sweep of the hand. A request with more distinct ids
    than the cache holds is served from the host directly. Slices (the dense path) read
    the host table. Lookups on one cached table are serialised by its mutex; hits,
    misses and evictions go to `record(hits, misses, evictions)`.

    On CUDA, threads launch their work on streams of their own (see `devices`), which the
    device does not order: each cache operation therefore waits, on the device, for the
    one before it (an event), so that no slot is overwritten before an earlier gather
    from it has run.

    The device memory is taken at construction, or with `allocate=False` on first use:
    the supervisor of several server processes holds the host table for its workers and
    never serves from a cache of its own.
    """

    def __init__(
        self,
        host: torch.Tensor,
        slots: int,
        device: torch.device,
        record: Callable[[int, int, int], None] | None = None,
        *,
        allocate: bool = True,
    ) -> None:
        self.host = host
        self.slots = min(slots, host.shape[0])
        self._device = device
        self._cache: torch.Tensor | None = None
        self.record = record or (lambda hits, misses, evictions: None)
        self._slot_of = np.full(host.shape[0], -1, dtype=np.int64)  # row -> slot, -1: absent
        self._row_in = np.full(self.slots, -1, dtype=np.int64)  # slot -> row, -1: free
        self._used = np.zeros(self.slots, dtype=bool)  # CLOCK's second-chance bits
        self._hand = 0
        self._mutex = threading.Lock()
        self._last: torch.cuda.Event | None = None  # the previous cache operation, on CUDA
        if allocate:
            _ = self.cache

    def __reduce__(self) -> tuple[Any, ...]:
        # Another process (a --processes worker) gets the same host table and a cache of
        # its own, empty: device caches are per process.
        return (CachedRows, (self.host, self.slots, self._device, self.record))

    @property
    def cache(self) -> torch.Tensor:
        """The device rows (taken on first use when not allocated at construction)."""
        if self._cache is None:
            self._cache = torch.empty(
                (self.slots, self.host.shape[1]), dtype=self.host.dtype, device=self._device
            )
        return self._cache

    @property
    def cache_bytes(self) -> int:
        """Device memory the cache holds now (0 before it is allocated)."""
        return 0 if self._cache is None else self._cache.numel() * self._cache.element_size()

    @property
    def shape(self) -> torch.Size:
        return self.host.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.host.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.host[rows].to(self._device, non_blocking=True)

    @contextlib.contextmanager
    def _in_order(self) -> Iterator[None]:
        """Hold the mutex, with this thread's stream waiting for the previous cache
        operation and the next one waiting for this one (CUDA)."""
        with self._mutex:
            if self._device.type != "cuda":
                yield
                return
            stream = torch.cuda.current_stream(self._device)
            if self._last is not None:
                stream.wait_event(self._last)
            try:
                yield
            finally:
                self._last = torch.cuda.Event()
                self._last.record(stream)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape), on the cache's device, through the cache."""
        flat = ids.reshape(-1).cpu().numpy()
        unique, inverse = np.unique(flat, return_inverse=True)
        with self._in_order():
            slots = self._slot_of[unique]
            missing = slots < 0
            misses = int(missing.sum())
            if unique.size > self.slots:  # cannot hold them all: straight from the host
                self.record(unique.size - misses, misses, 0)
                rows = self.host.index_select(0, torch.from_numpy(flat))
                return rows.to(self._device).reshape(*ids.shape, self.host.shape[1])
            self._used[slots[~missing]] = True
            evicted = 0
            if misses:
                fresh, evicted = self._free_slots(misses, protect=slots[~missing])
                rows = torch.from_numpy(unique[missing])
                staged = self.host.index_select(0, rows)
                if self._device.type == "cuda":
                    staged = staged.pin_memory()
                self.cache[torch.from_numpy(fresh).to(self._device)] = staged.to(
                    self._device, non_blocking=True
                )
                self._slot_of[unique[missing]] = fresh
                self._row_in[fresh] = unique[missing]
                self._used[fresh] = True
                slots[missing] = fresh
            index = torch.from_numpy(slots[inverse]).to(self._device)
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
        with self._in_order():
            self.host.index_copy_(0, ids.cpu(), rows.to(self.host.device))
            slots = self._slot_of[ids.cpu().numpy()]
            cached = slots >= 0
            if cached.any():
                self.cache[torch.from_numpy(slots[cached]).to(self._device)] = rows[
                    torch.from_numpy(np.flatnonzero(cached)).to(rows.device)
                ].to(self._device)
