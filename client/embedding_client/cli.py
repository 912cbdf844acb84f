"""`embedding-client`: look up vectors, list tables and check health from a shell."""

from __future__ import annotations

import os

# grpc's C core logs a failed TLS handshake at INFO on stderr (`I1208 ... ssl_transport_
# security.cc`) unless GRPC_VERBOSITY is set when grpc starts; the error line this program
# prints says it all. Set before grpc is imported (the package imports it lazily); a
# GRPC_VERBOSITY the user set wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, NoReturn

import grpc
import numpy as np

from embedding_client.client import (
    DEFAULT_TARGET,
    EmbeddingClient,
    EmbeddingError,
    Feature,
    Pooling,
    Security,
)
from embedding_client.codec import DTYPE_NAMES, POOLING_MODES


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line and a pointer to --help, not after
    the whole usage text (tens of lines for a server's flags)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")


def version_text(prog: str) -> str:
    """`prog`'s version line: this distribution's version."""
    try:
        return f"{prog} {metadata.version('embedding-service')}"
    except metadata.PackageNotFoundError:
        return f"{prog} (not installed: no version)"


INT64 = np.iinfo(np.int64)


class _OutOfRange(ValueError):
    """A number that parsed but does not fit; its message is the one to show."""


def _int64(text: str) -> int:
    value = int(text)
    if not INT64.min <= value <= INT64.max:
        raise _OutOfRange(f"{value} does not fit in int64")
    return value


def _numbers(convert: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type for a comma-separated list of `convert`-able values."""

    def parse(text: str) -> list[Any]:
        parts = text.split(",") if text.strip() else []
        empty = next((k for k, part in enumerate(parts) if not part.strip()), None)
        if empty is not None:  # `0,,1` is a typo, not the ids 0 and 1
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}: value {empty + 1} of {text[:100]!r} is empty"
            )
        try:
            return [convert(part) for part in parts]
        except ValueError as exc:
            reason = str(exc) if isinstance(exc, _OutOfRange) else f"got {text[:100]!r}"
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}: {reason}") from None

    return parse


_int_list = _numbers(_int64, "integers (int64)")
_float_list = _numbers(float, "numbers")


def _feature(text: str) -> tuple[str, str, list[int]]:
    head, sep, ids = text.rpartition(":")
    name, _, table = head.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME[=TABLE]:IDS, got {text!r}")
    return name, table or name, _int_list(ids)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="embedding-client", description="Talk to an embedding lookup server."
    )
    parser.add_argument("--version", action="version", version=version_text(parser.prog))
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help="server host[:port] (%(default)s; port 50051)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    parser.add_argument(
        "--token",
        default=os.environ.get("EMBEDDING_TOKEN"),
        help="bearer token (default: $EMBEDDING_TOKEN; prefer the variable: argv is visible)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    parser.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (TLS)")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    parser.add_argument("--server-name", help="name to check the server's certificate for")
    commands = parser.add_subparsers(dest="command", required=True)

    lookup = commands.add_parser("lookup", help="look up the vectors of some ids")
    lookup.add_argument("--ids", type=_int_list, required=True, help="e.g. 0,2,1,2")
    lookup.add_argument("--shape", type=_int_list, help="shape of the ids, e.g. 2,2")
    lookup.add_argument("--table", help="table name (default: the server's default table)")
    lookup.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    lookup.add_argument("--dense", action="store_true", help="use LookupDense (one-hot matmul)")
    lookup.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lookup.add_argument(
        "--pool", choices=POOLING_MODES, help="pool each bag of ids into one vector (EmbeddingBag)"
    )
    bags = lookup.add_mutually_exclusive_group()
    bags.add_argument("--offsets", type=_int_list, help="with --pool: start of each bag, e.g. 0,2")
    bags.add_argument("--lengths", type=_int_list, help="with --pool: length of each bag, e.g. 2,1")
    lookup.add_argument(
        "--weights", type=_float_list, help="with --pool sum: a weight per id, e.g. 0.5,2,1"
    )
    lookup.add_argument(
        "--padding-id", type=_int64, help="id that stands for nothing: zeros, skipped in bags"
    )

    many = commands.add_parser("many", help="look up several features in one call (LookupMany)")
    many.add_argument(
        "--feature",
        dest="features",
        action="append",
        type=_feature,
        required=True,
        metavar="NAME[=TABLE]:IDS",
        help="a feature and its ids, e.g. users:1,2 or item=items:5,6 (table: NAME by default)",
    )
    many.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    many.add_argument("--dense", action="store_true", help="use LookupManyDense")
    many.add_argument("--json", action="store_true", help="print JSON instead of tables")

    tables = commands.add_parser("tables", help="list the server's tables")
    tables.add_argument("--json", action="store_true", help="as JSON, every field")
    reload = commands.add_parser("reload", help="load a new version of a table (admin)")
    reload.add_argument("--table", help="table name (default: the server's default table)")
    reload.add_argument(
        "--source", default="", help="PATH[:KEY] on the server (default: the table's own file)"
    )
    update = commands.add_parser("update", help="overwrite rows of a table in place (admin)")
    update.add_argument("--table", help="table name (default: the server's default table)")
    update.add_argument("--ids", type=_int_list, required=True, help="rows to overwrite, e.g. 3,7")
    update.add_argument(
        "--vectors", required=True, metavar="FILE.npy", help="local .npy of [len(ids), dim] rows"
    )
    snapshot = commands.add_parser("snapshot", help="write a table to a file on the server (admin)")
    snapshot.add_argument("--table", help="table name (default: the server's default table)")
    snapshot.add_argument(
        "--path",
        required=True,
        help="file in the server's snapshot directory (relative to it), .npy or .safetensors",
    )
    snapshot.add_argument("--overwrite", action="store_true", help="replace an existing file")
    health = commands.add_parser("health", help="grpc.health.v1 status (exit 0 when SERVING)")
    health.add_argument("--service", default="", help="service name ('' for the whole server)")
    return parser


def _lookup(client: EmbeddingClient, args: argparse.Namespace) -> int:
    ids = np.asarray(args.ids, dtype=np.int64)
    if args.shape is not None:
        if int(np.prod(args.shape)) != ids.size:
            print(f"error: --shape {args.shape} does not hold {ids.size} ids", file=sys.stderr)
            return 2
        ids = ids.reshape(args.shape)
    pooling = None
    if args.pool is not None:
        pooling = Pooling(args.pool, args.offsets, args.lengths, args.weights)
    elif args.offsets or args.lengths or args.weights:
        print("error: --offsets, --lengths and --weights need --pool", file=sys.stderr)
        return 2
    result = client.lookup_result(
        ids, args.table, args.dtype, dense=args.dense, pooling=pooling, padding_id=args.padding_id
    )
    vectors = result.vectors.astype(np.float32)
    if args.json:
        payload = {
            "table": result.table,
            "version": result.version,
            "update_seq": result.update_seq,
            "dtype": args.dtype,
            "shape": list(result.vectors.shape),
            "vectors": vectors.tolist(),
        }
        print(json.dumps(payload))
        return 0
    method = "LookupDense" if args.dense else "Lookup"
    print(
        f"{method} table={result.table} version={result.version} "
        f"update_seq={result.update_seq} shape={tuple(result.vectors.shape)} dtype={args.dtype}"
    )
    with np.printoptions(precision=6, suppress=True, threshold=1000, linewidth=120):
        print(vectors)
    return 0


def _many(client: EmbeddingClient, args: argparse.Namespace) -> int:
    features = {name: Feature(ids, table, args.dtype) for name, table, ids in args.features}
    results = client.lookup_many(features, dense=args.dense)
    if args.json:
        payload = {
            name: {"table": r.table, "version": r.version, "update_seq": r.update_seq,
                   "shape": list(r.vectors.shape),
                   "vectors": r.vectors.astype(np.float32).tolist()}
            for name, r in results.items()
        }  # fmt: skip
        print(json.dumps(payload))
        return 0
    for name, result in results.items():
        print(f"{name}: table={result.table} version={result.version} "
              f"update_seq={result.update_seq} shape={tuple(result.vectors.shape)} "
              f"dtype={args.dtype}")  # fmt: skip
        with np.printoptions(precision=6, suppress=True, threshold=1000, linewidth=120):
            print(result.vectors.astype(np.float32))
    return 0


def _tables(client: EmbeddingClient, as_json: bool = False) -> int:
    tables = client.tables()
    if as_json:  # every field of TableInfo, one object per table
        print(json.dumps([dataclasses.asdict(t) for t in tables], indent=2))
        return 0
    header = ("name", "rows", "dim", "dtype", "device", "version", "update_seq", "bytes",
              "shard", "shard_rows", "keys", "missing", "log", "default")  # fmt: skip
    rows = [
        (t.name, t.rows, t.dim, t.dtype, t.device, t.version, t.update_seq, t.bytes,
         "-" if t.shard is None else f"{t.shard[0]}/{t.shard[1]}",
         "-" if t.shard_rows is None else t.shard_rows,
         "-" if t.keys is None else f"{t.keys}/{t.max_keys}", t.missing_keys or "-",
         "yes" if t.update_log else "no", "*" if t.is_default else "")
        for t in tables
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)
            ).rstrip()
        )
    return 0


def _hint(error: EmbeddingError, args: argparse.Namespace) -> str:
    """The next step for an error a new user meets often ("" for none)."""
    if error.code == grpc.StatusCode.ALREADY_EXISTS and args.command == "snapshot":
        return "(pass --overwrite to replace it)"
    return ""


def _negative_ids(argv: Sequence[str]) -> list[str]:
    """`--ids -5,7` as `--ids=-5,7`: argparse takes a value starting with '-' for an
    option, and a keyed table's keys may be negative."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--ids":
            value = next(args, None)
            if value is not None and value[:1] == "-" and value[1:2].isdigit():
                out.append(f"--ids={value}")
                continue
            out.extend([arg] if value is None else [arg, value])
            continue
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `embedding-client` command; exit 1 on a failed call."""
    args = build_parser().parse_args(_negative_ids(sys.argv[1:] if argv is None else argv))
    try:
        security = Security.from_files(
            args.token, args.tls_ca, args.tls_cert, args.tls_key, args.server_name, args.tls
        )
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        with EmbeddingClient(args.target, timeout=args.timeout, security=security) as client:
            if args.command == "lookup":
                return _lookup(client, args)
            if args.command == "many":
                return _many(client, args)
            if args.command == "tables":
                return _tables(client, args.json)
            if args.command == "reload":
                info = client.reload_table(args.table, args.source)
                print(f"reloaded {info.name}: version {info.version}, {info.rows} x {info.dim}")
                return 0
            if args.command == "update":
                try:
                    vectors = np.load(args.vectors, allow_pickle=False)
                except (OSError, ValueError) as exc:
                    print(f"error: cannot read {args.vectors}: {exc}", file=sys.stderr)
                    return 2
                info = client.update_rows(args.ids, vectors, args.table)
                print(f"updated {len(args.ids)} rows of {info.name}: update_seq {info.update_seq}")
                return 0
            if args.command == "snapshot":
                info, version = client.snapshot_table(
                    args.path, args.table, overwrite=args.overwrite
                )
                print(f"wrote {info.name} version {version} to {args.path}")
                return 0
            status = client.health(args.service)
            print(status)
            return 0 if status == "SERVING" else 1
    except EmbeddingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        hint = _hint(exc, args)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not grpc's traceback
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as cat and ls do. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


if __name__ == "__main__":
    sys.exit(main())
