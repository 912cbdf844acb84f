"""The table module's pieces one at a time: the id checks and their messages, the
read/write lock, and what a Table reports about itself.

Lookups, updates and reloads exercise these through servers (test_limits, test_updates,
test_reload); here each is pinned where it is defined. Written against mutation
testing's survivors (`make mutate MODULE=tables`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from embedding_server.core import kernels
from embedding_server.core.cache import CachedRows
from embedding_server.core.tables import ReadWriteLock, Table, check_ids, check_padding_id
from embedding_server.errors import InvalidRequest

from .conftest import exactly


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_ids_in_range_pass_and_the_first_bad_one_is_named(dtype: type) -> None:
    check_ids(np.array([0, 9, 3], dtype=dtype), 10)
    check_ids(np.zeros((0, 4), dtype=dtype), 0)
    cases = [
        ([0, 10, -1], "id 10 at position 1 is out of range"),
        ([9, 10], "id 10 at position 1 is out of range"),
        ([0, 3, -1], "id -1 at position 2 is out of range"),
        ([[0, 1], [2, 11]], "id 11 at position 3 (index [1, 1]) is out of range"),
        ([[[5], [-7]]], "id -7 at position 1 (index [0, 1, 0]) is out of range"),
    ]
    for ids, start in cases:
        message = f"{start}: table has 10 rows, ids must be in [0, 10)"
        with pytest.raises(InvalidRequest, match=exactly(message)):
            check_ids(np.array(ids, dtype=dtype), 10)
    scalar = "id 12 at position 0 is out of range: table has 10 rows, ids must be in [0, 10)"
    with pytest.raises(InvalidRequest, match=exactly(scalar)):
        check_ids(np.array(12, dtype=dtype), 10)


def test_the_extremes_of_int64_are_out_of_range() -> None:
    for bad in (np.iinfo(np.int64).min, np.iinfo(np.int64).max, 10):
        with pytest.raises(InvalidRequest, match=f"^id {bad} at position 0 "):
            check_ids(np.array([bad], dtype=np.int64), 10)
    check_ids(np.array([9], dtype=np.int64), 10)  # the last row


def test_many_ids_and_strided_ids_are_checked_like_a_few() -> None:
    """A few contiguous int64 ids are checked by Python's max over their bytes, more (and
    strided ones) by numpy: the same answers either way."""
    many = np.arange(100, dtype=np.int64) % 10
    check_ids(many, 10)
    check_ids(many[:64].reshape(8, 8), 10)  # numpy's reduce over every axis, not one
    for bad, position in ((-3, 77), (10, 99), (np.iinfo(np.int64).min, 40)):
        ids = many.copy()
        ids[position] = bad
        with pytest.raises(InvalidRequest, match=rf"^id {bad} at position {position} "):
            check_ids(ids, 10)
    columns = np.array([[0, -1], [2, 3], [4, 10]], dtype=np.int64)
    check_ids(columns[:, 0], 10)  # a strided view: [0, 2, 4]
    with pytest.raises(InvalidRequest, match=r"^id -1 at position 0 "):
        check_ids(columns[:, 1], 10)


def test_padding_ids_must_be_rows() -> None:
    check_padding_id(0, 5, "t")
    check_padding_id(4, 5, "t")
    for bad in (5, -1):
        message = f"padding_id {bad} is not a row of table 't': it must be in [0, 5)"
        with pytest.raises(InvalidRequest, match=exactly(message)):
            check_padding_id(bad, 5, "t")


def test_a_writer_waits_for_readers_and_goes_before_new_ones() -> None:
    lock = ReadWriteLock()
    order: list[str] = []
    lock.acquire_read()
    writer = threading.Thread(target=lambda: _write(lock, order))
    late_reader = threading.Thread(target=lambda: _read(lock, order))
    try:
        writer.start()
        time.sleep(0.2)
        assert order == []  # the writer waits for the reader inside
        late_reader.start()
        time.sleep(0.2)
        assert order == []  # a new reader waits behind the waiting writer
        lock.release_read()
        writer.join(5)
        late_reader.join(5)
        assert order == ["write", "read"]
    finally:
        writer.join(5)
        late_reader.join(5)
    with lock.reading(), lock.reading():  # readers share it
        pass
    with lock.writing():
        pass


def test_a_read_that_must_not_wait_is_refused_while_a_writer_writes_or_waits() -> None:
    """`try_acquire_read` (the event loop's read) is taken at once when no writer is about,
    and then held like `acquire_read` (a writer waits for every such reader); while a
    writer writes or waits it is refused and takes nothing, and `Table.take` returns None
    then, its rows again once the writer is done."""
    lock = ReadWriteLock()
    order: list[str] = []
    assert lock.try_acquire_read() and lock.try_acquire_read()  # readers share it
    writer = threading.Thread(target=lambda: _write(lock, order))
    try:
        writer.start()
        time.sleep(0.2)
        assert order == []  # the writer waits for both readers
        assert not lock.try_acquire_read()  # refused: a writer waits
        lock.release_read()
        time.sleep(0.2)
        assert order == []  # one reader still in
        lock.release_read()
        writer.join(5)
        assert order == ["write"]
    finally:
        writer.join(5)
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    shared = table(weights.clone(), shared_state=torch.tensor([0, 1, 0], dtype=torch.int64))
    for held in (table(weights.clone()), shared):
        with held.lock.writing():
            assert not held.lock.try_acquire_read()  # refused: a writer writes
            assert held.take(np.array([1])) is None
        taken = held.take(np.array([1]))
        assert taken is not None
        np.testing.assert_array_equal(taken[0], weights.numpy()[[1]])
        with held.lock.writing():  # the refusals and the take left no reader behind
            pass


def _write(lock: ReadWriteLock, order: list[str]) -> None:
    with lock.writing():
        order.append("write")


def _read(lock: ReadWriteLock, order: list[str]) -> None:
    with lock.reading():
        order.append("read")


def test_a_lock_pickles_as_a_fresh_one() -> None:
    import pickle

    lock = ReadWriteLock()
    lock.acquire_read()
    copy = pickle.loads(pickle.dumps(lock))
    with copy.writing():  # not held by the original's reader
        pass


def table(weights: torch.Tensor, **fields: object) -> Table:
    return Table(name="t", weights=weights, source="test", **fields)  # type: ignore[arg-type]


def test_what_a_table_reports_about_itself() -> None:
    floats = table(torch.zeros((6, 4), dtype=torch.float16))
    assert (floats.rows, floats.dim, floats.dtype, floats.device) == (6, 4, "float16", "cpu")
    assert (floats.part, floats.nbytes, floats.stamp) == ((0, 1), 48, (1, 0))
    assert floats.memory() == {torch.device("cpu"): 48}
    assert floats.rows_for_kernels() is floats.weights
    codes, qparams = torch.zeros((6, 4), dtype=torch.uint8), torch.zeros((6, 2))
    quantized = table(codes, qparams=qparams)
    assert (quantized.dtype, quantized.nbytes) == ("int8", 24 + 48)
    rows = quantized.rows_for_kernels()
    assert isinstance(rows, kernels.QuantizedRows)
    assert rows.codes is codes and rows.qparams is qparams
    host = torch.zeros((40, 4))
    cached = table(host, cache=CachedRows(host, 10, torch.device("cpu")))
    assert cached.rows_for_kernels() is cached.cache and cached.device == "cpu"
    # The cache on the weights' own device: both counted there.
    assert cached.memory() == {torch.device("cpu"): 40 * 4 * 4 + 10 * 4 * 4}


def test_versions_live_in_shared_state_when_there_is_one() -> None:
    plain = table(torch.zeros((2, 2)))
    plain.version, plain.update_seq = 5, 11
    assert plain.stamp == (5, 11)
    state = torch.tensor([0, 1, 0], dtype=torch.int64)
    shared = table(torch.zeros((2, 2)), shared_state=state)
    shared.version, shared.update_seq = 7, 12
    assert shared.stamp == (7, 12) and state.tolist() == [0, 7, 12]
    state[1], state[2] = 9, 13  # another process's reload and update
    assert shared.stamp == (9, 13)
    assert shared.read(lambda: "rows") == ("rows", (9, 13))
    assert plain.read(lambda: "rows") == ("rows", (5, 11))


def test_a_shared_read_waits_out_a_write_and_rereads_after_an_overlap() -> None:
    state = torch.tensor([1, 3, 0], dtype=torch.int64)  # odd: a write is under way
    shared = table(torch.zeros((2, 2)), shared_state=state)
    calls: list[int] = []

    def kernel() -> int:
        calls.append(int(state[0]))
        if len(calls) == 1:
            state[0] = 4  # a write began and ended during this read
            state[2] = 4
        return len(calls)

    def finish_write() -> None:
        time.sleep(0.1)
        state[0] = 2

    writer = threading.Thread(target=finish_write)
    writer.start()
    try:
        assert shared.read(kernel) == (2, (3, 4))
        assert calls == [2, 4]  # never read while odd; read again after the overlap
    finally:
        writer.join(5)


def test_host_arrays_are_views_of_the_weights_wire_bits() -> None:
    weights = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    floats = table(weights)
    view = floats.host_array()
    assert view.dtype == np.float32 and np.shares_memory(view, weights.numpy())
    assert floats.host_array() is view  # made once
    halves = table(weights.to(torch.bfloat16)).host_array()
    assert halves.dtype == np.int16  # bfloat16's bits
    assert floats.__getstate__()["_views"] == {}  # never pickled


def test_take_reads_rows_by_numpy_with_the_seconds_and_version_it_saw() -> None:
    """`Table.take`, the plain lookup's read: rows along axis 0 under the read lock, the
    seconds the take ran, the version; across processes (shared state) through the
    seqlock, reading again after an overlapping write."""
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    expected = weights.numpy()[[[2], [0]]]
    plain = table(weights.clone())
    plain.update_seq = 6
    rows, seconds, stamp = plain.take(np.array([[2], [0]]))
    np.testing.assert_array_equal(rows, expected)
    assert 0 <= seconds < 1 and stamp == (1, 6)
    state = torch.tensor([0, 1, 3], dtype=torch.int64)
    shared = table(weights.clone(), shared_state=state)
    real = shared.host_array()
    reads: list[int] = []

    class Overlapped:  # the host array, with another process writing during the first take
        def take(self, ids: np.ndarray, axis: int) -> np.ndarray:
            reads.append(axis)
            if len(reads) == 1:
                state[0] += 2  # a whole write: odd while it ran, even again
                state[2] = 4
            return real.take(ids, axis)

    shared._views["weights"] = Overlapped()  # type: ignore[assignment]
    rows, seconds, stamp = shared.take(np.array([[2], [0]]))
    np.testing.assert_array_equal(rows, expected)
    assert reads == [0, 0] and stamp == (1, 4) and 0 <= seconds < 1


@pytest.mark.parametrize("way", ["take", "read"])
def test_the_stamp_is_read_with_the_rows_not_around_them(way: str) -> None:
    """A write lands just before the read takes its lock (and, for `read`, just after it
    lets go): the stamp returned is the update_seq of the rows returned, never one read
    apart from them (issue 29: a stamp read outside the read section went unseen)."""
    from embedding_server.core.store import TableStore

    store = TableStore()
    t = table(torch.zeros((4, 3)))
    store.add(t)
    lock = t.lock

    def write(value: float) -> None:
        update = store.prepare_update("t", np.arange(4), np.full((4, 3), value, np.float32))
        store.write_update(update)

    class Interleaved:  # the table's lock, with a write landing around each acquisition
        def __getattr__(self, name: str) -> object:
            return getattr(lock, name)

        def try_acquire_read(self) -> bool:
            write(float(t.update_seq + 1))
            return lock.try_acquire_read()

        def acquire_read(self) -> None:
            write(float(t.update_seq + 1))
            lock.acquire_read()

        def release_read(self) -> None:
            lock.release_read()
            write(float(t.update_seq + 1))

    t.lock = Interleaved()  # type: ignore[assignment]
    if way == "take":
        taken = t.take(np.arange(4))
        assert taken is not None
        rows, _, stamp = taken
    else:
        rows, stamp = t.read(lambda: t.weights.numpy().copy())
    assert np.unique(rows).tolist() == [float(stamp.update_seq)], (rows, stamp)
    assert stamp.update_seq == 1
