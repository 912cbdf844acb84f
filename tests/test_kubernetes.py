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
    assert len(made) == 2 + 3 * shards
    for item in made:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    broken = dict(made[-1], spec={**made[-1]["spec"], "replicas": "two"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_each_shard_is_a_deployment_a_headless_service_and_a_budget() -> None:
    made = objects(generate("--shards", "3", "--replicas", "2", "--table", "ads=ads.npy"))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in made:
        by_kind.setdefault(item["kind"], []).append(item)
    assert [len(by_kind[k]) for k in ("Deployment", "Service", "PodDisruptionBudget")] == [3] * 3
    for shard, (deploy, service, budget) in enumerate(
        zip(by_kind["Deployment"], by_kind["Service"], by_kind["PodDisruptionBudget"], strict=True)
    ):
        spec = deploy["spec"]
        pod = spec["template"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
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
