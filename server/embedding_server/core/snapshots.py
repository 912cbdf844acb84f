"""Finding the newest snapshot of a table in the snapshot directory: what a replica on an
update log starts from, reloads when the log was trimmed past it, and trims the log to.

A snapshot (`SnapshotTable` to `.safetensors`) names itself: its tensor is the table's
name, its metadata holds the update_seq it was taken at and, for a shard, which shard of
how many global rows. Only its header is read here (a few hundred bytes)."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from embedding_server.core import sharding
from embedding_server.core.keys import TABLE_KEY, VALUES_TENSOR
from embedding_server.core.sharding import Shard
from embedding_server.core.sources import UPDATE_SEQ_KEY

log = logging.getLogger(__name__)

# The most files looked at in one search: a snapshot directory holds a table's recent
# snapshots, not a filesystem.
MAX_FILES = 10_000

# Snapshots of another shape already said in the log (searches repeat: said once each).
_said: set[Path] = set()


@dataclass(frozen=True)
class Snapshot:
    path: Path
    update_seq: int


def global_shape(shape: tuple[int, ...], metadata: dict[str, str]) -> tuple[int, int]:
    """(rows of the whole table, dim) of a table file: a per-shard file says its table's
    rows in its metadata."""
    rows = metadata.get(sharding.ROWS_KEY) if sharding.SHARD_KEY in metadata else None
    return (int(rows) if rows is not None else shape[0]), (shape[1] if len(shape) > 1 else 0)


# `newest_snapshot`'s rows for a keyed table: snapshots of any number of keys match.
ANY_ROWS = -1


def newest_snapshot(
    folder: Path, name: str, shard: Shard | None, shape: tuple[int, int]
) -> Snapshot | None:
    """The snapshot in `folder` (and its subdirectories) of table `name`, of `shard` (or
    of the whole table for None), whose table has `shape` (global rows, dim), with the
    highest update_seq above 0; None when there is none. Files that cannot be read,
    links, and temporary files (a dot first) are passed over; so is a snapshot of the
    table at another shape, said in the log (it belongs to another table file)."""
    best: Snapshot | None = None
    for path in _safetensors_files(folder):
        try:
            keys, file_shape, metadata = _header(path, name)
        except Exception as exc:  # a damaged or foreign file: not a snapshot to use
            log.debug("snapshot search: %s unreadable (%s)", path, exc)
            continue
        keyed = metadata.get(TABLE_KEY) == name and VALUES_TENSOR in keys
        if (name not in keys and not keyed) or UPDATE_SEQ_KEY not in metadata:
            continue
        held = metadata.get(sharding.SHARD_KEY)
        if held != (None if shard is None else str(shard)):
            continue
        try:
            seq = int(metadata[UPDATE_SEQ_KEY])
            found_shape = global_shape(file_shape, metadata)
        except ValueError:
            continue
        if shape[0] == ANY_ROWS:
            found_shape = (ANY_ROWS, found_shape[1])
        if found_shape != shape:
            if path in _said:
                continue
            if len(_said) >= MAX_FILES:
                _said.clear()
            _said.add(path)
            log.warning("snapshot %s of table %r has %d x %d rows, the table %d x %d: not used",
                        path, name, *found_shape, *shape)  # fmt: skip
            continue
        if seq > 0 and (best is None or seq > best.update_seq):
            best = Snapshot(path, seq)
    return best


def _safetensors_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):  # links to directories are not followed
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            path = Path(root) / file
            if file.startswith(".") or not file.endswith(".safetensors"):
                continue
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
            except OSError:
                continue
            if len(found) == MAX_FILES:  # one more than the most looked at
                log.warning("snapshot search: more than %d files under %s; looked at the "
                            "first %d", MAX_FILES, folder, MAX_FILES)  # fmt: skip
                return found
            found.append(path)
    return found


def _header(path: Path, name: str) -> tuple[list[str], tuple[int, ...], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        keys = list(handle.keys())
        tensor = name if name in keys else VALUES_TENSOR  # a keyed snapshot's: its values
        shape = tuple(handle.get_slice(tensor).get_shape()) if tensor in keys else ()
        return keys, shape, handle.metadata() or {}
