"""The handler pool: few threads at once, more only for waits.

The server answers plain lookups on its event loop and runs every other call (dense,
pooled, padded, device and batched lookups, admin RPCs) here, on a pool thread. Every C
call on the way (grpc's core, each torch op) releases and retakes the GIL, so with many
threads busy at once they queue for it at every step: on the 2-core machine a bare
server doing torch lookups answered B = 1 at ~2,100 req/s with 16 threads and ~4,000
with 2 (docs/performance.md, "Handler threads"). So `CallPool` keeps `threads` calls
running at once and queues the rest, like a fixed pool of that size.

A call that will wait a long time (a one-hot matmul, a reload, a batched lookup waiting
for its batch) says so with `blocking()`: while it is inside, it does not count, and
another thread may take queued calls, up to `max_threads` threads in all. A thread that
finds more than `threads` running when its call ends leaves the pool, so the count comes
back down after the wait.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

log = logging.getLogger(__name__)

# (future, function, args, kwargs)
_Work = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class CallPool(futures.Executor):
    """An executor running at most `threads` calls at once, plus those inside `blocking()`,
    on at most `max_threads` threads."""

    def __init__(self, threads: int, max_threads: int, name: str = "rpc") -> None:
        if not 1 <= threads <= max_threads:
            raise ValueError(f"need 1 <= threads ({threads}) <= max_threads ({max_threads})")
        self.threads = threads
        self.max_threads = max_threads
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._alive: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for work
        self._blocked = 0  # threads inside blocking()
        self._queued = 0  # work not yet taken by a thread
        self._shutdown = False
        self._mine = threading.local()  # .inside: one of ours
        self._serial = 0

    @property
    def running(self) -> int:
        """Threads that count against `threads`: alive and not inside `blocking()`."""
        return len(self._alive) - self._blocked

    @property
    def queued(self) -> int:
        """Calls submitted and not yet taken by a thread."""
        return self._queued

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queued += 1
            self._work.put((future, fn, args, kwargs))
            self._grow()
        return future

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """Mark the current call as waiting (not using the interpreter) for a while, so a
        queued call may run meanwhile on another thread. Does nothing off the pool."""
        if not getattr(self._mine, "inside", False):
            yield
            return
        with self._lock:
            self._blocked += 1
            self._grow()
        try:
            yield
        finally:
            with self._lock:
                self._blocked -= 1

    def _grow(self) -> None:
        """Start a thread if queued work would otherwise wait while fewer than `threads`
        run. Called with the lock held."""
        if (
            self._queued > self._idle
            and self.running < self.threads
            and len(self._alive) < self.max_threads
        ):
            self._serial += 1
            thread = threading.Thread(
                target=self._worker, name=f"{self._name}_{self._serial}", daemon=True
            )
            self._alive.add(thread)
            thread.start()

    def _worker(self) -> None:
        self._mine.inside = True
        me = threading.current_thread()
        while True:
            with self._lock:
                self._idle += 1
            work = self._work.get()
            with self._lock:
                self._idle -= 1
                if work is None:  # shutdown
                    self._alive.discard(me)
                    return
                self._queued -= 1
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del work, future, fn, args, kwargs  # no reference kept while idle
            with self._lock:
                if self.running > self.threads:
                    self._alive.discard(me)  # a waiting call came back: one too many now
                    return

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work; the threads finish what is queued (unless `cancel_futures`), then end."""
        with self._lock:
            self._shutdown = True
            threads = list(self._alive)
            if cancel_futures:
                while True:
                    try:
                        work = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if work is not None:
                        self._queued -= 1
                        work[0].cancel()
            for _ in threads:
                self._work.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
