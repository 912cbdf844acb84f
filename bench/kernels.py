"""Kernel benchmark: gather vs one-hot matmul over vocabulary size and batch, as served.

Times `embedding_server.core.kernels.gather` and `one_hot_matmul` (the functions the server
runs) on the chosen device: CUDA events on a GPU, a wall clock on the CPU. Prints a
markdown table, writes it and a plot under --out.

    .venv/bin/python bench/kernels.py                    (make bench-kernels)
    .venv/bin/python bench/kernels.py --device cuda --rows 1e3,1e4,1e5,1e6,1e7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from embedding_server.core import devices, kernels

DIM = 128


def _numbers(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


ID_SETS = 16


def one_hot(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return kernels.one_hot_matmul(table, ids, 1 << 24)  # the server's default chunk


def median_seconds(
    device: torch.device,
    kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    table: torch.Tensor,
    id_sets: list[torch.Tensor],
    budget_s: float,
) -> float:
    """Median device time of `kernel(table, ids)` over repeats filling about `budget_s`
    (3 to 200 runs).

    Each repeat takes the next of several random id sets, so repeats do not just re-read
    rows the last one left in cache.
    """
    times: list[float] = []
    started = time.perf_counter()
    # One warm-up (allocator, threads, handles), then at least 3 timed runs.
    for n in range(201):
        ids = id_sets[n % len(id_sets)]
        seconds = devices.timed(device, partial(kernel, table, ids))[1]
        if n:
            times.append(seconds)
        if len(times) >= 3 and time.perf_counter() - started > budget_s:
            break
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=_numbers, default=_numbers("1e3,1e4,1e5,1e6,1e7"))
    parser.add_argument(
        "--batch", type=_numbers, default=_numbers("1,16,256,1024,4096,16384,65536")
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--max-dense-macs", type=float, default=2e10,
                        help="skip one-hot cases costing more multiply-adds than this")  # fmt: skip
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of repeats per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    print(
        f"kernels on {device} ({name}, {threads} torch threads), dim {DIM}, torch {torch.__version__}"
    )

    rows_out: list[dict[str, object]] = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for rows in args.rows:
            table = torch.randn(rows, DIM, device=device, dtype=torch.float32).to(dtype)
            for batch in args.batch:
                id_sets = [torch.randint(0, rows, (batch,), device=device) for _ in range(ID_SETS)]
                gather_s = median_seconds(device, kernels.gather, table, id_sets, args.budget)
                moved = batch * DIM * table.element_size() * 2 + batch * 8
                dense_s = None
                if batch * rows * DIM <= args.max_dense_macs:
                    dense_s = median_seconds(device, one_hot, table, id_sets, args.budget)
                rows_out.append({
                    "dtype": dtype_name, "rows": rows, "batch": batch,
                    "gather_us": gather_s * 1e6, "gather_gbps": moved / gather_s / 1e9,
                    "dense_us": None if dense_s is None else dense_s * 1e6,
                    "ratio": None if dense_s is None else dense_s / gather_s,
                })  # fmt: skip
                last = rows_out[-1]
                print(f"  {dtype_name:8} V={rows:>9,} B={batch:>6,}: gather {last['gather_us']:10.1f} us"
                      + ("" if dense_s is None else f", one-hot {dense_s * 1e6:12.1f} us"
                         f" ({dense_s / gather_s:,.0f}x)"), file=sys.stderr, flush=True)  # fmt: skip
            del table

    lines = [
        f"Kernels on {device} ({name}), dim {DIM}, torch {torch.__version__}; median device time.",
        "",
        "| dtype | rows (V) | batch (B) | gather us | gather GB/s | one-hot us | one-hot / gather |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows_out:
        dense = "-" if r["dense_us"] is None else f"{r['dense_us']:,.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:,.0f}x"
        lines.append(
            f"| {r['dtype']} | {r['rows']:,} | {r['batch']:,} | {r['gather_us']:,.1f} | "
            f"{r['gather_gbps']:.2f} | {dense} | {ratio} |"
        )
    table_text = "\n".join(lines)
    print(table_text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{device.type}"
    (args.out / f"{stem}.md").write_text(table_text + "\n")
    plot(rows_out, args.out / f"{stem}.png", f"{name}, dim {DIM}")
    print(f"\nwrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')}")
    return 0


def plot(results: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for dtype in sorted({str(r["dtype"]) for r in results}):
        for rows in sorted({int(r["rows"]) for r in results if r["dtype"] == dtype}):  # type: ignore[call-overload]
            series = [r for r in results if r["dtype"] == dtype and r["rows"] == rows]
            style = "-" if dtype == "float32" else "--"
            left.plot([r["batch"] for r in series], [r["gather_gbps"] for r in series], style,
                      marker="o", label=f"{dtype} V={rows:,}")  # fmt: skip
            dense = [r for r in series if r["ratio"] is not None]
            if dense:
                right.plot([r["batch"] for r in dense], [r["ratio"] for r in dense], style,
                           marker="o", label=f"{dtype} V={rows:,}")  # fmt: skip
    left.set(xscale="log", xlabel="ids per call (B)", ylabel="gather GB/s (read + write)",
             title=f"gather throughput: {title}")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="ids per call (B)",
              ylabel="one-hot matmul time / gather time", title="how much slower the dense path is")  # fmt: skip
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
