"""The store of the tables a server holds, by name: reloads (a new version swapped in),
row updates in place, and snapshots back to a file."""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from embedding_server.config import TableSpec
from embedding_server.core import kernels
from embedding_server.core.devices import available_bytes
from embedding_server.core.filesystem import FileAccess
from embedding_server.core.keys import DEFAULT_TENSOR, KEYS_TENSOR, TABLE_KEY, VALUES_TENSOR
from embedding_server.core.sharding import SHARD_KEY
from embedding_server.core.sources import (
    UPDATE_SEQ_KEY,
    TableLoadError,
    attach_cache,
    describe_footprint,
    footprint,
    materialise,
    open_table,
    recorded_update_seq,
    shard_source,
    shortfall,
    storable,
    write_table,
)
from embedding_server.core.tables import Stamp, Table, check_ids
from embedding_server.errors import (
    FailedPrecondition,
    InvalidRequest,
    OverLimit,
    RequestError,
    TableNotFound,
    quoted,
)

log = logging.getLogger(__name__)


class PreparedUpdate(NamedTuple):
    """A checked row update, its vectors as the table stores them (`prepare_update`)."""

    table: Table
    rows: torch.Tensor  # the table's local rows, on its device
    stored: torch.Tensor  # their new values in the storage dtype (codes, if int8)
    params: torch.Tensor | None  # int8: each row's (scale, bias)
    # A keyed table's keys (`rows` then unused): given rows under the write lock, where
    # new keys get free ones.
    keys: np.ndarray | None = None


_NO_ROWS = torch.empty(0, dtype=torch.int64)


def _keyed_as(old: Table, spec: TableSpec) -> TableSpec:
    """`spec` with `old`'s keyed-table options (missing-key policy, max_keys, default
    vector): a reload from another file keeps them; its keys come from that file."""
    if old.spec is None:
        return spec
    return replace(
        spec, missing=old.spec.missing, max_keys=old.spec.max_keys, default=old.spec.default,
        bags_skip_missing=old.spec.bags_skip_missing,
    )  # fmt: skip


@dataclass
class TableStore:
    """The tables a server holds, by name; the first added is the default."""

    tables: dict[str, Table] = field(default_factory=dict)
    default_name: str = ""
    # Reloads place CPU tables in shared memory (several server processes read them).
    shared: bool = False
    # Processes holding a device cache of each cached table (the workers, when shared).
    cache_copies: int = 1
    # The directories callers may name: new table files, snapshots (none by default).
    files: FileAccess = field(default_factory=FileAccess)
    # The update log these tables' updates go through, where one is configured (what it
    # is, is the process layer's: the store only reports that there is one).
    update_log: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, table: Table) -> None:
        with self._lock:
            self.tables[table.name] = table
            self.default_name = self.default_name or table.name

    def reload(self, name: str, source: str = "", *, snapshot: Path | None = None) -> Table:
        """Load a new version of table `name` (from `source`, PATH[:KEY], or its own file;
        or from `snapshot`, one the server found in its snapshot directory) and swap it
        in; calls already running finish on the version they started with.

        Raises
        ------
        TableNotFound, InvalidRequest, FailedPrecondition
            No such table; no file to reload from; a source outside the table
            directories, or none configured (see `FileAccess.table_source`).
        TableLoadError
            The new file cannot be served (the old version keeps serving).
        OverLimit
            The device has no room for the new copy beside the serving one.
        """
        with self._reload_lock:
            old = self.get(name)
            dtype = old.spec.dtype if old.spec is not None else None  # stored as now
            shard = old.held_shard  # the part it holds now
            if snapshot is not None:  # the server's own choice, in the operator's directory
                spec = _keyed_as(old, TableSpec(old.name, snapshot, old.name, dtype, shard=shard))
            elif source:  # a caller's file, inside the table directories
                path, key = self.files.table_source(source)
                spec = _keyed_as(
                    old, TableSpec(old.name, path, key, dtype, confined=True, shard=shard)
                )
            elif old.spec is not None:
                spec = old.spec
            else:
                raise InvalidRequest(
                    f"table {old.name!r} was not loaded from a file; give a source to reload from"
                )
            # A file a caller chose is read through the descriptor checked inside the table
            # directories; the operator's own files are read by path.
            with (
                self.files.open_table_file(spec.path)
                if spec.confined
                else contextlib.nullcontext(None)
            ) as read:
                new = self._load_version(old, spec, read)
            self.replace(new)
            return new

    def _load_version(self, old: Table, spec: TableSpec, read: Path | None) -> Table:
        """The next version of table `old` from `spec`'s file, checked to fit beside it."""
        try:
            opened = open_table(spec, read)
        except (TableLoadError, RequestError):
            raise
        except Exception as exc:  # a reader's surprise on a hostile file is not INTERNAL
            log.warning("table %r: reading %s failed", old.name, spec.path, exc_info=True)
            raise TableLoadError(
                f"table {old.name!r}: cannot read {quoted(str(spec.path))} ({type(exc).__name__})"
            ) from None
        recorded = recorded_update_seq(old.name, opened.metadata)
        opened, shard = (
            (opened, None) if opened.index else shard_source(old.name, opened, spec.shard)
        )
        if (opened.index is None) != (old.keys is None):
            have, new_kind = ("keys", "rows") if old.keys is not None else ("rows", "keys")
            raise TableLoadError(
                f"table {old.name!r} is addressed by {have}; the new file holds {new_kind} "
                f"(callers depend on how ids are read, so a reload keeps it)"
            )
        if opened.shape[1] != old.dim:
            raise TableLoadError(
                f"table {old.name!r}: the new file has dim {opened.shape[1]}, the table "
                f"serves dim {old.dim}; callers depend on it, so a reload keeps the dim"
            )
        device = old.weights.device
        cache = None if old.cache is None else (old.cache.slots, old.cache.device)
        short = shortfall(footprint(opened, spec.dtype, device, cache, self.cache_copies),
                          available_bytes)  # fmt: skip
        if short is not None:
            where, needed, free = short
            raise OverLimit(
                f"reloading table {old.name!r} needs {needed / 2**20:.0f} MiB on {where} "
                f"({describe_footprint(opened, spec.dtype, cache, self.cache_copies)}) "
                f"beside the {old.nbytes / 2**20:.0f} MiB version serving now; only "
                f"{free / 2**20:.0f} MiB are free"
            )
        try:
            new = materialise(
                old.name, str(spec), opened, device, shared=self.shared, dtype=spec.dtype
            )
            if cache is not None:
                attach_cache(new, *cache, allocate=not self.shared)
        except torch.OutOfMemoryError:
            raise OverLimit(
                f"reloading table {old.name!r}: {device} ran out of memory for the new version "
                "beside the one serving now (which keeps serving)"
            ) from None
        new.version, new.spec, new.shard, new.keys = old.version + 1, spec, shard, opened.index
        # Updates go on from where they were, unless the file records where its rows stand
        # (a snapshot's update_seq): with an update log, what follows it is applied again.
        new.update_seq = old.update_seq if recorded is None else recorded
        return new

    def replace(self, table: Table) -> None:
        """Serve `table` in place of the table of the same name (a new version of it)."""
        with self._lock:
            if table.name not in self.tables:
                raise TableNotFound(f"no table {table.name!r} to replace")
            self.tables[table.name] = table

    def update_rows(
        self, name: str, ids: np.ndarray, vectors: np.ndarray, seq: int | None = None
    ) -> Table:
        """Overwrite rows `ids` of table `name` with `vectors` ([len(ids), dim]) in place,
        atomically for readers, and set its update_seq: to `seq` (an update log's
        position) or one more than it was.

        Raises
        ------
        TableNotFound, InvalidRequest, FailedPrecondition
            As `prepare_update`.
        """
        return self.write_update(self.prepare_update(name, ids, vectors), seq)

    def prepare_update(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> PreparedUpdate:
        """Check an update of table `name` and convert its vectors to what the table
        stores, without writing: what an update log checks before it appends an entry,
        so that every replica can apply it.

        Raises
        ------
        TableNotFound, InvalidRequest
            No such table; ids not 1-D, out of range or repeated; vectors of the wrong
            shape, non-finite, or not fitting the table's storage dtype.
        FailedPrecondition
            A table shared by several server processes that is cached on the device, or
            on a host that is not x86-64.
        """
        table = self.get(name)
        if table.shared_state is not None and table.cache is not None:
            raise FailedPrecondition(
                f"table {table.name!r} is cached on the device by each of several server "
                "processes (--processes > 1), which cannot update rows yet; reload instead"
            )
        if table.shared_state is not None and platform.machine() not in ("x86_64", "AMD64"):
            raise FailedPrecondition(
                f"table {table.name!r} is shared by several server processes; updating it in "
                "place relies on x86-64 memory ordering, and this is "
                f"{platform.machine()}: reload a new version instead"
            )
        if ids.ndim != 1:
            raise InvalidRequest(f"ids to update must be 1-D, got shape {list(ids.shape)}")
        if ids.size == 0:
            raise InvalidRequest("no rows to update: give at least one id and its vector")
        if vectors.shape != (ids.size, table.dim):
            raise InvalidRequest(
                f"{ids.size} ids need vectors of shape [{ids.size}, {table.dim}], got "
                f"{list(vectors.shape)}"
            )
        global_ids = ids
        index = table.keys
        if index is not None:  # any int64 key; new ones within max_keys
            new = index.check_update(ids, table.name) < 0
            if table.shared_state is not None and new.any():
                raise FailedPrecondition(
                    f"table {table.name!r} is keyed and shared by several server processes "
                    "(--processes > 1), which take updates of the keys it holds but cannot add "
                    f"keys yet (key {int(ids[new][0])} is new): reload instead"
                )
        elif table.shard is not None:  # global ids on the wire, this shard's rows here
            ids, _ = table.shard.localise(ids, None, table.name)
        else:
            check_ids(ids, table.rows)
        unique, counts = np.unique(global_ids, return_counts=True)
        if (counts > 1).any():
            raise InvalidRequest(
                f"id {int(unique[counts > 1][0])} is given twice; give each row once"
            )
        stored = storable(
            torch.from_numpy(np.asarray(vectors, dtype=np.float32)),
            torch.float32 if table.qparams is not None else table.weights.dtype,
            lambda row, col: f"vector {row} (id {int(global_ids[row])}), element {col}",
            InvalidRequest,
        )
        # A keyed table's rows are given in the write section (`write_update`).
        rows_at = torch.from_numpy(ids).to(table.weights.device) if index is None else _NO_ROWS
        params = None
        if table.qparams is not None:
            stored, params = kernels.quantize(stored)
            params = params.to(table.weights.device)
        keys = None if index is None else np.array(ids, dtype=np.int64)
        return PreparedUpdate(table, rows_at, stored.to(table.weights.device), params, keys)

    def write_update(self, update: PreparedUpdate, seq: int | None = None) -> Table:
        """Write a prepared update under the table's write lock (and seqlock, shared):
        readers see every row before or after it, and the update_seq it leaves."""
        table, index, stored, params, keys = update  # index: the local rows
        state = table.shared_state
        with table.lock.writing():
            key_index = None
            if keys is not None and table.keys is not None:
                # Rows for the keys now, in the write section: new keys take free rows.
                key_index, rows = table.keys.with_keys(keys, table.name)
                index = torch.from_numpy(rows).to(table.weights.device)
            if state is not None:
                state[0] += 1  # odd: readers in other processes will read again
            try:
                if table.cache is not None:
                    table.cache.write(index, stored)
                else:
                    table.weights.index_copy_(0, index, stored)
                if table.qparams is not None and params is not None:
                    table.qparams.index_copy_(0, index, params)
                if table.weights.device.type == "cuda":
                    torch.cuda.synchronize(table.weights.device)  # written before "even"
                if key_index is not None:
                    table.keys = key_index  # after the rows: a key never reads a stale row
                table.update_seq = table.update_seq + 1 if seq is None else seq
            finally:
                if state is not None:
                    state[0] += 1
        return table

    def snapshot(
        self, name: str, path: str, *, overwrite: bool = False
    ) -> tuple[Table, Stamp, Path, int]:
        """Write table `name`'s current contents to `path`, inside the snapshot directory
        (.npy: float32 for bfloat16 tables; .safetensors: the storage dtype, under the
        table's name, with its update_seq and shard in the metadata), through an
        exclusive temporary file (see `FileAccess`). Returns the table, the version and
        update_seq written, the file and its bytes.

        Raises
        ------
        TableNotFound, InvalidRequest
            No such table; a path that is not .npy/.safetensors or outside the snapshot
            directory.
        AlreadyExists
            The file exists and `overwrite` is false.
        FailedPrecondition
            Snapshots are off, or the file cannot be written (the message says why).
        """
        table = self.get(name)
        target = self.files.snapshot_target(path)
        if table.shard is not None and target.suffix != ".safetensors":
            raise InvalidRequest(
                f"table {table.name!r} is shard {table.shard.shard} of a bigger table: snapshot "
                "it to .safetensors, whose metadata records which rows it holds"
            )
        if table.keys is not None and target.suffix != ".safetensors":
            raise InvalidRequest(
                f"table {table.name!r} is keyed: snapshot it to .safetensors, which holds its "
                "keys and values together"
            )
        rows = table.rows_for_kernels()

        def copy() -> dict[str, torch.Tensor]:
            # int8 tables are written dequantized (float32): any loader reads them; a
            # cached table's whole contents are its host weights.
            if isinstance(rows, kernels.QuantizedRows):
                values = rows.to_host()
            else:
                values = table.weights.to("cpu", copy=True)
            index = table.keys  # read with the rows: the keys those rows hold
            if index is None:
                return {table.name: values}
            keyed = {KEYS_TENSOR: torch.from_numpy(index.in_row_order()),
                     VALUES_TENSOR: values[: index.count]}  # fmt: skip
            if index.missing == "default":
                keyed[DEFAULT_TENSOR] = values[index.fill_row]
            return keyed

        contents, stamp = table.read(copy)
        metadata = {UPDATE_SEQ_KEY: str(stamp.update_seq)}
        if table.shard is not None:
            metadata.update(table.shard.metadata())
        if table.keys is not None:  # found again by name (its tensors are keys, values)
            metadata[TABLE_KEY] = table.name
            if table.keys.part is not None:
                metadata[SHARD_KEY] = str(table.keys.part)
        size = self.files.write_snapshot(
            target,
            partial(write_table, suffix=target.suffix, tensors=contents, metadata=metadata),
            overwrite=overwrite,
        )  # fmt: skip
        return table, stamp, target, size

    def resolve_name(self, name: str) -> str | None:
        """The name of the table an empty or given `name` selects, None if there is none."""
        name = name or self.default_name
        return name if name in self.tables else None

    def get(self, name: str) -> Table:
        """The table called `name`; the default table for an empty name."""
        table = self.tables.get(name or self.default_name)
        if table is None:
            if not name:
                raise TableNotFound("no table name given and the server has no default table")
            known = ", ".join(sorted(self.tables)) or "none"
            raise TableNotFound(f"unknown table {quoted(name)}; this server holds: {known}")
        return table

    def __iter__(self) -> Iterator[Table]:
        return iter(list(self.tables.values()))

    def memory(self) -> list[tuple[torch.device, int]]:
        """(device, bytes) of every table's memory on every device it uses."""
        return [held for table in self for held in table.memory().items()]
