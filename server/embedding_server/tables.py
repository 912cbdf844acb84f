"""Embedding tables: loading from files (or the seeded demo) onto a device, and the store.

Every source is read in row chunks, so loading never holds a second full copy of
a table in host memory: .npy is memory-mapped, .safetensors is sliced, torch
checkpoints are opened with mmap. Each chunk is checked for non-finite values
and has its negative zeros made positive (see `load_table`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from embedding_server import kernels, metrics
from embedding_server.config import TableSpec
from embedding_server.errors import FailedPrecondition, InvalidRequest, OverLimit, TableNotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

# Storage dtypes a table keeps; float64 files are stored as float32.
STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STORAGE_NAMES = {name: dtype for dtype, name in STORAGE_DTYPES.items()}
CHUNK_BYTES = 64 << 20
PROGRESS_EVERY_S = 2.0


class TableLoadError(Exception):
    """A table file that cannot be served; the message names the table and the fix."""


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

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

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
    cache: kernels.CachedRows | None = None
    lock: ReadWriteLock = field(default_factory=lambda: ReadWriteLock(), repr=False, compare=False)
    # [sequence number, version] in shared memory, for tables several processes read.
    shared_state: torch.Tensor | None = field(default=None, repr=False)
    _version: int = field(default=1, repr=False)

    @property
    def version(self) -> int:
        """Version of the contents: 1 at load, +1 per reload or row update."""
        return self._version if self.shared_state is None else int(self.shared_state[1])

    @version.setter
    def version(self, value: int) -> None:
        self._version = value
        if self.shared_state is not None:
            self.shared_state[1] = value

    def read(self, kernel: Callable[[], T]) -> tuple[T, int]:
        """`kernel()` (which reads the weights, and has finished on the device when it
        returns) run so that no row it reads is half-updated; with the version it saw."""
        with self.lock.reading():
            state = self.shared_state
            if state is None:
                return kernel(), self._version
            while True:  # seqlock: read again if a write overlapped
                before = int(state[0])
                if before % 2:
                    os.sched_yield()  # a write is under way: it takes microseconds
                    continue
                result = kernel()
                version = int(state[1])
                if int(state[0]) == before:
                    return result, version

    @property
    def rows(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

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

    @property
    def device(self) -> str:
        """Where lookups run: the weights' device, or the cache's for a cached table."""
        return str(self.cache.device if self.cache is not None else self.weights.device)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.qparams is None else self.qparams.numel() * self.qparams.element_size()
        return self.weights.numel() * self.weights.element_size() + extra


@dataclass
class TableStore:
    """The tables a server holds, by name; the first added is the default."""

    tables: dict[str, Table] = field(default_factory=dict)
    default_name: str = ""
    # Reloads place CPU tables in shared memory (several server processes read them).
    shared: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, table: Table) -> None:
        with self._lock:
            self.tables[table.name] = table
            self.default_name = self.default_name or table.name

    def reload(self, name: str, source: str = "") -> Table:
        """Load a new version of table `name` (from `source`, PATH[:KEY], or its own file)
        and swap it in; calls already running finish on the version they started with.

        Raises
        ------
        TableNotFound, InvalidRequest
            No such table; no file to reload from.
        TableLoadError
            The new file cannot be served (the old version keeps serving).
        OverLimit
            The device has no room for the new copy beside the serving one.
        """
        with self._reload_lock:
            old = self.get(name)
            if source:
                try:  # a new file, stored as the serving version is
                    dtype = old.spec.dtype if old.spec is not None else None
                    spec = TableSpec.parse(f"{old.name}={source}", dtype, None)
                except ValueError as exc:
                    raise InvalidRequest(str(exc)) from None
            elif old.spec is not None:
                spec = old.spec
            else:
                raise InvalidRequest(
                    f"table {old.name!r} was not loaded from a file; give a source to reload from"
                )
            opened = _open_table(spec)
            if opened.shape[1] != old.dim:
                raise TableLoadError(
                    f"table {old.name!r}: the new file has dim {opened.shape[1]}, the table "
                    f"serves dim {old.dim}; callers depend on it, so a reload keeps the dim"
                )
            device = old.weights.device
            needed = _storage_bytes(opened) + CHUNK_BYTES
            free = available_bytes(device)
            if needed > free:
                raise OverLimit(
                    f"reloading table {old.name!r} needs {needed / 2**20:.0f} MiB on {device} "
                    f"beside the {old.nbytes / 2**20:.0f} MiB version serving now; only "
                    f"{free / 2**20:.0f} MiB are free"
                )
            new = _materialise(
                old.name, str(spec), opened, device, shared=self.shared, dtype=spec.dtype
            )
            new.version, new.spec = old.version + 1, spec
            if old.cache is not None:
                attach_cache(new, old.cache.slots, old.cache.device)
            self.replace(new)
            return new

    def replace(self, table: Table) -> None:
        """Serve `table` in place of the table of the same name (a new version of it)."""
        with self._lock:
            if table.name not in self.tables:
                raise TableNotFound(f"no table {table.name!r} to replace")
            self.tables[table.name] = table

    def update_rows(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> Table:
        """Overwrite rows `ids` of table `name` with `vectors` ([len(ids), dim]) in place,
        atomically for readers, and bump its version.

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
        if vectors.shape != (ids.size, table.dim):
            raise InvalidRequest(
                f"{ids.size} ids need vectors of shape [{ids.size}, {table.dim}], got "
                f"{list(vectors.shape)}"
            )
        check_ids(ids, table.rows)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise InvalidRequest(
                f"id {int(unique[counts > 1][0])} is given twice; give each row once"
            )
        stored = storable(
            torch.from_numpy(np.asarray(vectors, dtype=np.float32)),
            torch.float32 if table.qparams is not None else table.weights.dtype,
            lambda row, col: f"vector {row} (id {int(ids[row])}), element {col}",
            InvalidRequest,
        )
        index = torch.from_numpy(ids).to(table.weights.device)
        params = None
        if table.qparams is not None:
            stored, params = kernels.quantize(stored)
            params = params.to(table.weights.device)
        stored = stored.to(table.weights.device)
        state = table.shared_state
        with table.lock.writing():
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
                table.version += 1
            finally:
                if state is not None:
                    state[0] += 1
        return table

    def snapshot(self, name: str, path: Path) -> tuple[Table, int, int]:
        """Write table `name`'s current contents to `path` (.npy: float32 for bfloat16
        tables; .safetensors: the storage dtype, under the table's name), atomically (a
        temporary file renamed). Returns the table, the version written and the bytes.

        Raises
        ------
        TableNotFound, InvalidRequest
            No such table; a path that is not .npy/.safetensors or not absolute.
        FailedPrecondition
            The file cannot be written (the message says why).
        """
        table = self.get(name)
        if not path.is_absolute() or path.suffix not in (".npy", ".safetensors"):
            raise InvalidRequest(
                f"snapshot path {str(path)!r} must be absolute and end in .npy or .safetensors"
            )
        rows = table.rows_for_kernels()

        def copy() -> torch.Tensor:
            # int8 tables are written dequantized (float32): any loader reads them; a
            # cached table's whole contents are its host weights.
            whole = rows[:] if isinstance(rows, kernels.QuantizedRows) else table.weights
            return whole.to("cpu", copy=True)

        contents, version = table.read(copy)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if path.suffix == ".npy":
                if contents.dtype == torch.bfloat16:
                    contents = contents.float()  # .npy has no bfloat16
                with temporary.open("wb") as out:
                    np.save(out, contents.numpy())
            else:
                from safetensors.torch import save_file

                save_file({table.name: contents}, str(temporary))
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise FailedPrecondition(f"cannot write {path}: {exc.strerror}") from None
        return table, version, path.stat().st_size

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
            raise TableNotFound(f"unknown table {name!r}; this server holds: {known}")
        return table

    def __iter__(self) -> Iterator[Table]:
        return iter(list(self.tables.values()))


# A row source: its shape, its dtype, and a reader of rows [start, stop) as a tensor.
@dataclass
class _RowSource:
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]


def _npy_source(path: Path) -> _RowSource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise TableLoadError(f"{path} is not a plain numeric .npy array ({exc})") from None
    if array.dtype.kind not in "fiub" or array.dtype.hasobject:
        raise TableLoadError(f"{path} holds dtype {array.dtype}, not numbers")
    if array.dtype.kind != "f":
        raise TableLoadError(
            f"{path} holds {array.dtype} values; tables must be floating point "
            "(float16, float32 or float64)"
        )
    dtype = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}.get(
        array.dtype.newbyteorder("="), torch.float64
    )

    def read(start: int, stop: int) -> torch.Tensor:
        # np.array copies out of the mapping into native byte order.
        return torch.from_numpy(np.array(array[start:stop], dtype=array.dtype.newbyteorder("=")))

    return _RowSource(tuple(array.shape), dtype, read)


def _safetensors_source(path: Path, key: str | None) -> _RowSource:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise TableLoadError(f"{path} is not a readable .safetensors file ({exc})") from None
    keys = list(handle.keys())
    key = _pick_key(path, key, keys)
    tensor_slice = handle.get_slice(key)
    shape = tuple(tensor_slice.get_shape())
    probe = tensor_slice[0:0] if shape else handle.get_tensor(key)
    return _RowSource(shape, probe.dtype, lambda start, stop: tensor_slice[start:stop])


def _torch_source(path: Path, key: str | None) -> _RowSource:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Checkpoints in the legacy (non-zip) format cannot be memory-mapped.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise TableLoadError(
            f"{path} is not a loadable torch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(loaded, torch.Tensor):
        if key:
            raise TableLoadError(f"{path} holds a single tensor; drop ':{key}'")
        tensor = loaded
    elif isinstance(loaded, dict):
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        tensor = tensors[_pick_key(path, key, list(tensors))]
    else:
        raise TableLoadError(f"{path} holds a {type(loaded).__name__}, not a tensor or state dict")
    return _RowSource(tuple(tensor.shape), tensor.dtype, lambda start, stop: tensor[start:stop])


def _pick_key(path: Path, key: str | None, keys: list[str]) -> str:
    if key is not None:
        if key not in keys:
            shown = ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
            raise TableLoadError(f"{path} has no tensor {key!r}; it holds: {shown or 'nothing'}")
        return key
    if len(keys) == 1:
        return keys[0]
    shown = ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
    raise TableLoadError(
        f"{path} holds {len(keys)} tensors; name one as PATH:KEY (it holds: {shown or 'nothing'})"
    )


def _open_source(spec: TableSpec) -> _RowSource:
    path = spec.path
    if not path.exists():
        raise TableLoadError(f"{path}: no such file")
    if not path.is_file():
        raise TableLoadError(f"{path}: not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TableLoadError(f"{path}: cannot read ({exc.strerror})") from None
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if spec.key:
            raise TableLoadError(f"{path} is a single .npy array; drop ':{spec.key}'")
        return _npy_source(path)
    if suffix == ".safetensors":
        return _safetensors_source(path, spec.key)
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _torch_source(path, spec.key)
    raise TableLoadError(
        f"{path}: unknown table format {suffix or '(no suffix)'!r}; "
        "use .npy, .safetensors or a torch checkpoint (.pt, .pth, .bin, .ckpt)"
    )


def check_ids(ids: np.ndarray, rows: int) -> None:
    """Refuse ids outside [0, rows), naming the first bad one and where it is."""
    if ids.size == 0:
        return
    if int(ids.min()) >= 0 and int(ids.max()) < rows:
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


def load_table(spec: TableSpec, device: torch.device, *, shared: bool = False) -> Table:
    """Load the table `spec` names onto `device`, checking it on the way; `shared` places
    a CPU table in shared memory, for several server processes to read.

    Float64 is stored as float32. Non-finite values are refused (inf or NaN would make
    LookupDense differ from Lookup: 0 * inf is NaN). Negative zeros become +0.0, the
    same value, so the one-hot matmul, which sums +0.0 terms, agrees bit for bit.

    Raises
    ------
    TableLoadError
        For a missing, unreadable, wrongly shaped, non-float or non-finite table.
    """
    source = _open_table(spec)
    if spec.cache_rows is None:
        table = _materialise(spec.name, str(spec), source, device, shared=shared, dtype=spec.dtype)
    else:
        host = torch.device("cpu")
        table = _materialise(spec.name, str(spec), source, host, shared=shared, dtype=spec.dtype)
        attach_cache(table, spec.cache_rows, device)
    table.spec = spec
    return table


def attach_cache(table: Table, rows: int, device: torch.device) -> None:
    """Serve `table` (in host memory) through a cache of `rows` hot rows on `device`."""
    table.cache = kernels.CachedRows(table.weights, rows, device, metrics.CacheMetrics(table.name))
    log.info("table %r: %d of its %d rows cached on %s (%.1f MiB there)", table.name,
             table.cache.slots, table.rows, device,
             table.cache.slots * table.dim * table.weights.element_size() / 2**20)  # fmt: skip


def _open_table(spec: TableSpec) -> _RowSource:
    """Open `spec`'s file and check its shape and dtype; errors name the table."""
    try:
        source = _open_source(spec)
    except TableLoadError as exc:
        raise TableLoadError(f"table {spec.name!r}: {exc}") from None
    _check_shape(spec.name, source)
    return source


def available_bytes(device: torch.device) -> int:
    """Bytes a new table could take on `device` now (CUDA: free plus torch's unused cache;
    CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
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


def _storage_dtype(source: _RowSource) -> torch.dtype:
    return source.dtype if source.dtype in STORAGE_DTYPES else torch.float32


def _storage_bytes(source: _RowSource) -> int:
    rows, dim = source.shape
    return rows * dim * _storage_dtype(source).itemsize


def _check_shape(name: str, source: _RowSource) -> None:
    if len(source.shape) != 2:
        raise TableLoadError(
            f"table {name!r}: expected a 2-D [rows, dim] table, got shape {list(source.shape)}"
        )
    rows, dim = source.shape
    if rows == 0 or dim == 0:
        raise TableLoadError(f"table {name!r}: shape {list(source.shape)} has no rows or no dim")
    if not source.dtype.is_floating_point:
        raise TableLoadError(
            f"table {name!r}: holds {source.dtype} values; tables must be floating point"
        )


def storable(
    values: torch.Tensor,
    storage: torch.dtype,
    place: Callable[[int, int], str],
    error: type[Exception],
    hint: str = "",
) -> torch.Tensor:
    """`values` (rows x dim) as a new tensor of `storage` with -0.0 made +0.0 (one sign
    of zero on both RPC paths). The first value that is not finite, or does not fit
    `storage`, is refused with `error`, naming its place as `place(row, column)` says.
    Loads and row updates both come through here."""
    stored = values.to(dtype=storage, copy=True)
    finite = torch.isfinite(stored)
    if not bool(finite.all()):
        row, col = (int(i) for i in (~finite).nonzero()[0])
        value = values[row, col].item()
        if math.isfinite(value):
            raise error(
                f"{place(row, col)} holds {value}, which does not fit "
                f"{STORAGE_DTYPES[storage]}{hint}"
            )
        raise error(f"{place(row, col)} holds {value}; tables must be finite")
    stored.add_(0.0)  # -0.0 + 0.0 == +0.0
    return stored


def _materialise(
    name: str,
    origin: str,
    source: _RowSource,
    device: torch.device,
    *,
    shared: bool = False,
    dtype: str | None = None,
) -> Table:
    rows, dim = source.shape
    quantized = dtype == "int8"
    if quantized:
        storage = torch.float32  # checked and normalised as float32, then quantized
    elif dtype is not None:
        storage = STORAGE_NAMES[dtype]
    else:
        storage = _storage_dtype(source)
    if storage != source.dtype or quantized:
        log.info("table %r: stored as %s (file holds %s)", name, dtype or STORAGE_DTYPES[storage],
                 source.dtype)  # fmt: skip
    weights = torch.empty((rows, dim), dtype=torch.uint8 if quantized else storage, device=device)
    qparams = torch.empty((rows, 2), dtype=torch.float32, device=device) if quantized else None
    if shared and device.type == "cpu":
        # Moved before they are filled: empty pages cost nothing to move. CUDA memory
        # needs nothing here: torch hands it to other processes as an IPC handle.
        weights.share_memory_()
        if qparams is not None:
            qparams.share_memory_()
    chunk_rows = max(1, CHUNK_BYTES // (dim * weights.element_size()))
    started = last_report = time.monotonic()
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        chunk = storable(
            source.read(start, stop),
            storage,
            lambda row, col: f"table {name!r}: row {start + row}, column {col}",  # noqa: B023
            TableLoadError,
            hint="; store the table as float32 or bfloat16",
        )
        if qparams is not None:
            codes, params = kernels.quantize(chunk)
            weights[start:stop].copy_(codes)
            qparams[start:stop].copy_(params)
        else:
            weights[start:stop].copy_(chunk)
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY_S:
            log.info("table %r: loaded %d / %d rows (%.0f%%)", name, stop, rows, 100 * stop / rows)
            last_report = now
    table = Table(name=name, weights=weights, source=origin, qparams=qparams)
    if shared:
        table.shared_state = torch.tensor([0, 1], dtype=torch.int64).share_memory_()
    log.info(
        "table %r: %d x %d %s on %s (%.1f MiB) from %s in %.2f s",
        name, rows, dim, table.dtype, device, table.nbytes / 2**20, origin,
        time.monotonic() - started,
    )  # fmt: skip
    return table


def demo_table(
    rows: int, dim: int, seed: int, device: torch.device, *, shared: bool = False
) -> Table:
    """The seeded demo table `demo`: np.random.default_rng(seed).standard_normal((rows, dim)).

    Anyone can rebuild it with numpy alone to check what the server returns.
    """
    values = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    source = _RowSource(
        (rows, dim), torch.float32, lambda start, stop: torch.from_numpy(values[start:stop])
    )
    return _materialise("demo", f"seeded demo (seed {seed})", source, device, shared=shared)
