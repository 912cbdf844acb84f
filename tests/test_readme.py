"""The README stays true: its flag table, its Python example and its CLI lines run."""

from __future__ import annotations

import re
import shlex
import subprocess

import numpy as np

from embedding_server.config import OPTIONS, ServerConfig, env_name

from .conftest import BIN, ROOT, ServerFactory, random_table

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_flag_table_lists_every_flag_with_env_and_default() -> None:
    defaults = ServerConfig()
    rows = [line for line in README.splitlines() if line.startswith("| `--")]
    assert any(row.startswith("| `--table NAME=PATH[:KEY]` |") for row in rows)
    for flag, dest, _, _ in OPTIONS:
        row = next((r for r in rows if f"`{flag}`" in r.split("|")[1]), None)
        assert row is not None, f"README's flag table misses {flag}"
        assert f"`{env_name(flag)}`" in row
        default = getattr(defaults, dest)
        if isinstance(default, bool):  # shown as typed: `true`, `false`
            default = str(default).lower()
        assert f"`{default}`" in row or (default in ("", ()) and "``" in row), (flag, row)


def test_python_example_runs(start_server: ServerFactory) -> None:
    server = start_server({"demo": random_table(10, 128)})
    example, sharded = _blocks("python")  # the second needs shards: test_sharding runs it
    compile(sharded, "README: shards", "exec")
    namespace: dict[str, object] = {}
    exec(example.replace("localhost:50051", f"127.0.0.1:{server.port}"), namespace)
    vectors, same, half = (np.asarray(namespace[k]) for k in ("vectors", "same", "half"))
    assert vectors.shape == (2, 2, 128)
    assert same.tobytes() == vectors.tobytes()
    assert half.shape == (4, 128) and str(half.dtype) == "bfloat16"


def test_cli_examples_run(start_server: ServerFactory) -> None:
    server = start_server({"demo": random_table(10, 128)})
    shell = next(b for b in _blocks("sh") if "embedding-client" in b)
    lines = [line.split("#")[0].strip() for line in shell.splitlines()]
    commands = [line for line in lines if line and "--target" not in line]
    assert len(commands) == 4
    for command in commands:
        args = shlex.split(command)[1:]
        done = subprocess.run(
            [str(BIN / "embedding-client"), "--target", f"127.0.0.1:{server.port}", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}: {done.stderr}"
        assert done.stdout.strip()
