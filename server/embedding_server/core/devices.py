"""Where kernels run and how their results come back: a CUDA stream per thread, device
timing, waiting without spinning, the copy to host memory through a bounded set of
pinned blocks, and the memory a device has free. On the CPU each is the plain thing (a
wall clock, a numpy view of the tensor).

The stream model (CUDA): every thread that runs kernels (a handler thread, the
batcher) runs them inside `on_device(device)`, on a stream of its own, with that device
current. So a call waits only for its own work, its kernel time counts its own kernels
(and the time they wait for a device busy with other calls' kernels), and no thread
touches a device its tables are not on (no stray context on cuda:0). Work on different
streams is unordered, so:

- writers (row updates, loads) synchronise the whole device before a reader may see
  their rows (the table's lock or seqlock, see `Table.read`);
- a cached table orders its own cache writes and reads across streams with an event
  (see `CachedRows`);
- a result is read on the host only after `finish()` on the stream that made it.

Waits use events created with `blocking=True`: the waiting thread sleeps instead of
spinning a core (CUDA spins by default when it has cores to spare, which with several
server processes starves the threads serving gRPC).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

from embedding_server.errors import DeadlineExceeded

T = TypeVar("T")

# bfloat16 has no numpy dtype; its bits leave the device as int16.
WIRE_VIEW = {torch.bfloat16: torch.int16}

_thread = threading.local()


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's own stream on CUDA `device` (made on first use, kept for the thread's
    life; torch hands out streams from a pool of 32 per device, so threads past 32 share)."""
    streams: dict[int, torch.cuda.Stream] = _thread.__dict__.setdefault("streams", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = streams.get(index)
    if stream is None:
        stream = streams[index] = torch.cuda.Stream(torch.device("cuda", index))
    return stream


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context running its block with `device` current and this thread's own stream on
    it (CUDA); on any other device, one that does nothing (and costs next to nothing: it
    is entered on every lookup)."""
    if device.type != "cuda":
        return _NOTHING
    return _on_cuda(device)


@contextlib.contextmanager
def _on_cuda(device: torch.device) -> Iterator[None]:
    with torch.cuda.device(device), torch.cuda.stream(thread_stream(device)):
        yield


def finish(device: torch.device) -> None:
    """Wait, asleep, until the work this thread queued on `device`'s current stream is done
    (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(device))
        done.synchronize()


def timed(device: torch.device, kernel: Callable[[], T]) -> tuple[T, float]:
    """Run `kernel` and return its result, finished, with its device time in seconds.

    On CUDA the time comes from events recorded on `device`'s current stream around the
    launches (device time, not host time), and the call returns once the kernel has
    finished there; on the CPU from a wall clock around the call.
    """
    if device.type != "cuda":
        began = time.perf_counter()
        result = kernel()
        return result, time.perf_counter() - began
    stream = torch.cuda.current_stream(device)
    start = torch.cuda.Event(enable_timing=True, blocking=True)
    end = torch.cuda.Event(enable_timing=True, blocking=True)
    start.record(stream)
    result = kernel()
    end.record(stream)
    end.synchronize()
    return result, start.elapsed_time(end) / 1e3


def paced(device: torch.device, deadline: float | None, ahead: int = 2) -> Callable[[], None]:
    """A check to call before each block of a long computation: raises `DeadlineExceeded`
    once `deadline` (time.monotonic()) has passed. On CUDA, launches return at once, so
    the check first waits until no more than `ahead` earlier blocks are still queued: the
    deadline is then checked against work done, not work launched, and a call stops
    within a few blocks of device time of its deadline."""
    if deadline is None:
        return lambda: None
    queued: list[torch.cuda.Event] = []

    def check() -> None:
        if device.type == "cuda":
            mark = torch.cuda.Event(blocking=True)
            mark.record(torch.cuda.current_stream(device))
            queued.append(mark)
            if len(queued) > ahead:
                queued.pop(0).synchronize()
        if time.monotonic() > deadline:
            raise DeadlineExceeded("deadline exceeded during the one-hot matmul")

    return check


class PinnedBlocks:
    """At most `count` page-locked host blocks of `block_bytes` each, for results leaving a
    device: made on first use, then kept and reused, never freed.

    The device copies into pinned memory several times faster than into pageable memory,
    but torch's pinned allocator rounds every request up to a power of two and keeps every
    block it ever made for the life of the process (pytorch/pytorch#150517): pinning each
    result as it comes would leave as much page-locked memory as the largest burst of
    results ever in flight. Here the total is fixed at count x block_bytes; a result
    larger than a block, or arriving when every block is in use, is copied to pageable
    memory instead.

    A block is in use while any array viewing it lives (the response being serialised):
    it comes back when the last one is gone.
    """

    def __init__(self, block_bytes: int, count: int, *, pin: bool = True) -> None:
        self.block_bytes = block_bytes
        self.count = count
        self.pin = pin  # False only in tests on machines without CUDA
        self._free: list[torch.Tensor] = []
        self._made = 0
        self._lock = threading.Lock()

    @classmethod
    def with_budget(cls, total_bytes: int, block_bytes: int = 8 << 20) -> PinnedBlocks:
        """Blocks of `block_bytes` (smaller if the budget is) adding up to `total_bytes`."""
        block = min(block_bytes, total_bytes)
        return cls(block, total_bytes // block if block else 0)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._made - len(self._free)

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, np.ndarray] | None:
        """A tensor of `shape` and `dtype` in a free pinned block and the numpy array of the
        same memory, or None (too large, no block free, or the memory cannot be pinned).
        The block is free again once that array, and every view of it, is gone."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.block_bytes:
            return None
        with self._lock:
            block = self._free.pop() if self._free else None
            if block is None:
                if self._made >= self.count:
                    return None
                self._made += 1
        if block is None:
            try:
                block = torch.empty(self.block_bytes, dtype=torch.uint8, pin_memory=self.pin)
            except RuntimeError:  # e.g. over RLIMIT_MEMLOCK: pageable copies still work
                with self._lock:
                    self._made -= 1
                return None
        tensor = block[:nbytes].view(dtype).view(shape)
        array = tensor.numpy()
        # The array's base (a tensor torch makes for it) lives as long as the array or
        # any view of it does; the tensor above does not.
        weakref.finalize(array if array.base is None else array.base, self._give_back, block)
        return tensor, array

    def _give_back(self, block: torch.Tensor) -> None:
        with self._lock:
            self._free.append(block)


def to_host(
    vectors: torch.Tensor, dtype: torch.dtype | None = None, staging: PinnedBlocks | None = None
) -> np.ndarray:
    """A numpy array of `vectors`' bits, converted to `dtype` first if given (bfloat16 as
    int16: numpy has no bfloat16). From CUDA the copy goes through a block of `staging`
    when one is free and large enough, else into pageable memory; it has finished when
    this returns."""
    if dtype is not None and vectors.dtype != dtype:
        vectors = vectors.to(dtype)
    vectors = vectors.view(WIRE_VIEW.get(vectors.dtype, vectors.dtype))
    if vectors.device.type != "cuda":
        return vectors.numpy()
    staged = None if staging is None else staging.take(tuple(vectors.shape), vectors.dtype)
    if staged is None:
        host = torch.empty(vectors.shape, dtype=vectors.dtype)
        staged = host, host.numpy()
    staged[0].copy_(vectors, non_blocking=True)
    finish(vectors.device)
    return staged[1]


def available_bytes(device: torch.device) -> int:
    """Bytes a new allocation could take on `device` now. CUDA: free on the device plus
    what torch's allocator holds unused, after releasing the memory of tensors other
    processes have let go of (`torch.cuda.ipc_collect`: a table version sent to worker
    processes stays allocated here until then). CPU: the kernel's MemAvailable."""
    if device.type == "cuda":
        torch.cuda.ipc_collect()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def release_unused(device: torch.device) -> int:
    """Free the memory of tensors the processes they were sent to have all let go of
    (`torch.cuda.ipc_collect`), and if that freed any, hand torch's cached blocks back to
    the driver, so that other processes (the workers of a supervisor) and `nvidia-smi` see
    it free. Returns the bytes freed (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    held = torch.cuda.memory_allocated(device)
    torch.cuda.ipc_collect()
    freed = held - torch.cuda.memory_allocated(device)
    if freed > 0:
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
    return max(freed, 0)
