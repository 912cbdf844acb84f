"""Every Python example in README.md and docs/*.md runs, or says where it is run and why
not here: a doc cannot go stale silently.

Each ```python block is preceded by a marker comment (hidden when the Markdown renders):

    <!-- doctest: run -->                 run here against a server on loopback
    <!-- doctest: foreign (why) -->       run here with Triton's client (its own venv)
    <!-- doctest: elsewhere FILE::TEST --> run by that test (which must exist)
    <!-- doctest: skip REASON -->         not run; the reason says what covers it

Examples name `localhost:50051`; here they reach a server holding the tables they use:
`demo` (the default), `users`, `items`."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, ServerFactory, random_table
from .test_inference import foreign_python, run_foreign

__all__ = ["foreign_python"]  # a fixture, used by name

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- doctest: (run|foreign|elsewhere|skip)\b\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Example:
    doc: str
    line: int
    kind: str  # run, foreign, elsewhere, skip, or "" for a block without a marker
    detail: str
    code: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def examples() -> list[Example]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for k, line in enumerate(lines):
            if line.strip() != "```python":
                continue
            end = next(j for j in range(k + 1, len(lines)) if lines[j].strip() == "```")
            marker = MARKER.match(lines[k - 1].strip()) if k else None
            found.append(
                Example(
                    str(path.relative_to(ROOT)), k + 1, marker.group(1) if marker else "",
                    marker.group(2) if marker else "", "\n".join(lines[k + 1 : end]),
                )
            )  # fmt: skip
    return found


EXAMPLES = examples()


def test_every_python_example_is_run_or_says_where() -> None:
    assert len(EXAMPLES) >= 7
    for example in EXAMPLES:
        assert example.kind, f"{example}: a ```python block needs a <!-- doctest: ... --> marker"
        compile(example.code, str(example), "exec")  # every one is Python, at least
        if example.kind == "skip":
            assert len(example.detail) > 20, f"{example}: say why it is not run, and what covers it"
        if example.kind == "elsewhere":
            where = example.detail.split()[0]
            file, _, test = where.partition("::")
            assert (ROOT / file).is_file(), f"{example}: {file} does not exist"
            assert f"def {test}(" in (ROOT / file).read_text(), f"{example}: no {where}"


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "run"], ids=str)
def test_the_example_runs(start_server: ServerFactory, example: Example) -> None:
    server = start_server(
        {
            "demo": random_table(10, 16),
            "users": random_table(10, 8, seed=2),
            "items": random_table(10, 4, seed=3),
        }
    )
    code = example.code.replace("localhost:50051", f"127.0.0.1:{server.port}")
    namespace: dict[str, object] = {"__name__": "example"}
    exec(compile(code, str(example), "exec"), namespace)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "foreign"], ids=str)
def test_the_foreign_clients_example_runs(
    start_server: ServerFactory, foreign_python: Path, example: Example, tmp_path: Path
) -> None:
    """Run with Triton's client in its own environment; the vectors it printed are
    the rows of the ids it asked for."""
    table = random_table(10, 16)
    server = start_server({"demo": table})
    script = (
        "import sys, json\n"
        + example.code.replace('"localhost:50051"', "sys.argv[1]")
        + "\njson.dump({'vectors': vectors.tolist()}, open(sys.argv[2] + '.json', 'w'))\n"
    )
    report = run_foreign(foreign_python, script, server.port, tmp_path / "example")
    np.testing.assert_array_equal(np.array(report["vectors"], np.float32), table[[[0, 2], [1, 2]]])


# ------------------------------------------------------------------ shell examples

PROGRAMS = ("embedding-server", "embedding-client", "embedding-split")


def shell_commands() -> list[tuple[str, list[str]]]:
    """Every command line of the docs' ```sh blocks (continuations joined, comments and
    leading VAR=value assignments dropped), with where it is."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"^```(?:sh|bash)\n(.*?)^```$", text, flags=re.S | re.M):
            line_no = text[: block.start()].count("\n") + 1
            joined = block.group(1).replace("\\\n", " ")
            for line in joined.splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words:
                    found.append((f"{path.relative_to(ROOT)}:{line_no}", words))
    return found


def toml_blocks() -> list[tuple[str, str]]:
    """Every ```toml block of the docs, with where it is."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"^```toml\n(.*?)^```$", text, flags=re.S | re.M):
            line_no = text[: block.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line_no}", block.group(1)))
    return found


@pytest.mark.parametrize(("where", "toml"), toml_blocks(), ids=[w for w, _ in toml_blocks()])
def test_every_documented_config_file_is_read(where: str, toml: str, tmp_path: Path) -> None:
    """Each config file shown in the docs is read by the server's own reader: no key it
    would refuse, no value of the wrong type (the files it names need not exist)."""
    from embedding_server.config import read_table_config

    (tmp_path / "tables.toml").write_text(toml)
    assert read_table_config(tmp_path / "tables.toml").tables, where


def test_every_documented_command_line_parses() -> None:
    """Each `embedding-*` command in the docs is parsed by its program's own parser (a
    renamed or removed flag fails here); each `make X` names a target the Makefile has;
    each `bench/*.py` flag is one the script defines."""
    from embedding_client.cli import build_parser as client_parser
    from embedding_server.config import build_parser as server_parser
    from embedding_server.split import build_parser as split_parser

    parsers = {"embedding-server": lambda: server_parser({}),
               "embedding-client": client_parser, "embedding-split": split_parser}  # fmt: skip
    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for where, words in shell_commands():
        program = Path(words[0]).name
        args = [w for w in words[1:] if w != "..."]  # "..." stands for the rest
        if program in PROGRAMS:
            try:
                parsers[program]().parse_args(args)
            except SystemExit:
                pytest.fail(f"{where}: {' '.join(words)} does not parse")
            checked += 1
        elif program == "make":
            target = next(w for w in args if "=" not in w)
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"{where}: {target}"
            checked += 1
        elif program == "python" and args and args[0].startswith("bench/"):
            script = (ROOT / args[0]).read_text()
            for flag in (w.split("=")[0] for w in args[1:] if w.startswith("--")):
                assert f'"{flag}"' in script, f"{where}: {args[0]} has no {flag}"
            checked += 1
    assert checked >= 25


def test_the_changelogs_newest_release_is_the_version_the_programs_print() -> None:
    """CHANGELOG.md: [Unreleased] first, its breaking changes before anything else, then
    releases newest first; the newest is what `--version` prints."""
    import subprocess
    from importlib import metadata

    from .conftest import BIN

    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, flags=re.M)
    assert headings[0] == ("Unreleased", "")
    releases = [version for version, date in headings[1:] if date]
    assert releases and len(releases) == len(headings) - 1, "every release has a date"
    unreleased = text.split("\n## [", 2)[1]
    assert re.findall(r"^### (.*)$", unreleased, flags=re.M)[0].startswith("Breaking")
    assert releases[0] == metadata.version("embedding-service")
    for program in ("embedding-server", "embedding-client"):
        done = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True)
        assert done.stdout.strip() == f"{program} {releases[0]}"
