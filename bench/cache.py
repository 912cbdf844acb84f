"""Device cache benchmark: lookup throughput against cache hit rate under Zipf ids.

A table of V x 128 float32 rows lives in host memory; a `CachedRows` cache of some
fraction of it sits on the device. Batches of ids drawn from a Zipf distribution (hot
rows first, exponent `--zipf`) go through the cache; after a warm-up the run reports the
hit rate and rows/s, beside the two ends: the whole table on the device (every id a hit)
and no cache at all (every row copied from the host per request). On a CPU-only machine
"device" is the CPU too, so only the cache's bookkeeping cost shows; run it with
`--device cuda` on a GPU for the real trade-off.

    .venv/bin/python bench/cache.py                     (make bench-cache)
    .venv/bin/python bench/cache.py --device cuda --rows 10000000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from embedding_server.core.cache import CachedRows

DIM = 128


class Counts:
    def __init__(self) -> None:
        self.hits = self.misses = 0

    def __call__(self, hits: int, misses: int, evictions: int) -> None:
        self.hits += hits
        self.misses += misses


def zipf_batches(rows: int, batch: int, exponent: float, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Row ids permuted so hot rows are scattered over the table, as in real data.
    permutation = rng.permutation(rows)
    return [permutation[(rng.zipf(exponent, size=batch) - 1) % rows] for _ in range(count)]


def rate(step: object, batches: list[np.ndarray], device: torch.device, seconds: float) -> float:
    """Rows per second of `step(ids)` over the batches, for about `seconds`."""
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for ids in batches:
            step(torch.from_numpy(ids))  # type: ignore[operator]
            done += ids.size
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return done / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--fractions", default="0.01,0.05,0.2,0.5", help="cache size / rows")
    parser.add_argument("--zipf", default="1.05,1.2", help="Zipf exponents")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"building a {args.rows:,} x {DIM} float32 host table ...", flush=True)
    host = torch.randn(args.rows, DIM)
    if device.type == "cuda":
        host = host.pin_memory()
    whole = host.to(device)
    results = []
    for exponent in (float(z) for z in args.zipf.split(",")):
        # 256 fresh batches (1M ids at the default size): a working set the cache must
        # really choose from, not a few batches it learns by heart.
        batches = zipf_batches(args.rows, args.batch, exponent, 256, seed=1)
        on_device = rate(lambda ids: whole.index_select(0, ids.to(device)), batches, device,
                         args.seconds)  # fmt: skip
        host_only = rate(lambda ids: host.index_select(0, ids).to(device), batches, device,
                         args.seconds)  # fmt: skip
        for fraction in (float(f) for f in args.fractions.split(",")):
            counts = Counts()
            cache = CachedRows(host, int(args.rows * fraction), device, counts)
            rate(cache.take, batches, device, 1.0)  # warm up
            counts.hits = counts.misses = 0
            cached = rate(cache.take, batches, device, args.seconds)
            hit_rate = counts.hits / max(1, counts.hits + counts.misses)
            row = {"zipf": exponent, "fraction": fraction, "hit_rate": hit_rate,
                   "cached": cached, "on_device": on_device, "host_only": host_only}  # fmt: skip
            results.append(row)
            print(f"  zipf {exponent} cache {fraction:>5.0%}: hit rate {hit_rate:6.1%}, "
                  f"{cached:14,.0f} rows/s (all on device {on_device:,.0f}, "
                  f"host only {host_only:,.0f})", flush=True)  # fmt: skip
    report(results, args)
    return 0


def report(results: list[dict[str, float]], args: argparse.Namespace) -> None:
    lines = [
        f"Device cache: {args.rows:,} x {DIM} float32 table in host memory, device "
        f"{args.device}, batches of {args.batch:,} Zipf ids, {args.seconds:.0f} s per cell.",
        "",
        "| Zipf exponent | cache / table | hit rate | cached rows/s | all on device rows/s | host only rows/s | cached / on device |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['zipf']} | {r['fraction']:.0%} | {r['hit_rate']:.1%} | {r['cached']:,.0f} | "
            f"{r['on_device']:,.0f} | {r['host_only']:,.0f} | {r['cached'] / r['on_device']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cache-{args.device.replace(':', '')}.md").write_text(text + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for exponent in sorted({r["zipf"] for r in results}):
        rows = [r for r in results if r["zipf"] == exponent]
        axis.plot([r["hit_rate"] for r in rows], [r["cached"] for r in rows], marker="o",
                  label=f"cached, Zipf {exponent}")  # fmt: skip
        axis.axhline(
            rows[0]["on_device"], linestyle="--", alpha=0.5, label=f"all on device, Zipf {exponent}"
        )
        axis.axhline(
            rows[0]["host_only"], linestyle=":", alpha=0.5, label=f"host only, Zipf {exponent}"
        )
    axis.set(
        xlabel="hit rate", ylabel="rows/s", yscale="log", title=f"device cache on {args.device}"
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    path = args.out / f"cache-{args.device.replace(':', '')}.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path} and its .md")


if __name__ == "__main__":
    sys.exit(main())
