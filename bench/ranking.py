"""The realistic call: one ranking request, `LookupMany` over 26 tables of Criteo-like sizes
(scaled to fit), 1,024 ids each, dim 128, answered in float32 and float16; its latency and
bytes/s against bare gRPC servers moving the same bytes in one call.

Driven by h2load (C, Debian's nghttp2-client) so that the load generator is not the
limit, plus the Python client's own round trip with one call in flight (what a ranking
service written in Python sees). For scale: HugeCTR's published DLRM inference (A100,
batch 1,024, 26 keys per sample) takes 534 us end to end, model included.

    .venv/bin/python bench/ranking.py              -> bench/results/ranking.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import service  # bench/service.py: the bare servers and the h2load cell

# Distinct values of the 26 categorical features of Criteo's display-advertising (Kaggle)
# data set, as DLRM's preprocessing counts them; tables are capped at --max-rows.
CRITEO_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
DIM = service.DIM


def write_tables(folder: Path, max_rows: int) -> Path:
    """The 26 tables as .npy files and a --config file naming them."""
    rng = np.random.default_rng(0)
    entries = []
    for index, rows in enumerate(CRITEO_ROWS):
        name = f"C{index + 1}"
        np.save(folder / f"{name}.npy", rng.standard_normal((min(rows, max_rows), DIM), np.float32))
        entries.append(f'[[table]]\nname = "{name}"\nsource = "{name}.npy"\n')
    config = folder / "tables.toml"
    config.write_text("\n".join(entries))
    return config


def many_body(ids_per_feature: int, dtype: str, max_rows: int) -> bytes:
    """A LookupManyRequest of every feature, gRPC-framed, as h2load sends it."""
    from embedding_client import codec
    from embedding_client.proto import embedding_pb2 as pb

    rng = np.random.default_rng(1)
    request = pb.LookupManyRequest()
    for index, rows in enumerate(CRITEO_ROWS):
        ids = rng.integers(0, min(rows, max_rows), size=ids_per_feature, dtype=np.int64)
        lookup = codec.encode_lookup_request(ids, f"C{index + 1}", dtype)
        request.features.add(feature=f"C{index + 1}", lookup=lookup)
    message = request.SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def python_round_trip(target: str, ids_per_feature: int, dtype: str, max_rows: int,
                      calls: int) -> float:  # fmt: skip
    """Median ms of `lookup_many` through the Python client, one call in flight."""
    from embedding_client import EmbeddingClient, Feature

    rng = np.random.default_rng(2)
    features = {
        f"C{i + 1}": Feature(
            rng.integers(0, min(rows, max_rows), size=ids_per_feature), dtype=dtype
        )
        for i, rows in enumerate(CRITEO_ROWS)
    }
    times = []
    with EmbeddingClient(target, timeout=60) as client:
        client.lookup_many(features)  # connect
        for _ in range(calls):
            began = time.perf_counter()
            client.lookup_many(features)
            times.append(time.perf_counter() - began)
    return float(np.median(times) * 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=100_000, help="cap on a table's rows")
    parser.add_argument("--ids", type=int, default=1024, help="ids per feature")
    parser.add_argument("--concurrency", type=service._numbers, default=service._numbers("1,8"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ranking-"))
    processes: list[subprocess.Popen | mp.Process] = []  # type: ignore[type-arg]
    rows_total = sum(min(r, args.max_rows) for r in CRITEO_ROWS)
    print(f"writing 26 tables, {rows_total:,} rows x {DIM} float32 "
          f"({rows_total * DIM * 4 / 2**20:,.0f} MiB) ...", flush=True)  # fmt: skip
    config = write_tables(work, args.max_rows)
    results = []
    try:
        port = service.free_port()
        server = subprocess.Popen(
            [str(service.BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
             "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--config", str(config),
             "--log-level", "WARNING"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        processes.append(server)
        service.wait_listening(port, server, 1, timeout=300)
        ceilings = {}
        for flavour in ("sync+malloc", "aio+malloc"):
            bare_port = service.free_port()
            bare = mp.get_context("spawn").Process(
                target=service.ceiling_server, args=(bare_port, args.max_rows, 4, flavour),
                daemon=True,
            )  # fmt: skip
            bare.start()
            processes.append(bare)
            service.wait_port(bare_port)
            ceilings[flavour] = (bare_port, bare.pid)
        time.sleep(1.0)
        for dtype, itemsize in (("float32", 4), ("float16", 2)):
            vector_bytes = len(CRITEO_ROWS) * args.ids * DIM * itemsize
            ceiling_ids = vector_bytes // (DIM * 4)  # the same bytes from a float32 table
            ceiling_body = service.grpc_body("ceiling", ceiling_ids, args.max_rows)[1]
            body = many_body(args.ids, dtype, args.max_rows)
            client_ms = python_round_trip(f"127.0.0.1:{port}", args.ids, dtype, args.max_rows, 50)
            for concurrency in args.concurrency:
                cell = {"dtype": dtype, "concurrency": concurrency}
                row = service.h2load_cell(
                    f"127.0.0.1:{port}", "/embedding.v1.EmbeddingService/LookupMany", body,
                    vector_bytes, len(CRITEO_ROWS) * args.ids, concurrency, args.seconds,
                    server.pid,
                )  # fmt: skip
                results.append({**cell, "target": "LookupMany", **row,
                                "client_ms": client_ms if concurrency == 1 else float("nan")})  # fmt: skip
                for flavour, (bare_port, pid) in ceilings.items():
                    bare_row = service.h2load_cell(
                        f"127.0.0.1:{bare_port}", "/ceiling/Lookup", ceiling_body, vector_bytes,
                        ceiling_ids, concurrency, args.seconds, pid,
                    )  # fmt: skip
                    results.append({**cell, "target": f"ceiling[{flavour}]", **bare_row,
                                    "client_ms": float("nan")})  # fmt: skip
                for r in results[-3:]:
                    print(f"  {r['target']:20} {dtype} C={concurrency}: {r['req_s']:7.0f} calls/s "
                          f"{r['mb_s']:8.0f} MB/s  mean {r['p50']:6.2f} ms  "
                          f"server CPU {r['cpu_us']:7.0f} us/call", flush=True)  # fmt: skip
    finally:
        for process in processes:
            if isinstance(process, subprocess.Popen):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
            else:
                process.terminate()
                process.join(timeout=10)
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    report(results, args, rows_total)
    return 0


def report(results: list[dict[str, object]], args: argparse.Namespace, rows_total: int) -> None:
    lines = [
        f"Ranking call: LookupMany over 26 Criteo-like tables ({rows_total:,} rows in all, "
        f"capped at {args.max_rows:,}), {args.ids:,} ids each, dim {DIM}; {os.cpu_count()} "
        f"cores; h2load, {args.seconds:.0f} s per cell; bare servers answer one Lookup with "
        'the same bytes. "client ms": the Python client\'s lookup_many, one in flight, median.',
        "",
        "| target | dtype | in flight | calls/s | MB/s | mean ms | server CPU us/call | "
        "bytes/s vs best bare | CPU vs best bare | client ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        peers = [p for p in results if p["dtype"] == r["dtype"]
                 and p["concurrency"] == r["concurrency"] and str(p["target"]).startswith("ceiling")]  # fmt: skip
        best_rate = max(float(p["mb_s"]) for p in peers)  # type: ignore[arg-type]
        best_cpu = min(float(p["cpu_us"]) for p in peers)  # type: ignore[arg-type]
        client = r["client_ms"]
        lines.append(
            f"| {r['target']} | {r['dtype']} | {r['concurrency']} | {r['req_s']:,.0f} | "
            f"{r['mb_s']:,.0f} | {r['p50']:.2f} | {r['cpu_us']:,.0f} | "
            f"{float(r['mb_s']) / best_rate:.0%} | {float(r['cpu_us']) / best_cpu:.2f}x | "  # type: ignore[arg-type]
            f"{'-' if client != client else f'{client:.2f}'} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ranking.md").write_text(text + "\n")
    print(f"\nwrote {args.out / 'ranking.md'}")


if __name__ == "__main__":
    sys.exit(main())
