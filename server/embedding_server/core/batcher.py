"""Dynamic batching: concurrent Lookup requests to one table coalesced into one gather.

A request hands its ids to the batcher and waits. One collector thread takes the first
waiting request and keeps collecting while other calls are on their way (announced by
`expect()` while they are checked, so a lone call does not wait for nobody), for at
most `max_delay_s` and up to `max_ids` ids; then it runs one gather over all their ids,
copies the result to the host once, and slices each request's rows back out. On a GPU
that is one kernel launch and one device-to-host copy instead of one per request; on
the CPU it saves little (the per-call cost is in gRPC and Python, which batching does
not touch), which is why it is off unless asked for (`--batching`); see
docs/performance.md.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from embedding_server import metrics
from embedding_server.core import devices, kernels
from embedding_server.core.tables import Stamp, Table


@dataclass
class _Request:
    table: Table
    ids: np.ndarray
    dtype: torch.dtype
    answer: Future[tuple[np.ndarray, float, Stamp]] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Coalesces gathers; `gather()` is called from many handler threads at once."""

    def __init__(
        self,
        max_delay_s: float,
        max_ids: int,
        waiting: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        staging: devices.PinnedBlocks | None = None,
    ) -> None:
        self.max_delay_s = max_delay_s
        self.max_ids = max_ids
        self.waiting = waiting  # entered while a call waits for its batch (CallPool.blocking)
        self.staging = staging  # pinned blocks for results leaving a CUDA device
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._held: list[_Request | None] = []  # taken from the queue, left for the next batch
        self._arriving = 0  # calls announced by expect() and not yet queued or given up
        self._arriving_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def expect(self) -> Arrival:
        """Announce a call that may reach the batcher soon (it is being checked): while one
        is on its way, the collector waits for it. Use as a context manager and call its
        `gather()` inside, or leave the block without (a refused request)."""
        return Arrival(self)

    def gather(
        self, table: Table, ids: np.ndarray, dtype: torch.dtype
    ) -> tuple[np.ndarray, float, Stamp]:
        """table.weights[ids] in `dtype` as a row-major array (a slice of the coalesced
        result, which it keeps alive), with the device time of the coalesced gather it was
        part of and the table's stamp it read. Ids must already be checked against the
        table."""
        return self._submit(_Request(table, ids, dtype))

    def _submit(
        self, request: _Request, arrival: Arrival | None = None
    ) -> tuple[np.ndarray, float, Stamp]:
        self._queue.put(request)
        if arrival is not None:
            arrival.leave()  # queued: no longer on its way
        with self.waiting():
            return request.answer.result()

    def _count_arriving(self, delta: int) -> None:
        with self._arriving_lock:
            self._arriving += delta

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._held.pop() if self._held else self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            try:
                self._serve(batch)
            except Exception as exc:  # the callers see it as their own error
                for request in batch:
                    if not request.answer.done():
                        request.answer.set_exception(exc)

    def _collect(self, first: _Request) -> list[_Request]:
        """`first` and what joins it within the delay: same table version and dtype, up to
        max_ids ids. The first request that does not fit is held for the next batch."""
        batch, size = [first], first.ids.size
        deadline = time.perf_counter() + self.max_delay_s
        while size < self.max_ids:
            if self._arriving == 0 and self._queue.empty():
                break  # nobody else is on the way: do not wait for nobody
            remaining = deadline - time.perf_counter()
            try:
                if remaining > 0:
                    request = self._queue.get(timeout=remaining)
                else:
                    request = self._queue.get_nowait()  # no delay: what is already waiting
            except queue.Empty:
                break
            if (
                request is None  # close()
                or request.table is not first.table
                or request.dtype != first.dtype
                or size + request.ids.size > self.max_ids
            ):
                self._held.append(request)
                break
            batch.append(request)
            size += request.ids.size
        return batch

    def _serve(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        table = batch[0].table
        weights = table.rows_for_kernels()
        ids = np.concatenate([r.ids.reshape(-1) for r in batch])
        with devices.on_device(weights.device):  # the batcher's own stream
            device_ids = torch.from_numpy(ids).to(kernels.ids_device(weights, dense=False))
            (vectors, seconds), stamp = table.read(  # no half-updated row; the stamp seen
                lambda: devices.timed(weights.device, lambda: kernels.gather(weights, device_ids))
            )
            host = devices.to_host(vectors, batch[0].dtype, self.staging)
        metrics.child(metrics.BATCH_IDS, table.name).observe(ids.size)
        metrics.child(metrics.BATCH_REQUESTS, table.name).observe(len(batch))
        queue_wait = metrics.child(metrics.BATCH_QUEUE_SECONDS, table.name)
        start = 0
        for request in batch:
            queue_wait.observe(started - request.queued_at)
            stop = start + request.ids.size
            request.answer.set_result((host[start:stop], seconds, stamp))
            start = stop


class Arrival:
    """A call on its way to the batcher (see `Batcher.expect`)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self._counted = False

    def __enter__(self) -> Arrival:
        self.batcher._count_arriving(1)
        self._counted = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leave()

    def leave(self) -> None:
        if self._counted:
            self._counted = False
            self.batcher._count_arriving(-1)

    def gather(
        self, table: Table, ids: np.ndarray, dtype: torch.dtype
    ) -> tuple[np.ndarray, float, Stamp]:
        """`Batcher.gather`, counting this call as arrived once it is queued."""
        return self.batcher._submit(_Request(table, ids, dtype), self)
