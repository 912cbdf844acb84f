"""Keyed tables (issue 31): which key index to use. Keys -> rows for a batch of keys,
measured side by side in one run on the same keys:

- sorted keys + binary search with numpy (`np.searchsorted`: what `core.keys.KeyIndex`
  does, the verification of each hit included);
- the same with torch (`torch.searchsorted`, what a CUDA table could run on the device);
- an open-addressing hash table (linear probing, multiplicative hash) in vectorised
  numpy, the strongest hash we can build without a compiled extension;
- a Python dict, the baseline a user would write in front of the service.

    .venv/bin/python bench/keys.py [--keys 1000000] [--repeats 7]

Prints a markdown table (median microseconds per batch and keys/s, with each index's
build time and bytes) and writes bench/results/keys.png.
"""

from __future__ import annotations

import argparse
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
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Fibonacci hashing)


class HashIndex:
    """Open addressing with linear probing, every probe of a batch taken at once."""

    def __init__(self, keys: np.ndarray) -> None:
        self.bits = max(4, int(np.ceil(np.log2(keys.size * 2))))  # load factor <= 0.5
        size = 1 << self.bits
        self.slots = np.full(size, np.iinfo(np.int64).min, dtype=np.int64)  # empty marker
        self.rows = np.full(size, -1, dtype=np.int64)
        pending, rows = keys.copy(), np.arange(keys.size, dtype=np.int64)
        at = self._home(pending)
        while pending.size:  # place each key in the first free slot from its home
            free = self.rows[at] < 0
            # Of several keys wanting one free slot, the first takes it, the rest move on.
            _, first = np.unique(at[free], return_index=True)
            placed = np.flatnonzero(free)[first]
            self.slots[at[placed]], self.rows[at[placed]] = pending[placed], rows[placed]
            keep = np.ones(pending.size, dtype=bool)
            keep[placed] = False
            pending, rows, at = pending[keep], rows[keep], (at[keep] + 1) & (size - 1)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            mixed = keys.view(np.uint64) * MULTIPLIER
        return (mixed >> np.uint64(64 - self.bits)).astype(np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        out = np.full(keys.shape, -1, dtype=np.int64)
        todo = np.arange(keys.size)
        at = self._home(keys)
        mask = (1 << self.bits) - 1
        while todo.size:
            rows = self.rows[at]
            hit = (self.slots[at] == keys[todo]) & (rows >= 0)
            out[todo[hit]] = rows[hit]
            going = ~hit & (rows >= 0)  # neither found nor at an empty slot: probe on
            todo, at = todo[going], (at[going] + 1) & mask
        return out

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes + self.rows.nbytes


def torch_find(sorted_keys: torch.Tensor, rows: torch.Tensor) -> Callable[[np.ndarray], object]:
    last = sorted_keys.numel() - 1

    def find(keys: np.ndarray) -> torch.Tensor:
        wanted = torch.from_numpy(keys)
        at = torch.searchsorted(sorted_keys, wanted).clamp_(max=last)
        return torch.where(sorted_keys[at] == wanted, rows[at], -1)

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
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server's lookups run: one call, one thread
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=args.keys, dtype=np.int64))
    rng.shuffle(keys)
    print(f"building the indexes of {keys.size:,} random int64 keys", flush=True)
    builds: dict[str, tuple[float, int, Callable[[np.ndarray], object]]] = {}
    began = time.perf_counter()
    index = KeyIndex.build(keys, keys.size)
    builds["sorted + np.searchsorted"] = (time.perf_counter() - began,
                                          index.sorted_keys.nbytes + index.rows.nbytes, index.find)  # fmt: skip
    sorted_t, rows_t = torch.from_numpy(index.sorted_keys), torch.from_numpy(index.rows)
    builds["sorted + torch.searchsorted"] = (builds["sorted + np.searchsorted"][0],
                                             builds["sorted + np.searchsorted"][1],
                                             torch_find(sorted_t, rows_t))  # fmt: skip
    began = time.perf_counter()
    hashed = HashIndex(keys)
    builds["hash, linear probing (numpy)"] = (time.perf_counter() - began, hashed.nbytes,
                                              hashed.find)  # fmt: skip
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
        wanted = rng.choice(keys, batch)
        misses = rng.random(batch) < 0.1  # a tenth of the keys not held
        wanted[misses] = rng.integers(-(2**63), 2**63 - 1, int(misses.sum()))
        for name, (_, _, find) in builds.items():
            results[name].append(timed(lambda f=find, w=wanted: f(w), args.repeats))

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

    RESULTS.mkdir(exist_ok=True)
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
    figure.savefig(RESULTS / "keys.png", dpi=120)
    print(f"\nplot: {RESULTS / 'keys.png'}")


if __name__ == "__main__":
    main()
