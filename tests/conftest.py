"""Shared fixtures: random tables, an in-process server on a free port, a client."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.config import ServerConfig
from embedding_server.core import kernels
from embedding_server.core.lookup import Lookups
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.process.server import EmbeddingServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The seed's worked example.
WORKED_WEIGHTS = np.array(
    [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 0.0, 0.1, 0.2]], dtype=np.float32
)

# Connections are asked to go (GOAWAY) after about a second: a stop waits for open ones
# to close, and every test's calls then cross connection changes, which must lose none.
TEST_CONFIG = ServerConfig(
    host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, connection_age_s=1.0
)


def admin_settings(folder: Path | None = None) -> dict[str, object]:
    """Config overrides for tests that call admin RPCs from this host: loopback admin on,
    and `folder` (when given) as the table and snapshot directory."""
    settings: dict[str, object] = {"allow_loopback_admin": True}
    if folder is not None:
        settings.update(table_dirs=(str(folder),), snapshot_dir=str(folder))
    return settings


def exactly(message: str) -> str:
    """A `match=` pattern for an error whose message is exactly `message`."""
    return f"^{re.escape(message)}$"


def grpc_count(
    kind: str, method: str, code: str | None = None,
    service: str = "embedding.v1.EmbeddingService",
) -> float:  # fmt: skip
    """grpc_server_started_total (code None) or grpc_server_handled_total of one method,
    summed over every server of this process (compare before and after)."""
    labels = {"grpc_type": kind, "grpc_service": service, "grpc_method": method}
    if code is None:
        return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0
    labels["grpc_code"] = code
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for `condition`, failing the test if it does not hold within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class LateLookups:
    """Lookup calls whose one request message is sent only once `send` is set: each call
    opens on the server (its handler found) and waits there for its request."""

    def __init__(self, channel: grpc.Channel, table: str, ids: list[int]) -> None:
        self.send = threading.Event()
        self._request = pb.LookupRequest(table=table, ids_list=ids).SerializeToString()
        self._lookup = channel.stream_unary(  # a unary method, its one message sent when ready
            "/embedding.v1.EmbeddingService/Lookup",
            response_deserializer=pb.LookupResponse.FromString,
        )

    def open(self, timeout: float = 20) -> grpc.Future:
        def late_request() -> Iterator[bytes]:
            self.send.wait(30)
            yield self._request

        return self._lookup.future(late_request(), timeout=timeout)


def random_table(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def make_store(tables: dict[str, np.ndarray | torch.Tensor]) -> TableStore:
    store = TableStore()
    for name, weights in tables.items():
        tensor = weights if isinstance(weights, torch.Tensor) else torch.from_numpy(weights.copy())
        store.add(Table(name=name, weights=tensor, source="test"))
    return store


ServerFactory = Callable[..., EmbeddingServer]


@pytest.fixture
def start_server() -> Iterator[ServerFactory]:
    """Start in-process servers on free loopback ports; all stop at teardown."""
    servers: list[EmbeddingServer] = []

    def start(tables: dict[str, np.ndarray | torch.Tensor], **overrides: object) -> EmbeddingServer:
        server = EmbeddingServer(replace(TEST_CONFIG, **overrides), make_store(tables))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def slow_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Lookups of a table named "slow" hold their handler thread (not marked as waiting)
    until `.release` is set; `.entered` is set as each starts, `.started` counts them.
    Released at teardown, so
    a failing test does not leave server threads waiting. They go the general way (in
    the handler pool): a plain lookup is answered on the event loop in microseconds, and
    one held there would hold every call."""
    held = SimpleNamespace(entered=threading.Event(), release=threading.Event(), started=0)
    general, plain = Lookups.lookup, Lookups.plain

    def holding(self: Lookups, table_name: str, *args: object, **kwargs: object) -> object:
        if table_name == "slow":
            held.started += 1
            held.entered.set()
            assert held.release.wait(30)
        return general(self, table_name, *args, **kwargs)  # type: ignore[arg-type]

    def not_slow(self: Lookups, table_name: str, *args: object) -> object:
        return None if table_name == "slow" else plain(self, table_name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Lookups, "lookup", holding)
    monkeypatch.setattr(Lookups, "plain", not_slow)
    try:
        yield held
    finally:
        held.release.set()


@pytest.fixture
def held_matmuls(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """One-hot matmuls (`kernels.one_hot_matmul`) wait until `.release` is set; `.entered`
    is set as each starts, `.threads` names the threads they ran in. Released at teardown."""
    held = SimpleNamespace(entered=threading.Event(), release=threading.Event(), threads=[])
    original = kernels.one_hot_matmul

    def held_matmul(*args: object, **kwargs: object) -> object:
        held.threads.append(threading.current_thread().name)
        held.entered.set()
        assert held.release.wait(30)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "one_hot_matmul", held_matmul)
    try:
        yield held
    finally:
        held.release.set()


@pytest.fixture(scope="module")
def tables() -> dict[str, np.ndarray]:
    return {
        "main": random_table(1000, 16, seed=1),
        "odd": random_table(37, 3, seed=2),
        "worked": WORKED_WEIGHTS,
        "half": random_table(50, 8, seed=3).astype(np.float16),
    }


@pytest.fixture(scope="module")
def server(tables: dict[str, np.ndarray]) -> Iterator[EmbeddingServer]:
    """One server for a module's read-only tests."""
    store = make_store(tables)
    store.add(
        Table(name="bf16", weights=torch.from_numpy(random_table(40, 5, seed=4)).bfloat16(),
              source="test")
    )  # fmt: skip
    instance = EmbeddingServer(
        replace(TEST_CONFIG, max_ids=10_000, max_dense_macs=50_000_000), store
    )
    instance.start()
    yield instance
    instance.stop(grace=0)


@pytest.fixture
def client(server: EmbeddingServer) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(f"127.0.0.1:{server.port}", timeout=30, max_attempts=1) as instance:
        yield instance


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(target: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait until a server process answers health SERVING (or fail with its log)."""
    deadline = time.monotonic() + timeout
    with EmbeddingClient(target, timeout=1, max_attempts=1) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited early:\n{process.communicate()[0]}")
            try:
                if probe.health() == "SERVING":
                    return
            except Exception:
                time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server not SERVING after {timeout} s:\n{process.communicate()[0]}")


def spawn_server(table: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """`embedding-server` serving `table` as "t" on 127.0.0.1:`port`, once it is SERVING
    (its log on stdout, stderr with it)."""
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--table", f"t={table}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    wait_serving(f"127.0.0.1:{port}", process)
    return process


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDING_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Redis:
    """A redis-server of the test's own (AOF on, in its folder), stopped by PID."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server not found: install Debian's redis-server (make system-deps)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """A redis-server of this test's own on a free port (AOF on), stopped at teardown."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = Redis(free_port(), folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
