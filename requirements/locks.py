"""Read the locks in requirements/ (pinned, hashed requirements files), and compare two sets.

python requirements/locks.py OLD_DIR NEW_DIR   # `make outdated`: the pins NEW_DIR moves
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

LOCKS = ("dev.txt", "server.txt", "server-cuda.txt", "client.txt", "foreign.txt")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    """One locked package: its exact version and the sha256 of every file pip may take."""

    version: str
    hashes: frozenset[str]


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Typing_Extensions` = `typing-extensions`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of one lock, by normalised name; a line that is neither a pin, a hash, a
    comment nor blank is an error (an unpinned requirement has no place in a lock)."""
    pins: dict[str, Pin] = {}
    name = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip().rstrip("\\").strip()
        if not line or line.startswith("#"):
            continue
        if pin := _PIN.match(line):
            name = normalise(pin.group(1))
            if name in pins:
                raise ValueError(f"{path}:{number}: {name} is pinned twice")
            pins[name] = Pin(pin.group(3), frozenset(_HASH.findall(line)))
        elif hashes := _HASH.findall(line):
            if not name:
                raise ValueError(f"{path}:{number}: a hash before any pin")
            pins[name] = Pin(pins[name].version, pins[name].hashes | set(hashes))
        else:
            raise ValueError(f"{path}:{number}: not an exact pin: {line!r}")
    return pins


def differences(old_dir: Path, new_dir: Path) -> list[tuple[str, str, str, str]]:
    """(lock, package, old version, new version) for every pin that differs; a version of
    '-' means the package is not in that lock."""
    rows = []
    for lock in LOCKS:
        old, new = read_lock(old_dir / lock), read_lock(new_dir / lock)
        for name in sorted(old.keys() | new.keys()):
            was = old[name].version if name in old else "-"
            now = new[name].version if name in new else "-"
            if was != now:
                rows.append((lock, name, was, now))
    return rows


def main() -> None:
    old_dir, new_dir = (Path(arg) for arg in sys.argv[1:3])
    rows = differences(old_dir, new_dir)
    if not rows:
        print("every lock is up to date: nothing newer within pyproject.toml's ranges")
        return
    print(f"{len(rows)} pins would move (within pyproject.toml's ranges):\n")
    print("| lock | package | locked | newest |\n| --- | --- | --- | --- |")
    for lock, name, was, now in rows:
        print(f"| {lock} | {name} | {was} | {now} |")
    print("\nto take them: move LOCK_DATE in the Makefile, `make lock`, `make test`, commit.")


if __name__ == "__main__":
    main()
