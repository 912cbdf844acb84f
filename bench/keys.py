"""Keyed tables (issue 31): which key index to use. Keys -> rows for a batch of keys,
measured side by side in one run on the same keys:

- `core.keys.KeyIndex.find` as the server runs it: the sorted keys below 256 keys per
  call, its hash table from 256 on;
- each of those alone: sorted keys + numpy's binary search, and the open-addressing hash
  table (linear probing, Fibonacci hashing, at most 0.7 full) probed in vectorised numpy,
  the strongest hash we can build without a compiled extension;
- the sorted keys with torch (`torch.searchsorted`, what a CUDA table could run on the
  device: `--device cuda`);
- a Python dict, the baseline a user would write in front of the service.

The build column is KeyIndex.build's (both structures) for all but the dict.

    .venv/bin/python bench/keys.py [--keys 1000000] [--repeats 7]

Prints a markdown table (median microseconds per batch and keys/s, with each index's
build time and bytes) and writes bench/results/keys.png.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from embedding_server.core.keys import KeyIndex

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 64, 1024, 16384)


def torch_find(sorted_keys: torch.Tensor, rows: torch.Tensor) -> Callable[[np.ndarray], object]:
    """torch's binary search where the tensors are (a CUDA index: the keys go there and
    the rows come back, as a lookup would need them)."""
    last = sorted_keys.numel() - 1
    device = sorted_keys.device

    def find(keys: np.ndarray) -> torch.Tensor:
        wanted = torch.from_numpy(keys).to(device)
        at = torch.searchsorted(sorted_keys, wanted).clamp_(max=last)
        return torch.where(sorted_keys[at] == wanted, rows[at], -1).cpu()

    return find


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `run()` over `repeats` timings of enough calls to last ~20 ms."""
    calls = 1
    while True:
        began = time.perf_counter()
        for _ in range(calls):
            run()
        if time.perf_counter() - began > 0.02:
            break
        calls *= 4
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            run()
        samples.append((time.perf_counter() - began) / calls)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="where torch's search runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the plot")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server's lookups run: one call, one thread
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=args.keys, dtype=np.int64))
    rng.shuffle(keys)
    print(f"building the indexes of {keys.size:,} random int64 keys", flush=True)
    builds: dict[str, tuple[float, int, Callable[[np.ndarray], object]]] = {}
    began = time.perf_counter()
    index = KeyIndex.build(keys, keys.size)
    build_s = time.perf_counter() - began
    assert index.hashed is not None
    sorted_bytes = index.sorted_keys.nbytes + index.rows.nbytes
    last = index.count - 1

    def searched(wanted: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(index.sorted_keys, wanted), last)
        return np.where(index.sorted_keys[at] == wanted, index.rows[at], -1)

    builds["KeyIndex.find (sorted below 256 keys, hash from 256)"] = (build_s, index.nbytes,
                                                                       index.find)  # fmt: skip
    builds["sorted + np.searchsorted"] = (build_s, sorted_bytes, searched)
    builds["hash, linear probing (numpy, load <= 0.7)"] = (
        build_s, index.nbytes - sorted_bytes, index.hashed.find,
    )  # fmt: skip
    sorted_t = torch.from_numpy(index.sorted_keys).to(args.device)
    rows_t = torch.from_numpy(index.rows).to(args.device)
    builds[f"sorted + torch.searchsorted ({args.device})"] = (
        build_s, sorted_bytes, torch_find(sorted_t, rows_t),
    )  # fmt: skip
    began = time.perf_counter()
    mapping = {int(k): r for r, k in enumerate(keys.tolist())}
    builds["Python dict"] = (time.perf_counter() - began, 0,
                             lambda ks: [mapping.get(k, -1) for k in ks.tolist()])  # fmt: skip

    # Every index must agree before any is timed: hits and misses alike.
    probe = np.concatenate([rng.choice(keys, 5000), rng.integers(-(2**63), 2**63 - 1, 5000)])
    expected = index.find(probe)
    for name, (_, _, find) in builds.items():
        got = np.asarray(find(probe))
        assert np.array_equal(got, expected), f"{name} disagrees"

    results: dict[str, list[float]] = {name: [] for name in builds}
    for batch in BATCHES:
        print(f"  batch {batch:,}", flush=True)
        # Many different batches in turn, as a server sees them: the same one again and
        # again would find its keys' cache lines warm (8x faster at B = 64 here).
        sets = []
        for _ in range(max(4, min(256, (1 << 20) // batch))):
            wanted = rng.choice(keys, batch)
            misses = rng.random(batch) < 0.1  # a tenth of the keys not held
            wanted[misses] = rng.integers(-(2**63), 2**63 - 1, int(misses.sum()))
            sets.append(wanted)
        for name, (_, _, find) in builds.items():
            turns = itertools.cycle(sets)
            results[name].append(timed(lambda f=find, t=turns: f(next(t)), args.repeats))

    print()
    print(f"machine: {os.cpu_count()} cores, one thread; {keys.size:,} keys; a tenth of the "
          "looked-up keys not held; median of "
          f"{args.repeats} timings")  # fmt: skip
    print()
    head = " | ".join(f"B = {b:,}" for b in BATCHES)
    print(f"| index | build | bytes | {head} |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in BATCHES) + " |")
    for name, (build_s, nbytes, _) in builds.items():
        cells = " | ".join(
            f"{t * 1e6:,.1f} us ({b / t / 1e6:,.2f} M keys/s)"
            for b, t in zip(BATCHES, results[name], strict=True)
        )
        size = f"{nbytes / 2**20:,.1f} MiB" if nbytes else "-"
        print(f"| {name} | {build_s:.2f} s | {size} | {cells} |")

    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, times in results.items():
        axes.plot(BATCHES, [b / t / 1e6 for b, t in zip(BATCHES, times, strict=True)],
                  marker="o", label=name)  # fmt: skip
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("keys per lookup (B)")
    axes.set_ylabel("million keys translated per second")
    axes.set_title(f"Key index over {keys.size:,} int64 keys, one CPU thread")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "keys.png", dpi=120)
    print(f"\nplot: {args.out / 'keys.png'}")


if __name__ == "__main__":
    main()
