#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in the few calls a lent GPU machine allows.
#
# Here, once: `make device-wheels` (grpcio, its health/reflection services and protobuf at
# the versions of requirements/dev.txt, for the device's Python 3.12, into .whl/). Then one
# device call per stage, each inside the 10-minute limit of a call, carrying .whl:
#
#   bash bench/device.sh check     # GPU facts, a CUDA context's size, CUDA tests, the rest of the suite (<= 8 min)
#   bash bench/device.sh kernels   # kernel sweep (gather vs one-hot), device cache at 10M rows (<= 6 min)
#   bash bench/device.sh service   # service sweep: 1 and 8 server processes, 8 with batching, ceiling (~6 min)
#   bash bench/device.sh processes # Lookup at B = 1 and 64 with 1, 2, 4, 8, 16 server processes (~5 min)
#   bash bench/device.sh keyed     # keyed vs row-indexed tables on the GPU, key index on CUDA (~6 min)
#
# `check` first: it is what proves the CUDA paths (tests/test_cuda.py) before any number
# is worth reading.
#
# Results go to $OUT (the device tool brings back at most 8 files), else bench/results/device:
# STAGE.log with every step's output, and each benchmark's table and plot. Every step is
# bounded by `timeout`, and a failed step does not stop the next one; the exit status is
# that of the first step that failed.
set -uo pipefail
cd "$(dirname "$0")/.."

stage=${1:?usage: bench/device.sh check|kernels|service|processes|keyed}
out=${OUT:-bench/results/device}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

log=$out/$stage.log
: >"$log"
step() {  # step SECONDS COMMAND...: run it, its output into the log, remember a failure
    local seconds=$1 rc
    shift
    echo "== $* (at most ${seconds} s)" | tee -a "$log"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "== exit $rc" | tee -a "$log"
    [ "$status" -ne 0 ] || status=$rc
}

# The device's Python has torch, numpy, prometheus-client, safetensors, matplotlib and
# pytest; grpcio and protobuf come at our versions from .whl/. An editable install puts
# embedding-server and embedding-client beside that Python, where tests and benchmarks
# look for them.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -x "$(dirname "$(command -v "$python")")/embedding-server" ]; then
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi

case $stage in
check)
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
        nproc
        "$python" -c 'import grpc, google.protobuf as pb, numpy, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "grpcio", grpc.__version__,
      "protobuf", pb.__version__, "numpy", numpy.__version__)'
    } 2>&1 | tee -a "$log"
    step 30 "$python" bench/cuda_context.py
    step 180 "$python" -m pytest -q -p no:cacheprovider -m cuda -rs --durations=10
    # The rest of the suite where "auto" means CUDA: every test that starts a server
    # process puts its tables on the GPU. Tests needing tools the device lacks
    # (prometheus, podman) skip.
    step 300 "$python" -m pytest -q -p no:cacheprovider -m "not cuda" -rs --durations=10
    ;;
kernels)
    # One-hot up to 2e12 multiply-adds, so V = 1M has its Lookup/LookupDense ratio at B = 1,024.
    step 240 "$python" bench/kernels.py --device cuda --max-dense-macs 2e12 --out "$out"
    step 100 "$python" bench/cache.py --device cuda --rows 10000000 --out "$out"
    ;;
service)
    # 8 client processes so the load generator is not the limit on 16 cores; the ceiling
    # is the single-process bare server the targets are stated against.
    step 540 "$python" bench/service.py --server-args "--device cuda" \
        --kinds Lookup,LookupStream,LookupDense,ceiling --processes 8 --seconds 2 \
        --concurrency 1,32,128 --batch 1,64,1024,16384 \
        --variants "1p=;8p=--processes 8;8p+batch=--processes 8 --batching true" \
        --out "$out"
    ;;
processes)
    # Issue 34: throughput at small batches from 1 to 16 server processes on the 16 cores
    # (the CPU VM has 2: it cannot show where the curve bends). Lookup only, tables on the
    # GPU, 8 client processes.
    step 420 "$python" bench/service.py --server-args "--device cuda" \
        --kinds Lookup --processes 8 --seconds 2 --repeat 2 \
        --concurrency 32,128 --batch 1,64 \
        --variants "1p=;2p=--processes 2;4p=--processes 4;8p=--processes 8;16p=--processes 16" \
        --out "$out"
    ;;
keyed)
    # Issue 31: a keyed table on the GPU against the same rows by index (the key index
    # stays on the host: what does it cost there?), and torch's search on CUDA.
    step 300 "$python" bench/keyed.py --device cuda --threads 16 --load-keys 10000000 \
        --out "$out"
    step 60 "$python" bench/keys.py --device cuda --out "$out"
    ;;
*)
    echo "unknown stage $stage: check, kernels, service, processes or keyed" >&2
    exit 2
    ;;
esac
ls -l "$out"
exit "$status"
