"""The lookup core (`Lookups`) called directly: shard tables, the batcher and the host
take chosen when they should be, deadlines reaching the dense kernels, the limits'
messages.

Servers exercise all of this in test_service, test_limits, test_pooling and
test_sharding (as separate processes, which mutation testing cannot see into); here
each decision is pinned in process. Written against mutation testing's survivors
(`make mutate MODULE=lookup`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from embedding_client import codec
from embedding_client.codec import Bags
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.shards import Shard
from embedding_server.core import kernels
from embedding_server.core.batcher import Batcher
from embedding_server.core.lookup import Limits, Lookups
from embedding_server.core.sharding import ShardRows
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    OverLimit,
)
from embedding_server.transport import servicer as servicer_module
from embedding_server.transport.servicer import EmbeddingServicer

from .conftest import exactly

FULL = (np.random.default_rng(3).integers(-8, 9, (100, 4)) / 4).astype(np.float32)
LIMITS = Limits(
    max_ids=5, max_dense_macs=10**9, dense_chunk_cells=1 << 16, max_response_bytes=1 << 20
)


def lookups_of(table: Table, limits: Limits = LIMITS, batcher: Batcher | None = None) -> Lookups:
    store = TableStore()
    store.add(table)
    return Lookups(store, limits, batcher)


@pytest.fixture
def shard() -> tuple[Lookups, np.ndarray]:
    """Shard 1 of 2 of FULL, and the global ids it holds."""
    rows = ShardRows.of(Shard(1, 2), len(FULL), chunk=64)
    table = Table(name="t", weights=torch.from_numpy(FULL[rows.owned]), source="test", shard=rows)
    return lookups_of(table), rows.owned


def test_a_shard_looks_up_global_ids_and_pads_by_global_id(
    shard: tuple[Lookups, np.ndarray],
) -> None:
    lookups, owned = shard
    mine = owned[[4, 0, 9]]
    out = lookups.lookup("t", mine, "float32")
    np.testing.assert_array_equal(out.vectors, FULL[mine])
    padded = lookups.lookup("t", mine, "float32", padding_id=int(mine[1]))
    expected = FULL[mine].copy()
    expected[1] = 0
    np.testing.assert_array_equal(padded.vectors, expected)
    dense = lookups.lookup("t", mine, "float32", dense=True)
    np.testing.assert_array_equal(dense.vectors, FULL[mine])


def test_a_shard_refuses_other_shards_ids_and_counts_before_mapping(
    shard: tuple[Lookups, np.ndarray],
) -> None:
    lookups, owned = shard
    foreign = next(i for i in range(100) if i not in set(owned.tolist()))
    on_other = f"^id {foreign} at position 1 is on shard 0/2 of table 't'"
    with pytest.raises(FailedPrecondition, match=on_other):
        lookups.lookup("t", np.array([owned[0], foreign]), "float32")
    # Over the id limit: refused by count before any id is mapped (all foreign here).
    too_many = np.full(6, foreign)
    message = "6 ids in one request; this server takes at most 5 (--max-ids): split the request"
    with pytest.raises(OverLimit, match=exactly(message)):
        lookups.lookup("t", too_many, "float32")


def test_expect_shard_is_checked_against_the_part_held(shard: tuple[Lookups, np.ndarray]) -> None:
    lookups, owned = shard
    assert lookups.lookup("t", owned[:2], "float32", expect_shard=(1, 2)).vectors.shape == (2, 4)
    message = (
        "the request is for shard 0/2 of table 't', but this server holds shard 1/2: the "
        "client's shard map is stale (rebuild it from ListTables)"
    )
    with pytest.raises(FailedPrecondition, match=exactly(message)):
        lookups.lookup("t", owned[:2], "float32", expect_shard=(0, 2))
    whole = lookups_of(Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test"))
    with pytest.raises(FailedPrecondition, match="but this server holds the whole table"):
        whole.lookup("w", np.array([1]), "float32", expect_shard=(1, 2))
    assert whole.lookup("w", np.array([1]), "float32", expect_shard=(0, 1)).vectors.shape == (1, 4)


@pytest.fixture
def whole() -> Lookups:
    return lookups_of(Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test"))


def test_a_plain_lookup_is_a_gather_by_the_host_take(
    whole: Lookups, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    real = kernels.host_take

    def spy(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        taken.append(ids.size)
        return real(rows, ids)

    monkeypatch.setattr(kernels, "host_take", spy)
    out = whole.lookup("w", np.array([3, 1]), "float32")
    assert out.kernel == "gather" and taken == [2]
    np.testing.assert_array_equal(out.vectors, FULL[[3, 1]])
    whole.lookup("w", np.array([3, 1]), "float16")  # another dtype: torch converts
    assert taken == [2]


@pytest.mark.parametrize("stored", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("ids", [[3, 1, 3], [[7], [2]], [], [99]], ids=["1d", "2d", "none", "last"])
def test_the_short_way_answers_what_lookup_answers(stored: str, dtype: str, ids: list[int]) -> None:
    values = FULL + np.float32(1 / 3)  # not exact in 16 bits: conversions must round alike
    weights = torch.from_numpy(values).to(getattr(torch, stored))
    table = Table(name="w", weights=weights, source="test")
    lookups = lookups_of(table)
    array = np.array(ids, dtype=np.int64)
    short, general = lookups.plain("w", array, dtype), lookups.lookup("w", array, dtype)
    assert short is not None
    assert short.vectors.dtype == general.vectors.dtype
    np.testing.assert_array_equal(short.vectors, general.vectors)
    assert short[1:4] == general[1:4] == ((*array.shape, 4), dtype, table)
    assert (short.stamp, short.kernel) == (general.stamp, general.kernel) == ((1, 0), "gather")
    assert 0 <= short.kernel_seconds < 1


def test_the_short_way_leaves_every_other_call_to_lookup(whole: Lookups) -> None:
    ids = np.array([1, 2])
    assert whole.plain("", ids, "float32") is None  # no table of that (resolved) name
    most = np.zeros(kernels.HOST_TAKE_ELEMENTS // 4, np.int64)  # the host take's most ids
    with pytest.raises(OverLimit, match=f"^{most.size} ids in one request"):
        whole.plain("w", most, "float32")  # taken the short way: its limits refuse it
    assert whole.plain("w", np.append(most, 0), "float32") is None  # past it: torch's gather
    weights = torch.from_numpy(FULL.copy())
    rows = ShardRows.of(Shard(0, 2), len(FULL), chunk=64)
    sharded = Table(name="s", weights=weights[rows.owned], source="test", shard=rows)
    codes, params = kernels.quantize(weights)
    quantized = Table(name="q", weights=codes, source="test", qparams=params)
    for table in (sharded, quantized):
        assert lookups_of(table).plain(table.name, ids, "float32") is None
    batcher = Batcher(max_delay_s=0.001, max_ids=4096)
    try:
        table = Table(name="w", weights=weights, source="test")
        assert lookups_of(table, batcher=batcher).plain("w", ids, "float32") is None
    finally:
        batcher.close()


def test_the_short_way_refuses_what_lookup_refuses() -> None:
    small = Limits(max_ids=3, max_dense_macs=1, dense_chunk_cells=1, max_response_bytes=40)
    lookups = lookups_of(
        Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test"), small
    )
    refusals = [
        ([1, 100], InvalidRequest, "id 100 at position 1 is out of range: table has 100 rows, "
                                   "ids must be in [0, 100)"),
        ([-1], InvalidRequest, "id -1 at position 0 is out of range: table has 100 rows, "
                               "ids must be in [0, 100)"),
        ([1, 2, 3, 4], OverLimit, "4 ids in one request; this server takes at most 3 "
                                  "(--max-ids): split the request"),
        ([1, 2, 3], OverLimit, "the response would be 48 bytes, over the 40-byte message "
                               "limit (--max-message-bytes): split the request or ask for "
                               "float16/bfloat16"),
    ]  # fmt: skip
    for ids, error, message in refusals:
        for how in (lookups.plain, lookups.lookup):
            with pytest.raises(error, match=exactly(message)):
                how("w", np.array(ids, dtype=np.int64), "float32")


def test_the_short_way_reads_rows_whole_and_says_which_version() -> None:
    """It never waits for a writer (it runs on the server's event loop): while one writes,
    or waits for a reader to finish, it leaves the call to `lookup` at once; after the
    write it reads the new rows with their version."""
    table = Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test")
    lookups = lookups_of(table)
    with table.lock.writing():  # an update under way
        started = time.monotonic()
        assert lookups.plain("w", np.array([4]), "float32") is None
        assert time.monotonic() - started < 1
        table.weights[4] = 9.0
        table.update_seq = 2
    wrote = threading.Event()

    def update() -> None:
        with table.lock.writing():
            wrote.set()

    table.lock.acquire_read()  # a lookup reading ...
    writer = threading.Thread(target=update, daemon=True)
    try:
        writer.start()  # ... and an update waiting for it
        deadline = time.monotonic() + 10
        while not table.lock._writers_waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert lookups.plain("w", np.array([4]), "float32") is None
    finally:
        table.lock.release_read()
        writer.join(timeout=10)
    assert wrote.is_set()
    out = lookups.plain("w", np.array([4]), "float32")
    assert out is not None and out.stamp == (1, 2)
    assert (out.vectors == 9.0).all()
    shared = Table(name="s", weights=torch.from_numpy(FULL.copy()), source="test",
                   shared_state=torch.tensor([0, 5, 3], dtype=torch.int64))  # fmt: skip
    out = lookups_of(shared).plain("s", np.array([2, 0]), "float32")
    assert out is not None and out.stamp == (5, 3)
    np.testing.assert_array_equal(out.vectors, FULL[[2, 0]])


def test_the_servicer_takes_the_short_way_for_plain_requests_only(
    whole: Lookups, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer = EmbeddingServicer(whole)
    shortcuts: list[str] = []
    real = whole.plain

    def plain(table: str, ids: np.ndarray, dtype: str, max_elements: int) -> object:
        shortcuts.append(table)
        return real(table, ids, dtype, max_elements)

    monkeypatch.setattr(whole, "plain", plain)
    context = SimpleNamespace(time_remaining=lambda: None)
    lookup = servicer.Lookup
    answer = asyncio.run(lookup(codec.encode_lookup_request([[1, 2]], "", "float32"), context))  # type: ignore[arg-type]
    assert shortcuts == ["w"]  # the name resolved: the default table
    assert (answer.shape, answer.table) == ((1, 2, 4), "w")
    others = [
        codec.encode_lookup_request([1, 2], "w", "float32", padding_id=1),
        codec.encode_lookup_request([1, 2], "w", "float32", pooling="sum", lengths=[2]),
        codec.encode_lookup_request([1, 2], "w", "float32", pooling="max"),
        pb.LookupRequest(table="w", ids_list=[1, 2], expect_shard=pb.ShardOf(index=0, count=1)),
    ]
    for request in others:
        asyncio.run(lookup(request, context))  # type: ignore[arg-type]
    asyncio.run(servicer.LookupDense(codec.encode_lookup_request([1], "w", "float32"), context))  # type: ignore[arg-type]
    assert shortcuts == ["w"]
    bag_fields = [pb.LookupRequest(table="w", ids_list=[1, 2], lengths=[2]),
                  pb.LookupRequest(table="w", ids_list=[1, 2], offsets=[0]),
                  pb.LookupRequest(table="w", ids_list=[1], per_id_weights=bytes(4))]  # fmt: skip
    for request in bag_fields:  # without pooling: refused, not looked up the short way
        with pytest.raises(codec.WireError, match=r"^offsets, lengths and per_id_weights need"):
            asyncio.run(lookup(request, context))  # type: ignore[arg-type]


def test_the_servicer_hands_all_but_small_plain_lookups_to_the_pool(
    whole: Lookups, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the event loop: plain lookups of up to LOOP_TAKE_ELEMENTS values. A larger one,
    and any other (here dense), is handed to `offload` (the handler pool), dense as a
    call that waits; the answers are the same."""
    handed: list[tuple[str, bool]] = []

    async def offload(call, *args, waits=False):  # type: ignore[no-untyped-def]
        handed.append((call.args[0], waits))
        return call(*args)

    monkeypatch.setattr(servicer_module, "LOOP_TAKE_ELEMENTS", 8)  # two rows of dim 4
    servicer = EmbeddingServicer(whole, offload)
    context = SimpleNamespace(time_remaining=lambda: None)
    for ids, pool in (([1, 2], []), ([1, 2, 3], [("w", False)])):
        request = codec.encode_lookup_request(ids, "w", "float32")
        answer = asyncio.run(servicer.Lookup(request, context))  # type: ignore[arg-type]
        assert handed == pool
        np.testing.assert_array_equal(
            np.frombuffer(answer.vectors, "<f4").reshape(-1, 4), FULL[ids]
        )
        handed.clear()
    request = codec.encode_lookup_request([1], "w", "float32")
    asyncio.run(servicer.LookupDense(request, context))  # type: ignore[arg-type]
    assert handed == [("w", True)]


def test_large_answers_are_serialized_in_the_pool(
    whole: Lookups, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers over LOOP_ANSWER_BYTES (Lookup, LookupDense, LookupMany) are serialized by
    `offload` (the handler pool), to the same bytes; smaller ones are left to grpc."""
    handed: list[str] = []

    async def offload(call, *args, waits=False):  # type: ignore[no-untyped-def]
        handed.append(getattr(call, "__name__", ""))
        return call(*args)

    monkeypatch.setattr(servicer_module, "LOOP_ANSWER_BYTES", 32)  # two rows of dim 4
    servicer = EmbeddingServicer(whole, offload)
    context = SimpleNamespace(time_remaining=lambda: None)
    for ids, serialized in (([1, 2], False), ([1, 2, 3], True)):
        request = codec.encode_lookup_request(ids, "w", "float32")
        for method in (servicer.Lookup, servicer.LookupDense):
            handed.clear()
            answer = asyncio.run(method(request, context))  # type: ignore[operator]
            assert isinstance(answer, servicer_module.Serialized) is serialized
            assert ("SerializeToString" in handed) is serialized
            parsed = pb.LookupResponse.FromString(answer.SerializeToString())
            np.testing.assert_array_equal(
                np.frombuffer(parsed.vectors, "<f4").reshape(-1, 4), FULL[ids]
            )
        many = pb.LookupManyRequest(features=[pb.FeatureLookup(feature="f", lookup=request)])
        answer = asyncio.run(servicer.LookupMany(many, context))  # type: ignore[arg-type]
        assert isinstance(answer, servicer_module.Serialized) is serialized
        parsed_many = pb.LookupManyResponse.FromString(answer.SerializeToString())
        assert parsed_many.results[0].result.vectors == FULL[ids].tobytes()


def test_a_batcher_given_serves_the_plain_gathers() -> None:
    batcher = Batcher(max_delay_s=0.001, max_ids=4096)
    try:
        announced: list[int] = []
        real = batcher.expect

        def expect():  # type: ignore[no-untyped-def]
            announced.append(1)
            return real()

        batcher.expect = expect  # type: ignore[method-assign]
        table = Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test")
        lookups = lookups_of(table, batcher=batcher)
        out = lookups.lookup("w", np.array([[7], [2]]), "float16")
        vectors = np.asarray(out.vectors).view(np.float16).reshape(out.shape)
        np.testing.assert_array_equal(vectors, FULL[[[7], [2]]])
        assert (out.shape, out.dtype, out.table, out.stamp) == ((2, 1, 4), "float16", table, (1, 0))
        assert out.kernel == "gather" and out.kernel_seconds >= 0
        assert announced == [1]
        with pytest.raises(InvalidRequest, match=r"^id 100 at position 1 is out of range"):
            lookups.lookup("w", np.array([7, 100]), "float32")  # checked while announced
        assert announced == [1, 1]
        bags = Bags("sum", np.array([0]), (1,))
        lookups.lookup("w", np.array([7, 2]), "float32", padding_id=0)  # none batched:
        lookups.lookup("w", np.array([7, 2]), "float32", dense=True)
        lookups.lookup("w", np.array([7, 2]), "float32", bags=bags)
        assert announced == [1, 1]
    finally:
        batcher.close()


def test_the_deadline_reaches_each_dense_kernel(whole: Lookups) -> None:
    passed = time.monotonic() - 1
    with pytest.raises(DeadlineExceeded):
        whole.lookup("w", np.array([1, 2]), "float32", dense=True, deadline=passed)
    bags = Bags("sum", np.array([0, 1]), (2,))
    with pytest.raises(DeadlineExceeded):
        whole.lookup("w", np.array([1, 2]), "float32", dense=True, deadline=passed, bags=bags)


def test_the_response_limit_names_the_bytes_and_the_way_out() -> None:
    small = Limits(
        max_ids=5, max_dense_macs=10**9, dense_chunk_cells=1 << 16, max_response_bytes=40
    )
    lookups = lookups_of(
        Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test"), small
    )
    message = (
        "the response would be 48 bytes, over the 40-byte message limit (--max-message-bytes): "
        "split the request or ask for float16/bfloat16"
    )
    with pytest.raises(OverLimit, match=exactly(message)):
        lookups.lookup("w", np.array([1, 2, 3]), "float32")
    assert lookups.lookup("w", np.array([1, 2, 3]), "float16").vectors.nbytes == 24


def test_one_hot_matmuls_take_a_place_and_give_up_at_their_deadline(
    held_matmuls: SimpleNamespace,
) -> None:
    """With one place, a second one-hot matmul waits for the first and gives up before
    its deadline, saying why; plain gathers never wait for a place."""
    one = Limits(max_ids=5, max_dense_macs=10**9, dense_chunk_cells=1 << 16,
                 max_response_bytes=1 << 20, dense_concurrency=1)  # fmt: skip
    lookups = lookups_of(Table(name="w", weights=torch.from_numpy(FULL.copy()), source="test"), one)
    entered, release = held_matmuls.entered, held_matmuls.release
    first: list[np.ndarray] = []
    holder = threading.Thread(
        target=lambda: first.append(
            np.asarray(lookups.lookup("w", np.array([1, 2]), "float32", dense=True).vectors)
        )
    )
    # Without the place, the calls below would wait for the first: freed in 5 s, never hung.
    releaser = threading.Timer(5, release.set)
    try:
        holder.start()
        assert entered.wait(10)
        releaser.start()
        plain = lookups.lookup("w", np.array([3]), "float32")
        assert not release.is_set()  # answered while the one-hot matmul held the place
        np.testing.assert_array_equal(np.asarray(plain.vectors).reshape(1, 4), FULL[[3]])
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=exactly(
            "the deadline passed while the call waited for other one-hot matmuls "
            "(at most 1 run at once, --dense-concurrency)"
        )):  # fmt: skip
            lookups.lookup("w", np.array([4]), "float32", dense=True,
                           deadline=time.monotonic() + 0.5)  # fmt: skip
        assert time.monotonic() - started < 0.5  # gave up a little before the deadline
    finally:
        release.set()
        releaser.cancel()
        holder.join(timeout=10)
    np.testing.assert_array_equal(first[0].reshape(2, 4), FULL[[1, 2]])


def test_a_device_out_of_memory_is_over_limit_with_the_way_out(
    whole: Lookups, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(kernels, "one_hot_matmul", out_of_memory)
    with pytest.raises(OverLimit, match=exactly(
        "cpu has no memory left for this request on table 'w' (2 ids); retry with fewer ids"
    )):  # fmt: skip
        whole.lookup("w", np.array([1, 2]), "float32", dense=True)
