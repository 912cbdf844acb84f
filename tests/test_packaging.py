"""Packaging contracts: stubs match protos/, and the client imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_checked_in_stubs_are_not_stale(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    checked_in = ROOT / "client" / "embedding_client" / "proto"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in checked_in.iterdir() if p.suffix in (".py", ".pyi"))
    for name in generated:
        assert (tmp_path / name).read_text() == (checked_in / name).read_text(), (
            f"client/embedding_client/proto/{name} is stale: run `make proto`"
        )


def _python(script: str) -> str:
    """Run `script` in a fresh interpreter (imports start from nothing); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_client_imports_and_decodes_without_torch() -> None:
    # sys.modules['torch'] = None makes any `import torch` raise ImportError.
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import embedding_client, embedding_client.cli\n"
        "from embedding_client import codec\n"
        "r = codec.encode_lookup_request([[1, 2]], 't', 'bfloat16')\n"
        "assert list(codec.decode_ids(r).shape) == [1, 2]\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    assert _python(script).strip() == "ok"


def test_client_does_not_pull_in_torch_or_the_server() -> None:
    script = (
        "import sys, embedding_client, embedding_client.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'embedding_server', 'prometheus_client')))\n"
    )
    assert _python(script).strip() == "[]"


def test_ml_dtypes_is_imported_only_for_bfloat16() -> None:
    """Importing ml_dtypes takes ~0.5-1 s: a command-line client that never sees bfloat16
    must not pay it; one that does gets numpy's bfloat16 dtype for its vectors."""
    script = (
        "import sys, embedding_client, embedding_client.cli\n"
        "from embedding_client import codec\n"
        "from embedding_client.proto import embedding_pb2 as pb\n"
        "codec.numpy_dtype(pb.DTYPE_FLOAT32), codec.numpy_dtype(pb.DTYPE_FLOAT16)\n"
        "print('ml_dtypes' in sys.modules)\n"
        "print(codec.numpy_dtype(pb.DTYPE_BFLOAT16), 'ml_dtypes' in sys.modules)\n"
    )
    assert _python(script).split() == ["False", "bfloat16", "True"]


def test_torch_is_only_a_server_dependency() -> None:
    from importlib.metadata import requires

    requirements = requires("embedding-service") or []
    torch_lines = [r for r in requirements if r.startswith("torch")]
    assert torch_lines and all('extra == "server"' in r for r in torch_lines), torch_lines
    base = [r for r in requirements if "extra ==" not in r]
    assert {r.split(">")[0].split("<")[0].split("=")[0] for r in base} == {
        "grpcio", "grpcio-health-checking", "protobuf", "numpy", "ml-dtypes"
    }  # fmt: skip
