"""A table kept in host memory with its hot rows cached on a device (CLOCK eviction)."""

from __future__ import annotations

import threading
from collections.abc import Callable
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
