#!/usr/bin/env bash
# Build the image with podman from a locally bootstrapped Debian base, run the server
# container, check it through its own HEALTHCHECK, look up rows with the Python client
# from the host, and see a host Prometheus scrape it. Loopback only; cleans up after itself.
#
#   docker/smoke.sh            (make smoke)
#
# No Docker engine runs on our machines and no registry is reachable, so the base image
# is debootstrapped and imported, and torch's CPU wheel comes from a host wheelhouse.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/docker/.smoke
VENV_PY=$ROOT/.venv/bin/python
BASE=localhost/embedding-base:bookworm
IMAGE=localhost/embedding-server:smoke
NAME=embedding-smoke-$$
log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() { log "SKIPPED: $*"; exit 0; }

for tool in podman runc debootstrap prometheus; do
    command -v "$tool" >/dev/null || skip "$tool is not installed (apt-get install podman runc debootstrap prometheus)"
done
[ -x "$VENV_PY" ] || skip ".venv is missing: run make venv first"
mkdir -p "$WORK"
# Podman's default ulimits cannot be applied inside our sandbox.
printf '[containers]\ndefault_ulimits = []\n' > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
PODMAN=(podman --runtime runc)
BUILD_STAGE=localhost/embedding-server:smoke-build
"${PODMAN[@]}" info >/dev/null 2>"$WORK/podman-info.err" \
    || skip "podman is not usable here: $(tail -n 1 "$WORK/podman-info.err")"

if ! "${PODMAN[@]}" image exists "$BASE"; then
    if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
        log "debootstrapping Debian bookworm (minbase + python3) into docker/.smoke/rootfs"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    fi
    log "importing the rootfs as $BASE"
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
fi

log "filling the wheelhouse docker/wheels/ (torch's CPU wheel, no CUDA download)"
"$VENV_PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --require-hashes -d docker/wheels -r requirements/server.txt >"$WORK/wheels.log" 2>&1 \
    || { tail -n 20 "$WORK/wheels.log"; exit 1; }

log "building $IMAGE (BASE_IMAGE=$BASE)"
started=$SECONDS
: >"$WORK/build.log"
# The build stage gets a name of its own (the next build's cache), so that what a rebuild
# leaves behind (the previous image and build stage, untagged) can be pruned by name.
for target in "--target build -t $BUILD_STAGE" "-t $IMAGE"; do
    # shellcheck disable=SC2086
    "${PODMAN[@]}" build --network host --format docker --build-arg "BASE_IMAGE=$BASE" \
        --build-arg LOCK=requirements/server.txt $target \
        -f docker/Dockerfile . >>"$WORK/build.log" 2>&1 \
        || { tail -n 30 "$WORK/build.log"; exit 1; }
done
log "built in $((SECONDS - started)) s: $("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
pruned=$("${PODMAN[@]}" image prune -f 2>/dev/null | wc -l)
log "removed $pruned untagged images earlier builds left; kept $IMAGE and its build stage $BUILD_STAGE (podman rmi them to free the disk)"

free_port() { "$VENV_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC_PORT=$(free_port); METRICS_PORT=$(free_port); PROM_PORT=$(free_port)
mkdir -p "$WORK/tables"
"$VENV_PY" -c "import numpy as np; np.save('$WORK/tables/smoke.npy', np.random.default_rng(7).standard_normal((1000, 24), dtype=np.float32))"
chmod -R a+rX "$WORK/tables"

cleanup() {
    "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    [ -n "${PROM_PID:-}" ] && kill "$PROM_PID" 2>/dev/null || true
}
trap cleanup EXIT

log "starting container $NAME (gRPC 127.0.0.1:$GRPC_PORT, metrics :$METRICS_PORT)"
"${PODMAN[@]}" run -d --name "$NAME" --network host \
    -e EMBEDDING_HOST=127.0.0.1 -e EMBEDDING_PORT="$GRPC_PORT" \
    -e EMBEDDING_METRICS_HOST=127.0.0.1 -e EMBEDDING_METRICS_PORT="$METRICS_PORT" \
    -e EMBEDDING_DEVICE=cpu -e EMBEDDING_TABLES=smoke=/tables/smoke.npy \
    -v "$WORK/tables:/tables:ro" "$IMAGE" >/dev/null

log "waiting for the image's HEALTHCHECK (podman healthcheck run)"
for _ in $(seq 60); do
    if "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then healthy=1; break; fi
    sleep 1
done
[ "${healthy:-}" = 1 ] || { "${PODMAN[@]}" logs "$NAME" | tail -n 20; log "FAILED: never healthy"; exit 1; }
log "healthy: $("${PODMAN[@]}" inspect "$NAME" --format '{{.State.Health.Status}}' 2>/dev/null || echo ok)"
log "container user: $("${PODMAN[@]}" exec "$NAME" id -un), tables mount read-only: $("${PODMAN[@]}" exec "$NAME" sh -c 'touch /tables/x 2>/dev/null && echo NO || echo yes')"

log "lookup from the host through the Python client"
"$VENV_PY" - "$GRPC_PORT" "$WORK/tables/smoke.npy" <<'PY'
import sys
import numpy as np
from embedding_client import EmbeddingClient
port, path = sys.argv[1], sys.argv[2]
table = np.load(path)
ids = np.array([[0, 999], [17, 17]])
with EmbeddingClient(f"127.0.0.1:{port}") as client:
    (info,) = client.tables()
    vectors = client.lookup(ids)
    dense = client.lookup_dense(ids)
assert np.array_equal(vectors, table[ids]) and dense.tobytes() == vectors.tobytes()
print(f"  table {info.name}: {info.rows} x {info.dim} {info.dtype} on {info.device}; "
      f"lookup {list(ids.shape)} -> {list(vectors.shape)} equals numpy, dense path identical")
PY

log "Prometheus (host binary) scraping the container with docker/prometheus/*.yml"
sed "s/embedding-server:8000/127.0.0.1:$METRICS_PORT/" docker/prometheus/prometheus.yml >"$WORK/prometheus.yml"
cp docker/prometheus/alerts.yml "$WORK/alerts.yml"
rm -rf "$WORK/prom-data"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
for _ in $(seq 60); do
    up=$(curl -s "http://127.0.0.1:$PROM_PORT/api/v1/query?query=up%7Bjob%3D%22embedding-server%22%7D" \
        | "$VENV_PY" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null || true)
    [ "$up" = 1 ] && break
    sleep 1
done
[ "$up" = 1 ] || { log "FAILED: Prometheus never saw the target up"; exit 1; }
log "Prometheus target up=1"
log "stopping the container (SIGTERM, graceful)"
"${PODMAN[@]}" stop -t 20 "$NAME" >/dev/null
log "exit code $("${PODMAN[@]}" inspect "$NAME" --format '{{.State.ExitCode}}'); last log line: $("${PODMAN[@]}" logs "$NAME" 2>&1 | tail -n 1)"
log "PASSED"
