"""Generate the Python stubs in client/embedding_client/proto/ from protos/.

grpcio-tools writes absolute imports that mirror the .proto path
(`from embedding.v1 import embedding_pb2`); this rewrites them to the package
the stubs live in, so the generated modules import each other correctly.

    python protos/generate.py            # write the checked-in stubs
    python protos/generate.py --out DIR  # write them elsewhere (the staleness test)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTO_FILE = "embedding/v1/embedding.proto"
STUB_DIR = ROOT / "client" / "embedding_client" / "proto"
STUB_PACKAGE = "embedding_client.proto"
GENERATED = ("embedding_pb2.py", "embedding_pb2.pyi", "embedding_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for the service's .proto and write the fixed-up stubs to out_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        include = str(Path(protoc.__file__).parent / "_proto")
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_DIR / PROTO_FILE),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "embedding" / "v1" / name).read_text()
            text = text.replace("from embedding.v1 import", f"from {STUB_PACKAGE} import")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text('"""Stubs generated from protos/ by protos/generate.py: do not edit."""\n')
    written.append(init)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUB_DIR, help="output folder")
    args = parser.parse_args()
    if args.out == STUB_DIR and STUB_DIR.exists():
        shutil.rmtree(STUB_DIR)
    for path in generate(args.out):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    sys.exit(main())
