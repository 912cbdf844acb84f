"""The files admin RPCs touch: only inside the directories the operator named, whatever
path, link or name a caller tries (through real connections); snapshots created
exclusively, 0600, never over an existing file unless asked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_server.core.filesystem import FileAccess
from embedding_server.errors import FailedPrecondition
from embedding_server.process.server import EmbeddingServer

from .conftest import ServerFactory, admin_settings, random_table

WEIGHTS = random_table(30, 4, seed=5)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(tables, snapshots, outside): the operator's two directories and one they did not
    name, holding a file a caller must not reach."""
    tables, snapshots, outside = tmp_path / "tables", tmp_path / "snapshots", tmp_path / "outside"
    for folder in (tables, snapshots, outside):
        folder.mkdir()
    np.save(outside / "secret.npy", np.full((30, 4), 42.0, np.float32))
    (outside / "victim").write_text("root-only contents")
    return tables, snapshots, outside


@pytest.fixture
def confined(start_server: ServerFactory, dirs: tuple[Path, Path, Path]) -> EmbeddingServer:
    tables, snapshots, _ = dirs
    return start_server(
        {"t": WEIGHTS},
        allow_loopback_admin=True,
        table_dirs=(str(tables),),
        snapshot_dir=str(snapshots),
    )


def _client(server: EmbeddingServer) -> EmbeddingClient:
    return EmbeddingClient(f"127.0.0.1:{server.port}", timeout=10, max_attempts=1)


def _refused(call, code: grpc.StatusCode, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EmbeddingError) as refused:
        call()
    assert refused.value.code == code, refused.value
    assert message in refused.value.details, refused.value.details
    assert len(refused.value.details) < 600  # caller text quoted in part only


def _outside_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret.npy", "victim"]
    assert (outside / "victim").read_text() == "root-only contents"


def test_snapshots_stay_inside_the_snapshot_directory(
    confined: EmbeddingServer, dirs: tuple[Path, Path, Path]
) -> None:
    _, snapshots, outside = dirs
    (snapshots / "escape").symlink_to(outside)  # a link inside, pointing out
    (snapshots / "sub").mkdir()
    with _client(confined) as client:
        for path in (
            "../outside/x.npy",
            "sub/../../outside/x.npy",
            str(outside / "x.npy"),
            "escape/x.npy",
            "/etc/x.npy",
        ):
            _refused(lambda p=path: client.snapshot_table(p, "t"), grpc.StatusCode.INVALID_ARGUMENT,
                     "not inside this server's snapshot directory")  # fmt: skip
        _refused(lambda: client.snapshot_table("t.csv", "t"), grpc.StatusCode.INVALID_ARGUMENT,
                 "must name a file ending in .npy")  # fmt: skip
        _refused(lambda: client.snapshot_table(".hidden.npy", "t"),
                 grpc.StatusCode.INVALID_ARGUMENT, "not starting with '.'")  # fmt: skip
        info, version = client.snapshot_table("sub/ok.npy", "t")
        assert version == info.version == 1
    np.testing.assert_array_equal(np.load(snapshots / "sub" / "ok.npy"), WEIGHTS)
    _outside_untouched(outside)


def test_snapshot_files_are_private_and_never_written_through_links(
    confined: EmbeddingServer, dirs: tuple[Path, Path, Path]
) -> None:
    _, snapshots, outside = dirs
    victim = outside / "victim"
    # The old temporary names were predictable: links planted at every one of them.
    for pid in range(max(os.getpid() - 50, 1), os.getpid() + 50):
        (snapshots / f".snap.npy.{pid}.tmp").symlink_to(victim)
    (snapshots / "linked.npy").symlink_to(victim)
    with _client(confined) as client:
        client.snapshot_table("snap.npy", "t")
        mode = stat.S_IMODE((snapshots / "snap.npy").stat().st_mode)
        assert mode == 0o600, oct(mode)
        # An existing name (a link, here) is kept unless the caller asks to overwrite.
        _refused(lambda: client.snapshot_table("linked.npy", "t"),
                 grpc.StatusCode.ALREADY_EXISTS, "exists already")  # fmt: skip
        assert (snapshots / "linked.npy").is_symlink()
        client.snapshot_table("linked.npy", "t", overwrite=True)  # replaces the link itself
        assert not (snapshots / "linked.npy").is_symlink()
        np.testing.assert_array_equal(np.load(snapshots / "linked.npy"), WEIGHTS)
        before = (snapshots / "snap.npy").read_bytes()
        client.update_rows([0], np.zeros((1, 4), np.float32), "t")
        _refused(lambda: client.snapshot_table("snap.npy", "t"),
                 grpc.StatusCode.ALREADY_EXISTS, "ask to overwrite it")  # fmt: skip
        assert (snapshots / "snap.npy").read_bytes() == before
        assert client.snapshot_table("snap.npy", "t", overwrite=True)[0].update_seq == 1
    _outside_untouched(outside)
    left = [p.name for p in snapshots.iterdir() if p.name.startswith(".") and not p.is_symlink()]
    assert left == []  # no temporary file left behind


def test_reload_sources_stay_inside_the_table_directories(
    confined: EmbeddingServer, dirs: tuple[Path, Path, Path]
) -> None:
    tables, _, outside = dirs
    (tables / "link.npy").symlink_to(outside / "secret.npy")  # a valid table, outside
    (tables / "mem.npy").symlink_to("/proc/self/mem")
    (tables / "escape").symlink_to(outside)
    os.mkfifo(tables / "fifo.npy")
    np.save(tables / "v2.npy", WEIGHTS * 2)
    with _client(confined) as client:
        for source in (
            str(outside / "secret.npy"),
            "../outside/secret.npy",
            "link.npy",
            "mem.npy",
            "escape/secret.npy",
            "/proc/self/mem",
        ):
            _refused(lambda s=source: client.reload_table("t", s),
                     grpc.StatusCode.INVALID_ARGUMENT, "not inside a table directory")  # fmt: skip
        _refused(lambda: client.reload_table("t", "fifo.npy"),  # refused, not blocked on
                 grpc.StatusCode.FAILED_PRECONDITION, "not a regular file")  # fmt: skip
        missing = grpc.StatusCode.FAILED_PRECONDITION
        _refused(lambda: client.reload_table("t", "nothing.npy"), missing,
                 "no such file in the table directories")  # fmt: skip
        assert client.lookup_result([1], "t").version == 1  # the table kept serving
        np.testing.assert_array_equal(client.lookup([1], "t"), WEIGHTS[[1]])
        assert client.reload_table("t", "v2.npy").version == 2  # relative to the table dir
        np.testing.assert_array_equal(client.lookup([1], "t"), 2 * WEIGHTS[[1]])


def test_without_directories_those_rpcs_say_how_to_turn_them_on(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    np.save(tmp_path / "t.npy", WEIGHTS)
    server = start_server({"t": WEIGHTS}, **admin_settings())
    with _client(server) as client:
        _refused(lambda: client.snapshot_table(str(tmp_path / "s.npy"), "t"),
                 grpc.StatusCode.FAILED_PRECONDITION, "--snapshot-dir")  # fmt: skip
        _refused(lambda: client.reload_table("t", str(tmp_path / "t.npy")),
                 grpc.StatusCode.FAILED_PRECONDITION, "--table-dir")  # fmt: skip
    assert not (tmp_path / "s.npy").exists()


def test_a_link_swapped_in_after_the_check_is_caught_on_the_descriptor(
    dirs: tuple[Path, Path, Path],
) -> None:
    """Between resolving a source and opening it, a link could replace a directory on the
    path; what the kernel opened is checked again."""
    tables, _, outside = dirs
    (tables / "sub").mkdir()
    np.save(tables / "sub" / "secret.npy", WEIGHTS)
    files = FileAccess([str(tables)])
    path, key = files.table_source("sub/secret.npy")
    assert (path, key) == (tables / "sub" / "secret.npy", None)
    (tables / "sub" / "secret.npy").unlink()
    (tables / "sub").rmdir()
    (tables / "sub").symlink_to(outside)  # now sub/secret.npy is the outside file
    with (
        pytest.raises(FailedPrecondition, match="moved out of the table directories"),
        files.open_table_file(path),
    ):
        pass
    (tables / "sub").unlink()
    (tables / "sub").mkdir()
    (tables / "sub" / "secret.npy").symlink_to(outside / "secret.npy")  # the last part a link
    with pytest.raises(FailedPrecondition, match="cannot open"), files.open_table_file(path):
        pass


def test_sources_with_a_key_and_colons(dirs: tuple[Path, Path, Path]) -> None:
    tables, _, _ = dirs
    files = FileAccess([str(tables)])
    (tables / "model.pt").write_bytes(b"")
    (tables / "a:b.npy").write_bytes(b"")
    assert files.table_source("model.pt:emb.weight") == (tables / "model.pt", "emb.weight")
    assert files.table_source("a:b.npy") == (tables / "a:b.npy", None)
    assert files.table_source(str(tables / "model.pt")) == (tables / "model.pt", None)


def test_a_sibling_directory_sharing_the_prefix_is_outside(
    confined: EmbeddingServer, dirs: tuple[Path, Path, Path]
) -> None:
    """`tables2` starts with `tables` and is not inside it (issue 29: a prefix check on
    the path's text would let it through); `snapshots2` likewise."""
    tables, snapshots, outside = dirs
    for sibling in (Path(f"{tables}2"), Path(f"{snapshots}2")):
        sibling.mkdir()
    np.save(Path(f"{tables}2") / "near.npy", np.full((30, 4), 7.0, np.float32))
    with _client(confined) as client:
        for source in (str(Path(f"{tables}2") / "near.npy"), "../tables2/near.npy"):
            _refused(lambda s=source: client.reload_table("t", s),
                     grpc.StatusCode.INVALID_ARGUMENT, "not inside a table directory")  # fmt: skip
        for path in (str(Path(f"{snapshots}2") / "x.npy"), "../snapshots2/x.npy"):
            _refused(lambda p=path: client.snapshot_table(p, "t"),
                     grpc.StatusCode.INVALID_ARGUMENT, "not inside this server's")  # fmt: skip
        np.testing.assert_array_equal(client.lookup([0, 29], "t"), WEIGHTS[[0, 29]])
    assert list(Path(f"{snapshots}2").iterdir()) == []
    _outside_untouched(outside)
