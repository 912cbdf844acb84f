"""Kubernetes manifests for N shards x R replicas of the embedding server.

    python deploy/kubernetes/generate.py --shards 2 --replicas 2 > embedding.yaml
    kubectl apply -f embedding.yaml

Per shard I: a Deployment `embedding-shard-I` of R pods started with `--shard I/N`
(rolling updates never take a ready pod away first: maxUnavailable 0), a headless
Service of the same name (its DNS name resolves to every ready replica: clients use
`dns:///embedding-shard-I:50051`, gRPC balances round-robin), and a
PodDisruptionBudget keeping all but one replica through node drains. Every pod reads
the tables from one read-only volume (a PersistentVolumeClaim), named in a ConfigMap of
`tables.toml`, and is probed through grpc.health.v1. The ConfigMap
`embedding-shard-map` holds the shard map clients pass to `ShardedClient`.

Row updates go through an update log every replica applies in order (--update-log): by
default a one-pod Redis StatefulSet `embedding-redis` (append-only file on its own
PersistentVolumeClaim, reachable only from the shard servers: a NetworkPolicy), or an
existing Redis named by URL, or none (each replica keeps its own updates in memory).
Updates need an admin token: --admin-secret names a Secret whose key `tokens` holds them.

A pod told to stop (a rolling update, a drain) turns NOT_SERVING and keeps serving for
the drain delay while Kubernetes takes it out of its Service's endpoints, then refuses
new connections and waits for its clients to leave: each connection is asked to go
(HTTP/2 GOAWAY) at its max age, and the client re-resolves the Service's name and
reconnects to the other replicas by itself, with no failed call. The pod's
terminationGracePeriodSeconds covers the drain delay, the grace and a margin, so that
Kubernetes never kills a pod still draining.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import yaml

APP = "embedding"
GRPC_PORT = 50051
METRICS_PORT = 8000
REDIS_PORT = 6379
REDIS_NAME = f"{APP}-redis"
# The Redis image's own user (redis:7 images run as uid 999).
REDIS_UID = 999
# Append-only file on, fsync every second, no RDB dumps, data in the claim's /data.
REDIS_FLAGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
               "--dir", "/data", "--protected-mode", "no")  # fmt: skip
# The server's stop: --drain-delay, --connection-max-age and --grace (> 1.1 x the age:
# every connection reaches its age, with its +-10% jitter, before the grace ends).
DRAIN_DELAY_S = 5
CONNECTION_AGE_S = 30
GRACE_S = 40
KILL_MARGIN_S = 5  # Kubernetes' SIGKILL comes this long after the server's own deadline


def _labels(shard: int | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "shard-server"}
    if shard is not None:
        labels["embedding.dev/shard"] = str(shard)
    return labels


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": GRPC_PORT}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 3}  # fmt: skip


def _server_args(args: argparse.Namespace) -> list[str]:
    flags = {"--drain-delay": args.drain_delay, "--connection-max-age": args.connection_max_age,
             "--grace": args.grace}  # fmt: skip
    return ["--config", "/etc/embedding/tables.toml",
            *(item for flag, value in flags.items() for item in (flag, f"{value:g}"))]  # fmt: skip


def deployment(shard: int, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"{APP}-shard-{shard}"
    container = {
        "name": "server",
        "image": args.image,
        "args": _server_args(args),
        "env": [
            {"name": "EMBEDDING_SHARD", "value": f"{shard}/{shards}"},
            {"name": "EMBEDDING_DEVICE", "value": args.device},
            # Prometheus scrapes the pod's address (the server's default is loopback only).
            {"name": "EMBEDDING_METRICS_HOST", "value": "0.0.0.0"},
            *_update_log_env(args),
        ],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        # Loading a big table takes minutes: liveness waits until the first SERVING.
        "startupProbe": _probe(period=5, failures=120),
        "readinessProbe": _probe(period=5, failures=2),
        "livenessProbe": _probe(period=10, failures=6),
        "resources": {
            "requests": {"cpu": args.cpu, "memory": args.memory},
            "limits": {"memory": args.memory, **({"nvidia.com/gpu": 1} if args.gpu else {})},
        },
        "volumeMounts": [
            {"name": "tables", "mountPath": "/tables", "readOnly": True},
            {"name": "config", "mountPath": "/etc/embedding", "readOnly": True},
            {"name": "scratch", "mountPath": "/tmp"},  # the root file system is read-only
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if args.gpu:
        container["resources"]["requests"]["nvidia.com/gpu"] = 1
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": _labels(shard)},
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": _labels(shard)},
            # A new pod is ready before an old one goes: the shard never loses a replica.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": _labels(shard),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": math.ceil(
                        args.drain_delay + args.grace + KILL_MARGIN_S
                    ),
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "tables",
                            "persistentVolumeClaim": {
                                "claimName": args.tables_claim,
                                "readOnly": True,
                            },
                        },
                        {"name": "config", "configMap": {"name": f"{APP}-tables"}},
                        {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
                    ],
                },
            },
        },
    }


def update_log_url(args: argparse.Namespace) -> str:
    """The servers' --update-log: the StatefulSet's pod by its stable name, a given URL,
    or "" for none."""
    if args.update_log == "none":
        return ""
    if args.update_log == "statefulset":
        return f"redis://{REDIS_NAME}-0.{REDIS_NAME}:{REDIS_PORT}/0"
    return str(args.update_log)


def _update_log_env(args: argparse.Namespace) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if url := update_log_url(args):
        env.append({"name": "EMBEDDING_UPDATE_LOG", "value": url})
    if args.admin_secret:
        env.append({"name": "EMBEDDING_ADMIN_TOKENS", "valueFrom": {"secretKeyRef": {
            "name": args.admin_secret, "key": "tokens"}}})  # fmt: skip
    return env


def redis_objects(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The update log's Redis: a headless Service (its pod's stable DNS name), a
    NetworkPolicy letting only the shard servers reach it, and a one-pod StatefulSet
    with the append-only file on a PersistentVolumeClaim of its own."""
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "update-log"}
    ping = {"exec": {"command": ["redis-cli", "ping"]}, "timeoutSeconds": 3}
    container = {
        "name": "redis",
        "image": args.redis_image,
        "command": ["redis-server", *REDIS_FLAGS, "--port", str(REDIS_PORT)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {**ping, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**ping, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {
            "requests": {"cpu": "500m", "memory": args.redis_memory},
            "limits": {"memory": args.redis_memory},
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": REDIS_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": REDIS_NAME, "labels": labels},
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": REDIS_NAME, "labels": labels},
            "spec": {
                "podSelector": {"matchLabels": labels},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": _labels()}}],
                        "ports": [{"protocol": "TCP", "port": REDIS_PORT}],
                    }
                ],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": REDIS_NAME, "labels": labels},
            "spec": {
                "serviceName": REDIS_NAME,
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": {"fsGroup": REDIS_UID},
                        "containers": [container],
                    },
                },
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "data"},
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": args.redis_storage}},
                        },
                    }
                ],
            },
        },
    ]


def service(shard: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{APP}-shard-{shard}", "labels": _labels(shard)},
        "spec": {
            "clusterIP": "None",  # headless: the name resolves to every ready replica
            "selector": _labels(shard),
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


def disruption_budget(shard: int) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{APP}-shard-{shard}", "labels": _labels(shard)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(shard)}},
    }


def config_maps(shards: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    tables = []
    for spec in args.table:
        name, _, path = spec.partition("=")
        tables.append(f'[[table]]\nname = "{name}"\nsource = "/tables/{path}"\n')
    shard_map = ";".join(f"dns:///{APP}-shard-{s}:{GRPC_PORT}" for s in range(shards))
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{APP}-tables", "labels": _labels()},
            "data": {"tables.toml": "\n".join(tables)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{APP}-shard-map", "labels": _labels()},
            # embedding_client.sharded.ShardMap.parse reads this text.
            "data": {"shard-map": shard_map},
        },
    ]


def manifests(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every object, in the order `kubectl apply` creates them."""
    objects = config_maps(args.shards, args)
    if args.update_log == "statefulset":
        objects += redis_objects(args)
    for shard in range(args.shards):
        objects += [service(shard), disruption_budget(shard), deployment(shard, args.shards, args)]
    return objects


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=2, help="N: shards of every table")
    p.add_argument("--replicas", type=int, default=2, help="R: pods serving each shard")
    p.add_argument("--image", default="embedding-server:latest")
    p.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a table file on the tables volume (repeatable; default demo=demo.npy)",
    )
    p.add_argument(
        "--tables-claim",
        default="embedding-tables",
        help="PersistentVolumeClaim holding the table files (ReadOnlyMany)",
    )
    p.add_argument("--device", default="auto", help="the server's --device")
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for one nvidia.com/gpu per pod",
    )
    p.add_argument(
        "--drain-delay",
        type=float,
        default=DRAIN_DELAY_S,
        help="the server's --drain-delay, seconds",
    )
    p.add_argument(
        "--connection-max-age",
        type=float,
        default=CONNECTION_AGE_S,
        help="the server's --connection-max-age, seconds",
    )
    p.add_argument("--grace", type=float, default=GRACE_S, help="the server's --grace, seconds")
    p.add_argument(
        "--update-log",
        default="statefulset",
        metavar="statefulset|none|URL",
        help="the update log: a Redis StatefulSet written here (default), none, or an "
        "existing Redis (redis://HOST:PORT/DB, rediss:// for TLS)",
    )
    p.add_argument("--redis-image", default="redis:7.2-bookworm", help="the StatefulSet's image")
    p.add_argument("--redis-memory", default="2Gi", help="its memory request and limit")
    p.add_argument("--redis-storage", default="20Gi", help="its append-only file's volume")
    p.add_argument(
        "--admin-secret",
        default="",
        help="a Secret whose key `tokens` holds the admin tokens (comma-separated) that "
        "updates and reloads need (none: admin calls are off)",
    )
    p.add_argument("--cpu", default="4", help="CPU request per pod")
    p.add_argument("--memory", default="16Gi", help="memory request and limit per pod")
    return p  # fmt: skip


class _Plain(yaml.SafeDumper):
    """Writes a dict used twice out twice (no &anchors: people read these files)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.shards < 1 or args.replicas < 1:
        parser().error("--shards and --replicas must be at least 1")
    if args.grace < 1.1 * args.connection_max_age:
        parser().error(
            "--grace must be at least 1.1 x --connection-max-age, or a stop cuts "
            "off clients whose connections have not reached their age"
        )
    if args.update_log not in ("statefulset", "none") and not args.update_log.startswith(
        ("redis://", "rediss://")
    ):
        parser().error("--update-log must be statefulset, none or a redis:// URL")
    args.table = args.table or ["demo=demo.npy"]
    header = (f"# {args.shards} shards x {args.replicas} replicas of the embedding server; "
              "made by deploy/kubernetes/generate.py (edit that, not this)\n")  # fmt: skip
    sys.stdout.write(header + yaml.dump_all(manifests(args), Dumper=_Plain, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
