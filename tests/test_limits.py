"""The per-request limits exactly at their boundaries, and reads that report the update_seq
their rows came from (issue 16: no test caught an off-by-one at a limit, a version read
after the read lock, or a seqlock reader that stopped re-reading)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedding_client.codec import Bags
from embedding_server.core.lookup import Limits, Lookups
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.errors import InvalidRequest, OverLimit

from .conftest import make_store, random_table

ROWS, DIM = 50, 4
WEIGHTS = random_table(ROWS, DIM, seed=61)


def _lookups(**limits: int) -> Lookups:
    chosen = {"max_ids": 8, "max_dense_macs": 10**9, "dense_chunk_cells": 1 << 20,
              "max_response_bytes": 1 << 30, **limits}  # fmt: skip
    return Lookups(make_store({"t": WEIGHTS}), Limits(**chosen))


def _bags(count: int, per_bag: int, mode: str) -> tuple[np.ndarray, Bags]:
    ids = np.arange(count * per_bag, dtype=np.int64) % ROWS
    offsets = np.arange(count, dtype=np.int64) * per_bag
    return ids, Bags(mode, offsets, (count,))


def test_exactly_max_ids_is_served_and_one_more_refused() -> None:
    lookups = _lookups(max_ids=8)
    assert lookups.lookup("t", np.arange(8), "float32").vectors.shape == (8, DIM)
    with pytest.raises(OverLimit, match="9 ids in one request; this server takes at most 8"):
        lookups.lookup("t", np.arange(9), "float32")
    # Pooled and dense calls count ids the same way.
    with pytest.raises(OverLimit, match="9 ids"):
        lookups.lookup("t", np.arange(9), "float32", dense=True)
    ids, bags = _bags(3, 3, "sum")
    with pytest.raises(OverLimit, match="9 ids"):
        lookups.lookup("t", ids, "float32", bags=bags)


def test_exactly_max_ids_bags_is_served_and_one_more_refused() -> None:
    lookups = _lookups(max_ids=100)
    ids, bags = _bags(100, 1, "mean")
    assert lookups.lookup("t", ids, "float32", bags=bags).vectors.shape == (100, DIM)
    lookups = _lookups(max_ids=100)
    ids, bags = _bags(101, 0, "mean")  # 101 empty bags, no ids at all
    with pytest.raises(OverLimit, match="101 bags in one request"):
        lookups.lookup("t", ids, "float32", bags=bags)


def test_the_response_limit_is_inclusive_and_counts_bags_not_ids() -> None:
    one_vector = DIM * 4
    lookups = _lookups(max_ids=100, max_response_bytes=5 * one_vector)
    assert lookups.lookup("t", np.arange(5), "float32").vectors.nbytes == 5 * one_vector
    with pytest.raises(OverLimit, match=f"would be {6 * one_vector} bytes"):
        lookups.lookup("t", np.arange(6), "float32")
    # float16 halves the answer: 10 ids fit where 5 float32 vectors do.
    assert lookups.lookup("t", np.arange(10), "float16").vectors.nbytes == 5 * one_vector
    # 5 bags of 20 ids: 100 ids would not fit as vectors, 5 pooled ones do.
    ids, bags = _bags(5, 20, "sum")
    assert lookups.lookup("t", ids, "float32", bags=bags).vectors.shape == (5, DIM)
    ids, bags = _bags(6, 1, "sum")
    with pytest.raises(OverLimit, match="would be"):
        lookups.lookup("t", ids, "float32", bags=bags)


def test_dense_cost_is_per_bag_for_sum_and_per_id_for_max() -> None:
    per_hot_row = ROWS * DIM
    # Sum and mean: one multi-hot row per bag. Max: the one-hot row of every id.
    lookups = _lookups(max_ids=100, max_dense_macs=4 * per_hot_row)
    ids, bags = _bags(4, 5, "sum")  # 4 bags, 20 ids
    assert lookups.lookup("t", ids, "float32", dense=True, bags=bags).vectors.shape == (4, DIM)
    ids, bags = _bags(5, 1, "sum")
    with pytest.raises(OverLimit, match="costs 1000 multiply-adds, over the limit of 800"):
        lookups.lookup("t", ids, "float32", dense=True, bags=bags)
    ids, bags = _bags(2, 2, "max")  # 2 bags but 4 one-hot rows: at the limit
    assert lookups.lookup("t", ids, "float32", dense=True, bags=bags).vectors.shape == (2, DIM)
    ids, bags = _bags(1, 5, "max")  # 1 bag, 5 one-hot rows: over
    with pytest.raises(OverLimit, match="costs 1000 multiply-adds"):
        lookups.lookup("t", ids, "float32", dense=True, bags=bags)
    plain = _lookups(max_ids=100, max_dense_macs=4 * per_hot_row)
    assert plain.lookup("t", np.arange(4), "float32", dense=True).vectors.shape == (4, DIM)
    with pytest.raises(OverLimit, match="LookupDense of 5 ids"):
        plain.lookup("t", np.arange(5), "float32", dense=True)


def test_a_trailing_empty_bag_is_zeros_on_both_paths() -> None:
    lookups = _lookups(max_ids=100)
    ids = np.array([1, 2, 3], dtype=np.int64)
    bags = Bags("sum", np.array([0, 3], dtype=np.int64), (2,))  # last offset == id count
    for dense in (False, True):
        out = lookups.lookup("t", ids, "float32", dense=dense, bags=bags).vectors
        np.testing.assert_allclose(out[0], WEIGHTS[[1, 2, 3]].sum(0), rtol=1e-6)
        assert not out[1].any()


def test_a_plain_dense_lookup_with_padding_id_zero() -> None:
    lookups = _lookups(max_ids=100)
    ids = np.array([[0, 3], [5, 0]], dtype=np.int64)
    for dense in (False, True):
        out = lookups.lookup("t", ids, "float32", dense=dense, padding_id=0).vectors
        assert not out[0, 0].any() and not out[1, 1].any()  # id 0 pads: zeros, not row 0
        np.testing.assert_array_equal(out[0, 1], WEIGHTS[3])
        np.testing.assert_array_equal(out[1, 0], WEIGHTS[5])
    with pytest.raises(InvalidRequest, match="padding_id 50 is not a row"):
        lookups.lookup("t", ids, "float32", dense=True, padding_id=ROWS)


def test_ids_at_both_ends_of_the_range() -> None:
    lookups = _lookups(max_ids=100)
    edge = np.array([0, ROWS - 1], dtype=np.int64)
    np.testing.assert_array_equal(lookups.lookup("t", edge, "float32").vectors, WEIGHTS[edge])
    for bad, where in ((ROWS, "id 50 at position 1"), (-1, "id -1 at position 1")):
        with pytest.raises(InvalidRequest, match=where):
            lookups.lookup("t", np.array([0, bad, 2], dtype=np.int64), "float32")
    lowest = np.array([0, np.iinfo(np.int64).min], dtype=np.int64)  # unsigned: 2**63
    with pytest.raises(InvalidRequest, match="at position 1"):
        lookups.lookup("t", lowest, "float32")


def test_a_read_reports_the_version_of_the_rows_it_read() -> None:
    """The update_seq is read while the rows are: an update that runs right after the read
    lock is released must not lend its update_seq to rows read before it."""
    store = make_store({"t": WEIGHTS})
    table = store.get("t")
    release = table.lock.release_read

    def release_then_update() -> None:  # the most unlucky moment for a writer to come in
        release()
        if table.update_seq in (0, 1):
            store.update_rows("t", np.array([0]), np.full((1, DIM), 7.0, np.float32))

    table.lock.release_read = release_then_update  # type: ignore[method-assign]
    rows, stamp = table.read(lambda: table.weights[0].clone())
    assert (stamp.update_seq, table.update_seq) == (0, 1)
    np.testing.assert_array_equal(rows.numpy(), WEIGHTS[0])
    # The plain lookup's short way (Table.take) the same: its update_seq is its rows'.
    taken, _, stamp = table.take(np.array([0, 0]))
    assert (stamp.update_seq, table.update_seq) == (1, 2)
    np.testing.assert_array_equal(taken, np.full((2, DIM), 7.0, np.float32))


def test_a_seqlock_read_overlapping_a_write_reads_again() -> None:
    """Across processes (`shared_state`): a read during which the sequence number moved
    is thrown away and done again, and its stamp is the second read's."""
    table = Table(name="t", weights=torch.from_numpy(WEIGHTS.copy()), source="test",
                  shared_state=torch.tensor([0, 1, 0], dtype=torch.int64))  # fmt: skip
    reads: list[int] = []

    def kernel() -> torch.Tensor:
        rows = table.weights[0].clone()
        reads.append(1)
        if len(reads) == 1:  # another process writes meanwhile: odd, rows, version, even
            assert table.shared_state is not None
            table.shared_state[0] += 1
            table.weights[0] = 5.0
            table.shared_state[2] = 2
            table.shared_state[0] += 1
        return rows

    rows, stamp = table.read(kernel)
    assert len(reads) == 2 and stamp == (1, 2)
    assert (rows == 5.0).all()


def test_a_store_of_one_table_still_answers_the_empty_name() -> None:
    store = TableStore()
    store.add(Table(name="only", weights=torch.zeros(3, 2), source="test"))
    lookups = Lookups(store, Limits(10, 10**6, 1 << 20, 1 << 20))
    assert lookups.lookup("", np.array([2]), "float32").table.name == "only"
