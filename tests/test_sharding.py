"""Shards and replicas: 2 shards x 2 replicas as real server processes, a ShardedClient in
front, checked against one unsharded server on the same files, and under faults (a
replica killed with SIGKILL, every replica restarted in turn) while calls run."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from embedding_client import EmbeddingClient, EmbeddingError, Feature, Pooling
from embedding_client.codec import encode_lookup_request
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_client.sharded import AsyncShardedClient, ShardedClient, ShardMap
from embedding_client.shards import Shard, mix64, shard_of
from embedding_server.config import TableSpec, load_config
from embedding_server.core import sharding
from embedding_server.core.sources import TableLoadError, load_table, write_table

from .conftest import BIN, free_port, random_table, server_env, wait_serving

SHARDS, REPLICAS = 2, 2
RANDOM = random_table(3000, 12, seed=41)
# Small multiples of 1/4: every sum of them is exact in float32, so pooled sums combined
# over shards must equal one server's to the bit, whatever the order of the additions.
QUARTERS = (np.random.default_rng(42).integers(-40, 40, (2000, 8)) / 4).astype(np.float32)
WHOLE = random_table(500, 4, seed=43)


def test_partition_is_pinned_and_spreads_contiguous_ids() -> None:
    # splitmix64's finaliser, computed here with Python integers (independent of numpy).
    mask = (1 << 64) - 1

    def reference(x: int) -> int:
        z = x & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    ids = np.array([0, 1, 2, 12345, 2**40 + 7, 2**63 - 1, -1], dtype=np.int64)
    assert [int(v) for v in mix64(ids)] == [reference(int(i)) for i in ids]
    # Pinned: changing the function moves every row of every deployed shard.
    assert [int(v) for v in mix64(ids[:4])] == [
        0, 6238072747940578789, 15839785061582574730, 17540659726606785873,
    ]  # fmt: skip
    assert shard_of(np.arange(8), 4).tolist() == [int(reference(i) % 4) for i in range(8)]
    # A hot contiguous range spreads evenly (a plain id % N would too; id // (R/N) not).
    counts = np.bincount(shard_of(np.arange(1_000_000, 1_100_000), 4), minlength=4)
    assert counts.min() > 0.98 * 25_000 and counts.max() < 1.02 * 25_000
    owned = Shard(1, 3).owned(10_000, chunk=777)  # across chunks
    assert (shard_of(owned, 3) == 1).all() and (np.diff(owned) > 0).all()
    assert len(owned) + len(Shard(0, 3).owned(10_000)) + len(Shard(2, 3).owned(10_000)) == 10_000


def test_shard_text_and_maps_parse_or_say_why() -> None:
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0", ""):
        with pytest.raises(ValueError, match="I/N"):
            Shard.parse(bad)
    assert ShardMap.parse("a:1, b:1; c:1").shards == (("a:1", "b:1"), ("c:1",))
    assert ShardMap.of(["a:1", ["b:1", "c:1"]]).shards == (("a:1",), ("b:1", "c:1"))
    with pytest.raises(ValueError):
        ShardMap.parse("a:1;;b:1")


def test_shard_settings_from_flags_env_and_config(tmp_path: Path) -> None:
    config = tmp_path / "tables.toml"
    config.write_text(
        '[[table]]\nname = "a"\nsource = "a.npy"\n\n'
        '[[table]]\nname = "b"\nsource = "b.npy"\nshard = "none"\n\n'
        '[[table]]\nname = "c"\nsource = "c.npy"\nshard = "0/3"\n'
    )
    loaded = load_config(["--config", str(config), "--shard", "1/2"], env={})
    assert [t.shard for t in loaded.tables] == [Shard(1, 2), None, Shard(0, 3)]
    from_env = load_config(["--table", "t=/t.npy"], env={"EMBEDDING_SHARD": "0/2"})
    assert from_env.shard == Shard(0, 2) and from_env.tables[0].shard == Shard(0, 2)
    with pytest.raises(SystemExit):
        load_config(["--shard", "2/2"], env={})
    config.write_text('[[table]]\nname = "a"\nsource = "a.npy"\nshard = "x"\n')
    with pytest.raises(SystemExit):
        load_config(["--config", str(config)], env={})


def test_a_shard_loads_its_rows_from_a_full_file_or_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = tmp_path / "full.npy"
    np.save(full, RANDOM)
    monkeypatch.setattr(sharding, "SPAN_ROWS", 100)  # many spans per chunk
    shard = Shard(1, 3)
    table = load_table(TableSpec("t", full, shard=shard), torch.device("cpu"))
    owned = shard.owned(len(RANDOM))
    assert table.shard is not None and table.shard.rows == len(RANDOM)
    assert np.array_equal(table.weights.numpy(), RANDOM[owned])
    # Its own file (as SnapshotTable on a shard server writes it) says which shard it is.
    own = tmp_path / "own.safetensors"
    with own.open("wb") as out:
        write_table(out, ".safetensors", {"t": table.weights}, table.shard.metadata())
    again = load_table(TableSpec("t", own, shard=shard), torch.device("cpu"))
    assert np.array_equal(again.weights.numpy(), RANDOM[owned])
    assert again.shard is not None and np.array_equal(again.shard.owned, owned)
    with pytest.raises(TableLoadError, match=r"holds shard 1/3 .* start it with --shard 1/3"):
        load_table(TableSpec("t", own), torch.device("cpu"))
    with pytest.raises(TableLoadError, match="holds shard 1/3"):
        load_table(TableSpec("t", own, shard=Shard(0, 3)), torch.device("cpu"))


# ------------------------------------------------------------------ the cluster


@dataclass
class Replica:
    """One server process: shard `shard` (None: the unsharded reference) on `port`."""

    shard: Shard | None
    config: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> subprocess.Popen[str]:
        log = (self.config.parent / f"server-{self.port}.log").open("a")
        self.process = subprocess.Popen(
            [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", "0", "--config", str(self.config), "--grace", "5",
             "--allow-loopback-admin", "true",
             *(["--shard", str(self.shard)] if self.shard else [])],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=server_env(),
        )  # fmt: skip
        return self.process

    def wait(self) -> None:
        assert self.process is not None
        wait_serving(self.target, self.process)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)


@dataclass
class Cluster:
    replicas: list[list[Replica]]  # per shard
    reference: Replica
    tables: dict[str, np.ndarray]

    @property
    def map(self) -> list[list[str]]:
        return [[r.target for r in shard] for shard in self.replicas]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("shards")
    tables = {"r": RANDOM.copy(), "q": QUARTERS.copy(), "w": WHOLE.copy()}
    for name, values in tables.items():
        np.save(folder / f"{name}.npy", values)
    config = folder / "tables.toml"
    config.write_text(
        '[[table]]\nname = "r"\nsource = "r.npy"\n\n[[table]]\nname = "q"\nsource = "q.npy"\n\n'
        '[[table]]\nname = "w"\nsource = "w.npy"\nshard = "none"\n'  # whole on every server
    )
    replicas = [[Replica(Shard(s, SHARDS), config) for _ in range(REPLICAS)] for s in range(SHARDS)]
    reference = Replica(None, config)
    everyone = [r for shard in replicas for r in shard] + [reference]
    try:
        for replica in everyone:
            replica.start()
        for replica in everyone:
            replica.wait()
        yield Cluster(replicas, reference, tables)
    finally:
        for replica in everyone:
            replica.stop(signal.SIGKILL)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_every_lookup_kind_matches_one_unsharded_server(cluster: Cluster) -> None:
    rng = np.random.default_rng(7)
    owner = shard_of(np.arange(3000), SHARDS)
    one_shard = np.flatnonzero(owner == 1)[:50]
    cases = {
        "random": rng.integers(0, 3000, 500),
        "duplicates": np.array([5, 5, 5, 9, 5, 9]),
        "all in one shard": one_shard,
        "2-D": rng.integers(0, 3000, (6, 7)),
        "scalar": np.int64(17),
        "empty": np.zeros(0, dtype=np.int64),
    }
    with (
        ShardedClient(cluster.map, timeout=30) as sharded,
        EmbeddingClient(cluster.reference.target, timeout=30) as whole,
    ):
        for name, ids in cases.items():
            for dtype in ("float32", "float16", "bfloat16"):
                got, want = sharded.lookup(ids, "r", dtype), whole.lookup(ids, "r", dtype)
                assert _same(got, want), (name, dtype)
            assert _same(sharded.lookup_dense(ids, "r"), whole.lookup_dense(ids, "r")), name
        ids = rng.integers(0, 2000, (5, 9))
        padding = int(ids[0, 0])
        assert _same(sharded.lookup(ids, "q", padding_id=padding),
                     whole.lookup(ids, "q", padding_id=padding))  # fmt: skip
        # Pooled bags crossing shards: last-axis bags, offsets with empty and trailing
        # empty bags, lengths, weights; with and without a padding id; gather and dense.
        flat = ids.reshape(-1)
        weights = rng.integers(-4, 4, flat.size).astype(np.float32) / 2
        poolings: list[Pooling | str] = [
            "sum", "mean", "max",
            Pooling("sum", offsets=[0, 0, 7, 30, 45]),
            Pooling("mean", lengths=[3, 0, 40, 1, 1]),  # bags of one id, too
            Pooling("max", offsets=[0, 1, 44]),
            Pooling("sum", offsets=[0, 10, 11], weights=weights),
        ]  # fmt: skip
        for pooling in poolings:
            bag_ids = ids if isinstance(pooling, str) else flat
            for pad in (None, padding):
                for dtype in ("float32", "bfloat16"):
                    got = sharded.lookup(bag_ids, "q", dtype, pooling=pooling, padding_id=pad)
                    want = whole.lookup(bag_ids, "q", dtype, pooling=pooling, padding_id=pad)
                    assert _same(got, want), (pooling, pad, dtype)
            dense = sharded.lookup_dense(bag_ids, "q", pooling=pooling, padding_id=pad)
            assert _same(dense, whole.lookup_dense(bag_ids, "q", pooling=pooling, padding_id=pad))
        # On float tables, sums combined in another order are equal to rounding.
        got = sharded.lookup(ids[:, :3] * 0 + rng.integers(0, 3000, (5, 3)), "r", pooling="mean")
        assert got.shape == (5, 12)
        features = {
            "plain": Feature(cases["2-D"], table="r"),
            "bags": Feature(ids, table="q", pooling="max", dtype="float16"),
            "whole": Feature([1, 2, 499], table="w"),
            "w": [3, 3],  # the table named like the feature
        }
        got_many, want_many = sharded.lookup_many(features), whole.lookup_many(features)
        assert list(got_many) == list(want_many)
        for name in features:
            assert _same(got_many[name].vectors, want_many[name].vectors), name
        assert got_many["plain"].shard_versions == (1, 1)
        tables = {t.name: t for t in sharded.tables()}
        assert tables["r"].rows == 3000 and tables["r"].bytes == RANDOM.nbytes
        assert tables["w"].rows == 500


def test_the_async_client_answers_the_same(cluster: Cluster) -> None:
    ids = np.random.default_rng(8).integers(0, 3000, (4, 25))

    async def run() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncShardedClient(cluster.map, timeout=30) as client:
            plain = await client.lookup(ids, "r")
            many = await client.lookup_many({"q": Feature(ids % 2000, pooling="sum")})
            return plain, many["q"].vectors

    plain, pooled = asyncio.run(run())
    with EmbeddingClient(cluster.reference.target) as whole:
        assert _same(plain, whole.lookup(ids, "r"))
        assert _same(pooled, whole.lookup(ids % 2000, "q", pooling="sum"))


def test_a_dns_shard_map_balances_and_updates_every_address(cluster: Cluster) -> None:
    # One dns:/// name per shard, as a Kubernetes headless Service gives (here a name
    # with one address: the resolver, round_robin and the update's own lookup still run).
    by_name = [[f"dns:///127.0.0.1:{shard[0].port}"] for shard in cluster.replicas]
    ids = np.random.default_rng(9).integers(0, 3000, 200)
    with ShardedClient(by_name, timeout=30) as client:
        assert _same(client.lookup(ids, "r"), cluster.tables["r"][ids])
        rows = cluster.tables["r"][ids[:3]]  # the same values: nothing changes
        answers = client.update_rows(
            np.unique(ids[:3]), cluster.tables["r"][np.unique(ids[:3])], "r"
        )
        assert {a.name for a in answers} == {"r"} and len(answers) >= 1
        assert _same(client.lookup(ids[:3], "r"), rows)


def test_a_stale_map_or_a_foreign_id_is_refused(cluster: Cluster) -> None:
    swapped = [cluster.map[1], cluster.map[0]]
    three = [*cluster.map, [cluster.reference.target]]
    for stale in (swapped, three):
        with ShardedClient(stale, timeout=10) as client:
            with pytest.raises(EmbeddingError, match="the map is stale") as caught:
                client.lookup([1, 2], "r")
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    foreign = int(np.flatnonzero(shard_of(np.arange(100), SHARDS) == 1)[0])
    shard0 = cluster.replicas[0][0].target
    with EmbeddingClient(shard0, timeout=10, max_attempts=1) as plain:
        info = {t.name: t for t in plain.tables()}
        assert info["r"].shard == (0, 2) and info["r"].rows == 3000
        assert info["r"].shard_rows == int((shard_of(np.arange(3000), 2) == 0).sum())
        assert info["w"].shard is None
        with pytest.raises(EmbeddingError, match=r"on shard 1/2 .* holds shard 0/2") as caught:
            plain.lookup([foreign], "r")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(EmbeddingError, match="out of range"):
            plain.lookup([3000], "r")
    # A request that says which shard it expects is refused by another.
    request = encode_lookup_request([0], "r", "float32")
    request.expect_shard.index, request.expect_shard.count = 1, 2
    with grpc.insecure_channel(shard0) as channel, pytest.raises(grpc.RpcError) as rpc:
        pb_grpc.EmbeddingServiceStub(channel).Lookup(request, timeout=10)
    assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "client's shard map is stale" in str(rpc.value.details())
    with ShardedClient(cluster.map, timeout=10) as client:
        for bad, code in (([3000], "INVALID_ARGUMENT"), ([-1], "INVALID_ARGUMENT")):
            with pytest.raises(EmbeddingError, match=code):
                client.lookup(bad, "r")
        with pytest.raises(EmbeddingError, match="NOT_FOUND"):
            client.lookup([1], "nope")


def test_the_cli_lists_the_shard_a_server_holds(cluster: Cluster) -> None:
    """docs/scaling.md says `embedding-client tables` shows shard and shard_rows."""
    replica = cluster.replicas[1][0]
    done = subprocess.run([str(BIN / "embedding-client"), "--target", replica.target, "tables"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    header, *rows = (line.split() for line in done.stdout.splitlines())
    listed = {row[0]: dict(zip(header, row, strict=False)) for row in rows}  # default: blank
    held = int(np.count_nonzero(shard_of(np.arange(len(RANDOM)), SHARDS) == 1))
    assert (listed["r"]["shard"], listed["r"]["shard_rows"]) == (f"1/{SHARDS}", str(held))
    assert listed["r"]["rows"] == str(len(RANDOM))
    assert (listed["w"]["shard"], listed["w"]["shard_rows"]) == ("-", "-")  # whole


def test_update_rows_reaches_every_replica_of_the_shard(cluster: Cluster) -> None:
    ids = np.array([4, 11, 2500, 77])
    rows = np.full((4, 12), 0.5, dtype=np.float32) * np.arange(1, 5, dtype=np.float32)[:, None]
    original = cluster.tables["r"][ids].copy()
    owner = shard_of(ids, SHARDS)

    def versions() -> dict[str, int]:
        seen = {}
        for s, shard in enumerate(cluster.replicas):
            for replica in shard:
                with EmbeddingClient(replica.target, max_attempts=1) as direct:
                    seen[replica.target] = direct.lookup_result(ids[owner == s], "r").update_seq
        return seen

    with ShardedClient(cluster.map, timeout=30) as client:
        before = versions()
        answers = client.update_rows(ids, rows, "r")
        try:
            assert len(answers) == SHARDS * REPLICAS  # both shards own some of these ids
            for s, shard in enumerate(cluster.replicas):
                for replica in shard:
                    with EmbeddingClient(replica.target, max_attempts=1) as direct:
                        result = direct.lookup_result(ids[owner == s], "r")
                        assert _same(result.vectors, rows[owner == s])
                        assert result.update_seq == before[replica.target] + 1
            assert _same(client.lookup(ids, "r"), rows)
        finally:
            # Back as the file has them: the fault tests restart replicas, which read it.
            client.update_rows(ids, original, "r")
        assert _same(client.lookup(ids, "r"), original)
        # Rows of another width: every replica refuses alike, and the error says it once,
        # naming the replicas (it said the same message once per replica).
        with pytest.raises(EmbeddingError) as refused:
            client.update_rows(ids, np.zeros((4, 11), np.float32), "r")
        details = refused.value.details
        assert details.startswith("update of table 'r' reached 0 of 4 replicas; not applied on: ")
        targets = [r.target for shard in cluster.replicas for r in shard]
        assert details.count("INVALID_ARGUMENT") == 1 and all(t in details for t in targets)
        assert _same(client.lookup(ids, "r"), original)


class Load:
    """Threads calling `lookup` on a ShardedClient and checking every row, until stopped."""

    def __init__(self, client: ShardedClient, expected: np.ndarray, threads: int = 3) -> None:
        self.client, self.expected = client, expected
        self.calls = self.failures = self.wrong = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            ids = rng.integers(0, len(self.expected), 64)
            try:
                got = self.client.lookup(ids, "r")
                bad = not _same(got, self.expected[ids])
                failed = False
            except EmbeddingError as exc:
                bad, failed = False, True
                self.errors.append(str(exc))
            with self._lock:
                self.calls += 1
                self.failures += failed
                self.wrong += bad

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_a_replica_killed_under_load_fails_no_call(cluster: Cluster) -> None:
    victim = cluster.replicas[1][0]
    with ShardedClient(cluster.map, timeout=20) as client:
        try:
            with Load(client, cluster.tables["r"]) as load:
                time.sleep(1.5)
                before = load.calls
                victim.stop(signal.SIGKILL)
                time.sleep(2.5)
            assert before > 0 and load.calls > before + 20, (before, load.calls)
            assert (load.failures, load.wrong) == (0, 0), load.errors[:3]
            # Failed over, and then the dead replica was no longer asked first by every
            # other call (it would be, taken in turn: about half the calls after the kill).
            failovers = client.stats()[1]["failovers"]
            after = load.calls - before
            assert 0 < failovers <= max(10, after / 4), (failovers, after)
            # An update while a replica is down names it; the others took their rows.
            ids = np.flatnonzero(shard_of(np.arange(3000), 2) == 1)[:2]
            rows = cluster.tables["r"][ids]  # the same values: nothing else changes
            with pytest.raises(EmbeddingError, match=rf"reached 1 of 2 .*{victim.target}"):
                client.update_rows(ids, rows, "r")
        finally:
            victim.start()
            victim.wait()


def test_a_rolling_restart_under_load_fails_no_call(cluster: Cluster) -> None:
    with ShardedClient(cluster.map, timeout=20) as client:
        with Load(client, cluster.tables["r"]) as load:
            for shard in cluster.replicas:
                for replica in shard:
                    try:
                        replica.stop(signal.SIGTERM)  # drains, as Kubernetes stops a pod
                    finally:
                        replica.start()
                        replica.wait()
                    time.sleep(0.3)
        assert load.calls > 50
        assert (load.failures, load.wrong) == (0, 0), load.errors[:3]


def test_hedging_sends_a_second_request_to_a_slow_shard(cluster: Cluster) -> None:
    victim = cluster.replicas[0][0]
    assert victim.process is not None
    with ShardedClient(cluster.map, timeout=20, hedge_after=0.05) as client:
        client.lookup([1, 2, 3], "r")  # connected and the map read
        os.kill(victim.process.pid, signal.SIGSTOP)  # alive but silent: slow, not down
        try:
            started = time.monotonic()
            for _ in range(4):  # whichever replica's turn comes first, one is the stopped one
                assert _same(client.lookup([0, 1, 2, 3], "r"), cluster.tables["r"][[0, 1, 2, 3]])
            assert time.monotonic() - started < 10
            stats = client.stats()[0]
            assert stats["hedges"] >= 1 and stats["hedge_wins"] >= 1, stats
        finally:
            os.kill(victim.process.pid, signal.SIGCONT)


def test_a_call_rides_out_a_shard_with_every_replica_down(cluster: Cluster) -> None:
    down = cluster.replicas[0]
    with ShardedClient(cluster.map, timeout=60) as client:
        client.lookup([1], "r")  # the map read while the shard is up
        answer: list[np.ndarray] = []
        caller = threading.Thread(target=lambda: answer.append(client.lookup([0, 1, 2], "r")))
        try:
            for replica in down:
                replica.stop(signal.SIGKILL)
            # A call whose deadline passes first says that every replica refused, naming
            # each (it named one, with "the deadline passed").
            with pytest.raises(EmbeddingError) as failed:
                client.lookup([0, 1, 2], "r", timeout=1.0)
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            details = failed.value.details
            assert details.startswith(
                f"shard 0/{SHARDS}: every replica refused the connection: is shard 0/{SHARDS} "
                "running? (asked until the deadline; "
            ), details
            for replica in down:
                assert f"{replica.target}: UNAVAILABLE: " in details
            caller.start()
            time.sleep(1.0)  # the call has found both replicas refusing, and waits
            assert caller.is_alive()
        finally:
            for replica in down:
                replica.start()
            for replica in down:
                replica.wait()
            caller.join(timeout=60)
        assert answer and _same(answer[0], cluster.tables["r"][[0, 1, 2]])
        assert client.stats()[0]["failovers"] >= 2


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 129, 5000])
def test_the_rank_bitmap_turns_global_ids_into_local_rows(rows: int) -> None:
    for count in (1, 2, 3, 7):
        for index in range(count):
            held = sharding.ShardRows.of(Shard(index, count), rows, chunk=128)
            assert np.array_equal(held.owned, Shard(index, count).owned(rows))
            if held.owned.size == 0:
                continue
            grid = np.resize(held.owned, (3, held.owned.size))  # any shape of ids
            local, padding = held.localise(grid, int(held.owned[-1]), "t")
            assert np.array_equal(local, np.resize(np.arange(held.owned.size), grid.shape))
            assert padding == held.owned.size - 1
            others = np.setdiff1d(np.arange(rows), held.owned)
            if others.size:
                with pytest.raises(sharding.FailedPrecondition, match=f"holds shard {index}/"):
                    held.localise(np.array([held.owned[0], others[-1]]), None, "t")
                assert held.localise(held.owned[:1], int(others[0]), "t")[1] is None


def test_embedding_split_writes_a_file_each_shard_server_loads(tmp_path: Path) -> None:
    full = tmp_path / "ads.npy"
    np.save(full, RANDOM.astype(np.float64))  # stored as float32, as a server stores it
    out = tmp_path / "shards"
    done = subprocess.run([str(BIN / "embedding-split"), str(full), "--shards", "3", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == [f"ads.shard-{i}-of-3.safetensors" for i in range(3)]
    seen = np.zeros(len(RANDOM), dtype=int)
    for index, path in enumerate(files):
        table = load_table(TableSpec("ads", path, shard=Shard(index, 3)), torch.device("cpu"))
        owned = Shard(index, 3).owned(len(RANDOM))
        assert np.array_equal(table.weights.numpy(), RANDOM[owned])
        seen[owned] += 1
    assert (seen == 1).all()  # every row in exactly one file
    again = subprocess.run([str(BIN / "embedding-split"), str(full), "--shards", "3", "--out",
                            str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_the_readmes_sharded_example_runs(cluster: Cluster) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                  if "ShardedClient" in b]  # fmt: skip
    for shard, replicas in enumerate(cluster.replicas):
        for letter, replica in zip("ab", replicas, strict=True):
            example = example.replace(f"shard{shard}-{letter}:50051", replica.target)
    namespace: dict[str, object] = {}
    exec(example, namespace)
    assert _same(np.asarray(namespace["vectors"]), cluster.tables["r"][[[0, 2], [1, 2]]])


def test_the_scaling_example_runs(cluster: Cluster) -> None:
    """docs/scaling.md's client example, on this fleet (its tables "ads" and "countries"
    played by "r", sharded, and "w", whole); its update is undone afterwards."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S)
                  if "ShardedClient" in b]  # fmt: skip
    listed = re.search(r"shards = \[\n.*?\]  # shard 1\n", example, flags=re.S)
    assert listed is not None
    example = example.replace(listed.group(0), f"shards = {cluster.map!r}\n")
    example = example.replace('"ads"', '"r"').replace('"countries"', '"w"')
    namespace: dict[str, object] = {}
    table = cluster.tables["r"]
    try:
        exec(example, namespace)
    finally:
        with ShardedClient(cluster.map, timeout=30) as client:
            client.update_rows([3, 17], table[[3, 17]], "r")
    ids, bags = (np.asarray(namespace[k]) for k in ("ids", "bags"))
    assert _same(np.asarray(namespace["vectors"]), table[ids])
    np.testing.assert_allclose(np.asarray(namespace["pooled"]), table[bags].mean(axis=1), rtol=1e-6)
    many = namespace["many"]
    assert _same(many["w"].vectors, cluster.tables["w"][np.asarray(namespace["cids"])])  # type: ignore[index]


def test_a_merged_answer_says_the_lowest_version_and_update_seq_and_each_shards() -> None:
    """What a sharded lookup reports (issue 29: the merge was untested): the lowest
    loaded version and update_seq of the shards that answered, and each shard's own."""
    from embedding_client.client import LookupResult
    from embedding_client.sharded import _merged

    parts = [LookupResult(np.zeros((1, 2)), "r", version=3, update_seq=17),
             LookupResult(np.zeros((1, 2)), "r", version=2, update_seq=40)]  # fmt: skip
    merged = _merged("r", np.ones((2, 2)), parts)
    assert (merged.version, merged.update_seq) == (2, 17)
    assert (merged.shard_versions, merged.shard_update_seqs) == ((3, 2), (17, 40))
    assert merged.table == "r" and merged.vectors.shape == (2, 2)
