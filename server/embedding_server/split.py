"""`embedding-split`: a table file as N per-shard .safetensors files, one per shard server.

    embedding-split /data/ads.npy --shards 4 --out /data/shards
    -> /data/shards/ads.shard-0-of-4.safetensors ... ads.shard-3-of-4.safetensors

Each file holds the rows `shard_of(id, 4) == I` in ascending id order, in the table's
storage dtype (float64 as float32), with metadata naming the shard and the table's global
rows; `embedding-server --table ads=FILE --shard I/4` loads it without reading the rest of
the table (a server started with another --shard refuses it). A keyed table (keys and
values) is split by its keys: file I holds the keys `shard_of(key, 4) == I`, their values
and the file's default vector. Files are written under a temporary name and renamed into
place; an existing file is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedding_client.cli import ArgumentParser, version_text
from embedding_client.shards import Shard

if TYPE_CHECKING:
    from embedding_server.config import TableSpec

log = logging.getLogger("embedding_server.split")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="embedding-split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=version_text(parser.prog))
    parser.add_argument("table", help="the whole table: PATH or PATH:KEY (.npy, .safetensors, "
                        "torch checkpoint)")  # fmt: skip
    parser.add_argument("--shards", type=int, required=True, help="N: how many shards")
    parser.add_argument("--out", type=Path, required=True, help="folder for the N files")
    parser.add_argument("--name", help="table name, in the file names and the tensor key "
                        "(default: the file's stem)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def split(table: str, shards: int, out: Path, name: str | None = None,
          overwrite: bool = False) -> list[Path]:  # fmt: skip
    """Write the N shard files of `table` into `out`; returns their paths.

    Raises
    ------
    TableLoadError
        The table file cannot be read or served (the message says why).
    FileExistsError
        A shard file exists and `overwrite` is false.
    """
    import torch

    from embedding_server.config import TableSpec
    from embedding_server.core.sources import CHUNK_BYTES, open_table, shard_source

    spec = TableSpec.parse(f"{name or Path(table.split(':')[0]).stem}={table}")
    source = open_table(spec)
    out.mkdir(parents=True, exist_ok=True)
    if source.index is not None:
        return _split_keyed(spec, source.index.count, shards, out, overwrite)
    storage = source.dtype if source.dtype != torch.float64 else torch.float32
    written = []
    for index in range(shards):
        shard = Shard(index, shards)
        target = _target(out, spec.name, shard, overwrite)
        started = time.monotonic()
        rows, layout = shard_source(spec.name, source, shard)
        assert layout is not None
        count, dim = rows.shape
        step = max(1, CHUNK_BYTES // (dim * 4))
        parts = [rows.read(a, min(count, a + step)).to(storage) for a in range(0, count, step)]
        contents = torch.cat(parts) if len(parts) > 1 else parts[0]
        _write(target, {spec.name: contents}, layout.metadata())
        log.info("shard %s: %d of %d rows -> %s (%.1f s)", shard, count, layout.rows, target,
                 time.monotonic() - started)  # fmt: skip
        written.append(target)
    return written


def _target(out: Path, name: str, shard: Shard, overwrite: bool) -> Path:
    """Where shard `shard`'s file goes (FileExistsError: it is there, not to be replaced)."""
    target = out / f"{name}.shard-{shard.index}-of-{shard.count}.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; give --overwrite to replace it")
    return target


def _split_keyed(
    spec: TableSpec, every_key: int, shards: int, out: Path, overwrite: bool
) -> list[Path]:
    """A keyed table's shard files: each holds the keys `shard_of(key, N) == I` with their
    values (and the file's default vector), named as a keyed snapshot is."""
    import numpy as np
    import torch

    from embedding_server.core.keys import DEFAULT_TENSOR, KEYS_TENSOR, TABLE_KEY, VALUES_TENSOR
    from embedding_server.core.sharding import SHARD_KEY
    from embedding_server.core.sources import keyed_default, open_table

    default = keyed_default(spec)
    written = []
    for index in range(shards):
        shard = Shard(index, shards)
        target = _target(out, spec.name, shard, overwrite)
        # max_keys: room for every key of the file, so that a shard may hold none.
        opened = open_table(replace(spec, shard=shard, max_keys=max(1, every_key)))
        keys = opened.index
        assert keys is not None
        values = opened.read(0, keys.count)
        storage = values.dtype if values.dtype != torch.float64 else torch.float32
        tensors = {KEYS_TENSOR: torch.from_numpy(np.ascontiguousarray(keys.in_row_order())),
                   VALUES_TENSOR: values.to(storage)}  # fmt: skip
        if default is not None:
            tensors[DEFAULT_TENSOR] = torch.from_numpy(default).to(storage)
        metadata = {SHARD_KEY: str(shard), TABLE_KEY: spec.name}
        _write(target, tensors, metadata)
        log.info("shard %s: %d keys -> %s", shard, keys.count, target)
        written.append(target)
    return written


def _write(target: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """`tensors` as a .safetensors file at `target`, through a temporary file renamed into
    place."""
    from embedding_server.core.sources import write_table

    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            write_table(handle, ".safetensors", tensors, metadata)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from embedding_server.core.sources import TableLoadError
    except ImportError as exc:  # torch missing: the server extra is not installed
        print(f"embedding-split needs the server extra (pip install '.[server]'): {exc}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        split(args.table, args.shards, args.out, args.name, args.overwrite)
    except (TableLoadError, FileExistsError, ValueError, OSError) as exc:
        print(f"embedding-split: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
