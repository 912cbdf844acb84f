"""Hot reload: atomic swaps under load, refused bad files, the memory check, SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_server.config import TableSpec
from embedding_server.core import store as store_module
from embedding_server.core.sources import load_table
from embedding_server.core.store import TableStore
from embedding_server.process.server import EmbeddingServer

from .conftest import BIN, TEST_CONFIG, admin_settings, free_port, server_env, wait_serving

ROWS, DIM = 400, 8


def version_table(version: int, rows: int = ROWS, dim: int = DIM) -> np.ndarray:
    """Every value names its version and row, so a mixed answer cannot pass."""
    grid = np.arange(rows, dtype=np.float32)[:, None] + np.arange(dim, dtype=np.float32) / 16
    return (grid + 1000 * version).astype(np.float32)


def _save(path: Path, values: np.ndarray) -> Path:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, values)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


@pytest.fixture
def reloadable(tmp_path: Path):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    path = _save(tmp_path / "t.npy", version_table(1))
    store = TableStore()
    store.add(load_table(TableSpec("t", path), torch.device("cpu")))
    server = EmbeddingServer(replace(TEST_CONFIG, **admin_settings(tmp_path)), store)
    server.start()
    yield server, tmp_path
    server.stop(grace=0)


def test_reload_under_load_is_atomic(reloadable) -> None:  # type: ignore[no-untyped-def]
    server, folder = reloadable
    target = f"127.0.0.1:{server.port}"
    stop = threading.Event()
    seen: list[int] = []
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with EmbeddingClient(target, max_attempts=1) as client:
            while not stop.is_set():
                ids = rng.integers(0, ROWS, size=int(rng.integers(1, 300)))
                try:
                    result = client.lookup_result(ids, dense=bool(rng.integers(0, 8) == 0))
                except EmbeddingError as exc:
                    failures.append(str(exc))
                    continue
                if not np.array_equal(result.vectors, version_table(result.version)[ids]):
                    failures.append(f"rows do not match version {result.version}")
                seen.append(result.version)

    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in readers:
        thread.start()
    try:
        with EmbeddingClient(target) as admin:
            for version in range(2, 7):
                time.sleep(0.15)
                path = _save(folder / f"v{version}.npy", version_table(version))
                info = admin.reload_table("t", str(path))
                assert info.version == version
        time.sleep(0.15)
    finally:  # a failed reload must not leave the readers running for good
        stop.set()
        for thread in readers:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in readers)
    assert failures == []
    assert len(seen) > 50 and set(seen) >= {1, 6}, sorted(set(seen))


def _reload_error(server: EmbeddingServer, source: str) -> EmbeddingError:
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        with pytest.raises(EmbeddingError) as raised:
            client.reload_table("t", source)
        # The old version keeps serving.
        result = client.lookup_result([5, 6])
        assert result.version == 1
        np.testing.assert_array_equal(result.vectors, version_table(1)[[5, 6]])
    return raised.value


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b"not an array"), "is not a plain numeric .npy array"),
        (lambda p: _save(p, np.zeros(10, np.float32)), "expected a 2-D"),
        (lambda p: _save(p, version_table(2, dim=DIM + 1)), "a reload keeps the dim"),
        (lambda p: _save(p, np.full((3, DIM), np.nan, np.float32)), "must be finite"),
        (lambda p: None, "no such file"),
    ],
)
def test_bad_new_versions_are_refused(reloadable, write, message: str) -> None:  # type: ignore[no-untyped-def]
    server, folder = reloadable
    path = folder / "new.npy"
    write(path)
    error = _reload_error(server, str(path))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert message in error.details


def test_reload_that_does_not_fit_is_refused(reloadable, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    server, folder = reloadable
    monkeypatch.setattr(store_module, "available_bytes", lambda device: 1 << 20)
    path = _save(folder / "v2.npy", version_table(2))
    error = _reload_error(server, str(path))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "beside the 0 MiB version serving now; only 1 MiB are free" in error.details


def test_reload_bumps_the_version_metric(reloadable) -> None:  # type: ignore[no-untyped-def]
    server, folder = reloadable
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        client.reload_table("t", str(_save(folder / "v2.npy", version_table(2, rows=500))))
        (info,) = client.tables()
    assert (info.version, info.rows) == (2, 500)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url) as response:
        text = response.read().decode()
    assert 'embedding_table_version{table="t"} 2.0' in text
    assert 'embedding_table_rows{table="t"} 500.0' in text
    assert 'embedding_table_reloads_total{result="ok",table="t"}' in text


def test_sighup_rereads_table_files(tmp_path: Path) -> None:
    path = _save(tmp_path / "t.npy", version_table(1))
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--table", f"t={path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process)
        with EmbeddingClient(target) as client:
            _save(path, version_table(2))
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while client.tables()[0].version != 2:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.1)
            np.testing.assert_array_equal(client.lookup([7]), version_table(2)[[7]])
            path.write_bytes(b"corrupt")
            process.send_signal(signal.SIGHUP)
            time.sleep(1.5)
            result = client.lookup_result([7])
            assert result.version == 2  # the corrupt file was refused
            np.testing.assert_array_equal(result.vectors, version_table(2)[[7]])
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert "reload of table 't' failed, still serving version 2" in output


def test_a_reload_from_a_new_source_keeps_the_tables_storage_and_shard(tmp_path: Path) -> None:
    """A float16 table and shard 0/2 of another, reloaded from new float32 files: each
    stays as configured (float16 storage; shard 0's rows of the new file), through a real
    connection (issue 29: nothing checked either)."""
    from dataclasses import replace

    from embedding_client.shards import Shard

    old = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    new = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32)
    half, part = _save(tmp_path / "half.npy", old), _save(tmp_path / "part.npy", old)
    _save(tmp_path / "new.npy", new)
    store = TableStore()
    cpu = torch.device("cpu")
    store.add(load_table(TableSpec("half", half, dtype="float16"), cpu))
    store.add(load_table(TableSpec("part", part, shard=Shard(0, 2), shard_given=True), cpu))
    server = EmbeddingServer(replace(TEST_CONFIG, **admin_settings(tmp_path)), store)
    server.start()
    try:
        with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
            owned = Shard(0, 2).owned(40)
            for name in ("half", "part"):
                info = client.reload_table(name, "new.npy")
                assert info.version == 2
            listed = {t.name: t for t in client.tables()}
            assert listed["half"].dtype == "float16"
            np.testing.assert_array_equal(
                client.lookup(np.arange(40), "half"), new.astype(np.float16).astype(np.float32)
            )
            assert (listed["part"].shard, listed["part"].shard_rows) == ((0, 2), len(owned))
            assert listed["part"].rows == 40
            np.testing.assert_array_equal(client.lookup(owned, "part"), new[owned])
    finally:
        server.stop(grace=0)
