"""The two ways to compute W[ids]: a gather and a one-hot matrix product.

Plain functions of tensors, testable without a server. Both return shape
ids.shape + [dim] in the table's dtype, on the table's device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from embedding_server.errors import DeadlineExceeded


def gather(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """W[ids]: one row read per id (`torch.nn.functional.embedding`)."""
    return torch.nn.functional.embedding(ids, table)


def _exact_matmul() -> None:
    # The dense path must agree with the gather bit for bit: no TF32 and no
    # reduced-precision reductions. Set on every call since these are process-wide.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.allow_tf32 = False


def one_hot_matmul(
    table: torch.Tensor,
    ids: torch.Tensor,
    chunk_cells: int,
    deadline: float | None = None,
) -> torch.Tensor:
    """one_hot(ids, rows) @ W, materialising at most `chunk_cells` one-hot cells at once.

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
            hot = (chunk == vocab).to(table.dtype)
            part = hot @ table[vocab_start : vocab_start + vocab_chunk]
            acc = part if acc is None else acc.add_(part)
        assert acc is not None
        out[first : first + chunk.shape[0]] = acc
    return out.reshape(*ids.shape, dim)


def _deadline_check(deadline: float | None) -> Callable[[], None]:
    def check() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("deadline exceeded during the one-hot matmul")

    return check


def timed(device: torch.device, kernel: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
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
