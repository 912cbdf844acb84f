"""CallPool: few calls run at once, a waiting call lets another run, and the count comes back."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import pytest

from embedding_server.process.callpool import CallPool


class Gauge:
    """Counts calls inside `hold()` and remembers the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self._lock = threading.Lock()

    def hold(self, seconds: float) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self._lock:
            self.now -= 1


@pytest.mark.parametrize("threads", [1, 3])
def test_at_most_threads_calls_run_at_once(threads: int) -> None:
    pool = CallPool(threads, max_threads=16)
    gauge = Gauge()
    try:
        done = [pool.submit(gauge.hold, 0.02) for _ in range(12)]
        futures.wait(done, timeout=30)
        assert all(f.done() and f.exception() is None for f in done)
        assert gauge.most == threads  # the limit is reached and never passed
        assert len(pool._alive) <= threads
    finally:
        pool.shutdown()


def test_a_blocking_call_lets_a_queued_call_run_then_the_count_comes_back() -> None:
    pool = CallPool(1, max_threads=4)
    release = threading.Event()

    def wait_blocking() -> str:
        with pool.blocking():
            assert release.wait(30)
        return "waited"

    try:
        waiting = pool.submit(wait_blocking)
        quick = pool.submit(lambda: "quick")
        assert quick.result(timeout=10) == "quick"  # ran while the first call waited
        assert not waiting.done()
        release.set()
        assert waiting.result(timeout=10) == "waited"
        deadline = time.monotonic() + 10
        while len(pool._alive) > 1:  # the extra thread leaves after its call
            pool.submit(lambda: None).result(timeout=10)
            assert time.monotonic() < deadline, f"{len(pool._alive)} threads stayed"
    finally:
        release.set()
        pool.shutdown()


def test_a_call_waiting_without_saying_so_holds_its_place() -> None:
    """The control for the test above: without blocking(), the queued call cannot run."""
    pool = CallPool(1, max_threads=4)
    release = threading.Event()
    try:
        waiting = pool.submit(release.wait, 30)
        quick = pool.submit(lambda: "quick")
        with pytest.raises(futures.TimeoutError):
            quick.result(timeout=0.3)
        release.set()
        assert waiting.result(timeout=10) is True
        assert quick.result(timeout=10) == "quick"
    finally:
        release.set()
        pool.shutdown()


def test_max_threads_bounds_the_threads_even_when_all_wait() -> None:
    pool = CallPool(1, max_threads=2)
    release = threading.Event()

    def wait_blocking() -> None:
        with pool.blocking():
            release.wait(30)

    try:
        waiting = [pool.submit(wait_blocking) for _ in range(2)]
        third = pool.submit(lambda: "third")
        with pytest.raises(futures.TimeoutError):
            third.result(timeout=0.3)
        assert len(pool._alive) == 2
        release.set()
        assert third.result(timeout=10) == "third"
        futures.wait(waiting, timeout=10)
    finally:
        release.set()
        pool.shutdown()


def test_errors_reach_the_future_and_the_thread_goes_on() -> None:
    pool = CallPool(1, max_threads=1)
    try:
        failed = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result(timeout=10)
        assert pool.submit(lambda x: x + 1, 41).result(timeout=10) == 42
    finally:
        pool.shutdown()


def test_shutdown_finishes_queued_work_and_refuses_new() -> None:
    pool = CallPool(1, max_threads=1)
    gauge = Gauge()
    queued = [pool.submit(gauge.hold, 0.01) for _ in range(5)]
    pool.shutdown(wait=True)
    assert all(f.done() and f.exception() is None for f in queued)
    assert not pool._alive
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)


def test_shutdown_can_cancel_what_is_queued() -> None:
    pool = CallPool(1, max_threads=1)
    started, release = threading.Event(), threading.Event()

    def first() -> bool:
        started.set()
        return release.wait(30)

    running = pool.submit(first)
    queued = [pool.submit(lambda: None) for _ in range(3)]
    assert started.wait(10)
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert running.result(timeout=10) is True
    assert all(f.cancelled() for f in queued)


def test_blocking_off_the_pool_does_nothing() -> None:
    pool = CallPool(1, max_threads=1)
    with pool.blocking():
        assert pool._blocked == 0
    pool.shutdown()


def test_threads_must_fit_in_max_threads() -> None:
    with pytest.raises(ValueError, match="max_threads"):
        CallPool(4, max_threads=2)
