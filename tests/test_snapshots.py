"""Finding a table's newest snapshot in the snapshot directory (core/snapshots.py): what a
replica on an update log starts from, reloads at a gap, and trims the log to. In-process:
every rule of the search, each against a file that breaks it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from embedding_client.shards import Shard
from embedding_server.core import snapshots
from embedding_server.core.snapshots import Snapshot, global_shape, newest_snapshot

ROWS, DIM = 12, 4


def _write(path: Path, seq: int | None, *, name: str = "t", rows: int = ROWS, dim: int = DIM,
           shard: str | None = None, global_rows: int | None = None) -> Path:  # fmt: skip
    """A .safetensors file as SnapshotTable writes it: tensor `name`, update_seq (None:
    no such key) and, for a shard, which shard of how many global rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {} if seq is None else {"embedding.update_seq": str(seq)}
    if shard is not None:
        metadata.update({"embedding.shard": shard, "embedding.rows": str(global_rows)})
    shape = (rows, dim) if dim else (rows,)
    safetensors.numpy.save_file({name: np.zeros(shape, np.float32)}, str(path), metadata)
    return path


def test_the_highest_update_seq_wins_and_0_is_no_snapshot(tmp_path: Path) -> None:
    assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) is None  # an empty folder
    _write(tmp_path / "zero.safetensors", 0)
    assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) is None
    one = _write(tmp_path / "one.safetensors", 1)
    assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) == Snapshot(one, 1)
    five = _write(tmp_path / "a5.safetensors", 5)
    _write(tmp_path / "b3.safetensors", 3)  # found after the 5: does not replace it
    assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) == Snapshot(five, 5)
    _write(tmp_path / "c5.safetensors", 5)  # a tie: the first in name order stays
    assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) == Snapshot(five, 5)


def test_files_that_are_not_this_tables_snapshots_are_passed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _write(tmp_path / "good.safetensors", 2)
    _write(tmp_path / "other-table.safetensors", 50, name="u")
    _write(tmp_path / "no-seq.safetensors", None)
    _write(tmp_path / "x.safetensors.tmp", 50)  # not .safetensors
    _write(tmp_path / ".hidden.safetensors", 50)  # a temporary file's kind of name
    _write(tmp_path / ".work" / "in-hidden-dir.safetensors", 50)
    _write(tmp_path / "outside" / "far.safetensors", 50)
    os.symlink(tmp_path / "outside" / "far.safetensors", tmp_path / "link.safetensors")
    (tmp_path / "dirlink").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside" / "far.safetensors").rename(tmp_path / "outside" / "far.bin")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10" + b"\x00" * 7 + b"{not json")
    bad_seq = _write(tmp_path / "bad-seq.safetensors", 0)
    safetensors.numpy.save_file({"t": np.zeros((ROWS, DIM), np.float32)}, str(bad_seq),
                                {"embedding.update_seq": "many"})  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger=snapshots.__name__):
        assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) == Snapshot(good, 2)
    assert f"snapshot search: {damaged} unreadable (" in caplog.text


def test_a_link_to_a_snapshot_is_not_followed(tmp_path: Path) -> None:
    """Whoever can write the folder must not make the server read a file elsewhere."""
    folder = tmp_path / "snapshots"
    folder.mkdir()
    far = _write(tmp_path / "elsewhere.safetensors", 9)
    (folder / "link.safetensors").symlink_to(far)
    _write(tmp_path / "elsewhere-dir" / "in.safetensors", 9)
    (folder / "dir").symlink_to(tmp_path / "elsewhere-dir", target_is_directory=True)
    assert newest_snapshot(folder, "t", None, (ROWS, DIM)) is None
    inside = _write(folder / "sub" / "in.safetensors", 3)  # a real subdirectory is searched
    assert newest_snapshot(folder, "t", None, (ROWS, DIM)) == Snapshot(inside, 3)


def test_another_shape_is_not_used_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wide = _write(tmp_path / "wide.safetensors", 7, dim=DIM + 1)
    flat = _write(tmp_path / "flat.safetensors", 8, dim=0)  # 1-D: 12 x 0
    with caplog.at_level(logging.WARNING, logger=snapshots.__name__):
        for _ in range(3):  # searches repeat (every trim): said once each
            assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) is None
    said = [r.getMessage() for r in caplog.records]
    assert sorted(said) == sorted([
        f"snapshot {wide} of table 't' has 12 x 5 rows, the table 12 x 4: not used",
        f"snapshot {flat} of table 't' has 12 x 0 rows, the table 12 x 4: not used",
    ])  # fmt: skip


def test_a_shard_finds_its_own_shards_snapshots_only(tmp_path: Path) -> None:
    """A shard's snapshot holds its rows but names the whole table's (global_shape)."""
    whole = _write(tmp_path / "whole.safetensors", 4, rows=20)
    first = _write(tmp_path / "s0.safetensors", 6, rows=10, shard="0/2", global_rows=20)
    _write(tmp_path / "s1.safetensors", 9, rows=10, shard="1/2", global_rows=20)
    _write(tmp_path / "s0of4.safetensors", 9, rows=5, shard="0/4", global_rows=20)
    assert newest_snapshot(tmp_path, "t", None, (20, DIM)) == Snapshot(whole, 4)
    assert newest_snapshot(tmp_path, "t", Shard(0, 2), (20, DIM)) == Snapshot(first, 6)
    assert global_shape((10, DIM), {"embedding.shard": "0/2", "embedding.rows": "20"}) == (20, 4)
    assert global_shape((10, DIM), {"embedding.rows": "20"}) == (10, 4)  # not a shard's
    assert global_shape((10,), {}) == (10, 0)


def test_a_huge_folder_is_searched_only_so_far(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(snapshots, "MAX_FILES", 3)
    for k in range(1, 4):
        _write(tmp_path / f"s{k}.safetensors", k)
    with caplog.at_level(logging.WARNING, logger=snapshots.__name__):
        assert newest_snapshot(tmp_path, "t", None, (ROWS, DIM)) == Snapshot(
            tmp_path / "s3.safetensors", 3
        )
    assert not caplog.records  # 3 files: all of them looked at
    for k in range(4, 6):
        _write(tmp_path / f"s{k}.safetensors", k)
    with caplog.at_level(logging.WARNING, logger=snapshots.__name__):
        found = newest_snapshot(tmp_path, "t", None, (ROWS, DIM))
    assert found == Snapshot(tmp_path / "s3.safetensors", 3)
    assert [r.getMessage() for r in caplog.records] == [
        f"snapshot search: more than 3 files under {tmp_path}; looked at the first 3"
    ]
