"""mutation/changed.py: the functions a `MUTATE_SINCE=COMMIT` run mutates, named as mutmut
names them, found from a real `git diff` of a scratch repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "mutation"))
import changed

SOURCE = """\
def first():
    return 1


class Box:
    def put(self, x):
        return x

    async def take(self):
        return 2


def last():
    return 3
"""


def test_the_functions_a_diff_touches_are_named_as_mutmut_names_them() -> None:
    lines = {7, 14}  # inside Box.put and last
    assert changed.patterns(SOURCE, "pkg.mod", lines) == [
        "pkg.mod.xǁBoxǁput__mutmut_*",
        "pkg.mod.x_last__mutmut_*",
    ]
    assert changed.patterns(SOURCE, "pkg.mod", {4}) == []  # a blank line between
    assert changed.patterns(SOURCE, "pkg.mod", {9, 10}) == ["pkg.mod.xǁBoxǁtake__mutmut_*"]


def test_changed_lines_come_from_git_diff(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    path = tmp_path / "mod.py"
    path.write_text(SOURCE)
    git("add", ".")
    git("commit", "-qm", "one")
    path.write_text(SOURCE.replace("return x", "return x + 1").replace("return 3", "return 4"))
    assert changed.changed_lines(path, "HEAD") == {7, 14}
    assert changed.patterns(path.read_text(), "mod", changed.changed_lines(path, "HEAD")) == [
        "mod.xǁBoxǁput__mutmut_*",
        "mod.x_last__mutmut_*",
    ]
