"""The update log (issue 30) measured: how fast a replica applies the log, how long a new
replica takes to catch up, and what a stream of updates does to lookup latency. A real
redis-server (AOF on, every-second fsync) and real server processes on loopback.

    .venv/bin/python bench/updatelog.py [--entries 100000] [--seconds 10]

Prints a markdown table and writes bench/results/updatelog.png (lookup latency percentiles
without and with 1,000 updated rows/s). The load generator (Python threads, in this
process; the updates from a process of their own) shares the machine with the server: its
CPU is reported. With `--pin` (the default where there are 2 cores or more) the servers run
on the first core and everything else on the others: the load generator (this process),
and below its priority (nice 10) Redis, the updater and the control's server, which in a
fleet run elsewhere. The latency then shows what the update stream costs the server, not
what the updating process costs a shared core; `--no-pin` shares every core alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis

from embedding_client import EmbeddingClient, EmbeddingError

BIN = Path(sys.executable).parent
ROWS, DIM = 100_000, 128
RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVER_CORES: set[int] | None = None  # --pin: the cores the servers run on
OTHER_CORES: set[int] | None = None  # --pin: everything else


def on_other_cores() -> None:
    """In a child process before it runs (preexec_fn): to the cores left to the load, below
    the load generator's priority (what runs elsewhere in a fleet: Redis, the trainer
    writing updates)."""
    if OTHER_CORES:
        os.sched_setaffinity(0, OTHER_CORES)
        os.nice(10)


def on_server_cores() -> None:
    if SERVER_CORES:
        os.sched_setaffinity(0, SERVER_CORES)


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=on_other_cores,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return process, url


def start_server(
    table: Path, url: str, *, measured: bool = True
) -> tuple[subprocess.Popen[str], str, float]:
    """A server of `table` on the log at `url` ("": none, updates in memory), on the
    servers' cores if it is `measured` (else the load's); returns it, its address and the
    seconds from start to SERVING (its catch-up included)."""
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--table", f"t={table}", *(["--update-log", url] if url else []),
         "--allow-loopback-admin", "true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=on_server_cores if measured else on_other_cores,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    with EmbeddingClient(target, timeout=1, max_attempts=1) as probe:
        while True:
            if process.poll() is not None:
                sys.exit("the server exited at start")
            try:
                if probe.health() == "SERVING":
                    break
            except EmbeddingError:
                pass
            time.sleep(0.02)
    return process, target, time.monotonic() - started


def fill_log(url: str, entries: int, rows_each: int) -> None:
    """`entries` updates of `rows_each` rows written to table t's stream the way the server
    writes them (positions 1..entries), in pipelined batches, with progress."""
    client = redis.Redis.from_url(url)
    rng = np.random.default_rng(1)
    said = time.monotonic()
    for start in range(0, entries, 1000):
        pipe = client.pipeline(transaction=False)
        for seq in range(start + 1, min(entries, start + 1000) + 1):
            ids = rng.choice(ROWS, size=rows_each, replace=False).astype("<i8")
            vectors = rng.standard_normal((rows_each, DIM), dtype=np.float32)
            pipe.xadd("embedding:updates:t", {"ids": ids.tobytes(), "vectors": vectors.tobytes(),
                      "dim": str(DIM), "writer": "bench", "time": repr(time.time())},
                      id=f"{seq}-0")  # fmt: skip
        pipe.execute()
        if time.monotonic() - said > 5:
            said = time.monotonic()
            print(f"  filled {start + 1000:,} of {entries:,} entries", flush=True)


def lookups(target: str, seconds: float, threads: int = 4, batch: int = 64) -> np.ndarray:
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with EmbeddingClient(target, max_attempts=1, timeout=10) as client:
            while time.monotonic() < stop:
                ids = rng.integers(0, ROWS, batch)
                began = time.perf_counter()
                client.lookup(ids, "t")
                latencies.append(time.perf_counter() - began)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return np.array(latencies)


UPDATER = """
import sys, time
import numpy as np
from embedding_client import EmbeddingClient
target, rate, seconds, dim, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(7)
written, interval = 0, 50 / rate
with EmbeddingClient(target, max_attempts=1, timeout=10) as client:
    client.tables()  # connected before the window opens
    print("ready", flush=True)
    sys.stdin.readline()  # "go": its start-up is not in the measured window
    began = next_at = time.monotonic()
    while time.monotonic() - began < seconds:
        ids = rng.choice(rows, size=50, replace=False)
        client.update_rows(ids, rng.standard_normal((50, dim), dtype=np.float32), "t")
        written += 50
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
print(written)
"""


def updating(target: str, rows_per_s: int, seconds: float) -> subprocess.Popen[str]:
    """A process of its own (not this one's GIL), started and connected, that updates 50
    rows at a time at `rows_per_s` for `seconds` once a line is written to its stdin; it
    then prints the rows it wrote."""
    process = subprocess.Popen(
        [sys.executable, "-c", UPDATER, target, str(rows_per_s), str(seconds), str(DIM),
         str(ROWS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=on_other_cores,
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def phases(
    target: str, args: argparse.Namespace, updated: str | None = None
) -> dict[str, np.ndarray]:
    """Lookup latencies of `target` without updates and with `args.rate` rows/s of them
    sent to `updated` (default: `target` itself; another server shows what the updating
    process alone costs the machine): `args.rounds` windows of each, alternating (quiet,
    busy, quiet, ...), so that a drift of the shared machine falls on both alike."""
    quiet: list[np.ndarray] = []
    busy: list[np.ndarray] = []
    written = 0
    window = args.seconds / args.rounds
    for _ in range(args.rounds):
        writer = updating(updated or target, args.rate, window)
        quiet.append(lookups(target, window))
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        busy.append(lookups(target, window))
        written += int(writer.communicate(timeout=60)[0])
    print(f"  {target}: {written / args.seconds:,.0f} updated rows/s while updating", flush=True)
    return {"without updates": np.concatenate(quiet), "with updates": np.concatenate(busy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="log entries to catch up")
    parser.add_argument("--rows-each", type=int, default=4, help="rows per entry")
    parser.add_argument("--seconds", type=float, default=20.0, help="each latency phase")
    parser.add_argument("--rounds", type=int, default=4, help="alternating windows per phase")
    parser.add_argument("--rate", type=int, default=1000, help="updated rows per second")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction,
                        default=len(os.sched_getaffinity(0)) >= 2,
                        help="servers on the first core, the load on the others")  # fmt: skip
    args = parser.parse_args()
    global SERVER_CORES, OTHER_CORES
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        SERVER_CORES, OTHER_CORES = {cores[0]}, set(cores[1:])
        os.sched_setaffinity(0, OTHER_CORES)
    work = Path(tempfile.mkdtemp(prefix="bench-updatelog-"))
    table = work / "t.npy"
    np.save(table, np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32))
    redis_process, url = start_redis(work)
    servers: list[subprocess.Popen[str]] = []
    try:
        print(f"filling the log: {args.entries:,} entries of {args.rows_each} rows x {DIM}")
        fill_log(url, args.entries, args.rows_each)
        print("starting a replica: it replays the whole log before SERVING")
        process, target, catch_up_s = start_server(table, url)
        servers.append(process)
        with EmbeddingClient(target, max_attempts=1) as client:
            assert client.tables()[0].update_seq == args.entries
        # The baseline: the same server without a log, its updates in memory (the
        # cheapest an update can be), measured in the same run.
        memory, memory_target, _ = start_server(table, "")
        servers.append(memory)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic()
        # The control: the same update stream sent to another server, so that what the
        # machine's 2 cores lose to the updating process alone shows apart.
        other, other_target, _ = start_server(table, "", measured=False)
        servers.append(other)
        # A second replica on the log, where the updates are written in the last phase:
        # the measured replica then only applies them, as most replicas of a fleet do.
        writer, writer_target, _ = start_server(table, url, measured=False)
        servers.append(writer)
        measured = {
            "updates elsewhere": phases(memory_target, args, other_target),
            "in memory": phases(memory_target, args),
            "update log": phases(target, args),
            "update log, written elsewhere": phases(target, args, writer_target),
        }
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        load_cpu = (cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime
                    - cpu_before.ru_stime) / (time.monotonic() - wall)  # fmt: skip
        print()
        print(
            f"machine: {os.cpu_count()} cores; lookup load generator CPU {load_cpu:.2f} cores "
            "(Python threads in this process; the updates come from another process); "
            + (f"servers pinned to core(s) {sorted(SERVER_CORES or ())}, load, updater and "
               f"Redis to {sorted(OTHER_CORES or ())}" if args.pin else "nothing pinned")
        )  # fmt: skip
        print()
        print(f"catch-up: {args.entries:,} entries ({args.entries * args.rows_each:,} rows) from "
              f"process start to SERVING in {catch_up_s:.2f} s ({args.entries / catch_up_s:,.0f} "
              "entries/s)")  # fmt: skip
        print(f"apply rate while catching up: {args.entries * args.rows_each / catch_up_s:,.0f} "
              f"rows/s ({args.rows_each} rows of {DIM} float32 per entry; process start "
              "and table load included)")  # fmt: skip
        print()
        print(f"| updates | Lookup p50, no updates | p50 at {args.rate:,} rows/s | p99, no "
              f"updates | p99 at {args.rate:,} rows/s | p99 ratio |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for name, phase in measured.items():
            (q50, q99), (b50, b99) = (np.percentile(lat, [50, 99]) * 1e3 for lat in phase.values())
            print(f"| {name} | {q50:.3f} ms | {b50:.3f} ms | {q99:.3f} ms | {b99:.3f} ms | "
                  f"{b99 / q99:.2f}x |")  # fmt: skip
        RESULTS.mkdir(exist_ok=True)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(9, 3.5))
        labels, values = [], []
        for name, phase in measured.items():
            for when, lat in phase.items():
                labels.append(f"{name}\n{when}")
                values.append(np.percentile(lat, [50, 99]) * 1e3)
        for k, quantile in enumerate(("p50", "p99")):
            axes.bar([x + 0.35 * k for x in range(len(labels))], [v[k] for v in values],
                     width=0.35, label=quantile)  # fmt: skip
        axes.set_xticks([x + 0.175 for x in range(len(labels))], labels, fontsize=7)
        axes.set_ylabel("Lookup latency, B=64 (ms)")
        axes.set_title(f"Lookups without and with {args.rate:,} updated rows/s")
        axes.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "updatelog.png", dpi=120)
        print(f"\nplot: {RESULTS / 'updatelog.png'}")
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
        redis_process.terminate()
        redis_process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
