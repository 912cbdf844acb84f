"""The dashboard and alerts against a real Prometheus that scraped a real server.

Prometheus (Debian's package) runs on loopback with the repository's own scrape config
and alert rules, only the target rewritten; every PromQL expression of the Grafana
dashboard and of the rules is then evaluated through its HTTP API. The server runs
with two processes (metrics in prometheus-client's multiprocess mode, served by the
supervisor) and dynamic batching on, so that every panel has something to show.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embedding_client import EmbeddingClient, EmbeddingError

from .conftest import BIN, ROOT, Redis, free_port, random_table, server_env, wait_serving

DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "embedding.json"
SCRAPE_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
COMPOSE_TARGET = "embedding-server:8000"
# Grafana's interval variables, as Grafana would fill them for a 5 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: install Debian's prometheus package (make system-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it; never skip silently there
        pytest.skip(message)
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression with Grafana variables filled) for every dashboard target."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict[str, Any]:
        return dict(_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, Path]]:
    """A real server with traffic, scraped by a real Prometheus for at least 3 scrapes."""
    prometheus_bin = _tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    np.save(work / "users.npy", random_table(5000, 32, seed=1))
    np.save(work / "items.npy", random_table(300, 17, seed=2))
    # items: host table with a device cache of 100 of its 300 rows (the cache panel).
    # tags: keyed by even keys 0..98; lookups ask for odd ones too (the missing-keys panel).
    np.savez(work / "tags.npz", keys=np.arange(0, 100, 2), values=random_table(50, 8, seed=3))
    (work / "tables.toml").write_text(
        '[[table]]\nname = "items"\nsource = "items.npy"\ncache_rows = 100\n'
        '[[table]]\nname = "tags"\nsource = "tags.npz"\nmissing = "zeros"\n'
    )
    grpc_port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    # An update log too (its panels and alerts), applied by the supervisor of 2 processes.
    (work / "redis").mkdir()
    log = Redis(free_port(), work / "redis")
    log.start()
    server = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(grpc_port),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
         "--table", f"users={work / 'users.npy'}", "--config", str(work / "tables.toml"),
         "--processes", "2", "--batching", "true", "--update-log", log.url,
         "--allow-loopback-admin", "true"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    target = f"127.0.0.1:{grpc_port}"
    wait_serving(target, server)

    config = SCRAPE_CONFIG.read_text()
    assert config.count(COMPOSE_TARGET) == 1
    (work / "prometheus.yml").write_text(
        config.replace(COMPOSE_TARGET, f"127.0.0.1:{metrics_port}")
    )
    shutil.copy(ALERTS, work / "alerts.yml")
    prometheus = subprocess.Popen(
        [prometheus_bin, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    api = Prometheus(f"http://127.0.0.1:{prometheus_port}")
    stop = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(0)
        with EmbeddingClient(target, max_attempts=1) as client:
            while not stop.is_set():
                for table, rows in (("users", 5000), ("items", 300)):
                    client.lookup(rng.integers(0, rows, size=int(rng.integers(1, 512))), table)
                    client.lookup_dense(rng.integers(0, rows, size=8), table)
                    client.lookup(rng.integers(0, rows, size=(16, 5)), table, pooling="mean")
                    batches = [rng.integers(0, rows, size=4) for _ in range(5)]
                    for _ in client.lookup_stream(batches, table):
                        pass
                # One key in 17 not held: counted, under the misses alert's tenth.
                client.lookup([*rng.choice(np.arange(0, 100, 2), 16), 1], "tags")
                with contextlib.suppress(EmbeddingError):
                    client.lookup([rows], table="items")  # out of range: an error to count
                client.update_rows(rng.integers(0, 5000, size=1), np.ones((1, 32)), "users")
                time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                scrapes = api.query('count_over_time(up{job="embedding-server"}[1m])')["data"]
                if scrapes["result"] and float(scrapes["result"][0]["value"][1]) >= 3:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus did not scrape 3 times in 60 s:\n{_stop(prometheus)}")
        yield api, work
    finally:
        stop.set()
        sender.join(timeout=10)
        _stop(prometheus)
        _stop(server)
        log.stop()


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    try:
        return process.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


def test_target_is_up(scraped: tuple[Prometheus, Path]) -> None:
    api, _ = scraped
    result = api.query('up{job="embedding-server"}')["data"]["result"]
    assert [float(r["value"][1]) for r in result] == [1.0]


@pytest.mark.parametrize(("panel", "expr"), dashboard_queries())
def test_every_dashboard_query_returns_data(
    scraped: tuple[Prometheus, Path], panel: str, expr: str
) -> None:
    api, _ = scraped
    answer = api.query(expr)
    assert answer["status"] == "success", answer
    values = [float(series["value"][1]) for series in answer["data"]["result"]]
    assert values, f"{panel}: no data for {expr}"
    assert any(math.isfinite(v) for v in values), f"{panel}: only NaN/inf for {expr}: {values}"


@pytest.mark.parametrize(("alert", "expr"), alert_queries())
def test_every_alert_expression_evaluates(
    scraped: tuple[Prometheus, Path], alert: str, expr: str
) -> None:
    api, _ = scraped
    answer = api.query(expr)
    assert answer["status"] == "success", answer
    # Healthy server under normal traffic: no alert condition holds.
    assert answer["data"]["result"] == [], f"{alert} would fire: {answer['data']['result']}"


def test_rules_are_loaded_and_healthy(scraped: tuple[Prometheus, Path]) -> None:
    api, _ = scraped
    deadline = time.monotonic() + 20
    while True:
        groups = _get(f"{api.url}/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == {name for name, _ in alert_queries()}
    assert all(rule["health"] == "ok" for rule in rules), rules


def test_promtool_accepts_config_rules_and_a_scrape(scraped: tuple[Prometheus, Path]) -> None:
    promtool = _tool("promtool")
    _, work = scraped
    for args in (
        ["check", "config", str(work / "prometheus.yml")],
        ["check", "rules", str(ALERTS)],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    config = (work / "prometheus.yml").read_text()
    metrics_target = config.split('targets: ["')[1].split('"')[0]
    with urllib.request.urlopen(f"http://{metrics_target}/metrics", timeout=10) as response:
        scrape = response.read()
    done = subprocess.run(
        [promtool, "check", "metrics"], input=scrape, capture_output=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert b"embedding_request_duration_seconds_bucket" in scrape
