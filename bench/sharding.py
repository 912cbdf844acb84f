"""The cost of the fan-out: one table served whole by one server, against the same table
split over N shard servers behind a ShardedClient (and its asyncio twin), at B = 1,
1,024 and 16,384 ids per call. All servers and the client run on this machine.

Latency: one call in flight, median and p99 of the round trip seen by the caller.
Throughput: `--inflight` calls in flight from the asyncio clients, rows per second,
with the CPU the servers and the client (the load generator) spent per call, so the
reader can see which side was the limit.

    .venv/bin/python bench/sharding.py                -> bench/results/sharding.{md,png}
    .venv/bin/python bench/sharding.py --out docs/bench/sharding
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(config: Path, shard: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--config", str(config), "--log-level", "WARNING",
         *(["--shard", shard] if shard else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"127.0.0.1:{port}"


def wait_serving(targets: list[str]) -> None:
    from embedding_client import EmbeddingClient

    for target in targets:
        deadline = time.monotonic() + 120
        with EmbeddingClient(target, timeout=1, max_attempts=1) as probe:
            while True:
                try:
                    if probe.health() == "SERVING":
                        break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)


def cpu(processes: list[subprocess.Popen[bytes]]) -> float:
    total = 0.0
    for process in processes:
        times = psutil.Process(process.pid).cpu_times()
        total += times.user + times.system
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def latency(call: Callable[[np.ndarray], Awaitable[object]], ids: list[np.ndarray],
                  seconds: float) -> tuple[float, float, int]:  # fmt: skip
    """Median and p99 (ms) of calls made one after another for `seconds`."""
    times = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop or len(times) < 20:
        started = time.perf_counter()
        await call(ids[len(times) % len(ids)])
        times.append(time.perf_counter() - started)
    ordered = sorted(times)
    return (
        ordered[len(ordered) // 2] * 1e3,
        ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
        len(times),
    )


async def throughput(call: Callable[[np.ndarray], Awaitable[object]], ids: list[np.ndarray],
                     seconds: float, inflight: int) -> int:  # fmt: skip
    """Calls completed with `inflight` running at once for `seconds`."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await call(ids[(done + offset) % len(ids)])
            done += 1

    await asyncio.gather(*(worker(i) for i in range(inflight)))
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", default="1,1024,16384")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="sweeps; cells report medians")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sharding")
    args = parser.parse_args()
    from embedding_client import AsyncEmbeddingClient, EmbeddingClient
    from embedding_client.sharded import AsyncShardedClient, ShardedClient

    folder = Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    table = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    np.save(folder / "t.npy", table)
    config = folder / "tables.toml"
    config.write_text('[[table]]\nname = "t"\nsource = "t.npy"\n')
    print(f"starting 1 whole server and {args.shards} shard servers of {args.rows} x {args.dim}",
          flush=True)  # fmt: skip
    whole, whole_target = start(config, None)
    shard_servers = [start(config, f"{s}/{args.shards}") for s in range(args.shards)]
    servers = [whole, *(p for p, _ in shard_servers)]
    rows_out = []
    try:
        wait_serving([whole_target, *(t for _, t in shard_servers)])
        shard_map = [[t] for _, t in shard_servers]
        rng = np.random.default_rng(1)
        sweeps = [int(b) for b in args.batch.split(",")] * args.repeat
        for sweep, batch in enumerate(sweeps):
            print(f"sweep {sweep + 1} of {len(sweeps)}: B = {batch}", flush=True)
            ids = [rng.integers(0, args.rows, batch) for _ in range(16)]
            want = table[ids[0]]

            async def run(kind: str, batch: int = batch, ids: list[np.ndarray] = ids,
                          want: np.ndarray = want) -> dict[str, object]:  # fmt: skip
                if kind == "one server":
                    client: object = AsyncEmbeddingClient(whole_target, max_attempts=1)
                    watched = [whole]
                else:
                    client = AsyncShardedClient(shard_map)
                    watched = servers[1:]
                call = client.lookup  # type: ignore[attr-defined]
                got = await call(ids[0], "t")
                assert np.array_equal(got, want), "wrong rows"
                p50, p99, _ = await latency(lambda i: call(i, "t"), ids, args.seconds)
                server_before, client_before = cpu(watched), own_cpu()
                started = time.monotonic()
                calls = await throughput(lambda i: call(i, "t"), ids, args.seconds, args.inflight)
                elapsed = time.monotonic() - started
                server_cpu = (cpu(watched) - server_before) / calls * 1e6
                client_cpu = (own_cpu() - client_before) / calls * 1e6
                await client.close()  # type: ignore[attr-defined]
                return {"B": batch, "target": kind, "p50 ms": p50, "p99 ms": p99,
                        "rows/s": calls * batch / elapsed, "server CPU us/call": server_cpu,
                        "client CPU us/call": client_cpu}  # fmt: skip

            for kind in ("one server", f"{args.shards} shards"):
                row = asyncio.run(run(kind))
                rows_out.append(row)
                print(row, flush=True)
            # The blocking client: its loop thread adds a hop per call.
            with ShardedClient(shard_map) as blocking, EmbeddingClient(whole_target) as single:
                for name, client in (("one server, blocking", single),
                                     (f"{args.shards} shards, blocking", blocking)):  # fmt: skip
                    times = []
                    stop = time.monotonic() + args.seconds
                    while time.monotonic() < stop or len(times) < 20:
                        started = time.perf_counter()
                        client.lookup(ids[len(times) % len(ids)], "t")
                        times.append(time.perf_counter() - started)
                    times.sort()
                    rows_out.append({"B": batch, "target": name,
                                     "p50 ms": times[len(times) // 2] * 1e3,
                                     "p99 ms": times[int(0.99 * (len(times) - 1))] * 1e3})  # fmt: skip
                    print(rows_out[-1], flush=True)
    finally:
        for process in servers:
            process.terminate()
        for process in servers:
            process.wait(timeout=30)
    report(medians(rows_out), args)
    return 0


def medians(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """One row per (B, target): the median of each measure over the sweeps."""
    cells: dict[tuple[object, object], list[dict[str, object]]] = {}
    for row in rows:
        cells.setdefault((row["B"], row["target"]), []).append(row)
    out = []
    for (batch, target), runs in sorted(cells.items(), key=lambda kv: int(kv[0][0])):  # type: ignore[call-overload]
        merged: dict[str, object] = {"B": batch, "target": target, "runs": len(runs)}
        for key in runs[0]:
            if key not in merged:
                merged[key] = float(np.median([float(r[key]) for r in runs]))  # type: ignore[arg-type]
        out.append(merged)
    return out


def report(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    columns = ["B", "target", "p50 ms", "p99 ms", "rows/s", "server CPU us/call",
               "client CPU us/call"]  # fmt: skip

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = [
        f"Machine: {os.cpu_count()} CPUs; table {args.rows:,} x {args.dim} float32; "
        f"{args.shards} shards x 1 replica; throughput with {args.inflight} calls in flight "
        f"from one asyncio client process; {args.seconds:g} s per cell; medians of "
        f"{args.repeat} sweeps. Every server and the client share this machine's cores.",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if c != "target" else "---" for c in columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    batches = sorted({int(r["B"]) for r in rows})  # type: ignore[call-overload]
    for target in dict.fromkeys(str(r["target"]) for r in rows):
        mine = {int(r["B"]): r for r in rows if r["target"] == target}  # type: ignore[call-overload]
        axes[0].plot(batches, [mine[b]["p50 ms"] for b in batches], marker="o", label=target)
        if all("rows/s" in mine[b] for b in batches):
            axes[1].plot(batches, [mine[b]["rows/s"] for b in batches], marker="o", label=target)
    for ax, title in zip(axes, ("latency p50 (ms), one call in flight",
                                f"rows/s, {args.inflight} calls in flight"), strict=True):  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ids per call (B)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
