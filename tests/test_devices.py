"""Where kernels run: device timing on the right stream, paced deadlines, bounded pinned
staging, exact matmul settings. The CUDA calls are checked here against a stand-in of
torch.cuda that records them (no GPU needed); tests/test_cuda.py runs the real ones."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch

from embedding_server.core import devices
from embedding_server.errors import DeadlineExceeded

CUDA1 = torch.device("cuda", 1)


class FakeCuda:
    """Records what devices.py asks of torch.cuda: streams by device, events and their
    flags, records, waits."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.events: list[FakeCuda.Event] = []
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
                self.enable_timing, self.blocking = enable_timing, blocking
                self.stream: str | None = None
                self.synchronized = False
                fake.events.append(self)

            def record(self, stream: str | None = None) -> None:
                self.stream = stream
                fake.calls.append(("record", stream))

            def synchronize(self) -> None:
                self.synchronized = True
                fake.calls.append(("synchronize", self.stream))

            def elapsed_time(self, end: Event) -> float:
                return 2.5  # milliseconds

        self.Event = Event

    def current_stream(self, device: torch.device | None = None) -> str:
        self.calls.append(("current_stream", device))
        return f"stream of {device}"


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)
    return fake


def test_timed_records_on_the_tables_device_with_sleeping_events(fake_cuda: FakeCuda) -> None:
    result, seconds = devices.timed(CUDA1, lambda: "rows")
    assert (result, seconds) == ("rows", 2.5e-3)
    # Both events on cuda:1's current stream (not the thread's current device, cuda:0),
    # timing and blocking (a waiting thread sleeps), and the end waited for.
    assert ("current_stream", CUDA1) in fake_cuda.calls
    start, end = fake_cuda.events
    assert start.stream == end.stream == f"stream of {CUDA1}"
    assert all(e.enable_timing and e.blocking for e in (start, end))
    assert end.synchronized


def test_finish_waits_asleep_on_the_devices_stream(fake_cuda: FakeCuda) -> None:
    devices.finish(CUDA1)
    (done,) = fake_cuda.events
    assert done.blocking and done.synchronized and done.stream == f"stream of {CUDA1}"
    devices.finish(torch.device("cpu"))  # nothing to wait for
    assert len(fake_cuda.events) == 1


def test_paced_blocks_wait_for_work_done_before_the_deadline_check(fake_cuda: FakeCuda) -> None:
    check = devices.paced(CUDA1, time.monotonic() + 60, ahead=2)
    for _ in range(5):
        check()
    # One mark per block; each check waits for the mark from two blocks before, so at
    # most two blocks are queued on the device when the deadline is read.
    marks = fake_cuda.events
    assert len(marks) == 5 and all(m.blocking for m in marks)
    assert [m.synchronized for m in marks] == [True, True, True, False, False]
    late = devices.paced(CUDA1, time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        late()


def test_paced_on_the_cpu_checks_the_clock_only() -> None:
    devices.paced(torch.device("cpu"), None)()
    devices.paced(torch.device("cpu"), time.monotonic() + 60)()
    with pytest.raises(DeadlineExceeded, match="one-hot matmul"):
        devices.paced(torch.device("cpu"), time.monotonic() - 1)()


def test_on_device_leaves_the_cpu_as_it_is() -> None:
    with devices.on_device(torch.device("cpu")):
        assert devices.to_host(torch.arange(3.0)).tolist() == [0.0, 1.0, 2.0]


def _array(blocks: devices.PinnedBlocks, shape: tuple[int, ...], value: float) -> np.ndarray:
    staged = blocks.take(shape, torch.float32)
    assert staged is not None
    tensor, array = staged
    tensor.fill_(value)  # as the device's copy fills it
    return array


def test_pinned_blocks_are_bounded_and_reused() -> None:
    blocks = devices.PinnedBlocks(1024, 2, pin=False)
    first = _array(blocks, (4, 8), 1.0)
    second = _array(blocks, (2, 2), 2.0)
    assert blocks.take((1,), torch.float32) is None  # both in use: the caller copies pageable
    assert blocks.take((257,), torch.float32) is None  # 1,028 bytes: larger than a block
    address = first.ctypes.data
    del first
    gc.collect()
    third = blocks.take((16,), torch.float16)
    assert third is not None and third[0].shape == (16,) and third[1].dtype == np.float16
    assert third[0].data_ptr() == third[1].ctypes.data == address  # the same block again
    assert second.tolist() == [[2.0, 2.0], [2.0, 2.0]]  # untouched meanwhile
    assert blocks.in_use == 2


def test_a_block_stays_in_use_while_a_slice_of_its_array_lives() -> None:
    blocks = devices.PinnedBlocks(1024, 1, pin=False)
    whole = _array(blocks, (8, 4), 3.0)
    part = whole[2:4]  # as the batcher hands each request its rows
    del whole
    gc.collect()
    assert blocks.take((1,), torch.float32) is None
    assert part.tolist() == [[3.0] * 4] * 2
    del part
    gc.collect()
    assert blocks.in_use == 0
    assert blocks.take((1,), torch.float32) is not None


def test_pinned_budget_in_blocks() -> None:
    assert (lambda b: (b.block_bytes, b.count))(devices.PinnedBlocks.with_budget(128 << 20)) == (
        8 << 20,
        16,
    )
    small = devices.PinnedBlocks.with_budget(3 << 20)
    assert (small.block_bytes, small.count) == (3 << 20, 1)
    off = devices.PinnedBlocks.with_budget(0)
    assert off.take((1,), torch.float32) is None and off.take((0,), torch.float32) is None


def test_exact_matmul_overrides_nvidias_tf32_default_without_mixing_apis() -> None:
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (NVIDIA's containers) starts torch with TF32 on.
    The dense path must turn it off so that both of torch's flag APIs agree: setting only
    the newer one makes torch refuse every float32 matmul as a mix of the two."""
    probe = (
        "import torch\n"
        "from embedding_server.core import kernels\n"
        "before = torch.backends.cuda.matmul.fp32_precision\n"
        "kernels.exact_matmul()\n"
        "print(before, torch.backends.cuda.matmul.fp32_precision,"
        " torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tf32", "ieee", "False", "highest"]
