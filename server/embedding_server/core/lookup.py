"""The lookup core: validate ids against a table and the limits, run a kernel, return bytes.

Knows tensors, devices and numpy arrays; never protobuf.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from embedding_client.codec import Bags
from embedding_server import metrics
from embedding_server.core import devices, kernels, sharding
from embedding_server.core.batcher import Batcher
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Stamp, Table, check_ids, check_padding_id
from embedding_server.errors import DeadlineExceeded, OverLimit

# Ids arrive as read-only views of the request bytes; the kernels never write them,
# so torch's warning about non-writable arrays does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Limits:
    """Per-request limits; past them a request is refused with OverLimit."""

    max_ids: int
    max_dense_macs: int
    dense_chunk_cells: int
    max_response_bytes: int
    # One-hot matmuls running at once: each uses every core (or the whole device) by
    # itself, so more only fight over them and starve the threads serving lookups.
    dense_concurrency: int = 2
    # Features (lookups) in one LookupMany call: each is a lookup of its own on the
    # event loop, so their number bounds how long one call holds it.
    max_features: int = 1024


class LookupOutput(NamedTuple):
    """Vectors as a row-major array of their wire bytes (bfloat16 as int16), with what the
    transport reports about them. (A tuple: a frozen dataclass's constructor costs
    several times more, on every call.)"""

    vectors: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    table: Table
    stamp: Stamp  # the table's version and update_seq the rows were read at
    kernel_seconds: float
    kernel: str  # the metric label of the kernel that ran (see KERNELS)


class Lookups:
    """Runs Lookup (gather) and LookupDense (one-hot matmul) against a TableStore."""

    def __init__(
        self,
        store: TableStore,
        limits: Limits,
        batcher: Batcher | None = None,
        staging: devices.PinnedBlocks | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self.batcher = batcher
        self.staging = staging  # pinned blocks for results leaving a CUDA device
        self._dense_slots = threading.BoundedSemaphore(limits.dense_concurrency)

    def plain(
        self,
        table_name: str,
        ids: np.ndarray,
        dtype: str,
        max_elements: int = kernels.HOST_TAKE_ELEMENTS,
    ) -> LookupOutput | None:
        """The common call the short way: `lookup(table_name, ids, dtype)` of a whole table
        in host memory, which numpy's take serves (`Table.take`; another output dtype
        converted after it by torch, as `lookup` converts), with the same checks, answer
        and errors; None when it is not that call (another table, a batcher, more than
        `max_elements` values to take) or a writer holds the table (it runs on the event
        loop, which must not wait), for `lookup` to run."""
        table = self.store.tables.get(table_name)
        if table is None or not table.on_host or self.batcher is not None:
            return None
        dim = table.dim
        if ids.size * dim > max_elements:
            return None
        out_dtype = OUTPUT_DTYPES[dtype]
        index = table.keys
        missing = 0
        if index is not None:  # keys to rows (a lookup's keys never read the pad row)
            self.check_count(ids.size, "ids")
            ids, _, missing = index.translate(ids, table.name)
        self._check(table, ids, out_dtype, dense=False)
        taken = table.take(ids)
        if taken is None:
            return None
        if index is not None:
            if table.keys is not index:
                return None  # keys were added meanwhile: `lookup` translates again
            count_missing(table, missing)
        data, seconds, stamp = taken
        if dtype != table.dtype:  # the stored rows (bfloat16 as its bits) converted
            rows = torch.from_numpy(data).view(table.weights.dtype)
            data = devices.to_host(rows, out_dtype)
        return LookupOutput(data, (*ids.shape, dim), dtype, table, stamp, seconds, "gather")

    def lookup(
        self,
        table_name: str,
        ids: np.ndarray,
        dtype: str,
        *,
        dense: bool = False,
        deadline: float | None = None,
        bags: Bags | None = None,
        padding_id: int | None = None,
        expect_shard: tuple[int, int] | None = None,
    ) -> LookupOutput:
        """W[ids] of table `table_name` in output `dtype`, by gather or (dense) one-hot
        matmul; with `bags`, one pooled vector per bag (embedding_bag, or a multi-hot
        matmul); rows of `padding_id` are zeros, and skipped in bags. Ids are global: a
        shard server looks up its own rows (`expect_shard`: the (index, count) the
        caller believes it holds).

        Raises
        ------
        TableNotFound, InvalidRequest, OverLimit, DeadlineExceeded
        FailedPrecondition
            An id another shard holds, or a shard other than `expect_shard`.
        """
        table = self.store.get(table_name)
        if expect_shard is not None:
            sharding.expect(table, *expect_shard)
        if table.keys is not None:
            return self._keyed(table, ids, dtype, dense, deadline, bags, padding_id)
        return self._rows(table, ids, dtype, dense, deadline, bags, padding_id)

    def _keyed(
        self,
        table: Table,
        ids: np.ndarray,
        dtype: str,
        dense: bool,
        deadline: float | None,
        bags: Bags | None,
        padding_id: int | None,
    ) -> LookupOutput:
        """A keyed table's lookup: its keys as rows (padding and skipped missing keys as
        the pad row, which the kernels skip), then as any table's; again if keys were
        added between the translation and the read (the rows read go with their keys)."""
        self.check_count(ids.size, "ids")  # before any work on a hostile count
        while True:
            index = table.keys
            assert index is not None
            rows, padding_row, missing = index.translate(
                ids, table.name, pooled=bags is not None, padding_key=padding_id
            )
            output = self._rows(table, rows, dtype, dense, deadline, bags, padding_row)
            if table.keys is index:
                count_missing(table, missing)
                return output

    def _rows(
        self,
        table: Table,
        ids: np.ndarray,
        dtype: str,
        dense: bool,
        deadline: float | None,
        bags: Bags | None,
        padding_id: int | None,
    ) -> LookupOutput:
        if table.shard is not None:
            self.check_count(ids.size, "ids")  # before any work on a hostile count
            ids, padding_id = table.shard.localise(ids, padding_id, table.name)
        out_dtype = OUTPUT_DTYPES[dtype]
        shape = (*(tuple(ids.shape) if bags is None else bags.shape), table.dim)
        name = KERNELS[dense, bags is not None]
        if self.batcher is not None and not dense and bags is None and padding_id is None:
            with self.batcher.expect() as arrival:  # others may wait for this one
                self._check(table, ids, out_dtype, dense, bags, padding_id)
                data, seconds, stamp = arrival.gather(table, ids, out_dtype)
            return LookupOutput(data, shape, dtype, table, stamp, seconds, name)
        self._check(table, ids, out_dtype, dense, bags, padding_id)
        rows = table.rows_for_kernels()
        device = rows.device
        try:
            with devices.on_device(device):  # this thread's stream on CUDA (see devices)
                kernel = self._kernel(table, rows, ids, out_dtype, dense, bags, padding_id,
                                      deadline)  # fmt: skip
                with self._dense_slot(deadline) if dense else _NOTHING:
                    # No row the kernel reads is half-updated; the stamp is the one it saw.
                    (result, seconds), stamp = table.read(lambda: devices.timed(device, kernel))
                data = (
                    result
                    if isinstance(result, np.ndarray)
                    else devices.to_host(result, out_dtype, self.staging)
                )
        except torch.OutOfMemoryError:
            raise OverLimit(
                f"{device} has no memory left for this request on table {table.name!r} "
                f"({ids.size} ids); retry with fewer ids"
            ) from None
        return LookupOutput(data, shape, dtype, table, stamp, seconds, name)

    @contextlib.contextmanager
    def _dense_slot(self, deadline: float | None) -> Iterator[None]:
        """Hold one of the `dense_concurrency` places for a one-hot matmul, waiting no
        longer than the call's deadline."""
        timeout = None
        if deadline is not None:
            # Give up a little before the deadline, so the caller gets this reason rather
            # than only its own timeout.
            remaining = deadline - time.monotonic()
            timeout = max(0.0, remaining - min(0.25, max(0.01, remaining / 10)))
        if not self._dense_slots.acquire(timeout=timeout):
            raise DeadlineExceeded(
                "the deadline passed while the call waited for other one-hot matmuls "
                f"(at most {self.limits.dense_concurrency} run at once, --dense-concurrency)"
            )
        try:
            yield
        finally:
            self._dense_slots.release()

    def _kernel(
        self,
        table: Table,
        weights: kernels.Rows,
        ids: np.ndarray,
        dtype: torch.dtype,
        dense: bool,
        bags: Bags | None,
        padding_id: int | None,
        deadline: float | None,
    ) -> Callable[[], torch.Tensor | np.ndarray]:
        """The lookup to run: a torch kernel, or for a small plain gather from a host table
        in its own dtype, numpy's take (whose result already is the wire's bits)."""
        plain = not dense and bags is None and padding_id is None
        if plain and weights.dtype == dtype and kernels.takes_on_host(weights, ids):
            return partial(kernels.host_take, table.host_array(), ids)
        device = weights.device
        device_ids = torch.from_numpy(ids).to(kernels.ids_device(weights, dense))
        chunk = self.limits.dense_chunk_cells
        if bags is None:
            if dense:
                return partial(
                    kernels.one_hot_matmul, weights, device_ids, chunk, deadline, padding_id
                )
            return partial(kernels.gather, weights, device_ids, padding_id)
        flat = device_ids.reshape(-1)
        offsets = torch.from_numpy(bags.offsets).to(device)
        per_id = None if bags.weights is None else torch.from_numpy(bags.weights).to(device)
        if dense:
            return partial(kernels.pooled_matmul, weights, flat, offsets, bags.mode, chunk,
                           deadline, per_id, padding_id)  # fmt: skip
        return partial(kernels.pooled_gather, weights, flat, offsets, bags.mode, per_id, padding_id)

    def _check(
        self,
        table: Table,
        ids: np.ndarray,
        dtype: torch.dtype,
        dense: bool,
        bags: Bags | None = None,
        padding_id: int | None = None,
    ) -> None:
        """Refuse a request over the limits or with an id (or padding id) out of range."""
        limits = self.limits
        self.check_count(ids.size, "ids")
        if bags is None and not dense and padding_id is None:  # the common call: less to do
            self._check_response(ids.size * table.dim * dtype.itemsize)
            check_ids(ids, table.rows)
            return
        vectors = ids.size if bags is None else bags.count
        if bags is not None:
            self.check_count(bags.count, "bags")
        self._check_response(vectors * table.dim * dtype.itemsize)
        if dense:
            macs = dense_macs(table, ids.size, bags)
            if macs > limits.max_dense_macs:
                raise OverLimit(
                    f"LookupDense of {ids.size} ids over table {table.name!r} "
                    f"({table.rows} x {table.dim}) costs {macs} multiply-adds, over the limit "
                    f"of {limits.max_dense_macs} (--max-dense-macs): use Lookup, or fewer ids"
                )
        check_ids(ids, table.rows)
        if padding_id is not None:
            check_padding_id(padding_id, table.rows, table.name)

    def check_count(self, count: int, what: str) -> None:
        """Refuse (OverLimit) a request of more than --max-ids ids, bags or features."""
        if count > self.limits.max_ids:
            raise OverLimit(
                f"{count} {what} in one request; this server takes at most "
                f"{self.limits.max_ids} (--max-ids): split the request"
            )

    def _check_response(self, response_bytes: int) -> None:
        limit = self.limits.max_response_bytes
        if response_bytes > limit:
            raise OverLimit(
                f"the response would be {response_bytes} bytes, over the {limit}-byte message "
                "limit (--max-message-bytes): split the request or ask for float16/bfloat16"
            )


def count_missing(table: Table, missing: int) -> None:
    """Count the keys a lookup of keyed `table` asked for and it does not hold."""
    if missing:
        metrics.MISSING_KEYS.labels(table.name).inc(missing)


def dense_macs(table: Table, ids: int, bags: Bags | None) -> int:
    """The multiply-adds of a one-hot (or multi-hot) matmul over `table`: one hot row per
    bag for sum and mean, one per id otherwise, each times every row and dim."""
    hot_rows = bags.count if bags is not None and bags.mode != "max" else ids
    return hot_rows * table.rows * table.dim


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state

# The `kernel` label of embedding_kernel_seconds, by (dense, pooled).
KERNELS = {
    (False, False): "gather",
    (True, False): "one_hot_matmul",
    (False, True): "embedding_bag",
    (True, True): "multi_hot_matmul",
}
