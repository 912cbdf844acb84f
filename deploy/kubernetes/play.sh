#!/usr/bin/env bash
# Run the Kubernetes manifests for real with `podman kube play`: 2 shards x 2 replicas of
# the server image on the update log's Redis, a ShardedClient from the host checked
# against numpy, rows updated through the log and read back on every pod at the same
# update_seq, one pod killed under load (no failed call), both replicas of the other shard
# stopped and started again one after the other under a plain grpc client with no retry
# policy (no failed call, every pod exits 0, each restarted pod replays the log: the
# updated rows at the same update_seq), then `podman kube down`. Loopback only; cleans up.
#
#   deploy/kubernetes/play.sh        (make kube-play; builds the image with docker/smoke.sh
#                                     when it is missing)
#
# podman has no Services, DNS or PodDisruptionBudgets, and here runs pods on the host
# network: the manifests are played as generate.py writes them except that each replica
# becomes a one-pod Deployment with its own ports (two pods cannot both listen on 50051
# of one host), Services, budgets and the network policy are left out, the client is
# given the pods' addresses instead of the headless Services' names, and the Redis
# StatefulSet (podman 4.3 plays none) becomes a one-pod Deployment on a port of its own,
# its claim template a named volume, running as its image's own user (Redis from Debian's
# package: docker/redis/Dockerfile, as no registry is reachable here).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=$ROOT/deploy/kubernetes/.play
VENV_PY=$ROOT/.venv/bin/python
IMAGE=localhost/embedding-server:smoke
REDIS_IMAGE=localhost/embedding-redis:compose
BASE=localhost/embedding-base:bookworm
VOLUME=embedding-tables
REDIS_VOLUME=embedding-redis-data
export ADMIN_TOKEN=kube-play-admin-$$
log() { printf '[kube-play %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
skip() { log "SKIPPED: $*"; exit 0; }

for tool in podman runc catatonit; do
    command -v "$tool" >/dev/null || [ -x "/usr/libexec/podman/$tool" ] \
        || skip "$tool is not installed (apt-get install podman runc catatonit debootstrap)"
done
[ -x "$VENV_PY" ] || skip ".venv is missing: run make venv first"
mkdir -p "$WORK"
printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > "$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
podman info >/dev/null 2>"$WORK/podman-info.err" \
    || skip "podman is not usable here: $(tail -n 1 "$WORK/podman-info.err")"
if ! podman image exists "$IMAGE"; then
    log "no $IMAGE yet: building it with docker/smoke.sh"
    docker/smoke.sh
    podman image exists "$IMAGE" || skip "docker/smoke.sh did not build $IMAGE (see above)"
fi
if ! podman image exists "$REDIS_IMAGE"; then
    log "building $REDIS_IMAGE (Debian's redis-server on $BASE)"
    podman build --network host --build-arg "BASE_IMAGE=$BASE" -t "$REDIS_IMAGE" \
        -f docker/redis/Dockerfile docker/redis >"$WORK/redis-build.log" 2>&1 \
        || { tail -n 20 "$WORK/redis-build.log"; exit 1; }
fi

log "tables: one 20,000 x 32 float32 table in the podman volume $VOLUME"
rm -rf "$WORK/tables" && mkdir -p "$WORK/tables"
"$VENV_PY" -c "import numpy as np; np.save('$WORK/tables/ads.npy', np.random.default_rng(5).standard_normal((20000, 32), dtype=np.float32))"
chmod -R a+rX "$WORK/tables"
podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
podman volume create "$VOLUME" >/dev/null
podman volume rm -f "$REDIS_VOLUME" >/dev/null 2>&1 || true
podman volume create "$REDIS_VOLUME" >/dev/null
tar -C "$WORK/tables" -c . | podman volume import "$VOLUME" -

log "manifests: deploy/kubernetes/generate.py --shards 2 --replicas 2, as podman plays them"
PORTS=$("$VENV_PY" - "$WORK" "$IMAGE" "$REDIS_IMAGE" "$REDIS_VOLUME" <<'PY'
import os, socket, subprocess, sys
from pathlib import Path
import yaml

work, image, redis_image, redis_volume = Path(sys.argv[1]), *sys.argv[2:]
text = subprocess.run(
    [sys.executable, "deploy/kubernetes/generate.py", "--shards", "2", "--replicas", "2",
     "--no-gpu", "--device", "cpu", "--image", image, "--table", "ads=ads.npy",
     "--cpu", "250m", "--memory", "1Gi", "--redis-image", redis_image,
     "--redis-memory", "256Mi", "--admin-secret", "embedding-admin",
     # Shorter than the defaults (5, 30, 40 s: a stop then takes ~35 s) to keep CI quick.
     "--drain-delay", "1", "--connection-max-age", "2", "--grace", "10"],
    check=True, capture_output=True, text=True).stdout

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

redis_port = free_port()
played, ports = [], []
for item in yaml.safe_load_all(text):
    if item["kind"] in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        continue  # podman has none of them
    if item["kind"] == "StatefulSet":  # the update log's Redis, as one pod
        spec = item["spec"]
        pod = spec["template"]["spec"]
        pod.pop("securityContext")  # fsGroup: the Debian image's redis user owns /data
        container = pod["containers"][0]
        container["securityContext"].pop("runAsUser")
        container.pop("ports")
        command = container["command"]
        command[command.index("--port") + 1] = str(redis_port)
        command += ["--bind", "127.0.0.1"]
        (claim,) = spec.pop("volumeClaimTemplates")
        pod["volumes"] = [{"name": claim["metadata"]["name"],
                           "persistentVolumeClaim": {"claimName": redis_volume}}]
        del spec["serviceName"]
        item["kind"] = "Deployment"
        played.append(item)
        continue
    if item["kind"] != "Deployment":
        played.append(item)
        continue
    for replica in range(item["spec"]["replicas"]):
        free = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0)); free.append(s.getsockname()[1])
        name = f"{item['metadata']['name']}-{replica}"
        copy = yaml.safe_load(yaml.safe_dump(item))
        copy["metadata"]["name"] = name
        copy["spec"]["replicas"] = 1
        container = copy["spec"]["template"]["spec"]["containers"][0]
        here = [{"name": "EMBEDDING_HOST", "value": "127.0.0.1"},
                {"name": "EMBEDDING_PORT", "value": str(free[0])},
                {"name": "EMBEDDING_METRICS_HOST", "value": "127.0.0.1"},
                {"name": "EMBEDDING_METRICS_PORT", "value": str(free[1])},
                {"name": "EMBEDDING_UPDATE_LOG", "value": f"redis://127.0.0.1:{redis_port}/0"},
                # the Secret's value (podman 4.3 reads Kubernetes Secrets only as its own)
                {"name": "EMBEDDING_ADMIN_TOKENS", "value": os.environ["ADMIN_TOKEN"]}]
        names = {e["name"] for e in here}
        container["env"] = [e for e in container["env"] if e["name"] not in names] + here
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            container[probe]["grpc"]["port"] = free[0]
        container.pop("ports")  # port mappings need a bridge network; host network here
        shard = container["env"][0]["value"].split("/")[0]
        ports.append(f"{shard}:{free[0]}:{name}")
        played.append(copy)
(work / "played.yaml").write_text(yaml.safe_dump_all(played, sort_keys=False))
print(" ".join(ports))
PY
)
log "pods (shard:port:name): $PORTS"

cleanup() {
    podman kube down "$WORK/played.yaml" >/dev/null 2>&1 || true
    # podman plays an emptyDir as a named volume ("scratch"), shared by the pods.
    podman volume rm -f "$VOLUME" "$REDIS_VOLUME" scratch >/dev/null 2>&1 || true
}
trap cleanup EXIT
podman kube play --network host "$WORK/played.yaml" >"$WORK/play.log" 2>&1 \
    || { tail -n 20 "$WORK/play.log"; log "FAILED: podman kube play"; exit 1; }
log "played: $(podman pod ps --format '{{.Name}} {{.Status}}' | tr '\n' ';')"

log "driving a ShardedClient at the pods, killing one pod under load"
"$VENV_PY" - "$WORK/tables/ads.npy" $PORTS <<'PY'
import os, subprocess, sys, threading, time
import numpy as np
from embedding_client import EmbeddingClient, EmbeddingError, Security
from embedding_client.sharded import ShardedClient
from embedding_client.shards import shard_of

# The servers hold admin tokens only: every call needs one (data calls included).
admin = Security(token=os.environ["ADMIN_TOKEN"])

table = np.load(sys.argv[1])
pods = [p.split(":") for p in sys.argv[2:]]
shards: dict[int, list[str]] = {}
for shard, port, _ in pods:
    shards.setdefault(int(shard), []).append(f"127.0.0.1:{port}")
deadline = time.monotonic() + 180
for _, port, name in pods:
    with EmbeddingClient(f"127.0.0.1:{port}", timeout=2, max_attempts=1, security=admin) as probe:
        while True:
            try:
                if probe.health() == "SERVING":
                    break
            except EmbeddingError:
                pass
            if time.monotonic() > deadline:
                logs = subprocess.run(["podman", "logs", "--tail", "20", f"{name}-pod-0-server"],
                                      capture_output=True, text=True)
                sys.exit(f"{name} never SERVING:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)
print("  every pod SERVING through grpc.health.v1", flush=True)
shard_map = [shards[s] for s in sorted(shards)]
rng = np.random.default_rng(0)
calls = failures = wrong = 0
stop = threading.Event()
with ShardedClient(shard_map, timeout=20, security=admin) as client:
    info = {t.name: t for t in client.tables()}["ads"]
    print(f"  table ads: {info.rows} rows of dim {info.dim} over {len(shard_map)} shards")
    assert info.update_log, "the pods are not on the update log"
    ids = rng.integers(0, 20000, (8, 16))
    assert np.array_equal(client.lookup(ids, "ads"), table[ids])
    assert np.allclose(client.lookup(ids, "ads", pooling="mean"), table[ids].mean(axis=1), atol=1e-6)

    # Updates through the log: each sent to one replica per shard, applied by all.
    for round in range(1, 4):
        changed = rng.choice(20000, 40, replace=False)
        table[changed] = rng.standard_normal((40, 32), dtype=np.float32)
        answers = client.update_rows(changed, table[changed], "ads")
    wanted = {a.shard: a.update_seq for a in answers}
    assert sorted(wanted.values()) == [3, 3], wanted
    for shard, port, name in pods:
        with EmbeddingClient(f"127.0.0.1:{port}", timeout=10, security=admin) as one:
            held = np.arange(20000)[shard_of(np.arange(20000), 2) == int(shard)]
            got = one.lookup_result(held, "ads", min_update_seq=3)
            assert got.update_seq == 3 and np.array_equal(got.vectors, table[held]), name
    print("  3 rounds of 40 rows updated through the log: every pod holds them at update_seq 3",
          flush=True)

    def load() -> None:
        global calls, failures, wrong
        local = np.random.default_rng(1)
        while not stop.is_set():
            batch = local.integers(0, 20000, 256)
            try:
                wrong += not np.array_equal(client.lookup(batch, "ads"), table[batch])
            except EmbeddingError as exc:
                failures += 1
                print("  failed:", exc)
            calls += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(2)
        victim = pods[0][2]
        subprocess.run(["podman", "pod", "kill", f"{victim}-pod-0"], check=True,
                       capture_output=True)
        print(f"  killed pod {victim}-pod-0 (SIGKILL) after {calls} calls", flush=True)
        time.sleep(3)
    finally:
        stop.set()
        thread.join(timeout=30)
    print(f"  {calls} calls, {failures} failed, {wrong} wrong; failovers per shard: "
          f"{[s['failovers'] for s in client.stats()]}")
    assert calls > 20 and failures == 0 and wrong == 0

# A rolling restart of shard 1 under a client we did not write: a plain grpc channel,
# round_robin over both replicas, no retry policy (grpc resends only what no server saw).
import collections
import grpc
from embedding_client.proto import embedding_pb2 as pb, embedding_pb2_grpc as pb_grpc

replicas = [(port, name) for shard, port, name in pods if shard == "1"]
channel = grpc.insecure_channel("ipv4:" + ",".join(f"127.0.0.1:{p}" for p, _ in replicas),
                                options=[("grpc.lb_policy_name", "round_robin")])
lookup = pb_grpc.EmbeddingServiceStub(channel).Lookup
mine = np.arange(20000)[shard_of(np.arange(20000), 2) == 1]
outcomes: collections.Counter = collections.Counter()
stop.clear()

def plain_load(seed: int) -> None:
    local = np.random.default_rng(seed)
    while not stop.is_set():
        ids = local.choice(mine, 64)
        try:
            answer = lookup(pb.LookupRequest(table="ads", ids=ids.astype("<i8").tobytes()),
                            timeout=20, metadata=(("authorization", f"Bearer {admin.token}"),))
            got = np.frombuffer(answer.vectors, "<f4").reshape(64, -1)
            outcomes["OK" if np.array_equal(got, table[ids]) else "WRONG"] += 1
        except grpc.RpcError as exc:
            outcomes[f"{exc.code().name}: {exc.details()}"] += 1

threads = [threading.Thread(target=plain_load, args=(seed,)) for seed in range(8)]
for thread in threads:
    thread.start()
try:
    for port, name in replicas:
        time.sleep(2)
        subprocess.run(["podman", "pod", "stop", "-t", "30", f"{name}-pod-0"], check=True,
                       capture_output=True)
        code = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}",
                               f"{name}-pod-0-server"], capture_output=True, text=True).stdout
        print(f"  stopped pod {name}-pod-0 (SIGTERM): exit status {code.strip()}", flush=True)
        assert code.strip() == "0", code
        subprocess.run(["podman", "pod", "start", f"{name}-pod-0"], check=True,
                       capture_output=True)
        with EmbeddingClient(f"127.0.0.1:{port}", timeout=2, max_attempts=1,
                             security=admin) as probe:
            until = time.monotonic() + 120
            while time.monotonic() < until:
                try:
                    if probe.health() == "SERVING":
                        break
                except EmbeddingError:
                    pass
                time.sleep(0.3)
            else:
                sys.exit(f"{name} never SERVING again")
            got = probe.lookup_result(mine, "ads", timeout=10)
        # SERVING only once caught up: the log replayed over the file
        assert got.update_seq == 3 and np.array_equal(got.vectors, table[mine]), name
        print(f"  started pod {name}-pod-0 again: SERVING, the log replayed (update_seq 3)",
              flush=True)
    time.sleep(2)
finally:
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    channel.close()
failed = {k: v for k, v in outcomes.items() if k != "OK"}
print(f"  rolling restart of shard 1: {outcomes['OK']} calls OK, failed: {failed or 'none'}")
assert outcomes["OK"] > 100 and not failed
PY
log "podman kube down"
podman kube down "$WORK/played.yaml" >/dev/null 2>&1
trap - EXIT
podman volume rm -f "$VOLUME" "$REDIS_VOLUME" scratch >/dev/null
log "PASSED"
