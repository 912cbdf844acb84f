"""The docker/ files hold together: compose wiring, Grafana provisioning, dashboard schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from embedding_server.config import OPTIONS, ServerConfig, env_name

from .conftest import ROOT

DOCKER = ROOT / "docker"


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that knows Compose's merge tags (`!reset`, `!override`)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor(
    "!override", lambda loader, node: loader.construct_object(node, deep=True)
)


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((DOCKER / "grafana" / "dashboards" / "embedding.json").read_text()))


def test_compose_wires_health_gated_services_with_named_volumes() -> None:
    compose = _yaml(DOCKER / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"redis", "embedding-server", "prometheus", "grafana"}
    server = services["embedding-server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert any(v.endswith(":/tables:ro") for v in server["volumes"]), "tables must be read-only"
    assert (
        services["prometheus"]["depends_on"]["embedding-server"]["condition"] == "service_healthy"
    )
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    # The update log: append-only file on, on a named volume, no published port.
    redis = services["redis"]
    assert redis["command"][1:3] == ["--appendonly", "yes"] and "/data" in redis["command"]
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    assert "ports" not in redis
    assert server["environment"]["EMBEDDING_UPDATE_LOG"].endswith("redis://redis:6379/0}")
    assert all(s["restart"] == "unless-stopped" for s in services.values())
    named = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(("./", "${")):
                if source.startswith("./"):
                    assert (DOCKER / source).exists(), f"compose mounts missing {source}"
            else:
                assert source in named, f"{source} is not a declared named volume"


def test_cpu_override_drops_the_gpu_reservation() -> None:
    override = _yaml(DOCKER / "docker-compose.cpu.yml")
    server = override["services"]["embedding-server"]
    assert "deploy" in server and server["deploy"] is None  # `!reset null`
    assert server["environment"]["EMBEDDING_DEVICE"] == "cpu"
    assert "bookworm" in server["build"]["args"]["BASE_IMAGE"]


def test_compose_environment_names_are_real_server_settings() -> None:
    server = _yaml(DOCKER / "docker-compose.yml")["services"]["embedding-server"]
    secrets = {"EMBEDDING_AUTH_TOKENS", "EMBEDDING_ADMIN_TOKENS"}  # not flags: kept off argv
    known = {env_name(flag) for flag, *_ in OPTIONS} | {"EMBEDDING_TABLES"} | secrets
    assert set(server["environment"]) <= known


def test_compose_waits_for_the_servers_own_drain_before_killing_it() -> None:
    """docker compose's SIGKILL comes stop_grace_period after SIGTERM: later than the
    server's grace, which in turn covers a connection's max age (clients leave then)."""
    server = _yaml(DOCKER / "docker-compose.yml")["services"]["embedding-server"]
    setting = server["environment"]["EMBEDDING_GRACE"]
    default = re.fullmatch(r"\$\{EMBEDDING_GRACE:-(\d+)\}", setting)
    assert default, setting
    grace = float(default[1])
    stop_after = float(server["stop_grace_period"].removesuffix("s"))
    assert stop_after >= grace + 5
    assert grace >= 1.1 * ServerConfig().connection_age_s


def test_dockerfile_takes_its_base_as_an_argument_and_runs_as_non_root() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert dockerfile.count("ARG BASE_IMAGE=") == 1 and "FROM ${BASE_IMAGE} AS base" in dockerfile
    assert "\nUSER embedding\n" in dockerfile
    assert "HEALTHCHECK" in dockerfile and " health" in dockerfile
    assert dockerfile.count("\nFROM ") >= 3  # multi-stage


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = _yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    providers = _yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "embedding.yml")
    (provider,) = providers["providers"]
    compose = _yaml(DOCKER / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts

    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel[
            "title"
        ]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].strip()


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p["targets"])
    for needed in (
        "grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "LookupDense",
        "embedding_request_ids_sum", "embedding_kernel_seconds", "embedding_inflight_requests",
        "embedding_table_rows", "embedding_table_dim", "embedding_table_bytes",
        "embedding_table_version", "process_resident_memory_bytes",
        "embedding_device_memory_allocated_bytes", 'method="LookupStream"',
        "embedding_batch_queue_seconds_bucket", "embedding_batch_requests_sum",
        "embedding_batch_ids_sum", "embedding_request_bags_sum",
        "embedding_rows_updated_total", "embedding_cache_lookups_total",
        "embedding_cache_evictions_total",
    ):  # fmt: skip
        assert needed in exprs, f"the dashboard has no panel on {needed}"
