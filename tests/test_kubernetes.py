"""The Kubernetes manifests: generated for any N x R, valid against Kubernetes' own schemas,
and wired as the shard servers need (shard flags, probes, rolling updates, budgets)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from embedding_client.sharded import ShardMap

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "deploy" / "kubernetes" / "generate.py"
CHECKED_IN = ROOT / "deploy" / "kubernetes" / "embedding-2x2.yaml"
KUBERNETES_VERSION = "1.33.0"  # a release still supported in 2026; strict: no unknown fields


def generate(*args: str) -> str:
    result = subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                            text=True, check=True)  # fmt: skip
    return result.stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(text) if o]


def test_the_checked_in_manifests_are_the_generators() -> None:
    assert CHECKED_IN.read_text() == generate(), "run: make kubernetes"


@pytest.mark.parametrize("shards,replicas", [(2, 2), (1, 1), (4, 3)])
def test_manifests_pass_the_kubernetes_schemas(shards: int, replicas: int) -> None:
    made = objects(generate("--shards", str(shards), "--replicas", str(replicas)))
    assert len(made) == 2 + 3 + 3 * shards  # config maps, the update log's Redis, shards
    for item in made:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    broken = dict(made[-1], spec={**made[-1]["spec"], "replicas": "two"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_each_shard_is_a_deployment_a_headless_service_and_a_budget() -> None:
    made = objects(generate("--shards", "3", "--replicas", "2", "--table", "ads=ads.npy"))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in made:
        if item["metadata"]["labels"]["app.kubernetes.io/component"] == "shard-server":
            by_kind.setdefault(item["kind"], []).append(item)
    assert [len(by_kind[k]) for k in ("Deployment", "Service", "PodDisruptionBudget")] == [3] * 3
    for shard, (deploy, service, budget) in enumerate(
        zip(by_kind["Deployment"], by_kind["Service"], by_kind["PodDisruptionBudget"], strict=True)
    ):
        spec = deploy["spec"]
        pod = spec["template"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EMBEDDING_SHARD"] == f"{shard}/3"
        assert spec["replicas"] == 2
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 50051  # grpc.health.v1
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        labels = pod["metadata"]["labels"]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == labels == spec["selector"]["matchLabels"]
        assert budget["spec"]["selector"]["matchLabels"] == labels
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tables"]["readOnly"] is True
    config = {m["metadata"]["name"]: m["data"] for m in by_kind["ConfigMap"]}
    assert 'source = "/tables/ads.npy"' in config["embedding-tables"]["tables.toml"]
    shard_map = ShardMap.parse(config["embedding-shard-map"]["shard-map"])
    assert shard_map.shards == tuple((f"dns:///embedding-shard-{s}:50051",) for s in range(3))
    cpu_only = objects(generate("--no-gpu"))[-1]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_only["resources"]["limits"]


def test_a_pod_drains_within_what_kubernetes_waits_for() -> None:
    """The server's stop (drain delay, then up to the grace for clients to leave, which
    they do at their connection's max age) ends before Kubernetes' SIGKILL; a grace
    shorter than the connections' age (with its 10% jitter) is refused."""
    for extra in ((), ("--drain-delay", "2", "--connection-max-age", "10", "--grace", "12")):
        pod = objects(generate(*extra))[-1]["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        flags = {args[i]: float(args[i + 1]) for i in range(2, len(args), 2)}
        assert set(flags) == {"--drain-delay", "--connection-max-age", "--grace"}
        assert flags["--grace"] >= 1.1 * flags["--connection-max-age"]
        assert pod["terminationGracePeriodSeconds"] >= flags["--drain-delay"] + flags["--grace"] + 5
    assert flags == {"--drain-delay": 2, "--connection-max-age": 10, "--grace": 12}
    done = subprocess.run([sys.executable, str(GENERATOR), "--connection-max-age", "30",
                           "--grace", "20"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "--grace must be at least 1.1 x" in done.stderr


def test_the_update_log_is_a_redis_statefulset_only_the_shard_servers_reach() -> None:
    """By default: a one-pod Redis StatefulSet (append-only file on a claim of its own,
    non-root, probed), a headless Service giving its pod a stable name, which every
    server's EMBEDDING_UPDATE_LOG names, and a NetworkPolicy letting only the shard
    servers' pods in. An existing Redis by URL, or none, writes no Redis; the admin
    tokens come from a Secret when one is named."""
    made = objects(generate("--shards", "2", "--admin-secret", "embedding-admin"))
    redis = {o["kind"]: o for o in made if o["metadata"]["name"] == "embedding-redis"}
    assert set(redis) == {"Service", "NetworkPolicy", "StatefulSet"}
    stateful = redis["StatefulSet"]["spec"]
    pod = stateful["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["redis-server", "--appendonly", "yes"]
    assert command[command.index("--dir") + 1] == "/data"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert stateful["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert pod["containers"][0]["securityContext"]["runAsNonRoot"] is True
    assert redis["Service"]["spec"]["clusterIP"] == "None"
    assert stateful["serviceName"] == redis["Service"]["metadata"]["name"]
    assert redis["Service"]["spec"]["selector"] == stateful["template"]["metadata"]["labels"]
    policy = redis["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == stateful["template"]["metadata"]["labels"]
    servers = [o for o in made if o["kind"] == "Deployment"]
    (allowed,) = policy["ingress"][0]["from"]
    for server in servers:
        labels = server["spec"]["template"]["metadata"]["labels"]
        assert allowed["podSelector"]["matchLabels"].items() <= labels.items()
        env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
        # <statefulset>-0.<service>: the pod's own DNS name, stable across its restarts
        assert (
            env["EMBEDDING_UPDATE_LOG"]["value"]
            == "redis://embedding-redis-0.embedding-redis:6379/0"
        )
        secret = env["EMBEDDING_ADMIN_TOKENS"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "embedding-admin", "key": "tokens"}
    for other, url in (
        ("none", None),
        ("redis://log.internal:6379/2", "redis://log.internal:6379/2"),
    ):
        made = objects(generate("--update-log", other))
        assert not [o for o in made if o["metadata"]["name"] == "embedding-redis"]
        env = {
            e["name"]: e.get("value")
            for e in made[-1]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env.get("EMBEDDING_UPDATE_LOG") == url
        assert "EMBEDDING_ADMIN_TOKENS" not in env
    done = subprocess.run([sys.executable, str(GENERATOR), "--update-log", "kafka"],
                          capture_output=True, text=True)  # fmt: skip
    assert (
        done.returncode == 2
        and "--update-log must be statefulset, none or a redis:// URL" in done.stderr
    )
