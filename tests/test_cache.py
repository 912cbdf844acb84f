"""Tables bigger than the device: host table, device cache of hot rows (CLOCK)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient
from embedding_server.config import TableSpec
from embedding_server.core.cache import CachedRows
from embedding_server.core.sources import load_table
from embedding_server.core.store import TableStore
from embedding_server.process.server import EmbeddingServer

from .conftest import TEST_CONFIG, admin_settings, random_table

WEIGHTS = random_table(1000, 8, seed=91)


class Counts:
    def __init__(self) -> None:
        self.hits = self.misses = self.evictions = 0

    def __call__(self, hits: int, misses: int, evictions: int) -> None:
        self.hits += hits
        self.misses += misses
        self.evictions += evictions


def _zipf(rng: np.random.Generator, size: int, rows: int = 1000) -> np.ndarray:
    return (rng.zipf(1.3, size=size) - 1) % rows


def test_results_equal_the_plain_table_through_misses_and_evictions() -> None:
    counts = Counts()
    cache = CachedRows(torch.from_numpy(WEIGHTS.copy()), 50, torch.device("cpu"), counts)
    rng = np.random.default_rng(0)
    for step in range(300):
        if step % 3 == 0:
            ids = rng.integers(0, 1000, size=(int(rng.integers(1, 30)), 2))
        else:
            ids = _zipf(rng, int(rng.integers(1, 60)))
        out = cache.take(torch.from_numpy(ids))
        np.testing.assert_array_equal(out.numpy(), WEIGHTS[ids])
    assert counts.evictions > 0 and counts.misses > 0 and counts.hits > 0
    big = np.arange(0, 1000, 7)  # 143 distinct ids > 50 slots: straight from the host
    np.testing.assert_array_equal(cache.take(torch.from_numpy(big)).numpy(), WEIGHTS[big])


def test_clock_keeps_the_hot_rows() -> None:
    """Under a Zipf load the most frequent rows stay cached: the hit rate of a 5% cache is
    far above 5% (what random eviction of a uniform load would give)."""
    counts = Counts()
    cache = CachedRows(torch.from_numpy(WEIGHTS.copy()), 50, torch.device("cpu"), counts)
    rng = np.random.default_rng(1)
    for _ in range(200):
        cache.take(torch.from_numpy(_zipf(rng, 16)))
    counts.hits = counts.misses = 0
    for _ in range(200):
        cache.take(torch.from_numpy(_zipf(rng, 16)))
    assert counts.hits / (counts.hits + counts.misses) > 0.5


def test_concurrent_takes_and_writes_stay_correct() -> None:
    table = torch.from_numpy(WEIGHTS.copy())
    cache = CachedRows(table, 40, torch.device("cpu"))
    wrong: list[int] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            ids = _zipf(rng, 20)
            if not np.array_equal(cache.take(torch.from_numpy(ids)).numpy(), WEIGHTS[ids]):
                wrong.append(seed)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not wrong
    new = torch.full((2, 8), 3.0)
    cache.take(torch.tensor([5]))  # cached now
    cache.write(torch.tensor([5, 999]), new)
    np.testing.assert_array_equal(cache.take(torch.tensor([5, 999, 4])).numpy()[:2], new.numpy())
    np.testing.assert_array_equal(table[[5, 999]].numpy(), new.numpy())  # the host has it too


def test_a_cached_table_on_both_rpc_paths(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", WEIGHTS)
    spec = TableSpec("t", tmp_path / "t.npy", cache_rows=64)
    store = TableStore()
    store.add(load_table(spec, torch.device("cpu")))
    table = store.get("t")
    assert table.cache is not None and table.weights.device.type == "cpu"
    server = EmbeddingServer(replace(TEST_CONFIG, **admin_settings(tmp_path)), store)
    server.start()
    try:
        with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
            rng = np.random.default_rng(2)
            for _ in range(30):
                ids = _zipf(rng, 24).reshape(4, 6)
                np.testing.assert_array_equal(client.lookup(ids, "t"), WEIGHTS[ids])
                assert client.lookup_dense(ids, "t").tobytes() == WEIGHTS[ids].tobytes()
                np.testing.assert_allclose(
                    client.lookup(ids, "t", pooling="mean"), WEIGHTS[ids].mean(1), rtol=1e-6
                )
            client.update_rows([0, 500], np.ones((2, 8), np.float32), "t")
            np.testing.assert_array_equal(client.lookup([0, 500], "t"), np.ones((2, 8)))
            np.save(tmp_path / "t2.npy", WEIGHTS * 2)
            assert client.reload_table("t", str(tmp_path / "t2.npy")).version == 2
            np.testing.assert_array_equal(client.lookup([0, 7], "t"), 2 * WEIGHTS[[0, 7]])
        assert store.get("t").cache is not None  # a reload keeps the cache
    finally:
        server.stop(grace=0)
    hits = REGISTRY.get_sample_value(
        "embedding_cache_lookups_total", {"table": "t", "result": "hit"}
    )
    misses = REGISTRY.get_sample_value(
        "embedding_cache_lookups_total", {"table": "t", "result": "miss"}
    )
    assert hits and misses
    assert REGISTRY.get_sample_value("embedding_cache_capacity_rows", {"table": "t"}) == 64


def test_cache_rows_in_a_config_file_is_checked() -> None:
    assert TableSpec.parse("t=/x.npy", None, "cpu", 100).cache_rows == 100
    with pytest.raises(ValueError, match="cache_rows must be a positive integer"):
        TableSpec.parse("t=/x.npy", None, None, 0)
    with pytest.raises(ValueError, match="not int8"):
        TableSpec.parse("t=/x.npy", "int8", None, 10)
