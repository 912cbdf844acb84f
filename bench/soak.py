"""Bounded soak: a real server process under N concurrent calls for T seconds, on loopback.

Reports calls, errors (must be 0), latency percentiles and the server's RSS at start and end.

    .venv/bin/python bench/soak.py --seconds 60 --concurrency 64      (make soak)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from embedding_client import AsyncEmbeddingClient, EmbeddingClient, EmbeddingError

BIN = Path(sys.executable).parent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def drive(target: str, seconds: float, concurrency: int, batch: int, rows: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    wrong = 0
    expected = np.random.default_rng(0).standard_normal((rows, 128), dtype=np.float32)
    deadline = time.monotonic() + seconds
    async with AsyncEmbeddingClient(target, max_attempts=1, timeout=30) as client:

        async def worker(seed: int) -> None:
            nonlocal wrong
            rng = np.random.default_rng(seed)
            while time.monotonic() < deadline:
                ids = rng.integers(0, rows, size=batch)
                started = time.perf_counter()
                try:
                    vectors = await client.lookup(ids)
                except EmbeddingError as exc:
                    errors.append(str(exc))
                    continue
                latencies.append(time.perf_counter() - started)
                wrong += not np.array_equal(vectors, expected[ids])

        await asyncio.gather(*(worker(seed) for seed in range(concurrency)))
    return {"latencies": np.array(latencies), "errors": errors, "wrong": wrong}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="ids per call")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the demo table")
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--demo-rows", str(args.rows),
         "--demo-dim", "128", "--log-level", "WARNING"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    with EmbeddingClient(target, timeout=2, wait_for_ready=True) as probe:
        probe.health(timeout=60)
    rss_start = rss_mib(server.pid)
    print(
        f"soak: {args.concurrency} concurrent Lookup calls of {args.batch} ids for "
        f"{args.seconds:.0f} s against {target} (demo table {args.rows} x 128)",
        flush=True,
    )
    result = asyncio.run(drive(target, args.seconds, args.concurrency, args.batch, args.rows))
    rss_end = rss_mib(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)

    latencies = result["latencies"] * 1e3
    calls = len(latencies) + len(result["errors"])
    p50, p99, p999 = np.percentile(latencies, [50, 99, 99.9]) if len(latencies) else (0, 0, 0)
    print()
    columns = (
        "calls, errors, wrong rows, calls/s, p50 ms, p99 ms, p99.9 ms, RSS start MiB, RSS end MiB"
    )
    print("| " + " | ".join(columns.split(", ")) + " |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {calls} | {len(result['errors'])} | {result['wrong']} | {calls / args.seconds:.0f} | "
          f"{p50:.2f} | {p99:.2f} | {p999:.2f} | {rss_start:.0f} | {rss_end:.0f} |")  # fmt: skip
    if result["errors"]:
        print("first errors:", result["errors"][:3])
    return 0 if not result["errors"] and not result["wrong"] else 1


if __name__ == "__main__":
    sys.exit(main())
