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
    p.add_argument("--cpu", default="4", help="CPU request per pod")
    p.add_argument("--memory", default="16Gi", help="memory request and limit per pod")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.shards < 1 or args.replicas < 1:
        parser().error("--shards and --replicas must be at least 1")
    if args.grace < 1.1 * args.connection_max_age:
        parser().error(
            "--grace must be at least 1.1 x --connection-max-age, or a stop cuts "
            "off clients whose connections have not reached their age"
        )
    args.table = args.table or ["demo=demo.npy"]
    header = (f"# {args.shards} shards x {args.replicas} replicas of the embedding server; "
              "made by deploy/kubernetes/generate.py (edit that, not this)\n")  # fmt: skip
    sys.stdout.write(header + yaml.safe_dump_all(manifests(args), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
