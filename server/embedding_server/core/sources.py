"""Table files: loading from .npy, .safetensors or torch checkpoints (or the seeded demo)
onto a device, checking them on the way; and writing a table back as .npy or .safetensors.

Every source is read in row chunks, so loading never holds a second full copy of
a table in host memory: .npy is memory-mapped, .safetensors is sliced, torch
checkpoints are opened with mmap. Each chunk is checked for non-finite values
and has its negative zeros made positive (see `load_table`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from embedding_client.shards import Shard, shard_of
from embedding_server import metrics
from embedding_server.config import TableSpec
from embedding_server.core import kernels, sharding
from embedding_server.core.cache import CachedRows
from embedding_server.core.devices import available_bytes
from embedding_server.core.keys import DEFAULT_TENSOR, KEYS_TENSOR, VALUES_TENSOR, KeyIndex
from embedding_server.core.sharding import ShardRows
from embedding_server.core.tables import STORAGE_DTYPES, STORAGE_NAMES, Table

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20
PROGRESS_EVERY_S = 2.0


class TableLoadError(Exception):
    """A table file that cannot be served; the message names the table and the fix."""


# A row source: its shape, its dtype, and a reader of rows [start, stop) as a tensor.
@dataclass
class RowSource:
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]
    # What the file says about itself (a .safetensors header's metadata), e.g. the shard
    # a per-shard file holds (sharding.SHARD_KEY).
    metadata: dict[str, str] = field(default_factory=dict)
    # A keyed table's index (the rows are then its capacity, the fill and the pad row).
    index: KeyIndex | None = None


def _npy_source(path: Path) -> RowSource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
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

    return RowSource(tuple(array.shape), dtype, read)


def _safetensors_source(path: Path, key: str | None) -> RowSource:
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
    return RowSource(
        shape, probe.dtype, lambda start, stop: tensor_slice[start:stop], handle.metadata() or {}
    )


def _torch_source(path: Path, key: str | None) -> RowSource:
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
    return RowSource(tuple(tensor.shape), tensor.dtype, lambda start, stop: tensor[start:stop])


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


def _open_source(spec: TableSpec, read: Path) -> RowSource:
    """Open `spec`'s table, reading the file at `read` (its path, or a path naming the very
    file already opened for it); messages name `spec.path`."""
    path = spec.path
    if not read.exists():
        raise TableLoadError(f"{path}: no such file")
    if not read.is_file():
        raise TableLoadError(f"{path}: not a file")
    try:
        with read.open("rb"):
            pass
    except OSError as exc:
        raise TableLoadError(f"{path}: cannot read ({exc.strerror})") from None
    suffix = path.suffix.lower()
    if suffix == ".npy" and spec.key:
        raise TableLoadError(f"{path} is a single .npy array; drop ':{spec.key}'")
    readers: dict[str, Callable[[], RowSource]] = {
        ".npy": lambda: _npy_source(read),
        ".safetensors": lambda: _safetensors_source(read, spec.key),
        **dict.fromkeys((".pt", ".pth", ".bin", ".ckpt"), lambda: _torch_source(read, spec.key)),
    }
    if suffix not in readers:
        raise TableLoadError(
            f"{path}: unknown table format {suffix or '(no suffix)'!r}; "
            "use .npy, .safetensors or a torch checkpoint (.pt, .pth, .bin, .ckpt)"
        )
    try:
        return readers[suffix]()
    except TableLoadError as exc:
        raise TableLoadError(str(exc).replace(str(read), str(path))) from None


def load_table(
    spec: TableSpec,
    device: torch.device,
    *,
    shared: bool = False,
    cache_copies: int = 1,
    keep_free: Callable[[torch.device], int] = lambda device: 0,
) -> Table:
    """Load the table `spec` names onto `device`, checking it on the way; `shared` places
    a CPU table in shared memory, for several server processes to read (and leaves the
    device cache of a cached table to each of them: `cache_copies` is how many they are).

    Float64 is stored as float32. Non-finite values are refused (inf or NaN would make
    LookupDense differ from Lookup: 0 * inf is NaN). Negative zeros become +0.0, the
    same value, so the one-hot matmul, which sums +0.0 terms, agrees bit for bit.

    Before anything is allocated, the memory the table needs on each device
    (`footprint`) is checked against what is free there less `keep_free(device)` (room
    other processes will take, such as workers' CUDA contexts).

    Raises
    ------
    TableLoadError
        For a missing, unreadable, wrongly shaped, non-float or non-finite table, and for
        one that does not fit its devices.
    """
    opened = open_table(spec)
    recorded = recorded_update_seq(spec.name, opened.metadata)
    # A keyed table's shard is picked by its keys (see `keyed_source`).
    source, shard = (opened, None) if opened.index else shard_source(spec.name, opened, spec.shard)
    cache = None if spec.cache_rows is None else (spec.cache_rows, device)
    home = device if cache is None else torch.device("cpu")
    needs = footprint(source, spec.dtype, home, cache, cache_copies)
    short = shortfall(needs, lambda where: available_bytes(where) - keep_free(where))
    if short is not None:
        where, needed, free = short
        raise TableLoadError(
            f"table {spec.name!r} needs {size_text(needed)} on {where} "
            f"({describe_footprint(source, spec.dtype, cache, cache_copies)}); only "
            f"{size_text(max(free, 0))} are free there{_keep_free_note(keep_free, where)}"
            f": {FIT_HINT}"
        )
    try:
        table = materialise(spec.name, str(spec), source, home, shared=shared, dtype=spec.dtype)
        if cache is not None:
            attach_cache(table, cache[0], device, allocate=not shared)
    except torch.OutOfMemoryError:
        raise TableLoadError(
            f"table {spec.name!r}: {device} ran out of memory while loading it, though "
            f"{describe_footprint(source, spec.dtype, cache, cache_copies)} looked like it "
            f"fits: {FIT_HINT}"
        ) from None
    table.spec = spec
    table.shard = shard
    table.keys = opened.index
    table.update_seq = recorded or 0
    return table


# A snapshot's metadata key: the update_seq (update log position) its rows hold.
UPDATE_SEQ_KEY = "embedding.update_seq"


def recorded_update_seq(name: str, metadata: dict[str, str]) -> int | None:
    """The update_seq a file's metadata records (a snapshot's), None when it records none."""
    text = metadata.get(UPDATE_SEQ_KEY)
    if text is None:
        return None
    try:
        seq = int(text)
    except ValueError:
        seq = -1
    if not 0 <= seq < 1 << 63:
        raise TableLoadError(f"table {name!r}: bad {UPDATE_SEQ_KEY} metadata {text[:40]!r}")
    return seq


# The most rows a sharded table may claim: every server of it keeps a bitmap of all of
# them (rows / 8 bytes: 8 GiB at this bound), far above any real embedding table.
MAX_SHARDED_ROWS = 1 << 36


def check_shard_size(name: str, shard: Shard, rows: int, held: int) -> None:
    """Refuse a per-shard file whose metadata cannot describe it, before anything is sized
    from that metadata (the layout costs memory and time in the whole table's rows): a
    shard of a hash partition holds about rows / N of them, within a few standard
    deviations; a damaged or hostile file claiming 2^27 rows while holding 481 would
    otherwise cost ~1.6 GiB and seconds before the exact count refused it."""
    if not 0 < rows <= MAX_SHARDED_ROWS:
        raise TableLoadError(
            f"table {name!r}: the file says the whole table has {rows} rows; a sharded "
            f"table has 1 to {MAX_SHARDED_ROWS}: it is damaged"
        )
    expected = rows / shard.count
    if abs(held - expected) > 10 * expected**0.5 + 16:
        raise TableLoadError(
            f"table {name!r}: the file says it holds shard {shard} of {rows} rows (about "
            f"{expected:.0f} rows), but it has {held}: it is damaged"
        )


def check_own_shard(name: str, held: Shard, shard: Shard | None, what: str) -> None:
    """Refuse a shard's own file (holding shard `held` of `what`) on a server started as
    `shard` (None: no --shard), naming the flag that would load it."""
    if shard != held:
        started = "without --shard" if shard is None else f"with --shard {shard}"
        raise TableLoadError(
            f"table {name!r}: the file holds shard {held} of {what}, but the server was "
            f'started {started}: start it with --shard {held} (or `shard = "{held}"` in '
            "the config), or give it the whole table's file"
        )


def shard_source(
    name: str, source: RowSource, shard: Shard | None
) -> tuple[RowSource, ShardRows | None]:
    """The rows of `source` that `shard` holds (all of them for None), and where they sit
    in the whole table. A per-shard file (its metadata names the shard) must be the
    server's own shard; a full file is read for the shard's rows only."""
    named = source.metadata.get(sharding.SHARD_KEY)
    if named is not None:
        try:
            held, rows = Shard.parse(named), int(source.metadata[sharding.ROWS_KEY])
        except (KeyError, ValueError) as exc:
            raise TableLoadError(f"table {name!r}: bad shard metadata ({exc})") from None
        check_shard_size(name, held, rows, source.shape[0])
        check_own_shard(name, held, shard, f"a {rows}-row table")
        layout = ShardRows.of(held, rows)
        if layout.owned.size != source.shape[0]:
            raise TableLoadError(
                f"table {name!r}: the file says it holds shard {held} of {rows} rows, which "
                f"is {layout.owned.size} rows, but it has {source.shape[0]}: it is damaged"
            )
        return source, layout
    if shard is None:
        return source, None
    layout = ShardRows.of(shard, source.shape[0])
    if layout.owned.size == 0:
        raise TableLoadError(
            f"table {name!r}: shard {shard} of its {source.shape[0]} rows holds none: use "
            "fewer shards for so small a table"
        )
    owned, read = layout.owned, source.read
    return RowSource(
        (int(owned.size), source.shape[1]),
        source.dtype,
        lambda start, stop: sharding.pick_rows(read, owned, start, stop),
    ), layout


# What to do about a table that does not fit, said with every refusal.
FIT_HINT = (
    "store it smaller (dtype float16, bfloat16 or int8 in --config), keep it in host memory "
    "with its hot rows on the device (cache_rows), or free the device"
)

# Host memory a load uses besides the table: a chunk read from the file, its checked
# copy and (int8) its quantized form.
LOAD_STAGING_BYTES = 2 * CHUNK_BYTES


def footprint(
    source: RowSource,
    dtype: str | None,
    device: torch.device,
    cache: tuple[int, torch.device] | None = None,
    cache_copies: int = 1,
) -> dict[torch.device, int]:
    """Bytes a table from `source` takes on each device: its weights (stored as `dtype`,
    or the file's float dtype; int8 adds a float32 scale and bias per row) on `device`,
    `cache_copies` device caches of `cache` = (rows, device), and the host memory a load
    stages chunks in."""
    rows, dim = source.shape
    if dtype == "int8":
        itemsize, weights = 4, rows * dim + rows * 2 * 4
    else:
        itemsize = (STORAGE_NAMES[dtype] if dtype else _storage_dtype(source)).itemsize
        weights = rows * dim * itemsize
    cpu = torch.device("cpu")
    needs = {device: weights}
    if cache is not None:
        cache_rows, cache_device = cache
        cache_bytes = min(cache_rows, rows) * dim * itemsize * cache_copies
        needs[cache_device] = needs.get(cache_device, 0) + cache_bytes
    needs[cpu] = needs.get(cpu, 0) + LOAD_STAGING_BYTES
    return needs


def shortfall(
    needs: dict[torch.device, int], free: Callable[[torch.device], int]
) -> tuple[torch.device, int, int] | None:
    """The first device of `needs` (a `footprint`) with less `free(device)` than it needs,
    as (device, needed, free); None when every device has room."""
    for where, needed in needs.items():
        room = free(where)
        if needed > room:
            return where, needed, room
    return None


def describe_footprint(
    source: RowSource,
    dtype: str | None,
    cache: tuple[int, torch.device] | None = None,
    cache_copies: int = 1,
) -> str:
    """`footprint`'s reasons in words: shape, storage, cache."""
    rows, dim = source.shape
    stored = dtype or STORAGE_DTYPES[_storage_dtype(source)]
    text = f"{rows:,} x {dim} stored as {stored}"
    if cache is not None:
        copies = f" in each of {cache_copies} processes" if cache_copies > 1 else ""
        text += f" in host memory, {min(cache[0], rows):,} rows cached on {cache[1]}{copies}"
    return text


def _keep_free_note(keep_free: Callable[[torch.device], int], device: torch.device) -> str:
    kept = keep_free(device)
    return f" after {size_text(kept)} kept for the worker processes" if kept else ""


def size_text(nbytes: int) -> str:
    """Bytes as a person reads them: GiB from 1 GiB up, else MiB (two decimals)."""
    if nbytes >= 1 << 30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.2f} MiB"


def attach_cache(table: Table, rows: int, device: torch.device, *, allocate: bool = True) -> None:
    """Serve `table` (in host memory) through a cache of `rows` hot rows on `device`
    (its memory taken now, or with `allocate=False` by the processes that serve it)."""
    table.cache = CachedRows(
        table.weights, rows, device, metrics.CacheMetrics(table.name), allocate=allocate
    )
    log.info("table %r: %d of its %d rows cached on %s (%.1f MiB there%s)", table.name,
             table.cache.slots, table.rows, device,
             table.cache.slots * table.dim * table.weights.element_size() / 2**20,
             "" if allocate else ", in each worker process")  # fmt: skip


def open_table(spec: TableSpec, read: Path | None = None) -> RowSource:
    """Open `spec`'s file (read from `read` when given: a path naming the file opened for
    it) and check its shape and dtype; errors name the table. A keyed table's source
    (see `keyed_source`) carries its index."""
    try:
        parts = _keyed_parts(spec, spec.path if read is None else read)
        source = (
            _open_source(spec, spec.path if read is None else read) if parts is None else parts[0]
        )
    except TableLoadError as exc:
        raise TableLoadError(f"table {spec.name!r}: {exc}") from None
    _check_shape(spec.name, source)
    if parts is None:
        return source
    return keyed_source(spec, source, parts[1], parts[2])


def _keyed_parts(
    spec: TableSpec, read: Path
) -> tuple[RowSource, np.ndarray, np.ndarray | None] | None:
    """A keyed table's values, keys and default vector (None: none in the file), or None
    for a table of rows: keys from `spec.keys` (a .npy), or a .npz / .safetensors file
    holding `keys` and `values` (a .safetensors file whose tensor is named is of rows)."""
    path, suffix = spec.path, spec.path.suffix.lower()
    if spec.keys is not None:
        values = _open_source(spec, read)
        try:
            keys = np.load(spec.keys, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise TableLoadError(
                f"keys file {spec.keys}: not a readable .npy array ({exc})"
            ) from None
        return values, keys, None
    if suffix == ".npz":
        if not read.is_file():
            raise TableLoadError(f"{path}: no such file")
        try:
            with np.load(read, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (ValueError, OSError, EOFError, KeyError) as exc:
            raise TableLoadError(f"{path} is not a readable .npz archive ({exc})") from None
        if KEYS_TENSOR not in arrays or VALUES_TENSOR not in arrays:
            raise TableLoadError(
                f"{path} holds {', '.join(sorted(arrays)) or 'nothing'}; a .npz table holds "
                f"'{KEYS_TENSOR}' (int64) and '{VALUES_TENSOR}' ([keys, dim] floats)"
            )
        array = arrays[VALUES_TENSOR]
        if array.dtype.kind != "f":
            raise TableLoadError(f"{path}: '{VALUES_TENSOR}' holds {array.dtype}, not floats")
        tensor = torch.from_numpy(np.ascontiguousarray(array, array.dtype.newbyteorder("=")))
        source = RowSource(tuple(array.shape), tensor.dtype, lambda a, b: tensor[a:b])
        return source, arrays[KEYS_TENSOR], arrays.get(DEFAULT_TENSOR)
    if suffix == ".safetensors" and read.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(read), framework="pt")
            names = set(handle.keys())
        except (SafetensorError, OSError, ValueError):
            return None  # said by the reader of rows
        if not {KEYS_TENSOR, VALUES_TENSOR} <= names or (
            spec.key is not None and spec.key in names
        ):
            return None
        values = _safetensors_source(read, VALUES_TENSOR)
        default = handle.get_tensor(DEFAULT_TENSOR).numpy() if DEFAULT_TENSOR in names else None
        return values, handle.get_tensor(KEYS_TENSOR).numpy(), default
    return None


def keyed_default(spec: TableSpec) -> np.ndarray | None:
    """The default vector a keyed table's file holds (None: none, or not keyed)."""
    parts = _keyed_parts(spec, spec.path)
    return None if parts is None or parts[2] is None else np.asarray(parts[2]).reshape(-1)


def keyed_source(
    spec: TableSpec, values: RowSource, keys: np.ndarray, default: np.ndarray | None
) -> RowSource:
    """The rows a keyed table loads: its values, zeros up to its capacity (`max_keys`, or
    as many as it has keys), the fill row (the default vector under the `default` policy,
    else zeros) and the pad row (zeros); with its index.

    Raises
    ------
    TableLoadError
        Keys and values of different lengths, repeated or non-int64 keys, more keys than
        max_keys, a default vector of the wrong shape or missing under `default`.
    """
    name = spec.name
    count, dim = values.shape
    keys = np.asarray(keys)
    if keys.shape != (count,):
        raise TableLoadError(
            f"table {name!r}: {list(keys.shape)} keys for {count} rows of values; a keyed "
            "table holds one int64 key per row"
        )
    part = spec.shard
    named = values.metadata.get(sharding.SHARD_KEY)
    if named is not None:  # a shard's own file (embedding-split, a shard's snapshot)
        try:
            held = Shard.parse(named)
        except ValueError as exc:
            raise TableLoadError(f"table {name!r}: bad shard metadata ({exc})") from None
        check_own_shard(name, held, part, "a keyed table")
    elif part is not None and part.count > 1 and keys.dtype.kind in "iu":
        # The whole table's file: this shard's keys (bad keys are said by the index).
        mine = np.flatnonzero(shard_of(keys, part.count) == part.index)
        keys, whole = keys[mine], values
        values = RowSource(
            (int(mine.size), dim), whole.dtype,
            lambda start, stop: sharding.pick_rows(whole.read, mine, start, stop),
            whole.metadata,
        )  # fmt: skip
        count = int(mine.size)
    capacity = count if spec.max_keys is None else spec.max_keys
    if capacity == 0:
        raise TableLoadError(
            f"table {name!r}: shard {part} holds none of the file's keys; set max_keys for "
            "the keys updates will add, or use fewer shards"
        )
    try:
        index = KeyIndex.build(keys, capacity, spec.missing, spec.bags_skip_missing, part)
    except ValueError as exc:
        raise TableLoadError(f"table {name!r}: {exc}") from None
    vector = None
    if spec.default is not None:
        vector = np.asarray(spec.default, dtype=np.float64)
    elif default is not None:
        vector = np.asarray(default, dtype=np.float64).reshape(-1)
    if vector is not None and vector.shape != (dim,):
        raise TableLoadError(
            f"table {name!r}: the default vector has {vector.size} values, the table's dim is {dim}"
        )
    if spec.missing == "default" and vector is None:
        raise TableLoadError(
            f"table {name!r}: missing = 'default' needs a default vector: a '{DEFAULT_TENSOR}' "
            "tensor in the file, or default = [...] in the config"
        )
    fill = torch.zeros((1, dim), dtype=values.dtype)
    if spec.missing == "default" and vector is not None:
        fill = torch.from_numpy(vector.reshape(1, dim)).to(values.dtype)
    rows = capacity + 2

    def read(start: int, stop: int) -> torch.Tensor:
        parts = []
        if start < count:
            parts.append(values.read(start, min(stop, count)))
        free = max(0, min(stop, capacity) - max(start, count))
        if free:
            parts.append(torch.zeros((free, dim), dtype=values.dtype))
        if start <= capacity < stop:
            parts.append(fill)
        if start <= capacity + 1 < stop:
            parts.append(torch.zeros((1, dim), dtype=values.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    return RowSource((rows, dim), values.dtype, read, values.metadata, index)


def _storage_dtype(source: RowSource) -> torch.dtype:
    return source.dtype if source.dtype in STORAGE_DTYPES else torch.float32


def _check_shape(name: str, source: RowSource) -> None:
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


def materialise(
    name: str,
    origin: str,
    source: RowSource,
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # every row written before any stream reads them
    table = Table(name=name, weights=weights, source=origin, qparams=qparams)
    if shared:
        table.shared_state = torch.tensor([0, 1, 0], dtype=torch.int64).share_memory_()
    log.info(
        "table %r: %d x %d %s on %s (%.1f MiB) from %s in %.2f s",
        name, rows, dim, table.dtype, device, table.nbytes / 2**20, origin,
        time.monotonic() - started,
    )  # fmt: skip
    return table


def demo_table(
    rows: int,
    dim: int,
    seed: int,
    device: torch.device,
    *,
    shared: bool = False,
    shard: Shard | None = None,
) -> Table:
    """The seeded demo table `demo`: np.random.default_rng(seed).standard_normal((rows, dim))
    (with `shard`, the rows that shard holds).

    Anyone can rebuild it with numpy alone to check what the server returns.
    """
    values = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    source, layout = shard_source(
        "demo",
        RowSource((rows, dim), torch.float32, lambda a, b: torch.from_numpy(values[a:b])),
        shard,
    )
    origin = f"seeded demo (seed {seed}{f', shard {shard}' if shard else ''})"
    table = materialise("demo", origin, source, device, shared=shared)
    table.shard = layout
    return table


SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
}  # fmt: skip


def write_table(
    out: BinaryIO,
    suffix: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (host tensors; a table's [rows, dim] under its name, or a keyed
    table's keys, values and default) to `out` as `.npy` (one tensor; bfloat16 as float32:
    .npy has no bfloat16) or `.safetensors` (each in its own dtype, with `metadata` in the
    header), in one pass with no second copy of the table."""
    if suffix == ".npy":
        (contents,) = tensors.values()
        values = contents.float() if contents.dtype == torch.bfloat16 else contents
        np.save(out, values.numpy())
        return
    # The safetensors layout: an 8-byte little-endian header length, a JSON header
    # (padded with spaces to a multiple of 8), then the raw little-endian bytes.
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, contents in tensors.items():
        nbytes = contents.numel() * contents.element_size()
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[contents.dtype],
            "shape": list(contents.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    out.write(len(header).to_bytes(8, "little"))
    out.write(header)
    for contents in tensors.values():
        out.write(contents.contiguous().view(torch.uint8).numpy().data)
