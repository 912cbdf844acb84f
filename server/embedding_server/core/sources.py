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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from embedding_server import metrics
from embedding_server.config import TableSpec
from embedding_server.core import kernels
from embedding_server.core.cache import CachedRows
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
    return RowSource(shape, probe.dtype, lambda start, stop: tensor_slice[start:stop])


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
    source = open_table(spec)
    if spec.cache_rows is None:
        table = materialise(spec.name, str(spec), source, device, shared=shared, dtype=spec.dtype)
    else:
        host = torch.device("cpu")
        table = materialise(spec.name, str(spec), source, host, shared=shared, dtype=spec.dtype)
        attach_cache(table, spec.cache_rows, device)
    table.spec = spec
    return table


def attach_cache(table: Table, rows: int, device: torch.device) -> None:
    """Serve `table` (in host memory) through a cache of `rows` hot rows on `device`."""
    table.cache = CachedRows(table.weights, rows, device, metrics.CacheMetrics(table.name))
    log.info("table %r: %d of its %d rows cached on %s (%.1f MiB there)", table.name,
             table.cache.slots, table.rows, device,
             table.cache.slots * table.dim * table.weights.element_size() / 2**20)  # fmt: skip


def open_table(spec: TableSpec, read: Path | None = None) -> RowSource:
    """Open `spec`'s file (read from `read` when given: a path naming the file opened for
    it) and check its shape and dtype; errors name the table."""
    try:
        source = _open_source(spec, spec.path if read is None else read)
    except TableLoadError as exc:
        raise TableLoadError(f"table {spec.name!r}: {exc}") from None
    _check_shape(spec.name, source)
    return source


def _storage_dtype(source: RowSource) -> torch.dtype:
    return source.dtype if source.dtype in STORAGE_DTYPES else torch.float32


def storage_bytes(source: RowSource) -> int:
    rows, dim = source.shape
    return rows * dim * _storage_dtype(source).itemsize


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
    source = RowSource(
        (rows, dim), torch.float32, lambda start, stop: torch.from_numpy(values[start:stop])
    )
    return materialise("demo", f"seeded demo (seed {seed})", source, device, shared=shared)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_table(out: BinaryIO, suffix: str, name: str, contents: torch.Tensor) -> None:
    """Write `contents` (a host tensor, [rows, dim]) to `out` as `.npy` (bfloat16 as
    float32: .npy has no bfloat16) or `.safetensors` (its own dtype, under `name`), in
    one pass with no second copy of the table."""
    if suffix == ".npy":
        values = contents.float() if contents.dtype == torch.bfloat16 else contents
        np.save(out, values.numpy())
        return
    # The safetensors layout: an 8-byte little-endian header length, a JSON header
    # (padded with spaces to a multiple of 8), then the raw little-endian bytes.
    nbytes = contents.numel() * contents.element_size()
    header = json.dumps(
        {name: {"dtype": SAFETENSORS_DTYPES[contents.dtype], "shape": list(contents.shape),
                "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    header += b" " * (-len(header) % 8)
    out.write(len(header).to_bytes(8, "little"))
    out.write(header)
    out.write(contents.contiguous().view(torch.uint8).numpy().data)
