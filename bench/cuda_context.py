"""How much device memory one CUDA context takes with this torch (the server keeps
CUDA_CONTEXT_BYTES free per worker process for it): nvidia-smi's used memory on a GPU
before and after this process first touches it. Run on a GPU machine
(bench/device.sh check does)."""

from __future__ import annotations

import argparse
import subprocess
import time

import torch


def used_mib(index: int) -> int:
    out = subprocess.check_output(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)]
    )
    return int(out.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()
    before = used_mib(args.device)
    torch.zeros(1, device=f"cuda:{args.device}")
    time.sleep(1)  # nvidia-smi samples
    after = used_mib(args.device)
    print("| torch | GPU | CUDA context (MiB) |")
    print("| --- | --- | ---: |")
    print(f"| {torch.__version__} | {torch.cuda.get_device_name(args.device)} | {after - before} |")


if __name__ == "__main__":
    main()
