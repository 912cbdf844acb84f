#!/usr/bin/env bash
# Run docker/docker-compose.yml itself with podman-compose: Redis, the server and
# Prometheus (Redis and Prometheus built locally from Debian's packages), the server
# healthy through its HEALTHCHECK, a lookup through the published port, an update through
# the update log surviving a restart of the server container, Prometheus scraping it by
# its compose service name, then `down`. Loopback ports only; cleans up after itself.
#
#   docker/compose-smoke.sh        (make compose-smoke; builds the server image with
#                                   docker/smoke.sh when it is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/docker/.compose
VENV_PY=$ROOT/.venv/bin/python
BASE=localhost/embedding-base:bookworm
SERVER_IMAGE=localhost/embedding-server:smoke
PROM_IMAGE=localhost/embedding-prometheus:compose
REDIS_IMAGE=localhost/embedding-redis:compose
PROJECT=embedding-compose-$$
log() { printf '[compose %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() { log "SKIPPED: $*"; exit 0; }

command -v podman >/dev/null || skip "podman is not installed (apt-get install podman runc)"
[ -x "$VENV_PY" ] || skip ".venv is missing: run make venv first"
# PyPI's podman-compose (the dev extra): Debian's 1.0.3 leaves ${VAR:-} unexpanded.
PODMAN_COMPOSE=$ROOT/.venv/bin/podman-compose
[ -x "$PODMAN_COMPOSE" ] || skip "podman-compose is not in .venv (pip install podman-compose)"
mkdir -p "$WORK"
printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
podman info >/dev/null 2>"$WORK/podman-info.err" \
    || skip "podman is not usable here: $(tail -n 1 "$WORK/podman-info.err")"
if ! podman image exists "$SERVER_IMAGE"; then
    log "no $SERVER_IMAGE yet: building it with docker/smoke.sh"
    docker/smoke.sh
    podman image exists "$SERVER_IMAGE" || skip "docker/smoke.sh did not build $SERVER_IMAGE (see above)"
fi
log "building $PROM_IMAGE (Debian's prometheus on $BASE)"
podman build --network host --build-arg "BASE_IMAGE=$BASE" -t "$PROM_IMAGE" \
    -f docker/prometheus/Dockerfile docker/prometheus >"$WORK/prometheus-build.log" 2>&1 \
    || { tail -n 20 "$WORK/prometheus-build.log"; exit 1; }
log "building $REDIS_IMAGE (Debian's redis-server on $BASE)"
podman build --network host --build-arg "BASE_IMAGE=$BASE" -t "$REDIS_IMAGE" \
    -f docker/redis/Dockerfile docker/redis >"$WORK/redis-build.log" 2>&1 \
    || { tail -n 20 "$WORK/redis-build.log"; exit 1; }

free_port() { "$VENV_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export EMBEDDING_GRPC_PORT=$(free_port) EMBEDDING_METRICS_PUBLISH_PORT=$(free_port) PROMETHEUS_PORT=$(free_port)
export EMBEDDING_TABLES_DIR=$WORK/tables EMBEDDING_TABLES=compose=/tables/compose.npy
export EMBEDDING_ADMIN_TOKENS=compose-admin-$$
rm -rf "$EMBEDDING_TABLES_DIR" && mkdir -p "$EMBEDDING_TABLES_DIR"
"$VENV_PY" -c "import numpy as np; np.save('$EMBEDDING_TABLES_DIR/compose.npy', np.random.default_rng(3).standard_normal((500, 16), dtype=np.float32))"
chmod -R a+rX "$EMBEDDING_TABLES_DIR"
COMPOSE=("$PODMAN_COMPOSE" -p "$PROJECT" -f docker/docker-compose.yml -f docker/docker-compose.cpu.yml
         -f docker/docker-compose.podman.yml)

cleanup() { "${COMPOSE[@]}" down -v >"$WORK/down.log" 2>&1 || true; }
trap cleanup EXIT
log "podman-compose up: redis, embedding-server and prometheus (project $PROJECT)"
"${COMPOSE[@]}" up -d redis embedding-server prometheus >"$WORK/up.log" 2>&1 \
    || { tail -n 30 "$WORK/up.log"; log "FAILED: podman-compose up"; exit 1; }
SERVER=${PROJECT}_embedding-server_1
wait_healthy() {
    log "waiting for the server's HEALTHCHECK"
    healthy=
    for _ in $(seq 90); do
        if podman healthcheck run "$SERVER" >/dev/null 2>&1; then healthy=1; break; fi
        sleep 1
    done
    [ "$healthy" = 1 ] || { podman logs "$SERVER" 2>&1 | tail -n 20; log "FAILED: never healthy"; exit 1; }
}
wait_healthy
log "healthy; a lookup through the published port, and an update through the log"
"$VENV_PY" - "$EMBEDDING_GRPC_PORT" "$EMBEDDING_TABLES_DIR/compose.npy" <<'PY'
import os, sys
import numpy as np
from embedding_client import EmbeddingClient, Security
port, path = sys.argv[1], sys.argv[2]
table = np.load(path)
admin = Security(token=os.environ["EMBEDDING_ADMIN_TOKENS"])
with EmbeddingClient(f"127.0.0.1:{port}", security=admin) as client:
    assert np.array_equal(client.lookup([[1, 499], [7, 7]], "compose"), table[[[1, 499], [7, 7]]])
    info = {t.name: t for t in client.tables()}["compose"]
    assert info.update_log, "the compose server is not on the update log"
    seq = client.update_rows([7], np.full((1, 16), 0.5, np.float32), "compose").update_seq
    assert seq == 1, seq
print("  lookup equals numpy; update 1 appended to redis://redis:6379/0")
PY
log "restarting the server container: it replays the log over its file"
podman restart "$SERVER" >/dev/null 2>"$WORK/restart.log"  # (podman's systemd timer lines)
wait_healthy
"$VENV_PY" - "$EMBEDDING_GRPC_PORT" "$EMBEDDING_TABLES_DIR/compose.npy" <<'PY'
import os, sys
import numpy as np
from embedding_client import EmbeddingClient, Security
port, path = sys.argv[1], sys.argv[2]
table = np.load(path)
admin = Security(token=os.environ["EMBEDDING_ADMIN_TOKENS"])  # with admin tokens only, data calls need one too
with EmbeddingClient(f"127.0.0.1:{port}", security=admin) as client:
    got = client.lookup_result([6, 7], "compose", min_update_seq=1, timeout=10)
assert got.update_seq == 1, got.update_seq
assert np.array_equal(got.vectors[0], table[6]) and np.all(got.vectors[1] == 0.5)
print("  after the restart: update_seq 1, the updated row kept")
PY
log "Prometheus scraping embedding-server:8000 by its compose name"
for _ in $(seq 90); do
    up=$(curl -s "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=up%7Bjob%3D%22embedding-server%22%7D" \
        | "$VENV_PY" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null || true)
    [ "$up" = 1 ] && break
    sleep 1
done
[ "$up" = 1 ] || { podman logs "${PROJECT}_prometheus_1" 2>&1 | tail -n 20; log "FAILED: target never up"; exit 1; }
rules=$(curl -s "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/rules" | "$VENV_PY" -c 'import json,sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
log "target up=1; $rules alerting rules loaded from docker/prometheus/alerts.yml"
log "podman-compose down"
"${COMPOSE[@]}" down -v >"$WORK/down.log" 2>&1
trap - EXIT
log "PASSED"
