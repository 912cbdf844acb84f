#!/usr/bin/env bash
# Screenshot of Prometheus's graph page showing p99 latency of Lookup and of LookupDense,
# after real traffic against a real server, taken with headless Chromium.
#
#   docker/screenshot.sh [OUT.png]     (make screenshot; default docs/prometheus-p99.png)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/prometheus-p99.png}
WORK=$(mktemp -d)
PY=.venv/bin/python
log() { printf '[screenshot %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
for tool in prometheus chromium; do
    command -v "$tool" >/dev/null || { log "$tool is not installed (apt-get install prometheus chromium)"; exit 1; }
done
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=$(port); METRICS=$(port); PROM=$(port)
cleanup() { kill "${SERVER_PID:-}" "${PROM_PID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

.venv/bin/embedding-server --host 127.0.0.1 --port "$GRPC" --metrics-host 127.0.0.1 \
    --metrics-port "$METRICS" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
sed "s/embedding-server:8000/127.0.0.1:$METRICS/" docker/prometheus/prometheus.yml >"$WORK/prometheus.yml"
cp docker/prometheus/alerts.yml "$WORK/"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
    --web.listen-address="127.0.0.1:$PROM" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

for _ in $(seq 120); do
    .venv/bin/embedding-client --target "127.0.0.1:$GRPC" --timeout 1 health >/dev/null 2>&1 && break
    sleep 0.5
done
log "sending Lookup and LookupDense traffic for 75 s (demo table 100,000 x 128, batches of 64)"
"$PY" - "$GRPC" <<'PY'
import sys, time
import numpy as np
from embedding_client import EmbeddingClient
rng = np.random.default_rng(0)
with EmbeddingClient(f"127.0.0.1:{sys.argv[1]}") as client:
    end = time.monotonic() + 75
    while time.monotonic() < end:
        ids = rng.integers(0, 100_000, size=64)
        for _ in range(20):
            client.lookup(ids)
        client.lookup_dense(ids)
PY

expr() { "$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
# In microseconds: the graph's axis labels garble sub-second values ("0.49999999m").
q() { echo "1e6 * histogram_quantile(0.99, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{job=\"embedding-server\", grpc_method=\"$1\", grpc_code=\"OK\"}[1m])))"; }
URL="http://127.0.0.1:$PROM/graph?g0.expr=$(expr "$(q Lookup)")&g0.tab=0&g0.range_input=2m&g1.expr=$(expr "$(q LookupDense)")&g1.tab=0&g1.range_input=2m"
log "screenshot of $URL"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$WORK/chromium" --hide-scrollbars --window-size=1400,1500 \
    --virtual-time-budget=15000 --screenshot="$PWD/$OUT" "$URL" >"$WORK/chromium.log" 2>&1
log "wrote $OUT"
