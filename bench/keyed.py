"""Keyed tables (issue 31) against the same rows served by index, in one run: server CPU
per Lookup call and calls per second at B = 1, 64, 1,024 and 16,384, the memory a key
costs, and the load time of a 10-million-key file.

    .venv/bin/python bench/keyed.py [--keys 1000000] [--seconds 3] [--rounds 3]
                                    [--load-keys 10000000] [--device cpu|cuda]

One server process holds both tables (the same values: `rows` by row id, `keyed` by
random int64 keys); a closed-loop load generator (threads in this process) calls each
in alternating rounds, and the server's CPU is read from /proc around each round. Prints
markdown tables and writes bench/results/keyed.png.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from embedding_client import EmbeddingClient, EmbeddingError

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 64, 1024, 16384)
DIM = 64
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_round(target: str, table: str, ids: list[np.ndarray], seconds: float,
              threads: int) -> tuple[int, float]:  # fmt: skip
    """Calls answered and seconds taken by `threads` closed-loop callers of `table`."""
    done = [0] * threads
    stop = time.monotonic() + seconds

    def call(k: int) -> None:
        with EmbeddingClient(target, max_attempts=1, timeout=30) as client:
            turn = k
            while time.monotonic() < stop:
                client.lookup(ids[turn % len(ids)], table)
                turn += threads
                done[k] += 1

    began = time.monotonic()
    workers = [threading.Thread(target=call, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done), time.monotonic() - began


def load_time(count: int, folder: Path) -> tuple[float, float, float]:
    """Seconds to load `count` keys (dim 16) as a keyed table and as rows, and the
    index's bytes per key."""
    import torch

    from embedding_server.config import TableSpec
    from embedding_server.core.sources import load_table

    rng = np.random.default_rng(3)
    print(f"writing a {count:,}-key file (dim 16)", flush=True)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=count, dtype=np.int64))
    rng.shuffle(keys)
    values = np.lib.format.open_memmap(folder / "big-values.npy", mode="w+", dtype=np.float32,
                                       shape=(keys.size, 16))  # fmt: skip
    for start in range(0, keys.size, 1 << 20):
        stop = min(keys.size, start + (1 << 20))
        values[start:stop] = rng.standard_normal((stop - start, 16), dtype=np.float32)
    values.flush()
    np.save(folder / "big-keys.npy", keys)
    del values
    cpu = torch.device("cpu")
    began = time.perf_counter()
    keyed = load_table(TableSpec("k", folder / "big-values.npy", keys=folder / "big-keys.npy"),
                       cpu)  # fmt: skip
    keyed_s = time.perf_counter() - began
    assert keyed.keys is not None
    per_key = keyed.keys.nbytes / keyed.keys.count
    del keyed
    began = time.perf_counter()
    load_table(TableSpec("r", folder / "big-values.npy"), cpu)
    return keyed_s, time.perf_counter() - began, per_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="each round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per table")
    parser.add_argument("--threads", type=int, default=4, help="callers in flight")
    parser.add_argument("--load-keys", type=int, default=10_000_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the plot")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-keyed-"))
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=args.keys, dtype=np.int64))
    rng.shuffle(keys)
    values = rng.standard_normal((keys.size, DIM), dtype=np.float32)
    np.savez(work / "keyed.npz", keys=keys, values=values)
    np.save(work / "rows.npy", values)
    del values
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--device", args.device, "--table", f"rows={work / 'rows.npy'}",
         "--table", f"keyed={work / 'keyed.npz'}", "--max-ids", "16384"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        with EmbeddingClient(target, max_attempts=1, timeout=1) as probe:
            for _ in range(600):
                try:
                    if probe.health() == "SERVING":
                        break
                except EmbeddingError:
                    pass
                time.sleep(0.1)
            tables = {t.name: t for t in probe.tables()}
        load_before = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic()
        for batch in BATCHES:
            print(f"  B = {batch:,}", flush=True)
            rows = [rng.integers(0, keys.size, size=batch) for _ in range(32)]
            for _ in range(args.rounds):
                for table, ids in (("rows", rows), ("keyed", [keys[r] for r in rows])):
                    before = cpu_seconds(server.pid)
                    calls, seconds = run_round(target, table, ids, args.seconds, args.threads)
                    used = cpu_seconds(server.pid) - before
                    results.setdefault((table, batch), []).append((used / calls, calls / seconds))
        load_after = resource.getrusage(resource.RUSAGE_SELF)
        load_cpu = (load_after.ru_utime + load_after.ru_stime - load_before.ru_utime
                    - load_before.ru_stime) / (time.monotonic() - wall)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)

    keyed_s, rows_s, per_key = load_time(args.load_keys, work)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()

    print()
    print(f"machine: {os.cpu_count()} cores, device {args.device}; {keys.size:,} keys x {DIM} "
          f"float32; {args.threads} calls in flight; load generator CPU {load_cpu:.2f} cores "
          f"(threads in this process); median of {args.rounds} alternating {args.seconds:g} s "
          "rounds")  # fmt: skip
    print()
    print("| B | rows: server CPU us/call | keyed: server CPU us/call | keyed / rows | "
          "rows: calls/s | keyed: calls/s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    ratios = []
    for batch in BATCHES:
        cpu = {t: statistics.median(c for c, _ in results[(t, batch)]) for t in ("rows", "keyed")}
        rate = {t: statistics.median(r for _, r in results[(t, batch)]) for t in ("rows", "keyed")}
        ratios.append(cpu["keyed"] / cpu["rows"])
        print(f"| {batch:,} | {cpu['rows'] * 1e6:,.0f} | {cpu['keyed'] * 1e6:,.0f} | "
              f"{ratios[-1]:.2f}x | {rate['rows']:,.0f} | {rate['keyed']:,.0f} |")  # fmt: skip
    print()
    keyed_bytes, rows_bytes = tables["keyed"].bytes, tables["rows"].bytes
    print(f"memory: the keyed table holds {keyed_bytes:,} bytes of rows ({keys.size:,} keys + the "
          f"fill and pad rows) against {rows_bytes:,}; its index {per_key:.0f} bytes per key "
          f"({per_key / (DIM * 4):.1%} of a {DIM}-float32 row)")  # fmt: skip
    print(f"load of {args.load_keys:,} keys x 16 float32 (.npy values + .npy keys): keyed "
          f"{keyed_s:.2f} s, the same values as rows {rows_s:.2f} s")  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for table in ("rows", "keyed"):
        axes.plot(BATCHES, [statistics.median(c for c, _ in results[(table, b)]) * 1e6
                            for b in BATCHES], marker="o", label=table)  # fmt: skip
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("ids (keys) per Lookup (B)")
    axes.set_ylabel("server CPU per call (us)")
    axes.set_title(f"Keyed vs row-indexed lookups, {keys.size:,} x {DIM}, {args.device}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "keyed.png", dpi=120)
    print(f"\nplot: {args.out / 'keyed.png'}")


if __name__ == "__main__":
    main()
