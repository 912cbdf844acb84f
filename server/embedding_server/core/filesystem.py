"""Where callers may make the server touch the filesystem: new table files ReloadTable
reads (inside `--table-dir`) and snapshots SnapshotTable writes (inside `--snapshot-dir`).

A caller's path is checked as text (no NUL, bounded length), resolved (`..` and
symlinks followed) and refused unless the result lies inside a directory the operator
named. The file is then opened without following links or blocking (a FIFO), and what
the kernel opened is checked again, so a link swapped in between cannot redirect it.
Snapshots go to a temporary file created exclusively (O_EXCL, O_NOFOLLOW, an
unpredictable name, mode 0600) in the target's directory, then linked into place (an
existing file is kept) or renamed over it (when the caller asks to overwrite).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from embedding_server.config import split_key
from embedding_server.errors import AlreadyExists, FailedPrecondition, InvalidRequest, quoted

MAX_PATH_CHARS = 4096  # Linux's PATH_MAX
MAX_NAME_BYTES = 255  # Linux's NAME_MAX
SNAPSHOT_SUFFIXES = (".npy", ".safetensors")
SNAPSHOT_MODE = 0o600
# Opened by what the kernel says a descriptor is: /proc/self/fd/N (Linux).
_PROC_FD = Path("/proc/self/fd")

# Writes a snapshot's bytes to the open file.
SnapshotWriter = Callable[[BinaryIO], None]


class FileAccess:
    """The directories a server's callers may use, resolved once at start-up.

    Raises
    ------
    ValueError
        A named directory that does not exist or is not a directory.
    """

    def __init__(self, table_dirs: Sequence[str] = (), snapshot_dir: str = "") -> None:
        self.table_dirs = tuple(_directory(d, "--table-dir") for d in table_dirs)
        self.snapshot_dir = _directory(snapshot_dir, "--snapshot-dir") if snapshot_dir else None

    def table_source(self, text: str) -> tuple[Path, str | None]:
        """The file and KEY a ReloadTable `source` (PATH or PATH:KEY; relative: inside the
        first table directory that has it) names, resolved and inside a table directory.

        Raises
        ------
        FailedPrecondition
            No table directory is configured.
        InvalidRequest
            A path that is not valid text or lies outside every table directory.
        """
        if not self.table_dirs:
            raise FailedPrecondition(
                "ReloadTable from a new source is off on this server: start it with "
                "--table-dir DIR (env EMBEDDING_TABLE_DIR, or table_dirs in --config) to "
                "name where new table files may be read; an empty source re-reads the "
                "table's own file"
            )
        _check_path_text(text, "source")
        location, key = split_key(
            text, lambda whole: any(os.path.exists(c) for c in self._candidates(whole))
        )
        candidates = self._candidates(location)
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:  # outside the directories says so first: the caller's to fix
            self._inside_table_dirs(candidates[0], text)
            raise FailedPrecondition(
                f"source {quoted(text)}: no such file in the table directories"
            )
        return self._inside_table_dirs(found, text), key

    def _candidates(self, location: str) -> list[Path]:
        if location.startswith("/"):
            return [Path(location)]
        return [root / location for root in self.table_dirs]

    def _inside_table_dirs(self, path: Path, text: str) -> Path:
        resolved = _resolved(path, "source", text)
        if not any(_inside(resolved, root) for root in self.table_dirs):
            raise InvalidRequest(
                f"source {quoted(text)} is not inside a table directory of this server "
                "(--table-dir); give a path inside one, or relative to it"
            )
        return resolved

    @contextlib.contextmanager
    def open_table_file(self, path: Path) -> Iterator[Path]:
        """Open a resolved table file for the duration of the block and yield a path that
        reads exactly the file opened: not through a link, not a FIFO or device, inside a
        table directory by what the kernel says it opened.

        Raises
        ------
        FailedPrecondition
            The file cannot be opened, is not a regular file, or is not inside a table
            directory any more.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise FailedPrecondition(f"cannot open {quoted(str(path))}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FailedPrecondition(f"{quoted(str(path))} is not a regular file")
            opened = _PROC_FD / str(fd)
            if not opened.exists():  # no /proc: the resolved path is the best there is
                yield path
                return
            real = Path(os.readlink(opened))
            if not any(_inside(real, root) for root in self.table_dirs):
                raise FailedPrecondition(
                    f"{quoted(str(path))} moved out of the table directories while it was opened"
                )
            yield opened
        finally:
            os.close(fd)

    def snapshot_target(self, text: str) -> Path:
        """Where a SnapshotTable `path` (relative to the snapshot directory, or absolute
        inside it) writes: its directory resolved and inside the snapshot directory.

        Raises
        ------
        FailedPrecondition
            No snapshot directory is configured, or the target's directory is missing.
        InvalidRequest
            A path that is not valid text, not .npy/.safetensors, or outside the
            snapshot directory.
        """
        if self.snapshot_dir is None:
            raise FailedPrecondition(
                "SnapshotTable is off on this server: start it with --snapshot-dir DIR "
                "(env EMBEDDING_SNAPSHOT_DIR, or snapshot_dir in --config) to name where "
                "snapshots may be written"
            )
        _check_path_text(text, "snapshot path")
        requested = Path(text) if text.startswith("/") else self.snapshot_dir / text
        name = requested.name
        if requested.suffix not in SNAPSHOT_SUFFIXES or name.startswith("."):
            raise InvalidRequest(
                f"snapshot path {quoted(text)} must name a file ending in .npy or "
                ".safetensors (not starting with '.')"
            )
        folder = _resolved(requested.parent, "snapshot path", text)
        if not _inside(folder, self.snapshot_dir):
            raise InvalidRequest(
                f"snapshot path {quoted(text)} is not inside this server's snapshot "
                "directory (--snapshot-dir); give a path relative to it"
            )
        if not folder.is_dir():
            raise FailedPrecondition(
                f"snapshot path {quoted(text)}: its directory does not exist in the "
                "snapshot directory"
            )
        return folder / name

    def write_snapshot(self, target: Path, write: SnapshotWriter, *, overwrite: bool) -> int:
        """Write a snapshot to `target` (from `snapshot_target`) through an exclusive
        temporary file; returns its size in bytes.

        Raises
        ------
        AlreadyExists
            `target` exists and `overwrite` is false.
        FailedPrecondition
            The file cannot be written (the message says why); nothing is left behind.
        """
        shown = quoted(target.name)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            folder = os.open(target.parent, flags)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot open the directory of {shown}: {exc.strerror}"
            ) from None
        temporary = f".{target.name}.{secrets.token_hex(8)}.tmp"
        created = False
        try:
            opened = _PROC_FD / str(folder)
            if (
                opened.exists()
                and self.snapshot_dir is not None
                and not _inside(Path(os.readlink(opened)), self.snapshot_dir)
            ):
                raise FailedPrecondition(f"the directory of {shown} left the snapshot directory")
            out_fd = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                SNAPSHOT_MODE,
                dir_fd=folder,
            )
            created = True
            with os.fdopen(out_fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            if overwrite:
                os.replace(temporary, target.name, src_dir_fd=folder, dst_dir_fd=folder)
            else:
                # link() refuses an existing name atomically, where a check then rename
                # would race with another writer.
                os.link(temporary, target.name, src_dir_fd=folder, dst_dir_fd=folder,
                        follow_symlinks=False)  # fmt: skip
                os.unlink(temporary, dir_fd=folder)
            created = False
            size = os.stat(target.name, dir_fd=folder, follow_symlinks=False).st_size
            os.fsync(folder)
            return size
        except FileExistsError:
            raise AlreadyExists(
                f"snapshot {shown} exists already; ask to overwrite it, or pick another name"
            ) from None
        except OSError as exc:
            raise FailedPrecondition(f"cannot write snapshot {shown}: {exc.strerror}") from None
        finally:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=folder)
            os.close(folder)


def _resolved(path: Path, what: str, text: str) -> Path:
    """`path` with links and `..` resolved. realpath reads each link it meets; one
    swapped for something else between its check and its read fails with EINVAL (or
    ENOENT, ELOOP): a caller racing its own path, answered as the file being unusable."""
    try:
        return Path(os.path.realpath(path))
    except OSError as exc:
        raise FailedPrecondition(
            f"{what} {quoted(text)} changed while it was resolved ({exc.strerror}): try again "
            "once it stays put"
        ) from None


def _directory(text: str, flag: str) -> Path:
    path = Path(os.path.realpath(text))
    if not path.is_dir():
        raise ValueError(f"{flag} {text}: not a directory")
    return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_path_text(text: str, what: str) -> None:
    """Refuse text that no file name can be (empty, NUL bytes, over Linux's limits) or
    should be (control characters)."""
    if not text:
        raise InvalidRequest(f"{what} is empty")
    if "\x00" in text:
        raise InvalidRequest(f"{what} {quoted(text)} holds a NUL byte")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in text):
        # Legal in Linux file names, and a trap in every shell and log that lists them.
        raise InvalidRequest(f"{what} {quoted(text)} holds control characters")
    if len(text) > MAX_PATH_CHARS:
        raise InvalidRequest(f"{what} is {len(text)} characters long; at most {MAX_PATH_CHARS}")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in text.split("/")):
        raise InvalidRequest(f"{what} {quoted(text)} has a name over {MAX_NAME_BYTES} bytes")
