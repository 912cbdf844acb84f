"""Dynamic batching: coalesced gathers return exactly what unbatched ones do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_server.core.batcher import Batcher
from embedding_server.core.tables import Table

from .conftest import ServerFactory, random_table

WEIGHTS = random_table(500, 16, seed=41)


def _table(name: str, weights: np.ndarray = WEIGHTS) -> Table:
    return Table(name=name, weights=torch.from_numpy(weights.copy()), source="test")


@pytest.fixture
def batcher() -> Iterator[Batcher]:
    instance = Batcher(max_delay_s=0.005, max_ids=4096)
    yield instance
    instance.close()


def _announced(batcher: Batcher, table: Table, ids: np.ndarray, dtype: torch.dtype) -> Any:
    """A call as the server makes it: announced while checked, then queued."""
    with batcher.expect() as arrival:
        return arrival.gather(table, ids, dtype)


def _sample(name: str, table: str) -> float:
    return REGISTRY.get_sample_value(name, {"table": table}) or 0.0


def _concurrently(calls: list[Callable[[], Any]], threads: int = 8) -> list[Any]:
    """Run the callables from `threads` threads released at once; results in order."""
    results: list[object] = [None] * len(calls)
    start = threading.Barrier(threads)

    def run(worker: int) -> None:
        start.wait()
        for index in range(worker, len(calls), threads):
            try:
                results[index] = calls[index]()
            except Exception as exc:
                results[index] = exc

    pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=60)
    return results


def test_coalesced_results_equal_unbatched(batcher: Batcher) -> None:
    table = _table("coalesce")
    rng = np.random.default_rng(0)
    id_sets = [rng.integers(0, 500, size=(int(rng.integers(1, 40)), 2)) for _ in range(64)]
    results = _concurrently(
        [lambda ids=ids: _announced(batcher, table, ids, torch.float32) for ids in id_sets]
    )
    for ids, (data, seconds, _) in zip(id_sets, results, strict=True):
        assert data.tobytes() == WEIGHTS[ids].tobytes()
        assert seconds >= 0
    gathers = _sample("embedding_batch_requests_count", "coalesce")
    requests = _sample("embedding_batch_requests_sum", "coalesce")
    assert requests == 64
    assert gathers < requests, "no two requests were coalesced"
    assert _sample("embedding_batch_ids_sum", "coalesce") == sum(i.size for i in id_sets)


def test_dtypes_and_versions_are_never_mixed(batcher: Batcher) -> None:
    old, new = _table("mixed"), _table("mixed", WEIGHTS * 2)
    calls = []
    for k in range(48):
        ids = np.array([k, 499 - k])
        calls.append((old if k % 2 else new, torch.float16 if k % 3 else torch.float32, ids))
    results = _concurrently([lambda t=t, d=d, i=i: batcher.gather(t, i, d) for t, d, i in calls])
    for (table, dtype, ids), (data, _, _) in zip(calls, results, strict=True):
        expected = table.weights.numpy()[ids].astype(
            np.float16 if dtype == torch.float16 else np.float32
        )
        assert data.tobytes() == expected.tobytes()


def test_bfloat16_bits_leave_unchanged(batcher: Batcher) -> None:
    table = _table("bf16")
    ids = np.array([3, 1, 4])
    data, _, _ = batcher.gather(table, ids, torch.bfloat16)
    expected = table.weights[torch.from_numpy(ids)].bfloat16().view(torch.int16).numpy()
    assert data.tobytes() == expected.tobytes()


def test_a_gather_never_exceeds_max_ids() -> None:
    batcher = Batcher(max_delay_s=0.005, max_ids=10)
    try:
        table = _table("capped")
        results = _concurrently(
            [
                lambda k=k: batcher.gather(table, np.arange(k, k + 6), torch.float32)
                for k in range(40)
            ]
        )
        big, _, _ = batcher.gather(table, np.arange(50), torch.float32)  # alone, over the cap
    finally:
        batcher.close()
    for k, (data, _, _) in enumerate(results):
        assert data.tobytes() == WEIGHTS[k : k + 6].tobytes()
    assert big.tobytes() == WEIGHTS[:50].tobytes()
    # 6 + 6 > 10: every gather served exactly one request.
    assert _sample("embedding_batch_requests_sum", "capped") == 41
    assert _sample("embedding_batch_requests_count", "capped") == 41


def test_a_lone_call_does_not_wait_for_nobody() -> None:
    batcher = Batcher(max_delay_s=5.0, max_ids=4096)
    try:
        table = _table("lone")
        started = time.monotonic()
        data, _, _ = _announced(batcher, table, np.array([1, 2]), torch.float32)
        with batcher.expect():
            pass  # a call refused by its checks never arrives; nobody waits for it
        data2, _, _ = _announced(batcher, table, np.array([3]), torch.float32)
        assert time.monotonic() - started < 2.5, "waited the 5 s delay with nobody coming"
    finally:
        batcher.close()
    assert data.tobytes() == WEIGHTS[[1, 2]].tobytes() and data2.tobytes() == WEIGHTS[[3]].tobytes()


def test_a_failing_gather_fails_its_callers_only(batcher: Batcher) -> None:
    table = _table("failing")
    with pytest.raises(IndexError):
        batcher.gather(table, np.array([10_000]), torch.float32)  # past the checks: a bug
    data, _, _ = batcher.gather(table, np.array([7]), torch.float32)
    assert data.tobytes() == WEIGHTS[[7]].tobytes()


def test_server_with_batching_answers_like_without(start_server: ServerFactory) -> None:
    tables = {"main": WEIGHTS, "half": WEIGHTS[:50].astype(np.float16)}
    plain = start_server(tables)
    batched = start_server(tables, batching=True, batch_delay_us=2000.0)
    rng = np.random.default_rng(3)
    id_sets = [rng.integers(0, 50, size=int(rng.integers(1, 30))) for _ in range(40)]
    with (
        EmbeddingClient(f"127.0.0.1:{plain.port}") as a,
        EmbeddingClient(f"127.0.0.1:{batched.port}") as b,
    ):
        calls = []
        for ids in id_sets:
            for table in ("main", "half"):
                for dtype in ("float32", "bfloat16"):
                    calls.append((ids, table, dtype))
        got = _concurrently([lambda c=c: b.lookup_result(*c) for c in calls])
        for (ids, table, dtype), result in zip(calls, got, strict=True):
            want = a.lookup_result(ids, table, dtype)
            assert result.vectors.tobytes() == want.vectors.tobytes()
            assert result.vectors.dtype == want.vectors.dtype
        streamed = list(b.lookup_stream(id_sets[:5], "main"))
        for ids, answer in zip(id_sets[:5], streamed, strict=True):
            np.testing.assert_array_equal(answer.vectors, WEIGHTS[ids])
        np.testing.assert_array_equal(b.lookup_dense(id_sets[0]), WEIGHTS[id_sets[0]])
        with pytest.raises(EmbeddingError) as bad:
            b.lookup([1, 500], "main")
        assert "id 500 at position 1 is out of range" in bad.value.details
    assert _sample("embedding_batch_requests_sum", "main") >= len(id_sets) * 2
