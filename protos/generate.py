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
# Each .proto, and the stem its stubs are named by (the Open Inference Protocol's file is
# the server's second service on the same port).
PROTO_FILES = {"embedding/v1/embedding.proto": "embedding", "inference/grpc_service.proto":
               "grpc_service"}  # fmt: skip
STUB_DIR = ROOT / "client" / "embedding_client" / "proto"
STUB_PACKAGE = "embedding_client.proto"
GENERATED = tuple(
    f"{stem}{suffix}" for stem in PROTO_FILES.values()
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)  # fmt: skip


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
                *(str(PROTO_DIR / proto) for proto in PROTO_FILES),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for proto, stem in PROTO_FILES.items():
            folder = Path(tmp) / Path(proto).parent
            package = ".".join(Path(proto).parent.parts)
            for name in (n for n in GENERATED if n.startswith(f"{stem}_")):
                text = (folder / name).read_text()
                text = text.replace(f"from {package} import", f"from {STUB_PACKAGE} import")
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
