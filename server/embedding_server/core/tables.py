"""Embedding tables in memory: a table's weights on its device, read so that no reader
sees a half-updated row, and the id range check every lookup and update makes."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
import torch

from embedding_server.config import TableSpec
from embedding_server.core import devices, kernels
from embedding_server.core.cache import CachedRows
from embedding_server.core.devices import WIRE_VIEW
from embedding_server.core.keys import KeyIndex
from embedding_server.errors import InvalidRequest

if TYPE_CHECKING:  # sharding imports this module (check_ids)
    from embedding_client.shards import Shard
    from embedding_server.core.sharding import ShardRows

T = TypeVar("T")


class Stamp(NamedTuple):
    """What a read saw of a table: its loaded version, and the row updates applied to it
    (the update log's position, with a log). Read with the rows, under the same lock."""

    version: int
    update_seq: int


# Storage dtypes a table keeps; float64 files are stored as float32.
STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STORAGE_NAMES = {name: dtype for dtype, name in STORAGE_DTYPES.items()}
_CPU = torch.device("cpu")


class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before new readers. Pickles as a
    fresh lock (a table handed to another process shares memory, not this lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def __reduce__(self) -> tuple[type[ReadWriteLock], tuple[()]]:
        return (ReadWriteLock, ())

    # Every lookup takes the read side: plain calls, no generator or predicate (in a busy
    # server each Python step costs several times what it costs in a loop).
    def acquire_read(self) -> None:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def try_acquire_read(self) -> bool:
        """`acquire_read` unless a writer writes or waits: then False, nothing taken."""
        with self._cond:
            if self._writing or self._writers_waiting:
                return False
            self._readers += 1
            return True

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()  # only writers wait for the readers to leave

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class Table:
    """One embedding table `weights` of shape [rows, dim] on its device.

    Kernels read the weights through `read()`, and `TableStore.update_rows` writes rows,
    so that a reader sees each row before or after an update, never a mix: in one process
    by a read/write lock; for a table shared by several processes (`shared_state` set) by
    a seqlock in shared memory (the writer, the supervisor, makes the sequence number odd
    while it writes; a reader whose read overlapped a write reads again).
    """

    name: str
    weights: torch.Tensor
    source: str
    # The file it came from, for reloads; None for the demo table and tables made in code.
    spec: TableSpec | None = None
    # Row-wise int8 storage: `weights` holds uint8 codes, this the float32 (scale, bias)
    # of each row; None for float tables.
    qparams: torch.Tensor | None = None
    # Tables bigger than the device: `weights` stays in host memory, hot rows live here.
    cache: CachedRows | None = None
    # One shard of a bigger table: `weights` holds its rows, this where they sit in the
    # whole table (global ids on the wire); None for a whole table.
    shard: ShardRows | None = None
    # A keyed table: its keys -> rows (see core.keys); None for a table of row ids.
    keys: KeyIndex | None = None
    lock: ReadWriteLock = field(default_factory=lambda: ReadWriteLock(), repr=False, compare=False)
    # [sequence number, version, update_seq] in shared memory, for tables several
    # processes read.
    shared_state: torch.Tensor | None = field(default=None, repr=False)
    _version: int = field(default=1, repr=False)
    _update_seq: int = field(default=0, repr=False)
    # Views made once per table version, never pickled (a worker makes its own): the
    # weights' wire bits and the shared state as numpy arrays, so that the hot path reads
    # them without a torch call (each one releases and retakes the GIL).
    _views: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_views": {}}

    @property
    def version(self) -> int:
        """The loaded version: 1 at load, +1 per reload (row updates leave it)."""
        return self._version if self.shared_state is None else int(self.shared_state[1])

    @version.setter
    def version(self, value: int) -> None:
        self._version = value
        if self.shared_state is not None:
            self.shared_state[1] = value

    @property
    def update_seq(self) -> int:
        """Row updates applied to this version: the update log's position with a log,
        else a count of this server's updates; 0 at load."""
        return self._update_seq if self.shared_state is None else int(self.shared_state[2])

    @update_seq.setter
    def update_seq(self, value: int) -> None:
        self._update_seq = value
        if self.shared_state is not None:
            self.shared_state[2] = value

    @property
    def stamp(self) -> Stamp:
        """The version and update_seq now (not tied to any read of the rows)."""
        return Stamp(self.version, self.update_seq)

    def read(self, kernel: Callable[[], T]) -> tuple[T, Stamp]:
        """`kernel()` (which reads the weights, and has finished on the device when it
        returns) run so that no row it reads is half-updated; with what it saw."""
        self.lock.acquire_read()
        try:
            return self._read_locked(kernel)
        finally:
            self.lock.release_read()

    def _read_locked(self, kernel: Callable[[], T]) -> tuple[T, Stamp]:
        if self.shared_state is None:
            return kernel(), Stamp(self._version, self._update_seq)
        state = self._view("state", self.shared_state)
        while True:  # seqlock: read again if a write overlapped
            before = int(state[0])
            if before % 2:
                os.sched_yield()  # a write is under way: it takes microseconds
                continue
            result = kernel()
            stamp = Stamp(int(state[1]), int(state[2]))
            if int(state[0]) == before:
                return result, stamp

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, float, Stamp] | None:
        """numpy's take of rows `ids` of the host array (`host_array`), read as `read`
        reads; with the seconds the take ran and what it saw. The plain lookup's
        short way (`Lookups.plain`), on the server's event loop, so it never waits for a
        writer: None, at once, while one writes or waits to (the caller then reads by
        `read`, off the loop)."""
        lock = self.lock
        if not lock.try_acquire_read():
            return None
        try:
            if self.shared_state is not None:
                take = functools.partial(self.host_array().take, ids, 0)
                timed = functools.partial(devices.timed, _CPU, take)
                (rows, seconds), stamp = self._read_locked(timed)
                return rows, seconds, stamp
            began = time.perf_counter()
            rows = self.host_array().take(ids, 0)
            return rows, time.perf_counter() - began, Stamp(self._version, self._update_seq)
        finally:
            lock.release_read()

    def host_array(self) -> np.ndarray:
        """The weights of a float table in host memory as numpy's view of their wire bits
        (bfloat16 as int16), shared with the tensor (row updates show in it)."""
        return self._view("weights", self.weights)

    def _view(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        view = self._views.get(name)
        if view is None:
            bits = tensor.view(WIRE_VIEW.get(tensor.dtype, tensor.dtype))
            view = self._views[name] = bits.numpy()
        return view

    # Fixed for a Table's life (a reload makes a new Table; updates write in place), so
    # read once: lookups ask for them several times per call.
    @functools.cached_property
    def rows(self) -> int:
        return int(self.weights.shape[0])

    @functools.cached_property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    @functools.cached_property
    def on_host(self) -> bool:
        """Whether numpy serves its plain gathers (`take`): a whole float table in host
        memory, neither sharded, cached nor quantized."""
        return (
            self.shard is None
            and self.cache is None
            and self.qparams is None
            and self.weights.device.type == "cpu"
        )

    @property
    def held_shard(self) -> Shard | None:
        """The shard of the table this server holds (of its rows, or of a keyed table's
        keys); None for all of it."""
        if self.shard is not None:
            return self.shard.shard
        return None if self.keys is None else self.keys.part

    @property
    def part(self) -> tuple[int, int]:
        """(shard index, shard count) of what this table holds: (0, 1) for all of it."""
        held = self.held_shard
        return (0, 1) if held is None else (held.index, held.count)

    @property
    def dtype(self) -> str:
        return "int8" if self.qparams is not None else STORAGE_DTYPES[self.weights.dtype]

    def rows_for_kernels(self) -> kernels.Rows:
        """What the kernels read: the weights, the quantized codes with their params, or
        the device cache in front of the host weights."""
        if self.cache is not None:
            return self.cache
        if self.qparams is None:
            return self.weights
        return kernels.QuantizedRows(self.weights, self.qparams)

    @functools.cached_property
    def device(self) -> str:
        """Where lookups run: the weights' device, or the cache's for a cached table."""
        return str(self.cache.device if self.cache is not None else self.weights.device)

    def memory(self) -> dict[torch.device, int]:
        """Bytes this table holds on each device: its weights (codes and scales of an int8
        table) where they are, and a cached table's device cache once allocated."""
        held = {self.weights.device: self.nbytes}
        if self.cache is not None and self.cache.cache_bytes:
            held[self.cache.device] = held.get(self.cache.device, 0) + self.cache.cache_bytes
        return held

    @property
    def nbytes(self) -> int:
        extra = 0 if self.qparams is None else self.qparams.numel() * self.qparams.element_size()
        return self.weights.numel() * self.weights.element_size() + extra


def check_padding_id(padding_id: int, rows: int, table: str) -> None:
    """Refuse a padding id that is not a row id in [0, rows) of `table`."""
    if not 0 <= padding_id < rows:
        raise InvalidRequest(
            f"padding_id {padding_id} is not a row of table {table!r}: it must be in [0, {rows})"
        )


_FEW_IDS = 32


def check_ids(ids: np.ndarray, rows: int) -> None:
    """Refuse ids outside [0, rows), naming the first bad one and where it is."""
    if ids.size == 0:
        return
    if ids.dtype == np.int64:
        # One pass: read as unsigned, a negative id is above 2**63, so above any row count.
        # A few ids: Python's max over their bytes (numpy's ufunc machinery costs several
        # times more in a busy server); more: the ufunc's reduce (ndarray.max goes through
        # a Python wrapper).
        if ids.size <= _FEW_IDS and ids.flags.c_contiguous:
            highest = max(ids.data.cast("B").cast("Q"))
        else:
            highest = int(np.maximum.reduce(ids.view(np.uint64), axis=None))
        if highest < rows:
            return
    elif int(ids.min()) >= 0 and int(ids.max()) < rows:
        return
    flat = ids.reshape(-1)
    position = int(np.flatnonzero((flat < 0) | (flat >= rows))[0])
    where = f"position {position}"
    if ids.ndim > 1:
        index = tuple(int(i) for i in np.unravel_index(position, ids.shape))
        where += f" (index {list(index)})"
    raise InvalidRequest(
        f"id {int(flat[position])} at {where} is out of range: table has {rows} rows, "
        f"ids must be in [0, {rows})"
    )
