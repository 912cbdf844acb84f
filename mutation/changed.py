"""The mutmut name patterns of the functions in FILE that changed since COMMIT: what
`MUTATE_SINCE=COMMIT mutation/run.sh MODULE` mutates (a module's new code in minutes,
where the whole module takes hours).

    python mutation/changed.py src/embedding_server/core/updatelog.py COMMIT

FILE is under src/ as mutation/run.sh lays the tree out; the diff is read from the
repository's own FILE (its path without src/ and under server/ or client/). A function
changed when a line of it is added or changed (deleted lines mark the line after them).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path


def changed_lines(path: Path, commit: str) -> set[int]:
    diff = subprocess.run(["git", "diff", "--unified=0", commit, "--", path.name],
                          capture_output=True, text=True, check=True,
                          cwd=path.parent).stdout  # fmt: skip
    lines: set[int] = set()
    for start, count in re.findall(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", diff, flags=re.M):
        first, many = int(start), int(count or 1)
        lines.update(range(first, first + max(many, 1)))
    return lines


def patterns(source: str, module: str, lines: set[int]) -> list[str]:
    """mutmut's names: `module.x_function__mutmut_*`, `module.xǁClassǁmethod__mutmut_*`."""
    found = []
    for node in ast.parse(source).body:
        functions = (
            [(node, None)] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else []
        )
        if isinstance(node, ast.ClassDef):
            functions = [(f, node.name) for f in node.body
                         if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]  # fmt: skip
        for function, owner in functions:
            span = range(function.lineno, (function.end_lineno or function.lineno) + 1)
            if lines.intersection(span):
                name = f"x_{function.name}" if owner is None else f"xǁ{owner}ǁ{function.name}"
                found.append(f"{module}.{name}__mutmut_*")
    return found


def main(file: str, commit: str) -> int:
    relative = Path(file).relative_to("src")
    package = relative.parts[0]
    repository = Path("server" if package == "embedding_server" else "client") / relative
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                               text=True, check=True).stdout.strip())  # fmt: skip
    module = ".".join(relative.with_suffix("").parts)
    source = (root / repository).read_text()
    for pattern in patterns(source, module, changed_lines(root / repository, commit)):
        print(pattern)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
