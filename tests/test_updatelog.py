"""The update log (`--update-log`) with a real redis-server started here on a free port:
updates appended once and applied by every replica in log order, the same update_seq for
the same rows everywhere, read-your-writes by `min_update_seq`, catch-up at start, and
Redis going away and coming back."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_client import EmbeddingClient, EmbeddingError
from embedding_client.client import LookupResult

from .conftest import (
    Redis,
    ServerFactory,
    admin_settings,
    free_port,
    random_table,
    until,
)

WEIGHTS = random_table(500, 8, seed=91)


def _replicas(start_server: ServerFactory, url: str, count: int = 2) -> list[str]:
    return [
        f"127.0.0.1:{start_server({'t': WEIGHTS}, update_log=url, **admin_settings()).port}"
        for _ in range(count)
    ]


def test_updates_go_through_the_log_to_every_replica_in_its_order(
    start_server: ServerFactory, redis_server: Redis
) -> None:
    """40 updates written through two replicas in turn, each appended once: every replica
    applies all of them in the log's order, ends with the same rows and update_seq as a
    numpy model that applied them in that order, and a write is read back on the other
    replica by its update_seq."""
    first, second = _replicas(start_server, redis_server.url)
    model = WEIGHTS.copy()
    rng = np.random.default_rng(3)
    with EmbeddingClient(first, max_attempts=1) as a, EmbeddingClient(second, max_attempts=1) as b:
        assert [t.update_seq for t in (*a.tables(), *b.tables())] == [0, 0]
        for k in range(40):
            ids = rng.choice(len(WEIGHTS), size=int(rng.integers(1, 20)), replace=False)
            rows = rng.standard_normal((ids.size, 8)).astype(np.float32)
            writer, reader = (a, b) if k % 2 == 0 else (b, a)
            info = writer.update_rows(ids, rows, "t")
            assert info.update_seq == k + 1  # its place in the log
            model[ids] = rows
            mine = reader.lookup_result(ids, "t", min_update_seq=info.update_seq, timeout=10)
            np.testing.assert_array_equal(mine.vectors, rows)
            assert mine.update_seq >= k + 1 and mine.version == 1
        for client in (a, b):
            until(lambda client=client: client.tables()[0].update_seq == 40)  # type: ignore[misc]
            whole = client.lookup_result(np.arange(len(WEIGHTS)), "t")
            assert whole.update_seq == 40
            assert whole.vectors.tobytes() == model.tobytes()


def test_a_read_your_write_waits_within_its_deadline_then_says_unavailable(
    start_server: ServerFactory, redis_server: Redis
) -> None:
    """min_update_seq past what a replica holds: it waits for the update (here written
    meanwhile through the other replica), and past the deadline refuses with UNAVAILABLE
    saying what it holds and what was asked, so a sharded client asks another replica."""
    first, second = _replicas(start_server, redis_server.url)
    with EmbeddingClient(first, max_attempts=1) as a, EmbeddingClient(second, max_attempts=1) as b:
        waited: list[np.ndarray] = []

        def reader() -> None:
            waited.append(b.lookup_result([7], "t", min_update_seq=1, timeout=20).vectors)

        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(0.3)  # the reader waits for update 1
        assert thread.is_alive()
        a.update_rows([7], np.full((1, 8), 4.0, np.float32), "t")
        thread.join(timeout=20)
        np.testing.assert_array_equal(waited[0], np.full((1, 8), 4.0))
        started = time.monotonic()
        with pytest.raises(EmbeddingError) as refused:
            b.lookup_result([7], "t", min_update_seq=5, timeout=0.5)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "holds updates up to 1; the call asked for 5" in refused.value.details
        assert time.monotonic() - started < 5
        assert b.lookup_result([7], "t").update_seq == 1  # without it: no wait


def test_the_inference_protocol_reads_its_writes_too(
    start_server: ServerFactory, redis_server: Redis
) -> None:
    """ModelInfer's `min_update_seq` parameter waits as Lookup's does (the update written
    meanwhile through the other replica), and its answer says the update_seq it holds
    (parameter `update_seq`: the model_version names the loaded table only)."""
    from embedding_client.proto import grpc_service_pb2 as oip
    from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc

    first, second = _replicas(start_server, redis_server.url)
    request = oip.ModelInferRequest(model_name="t")
    request.inputs.add(name="ids", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([7], "<i8").tobytes())
    request.parameters["min_update_seq"].int64_param = 1
    channel = grpc.insecure_channel(second)
    try:
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        waiting = infer.future(request, timeout=20)
        time.sleep(0.3)
        assert not waiting.done()  # it waits for update 1
        with EmbeddingClient(first, max_attempts=1) as a:
            a.update_rows([7], np.full((1, 8), 4.0, np.float32), "t")
        answer = waiting.result(timeout=20)
        assert answer.parameters["update_seq"].int64_param == 1
        np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4"), 4.0)
        request.parameters["min_update_seq"].int64_param = 2
        with pytest.raises(grpc.RpcError) as refused:
            infer(request, timeout=0.5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def test_a_starting_replica_catches_up_before_it_serves(
    start_server: ServerFactory, redis_server: Redis
) -> None:
    """A replica started after 30 updates reads its file (update_seq 0), applies the log,
    and says SERVING only then, with the rows the others have."""
    (first,) = _replicas(start_server, redis_server.url, 1)
    model = WEIGHTS.copy()
    with EmbeddingClient(first, max_attempts=1) as a:
        for k in range(30):
            model[[k, k + 100]] = float(k)
            a.update_rows([k, k + 100], np.full((2, 8), float(k), np.float32), "t")
    (late,) = _replicas(start_server, redis_server.url, 1)
    with EmbeddingClient(late, max_attempts=1) as c:
        until(lambda: c.health() == "SERVING")
        result = c.lookup_result(np.arange(len(WEIGHTS)), "t")
    assert result.update_seq == 30
    assert result.vectors.tobytes() == model.tobytes()


def test_redis_going_away_refuses_updates_and_lookups_go_on(
    start_server: ServerFactory, redis_server: Redis
) -> None:
    """Redis stopped: an update is refused with UNAVAILABLE naming the log, and changes
    nothing; lookups go on at the updates applied. Redis back (its AOF kept every
    acknowledged entry): updates go through again, and both replicas resume where they
    stopped."""
    first, second = _replicas(start_server, redis_server.url)
    with EmbeddingClient(first, max_attempts=1) as a, EmbeddingClient(second, max_attempts=1) as b:
        a.update_rows([1], np.full((1, 8), 1.0, np.float32), "t")
        redis_server.stop()
        with pytest.raises(EmbeddingError) as refused:
            a.update_rows([2], np.full((1, 8), 2.0, np.float32), "t", timeout=30)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "could not take the update" in refused.value.details
        assert "the table is unchanged" in refused.value.details
        for client in (a, b):
            result = client.lookup_result([1, 2], "t", min_update_seq=1, timeout=10)
            np.testing.assert_array_equal(result.vectors[0], np.full(8, 1.0))
            np.testing.assert_array_equal(result.vectors[1], WEIGHTS[2])
        redis_server.start()
        info = b.update_rows([3], np.full((1, 8), 3.0, np.float32), "t", timeout=30)
        assert info.update_seq == 2  # the AOF kept entry 1; the refused one never was
        got = a.lookup_result([1, 3], "t", min_update_seq=2, timeout=20)
        np.testing.assert_array_equal(got.vectors, np.array([[1.0] * 8, [3.0] * 8]))


def test_a_snapshot_records_its_position_and_a_reload_from_it_replays_the_rest(
    start_server: ServerFactory, redis_server: Redis, tmp_path: Path
) -> None:
    """A .safetensors snapshot holds update_seq 5; three updates later a replica reloads
    it: it goes back to 5 and applies 6-8 from the log again, to the same rows."""
    server = start_server({"t": WEIGHTS}, update_log=redis_server.url, **admin_settings(tmp_path))
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        for k in range(5):
            client.update_rows([k], np.full((1, 8), float(k), np.float32), "t")
        info, _ = client.snapshot_table("t.safetensors", "t")
        assert info.update_seq == 5
        for k in range(5, 8):
            client.update_rows([k], np.full((1, 8), float(k), np.float32), "t")
        expected = client.lookup_result(np.arange(10), "t").vectors
        reloaded = client.reload_table("t", str(tmp_path / "t.safetensors"))
        assert reloaded.update_seq in range(5, 9)  # the file's 5, or already replayed past
        again = client.lookup_result(np.arange(10), "t", min_update_seq=8, timeout=10)
    assert again.update_seq == 8
    assert again.vectors.tobytes() == expected.tobytes()


# ------------------------------------------------------------------ snapshots and trims


def _spawn_replica(
    table: Path, redis_url: str, snapshots: Path, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    """An `embedding-server` process on the log, with `snapshots` as its snapshot
    directory; its log on stdout."""
    from .conftest import spawn_server

    port = free_port()
    process = spawn_server(table, port, "--update-log", redis_url, "--snapshot-dir",
                           str(snapshots), "--allow-loopback-admin", "true",
                           "--connection-max-age", "0", *extra)  # fmt: skip
    return process, f"127.0.0.1:{port}"


def _stop(process: subprocess.Popen[str]) -> str:
    """Stop a server process (it may be SIGSTOPped) and return its log."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.kill()
    return process.communicate(timeout=30)[0]


def _freeze(process: subprocess.Popen[str]) -> None:
    """SIGSTOP a process and wait until the kernel says it is stopped (the signal is
    asynchronous: without the wait it may still read one more entry)."""
    process.send_signal(signal.SIGSTOP)
    until(lambda: Path(f"/proc/{process.pid}/stat").read_text().split(") ")[1][0] == "T")


def _holds(target: str, update_seq: int, expected: LookupResult) -> None:
    """The replica at `target` reaches `update_seq` (within 20 s) holding every row as
    `expected` has it."""
    with EmbeddingClient(target, max_attempts=1) as client:
        got = client.lookup_result(np.arange(len(WEIGHTS)), "t", min_update_seq=update_seq,
                                   timeout=20)  # fmt: skip
    assert got.update_seq == update_seq
    assert got.vectors.tobytes() == expected.vectors.tobytes()


def _stream(redis_url: str) -> tuple[list[int], int]:
    """The positions table t's stream holds, and its last one."""
    import redis as redis_client

    connection = redis_client.Redis.from_url(redis_url)
    try:
        held = [int(i.split(b"-")[0]) for i, _ in connection.xrange("embedding:updates:t")]
        last = connection.xinfo_stream("embedding:updates:t")["last-generated-id"]
        return held, int(last.split(b"-")[0])
    finally:
        connection.close()


def test_a_replica_starts_from_the_newest_snapshot_and_the_log_is_trimmed_to_it(
    tmp_path: Path, redis_server: Redis
) -> None:
    """Ten updates, snapshots at 5 and 8 (one in a subdirectory), beside snapshot-like files
    that must not be taken (a damaged one, one of another shape with a higher update_seq, a
    hidden one and a link out of the folder with a higher one, an .npy): the writer's
    --trim-update-log trims the stream to 9-10, and a new replica starts from the snapshot
    at 8 and replays 9-10, bit-identical to the writer (entries 1-8 are gone: only the
    snapshot can give them)."""
    import safetensors.numpy

    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    snapshots = tmp_path / "snapshots"
    (snapshots / "sub").mkdir(parents=True)
    (snapshots / "junk.safetensors").write_bytes(b"\xff" * 64)
    safetensors.numpy.save_file({"t": np.zeros((10, 8), np.float32)},
                                str(snapshots / "other.safetensors"),
                                metadata={"embedding.update_seq": "99"})  # fmt: skip
    # Of the right shape and newer, but hidden (a dot first) or a link out of the folder.
    newer = {"embedding.update_seq": "50"}
    safetensors.numpy.save_file({"t": WEIGHTS}, str(snapshots / ".hidden.safetensors"), newer)
    safetensors.numpy.save_file({"t": WEIGHTS}, str(tmp_path / "outside.safetensors"), newer)
    (snapshots / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    writer, target = _spawn_replica(path, redis_server.url, snapshots, "--trim-update-log", "0.2")
    started: list[subprocess.Popen[str]] = [writer]
    try:
        with EmbeddingClient(target, max_attempts=1) as a:
            for k in range(1, 11):
                a.update_rows([k], np.full((1, 8), float(k), np.float32), "t")
                if k == 5:
                    assert a.snapshot_table("old.safetensors", "t")[0].update_seq == 5
                    a.snapshot_table("old.npy", "t")
                if k == 8:
                    assert a.snapshot_table("sub/new.safetensors", "t")[0].update_seq == 8
            expected = a.lookup_result(np.arange(len(WEIGHTS)), "t")
        until(lambda: _stream(redis_server.url) == ([9, 10], 10))
        late, late_target = _spawn_replica(path, redis_server.url, snapshots)
        started.append(late)
        _holds(late_target, 10, expected)
    finally:
        logs = [_stop(process) for process in started]
    assert "entries up to update 8 trimmed" in logs[0]
    assert "starting from snapshot" in logs[1] and "sub/new.safetensors" in logs[1]
    assert "other.safetensors of table 't' has 10 x 8 rows" in logs[1]


def test_a_replica_the_log_was_trimmed_past_reloads_the_newest_snapshot(
    tmp_path: Path, redis_server: Redis
) -> None:
    """A replica frozen (SIGSTOP) at update 1 while the writer goes on to 8, snapshots at
    6 and trims the stream to 7-8: thawed, it applies entry 2 (Redis answered its
    blocked read with it before the freeze took hold of the reading thread), finds 3-6
    gone, reloads the snapshot at 6 by itself, applies 7-8, and ends bit-identical to
    the writer."""
    path = tmp_path / "t.npy"
    np.save(path, WEIGHTS)
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    writer, target = _spawn_replica(path, redis_server.url, snapshots, "--trim-update-log", "0.2")
    started = [writer]
    try:
        frozen, frozen_target = _spawn_replica(
            path, redis_server.url, snapshots, "--processes", "2"
        )
        started.append(frozen)
        with EmbeddingClient(target, max_attempts=1) as a:
            a.update_rows([1], np.full((1, 8), 1.0, np.float32), "t")
            with EmbeddingClient(frozen_target, max_attempts=1) as b:
                b.lookup_result([1], "t", min_update_seq=1, timeout=10)
            _freeze(frozen)
            for k in range(2, 9):
                a.update_rows([k, 1], np.full((2, 8), float(k), np.float32), "t")
                if k == 6:
                    a.snapshot_table("at6.safetensors", "t")
            expected = a.lookup_result(np.arange(len(WEIGHTS)), "t")
        until(lambda: _stream(redis_server.url) == ([7, 8], 8))
        frozen.send_signal(signal.SIGCONT)
        _holds(frozen_target, 8, expected)
    finally:
        logs = [_stop(process) for process in started]
    assert "holds update 2 but the log's next entry is 7" in logs[1]
    assert "reloaded snapshot" in logs[1] and "at6.safetensors (update 6)" in logs[1]


def test_a_gap_no_snapshot_covers_stops_the_table_until_one_does(
    start_server: ServerFactory,
    redis_server: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every entry trimmed by hand (XTRIM MAXLEN 0) before a replica read them, and no
    snapshot: with no entry left to read, the stream's bounds tell it; it says so,
    counts a gap, stays at what it holds and NOT_SERVING. A snapshot that covers the
    gap, written later by another replica into the shared directory, is found (within
    RECOVER_EVERY_S) and reloaded: it catches up and serves."""
    import redis as redis_client
    from prometheus_client import REGISTRY

    from embedding_server.core import updatelog

    monkeypatch.setattr(updatelog, "RECOVER_EVERY_S", 1.0)
    caplog.set_level(logging.INFO, logger=updatelog.__name__)
    settings = admin_settings(tmp_path)
    first = start_server({"t": WEIGHTS}, update_log=redis_server.url, **settings)
    with EmbeddingClient(f"127.0.0.1:{first.port}", max_attempts=1) as a:
        for k in range(1, 4):
            a.update_rows([k], np.full((1, 8), float(k), np.float32), "t")
        connection = redis_client.Redis.from_url(redis_server.url)
        assert connection.xtrim("embedding:updates:t", maxlen=0, approximate=False) == 3
        connection.close()

        def gap_count() -> float:
            labels = {"table": "t", "kind": "gap"}
            return REGISTRY.get_sample_value("embedding_update_log_errors_total", labels) or 0.0

        gaps = gap_count()
        late = start_server({"t": WEIGHTS}, update_log=redis_server.url, **settings)
        with EmbeddingClient(f"127.0.0.1:{late.port}", max_attempts=1) as b:
            until(lambda: gap_count() == gaps + 1)
            assert REGISTRY.get_sample_value("embedding_update_log_stalled", {"table": "t"}) == 1
            assert b.health() == "NOT_SERVING"
            assert b.lookup_result([1], "t").update_seq == 0  # serves what it holds
            a.snapshot_table("mend.safetensors", "t")
            until(lambda: b.health() == "SERVING", timeout=10)
            assert REGISTRY.get_sample_value("embedding_update_log_stalled", {"table": "t"}) == 0
            got = b.lookup_result(np.arange(5), "t", min_update_seq=3, timeout=5)
            assert got.vectors.tobytes() == a.lookup_result(np.arange(5), "t").vectors.tobytes()
    said = [r.getMessage() for r in caplog.records if r.name == updatelog.__name__]
    assert (
        said.count(  # said once, not at every look
            "table 't' holds update 0 but the log's next entry is 4: the log was trimmed past "
            "it; looking for a snapshot that holds 3 or later"
        )
        == 1
    ), said
    assert (
        said.count(
            f"table 't': no snapshot holding update 3 or later in the snapshot directory "
            f"({tmp_path}); serving update 0 until one is there or the table is reloaded "
            "(ReloadTable)"
        )
        == 1
    ), said
    assert (
        f"table 't': reloaded snapshot {tmp_path / 'mend.safetensors'} (update 3); applying "
        "the log from there"
    ) in said


def test_a_log_that_ends_before_what_a_replica_holds_stops_it_without_guessing(
    start_server: ServerFactory,
    redis_server: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stream deleted and written again (Redis's data lost, say) to fewer entries
    than a replica holds: it cannot tell which of its updates the new log lacks, so it
    stops that table (said, counted, the gauge at 1) and reloads no snapshot by itself,
    even one at hand. A replica started from the file (no snapshot of the old log in its
    directory) follows the new log from its start."""
    import redis as redis_client
    from prometheus_client import REGISTRY

    from embedding_server.core import updatelog

    monkeypatch.setattr(updatelog, "RECOVER_EVERY_S", 0.2)
    caplog.set_level(logging.INFO, logger=updatelog.__name__)
    old_log = tmp_path / "old"
    old_log.mkdir()
    replica = start_server({"t": WEIGHTS}, update_log=redis_server.url, **admin_settings(old_log))
    with EmbeddingClient(f"127.0.0.1:{replica.port}", max_attempts=1) as a:
        for k in range(1, 4):
            a.update_rows([k], np.full((1, 8), float(k), np.float32), "t")
        a.snapshot_table("held.safetensors", "t")  # update 3 of the old log
        connection = redis_client.Redis.from_url(redis_server.url)
        connection.delete("embedding:updates:t")
        connection.xadd("embedding:updates:t", {"ids": np.array([9], "<i8").tobytes(),
                        "vectors": np.full(8, 9.0, "<f4").tobytes(), "dim": "8",
                        "writer": "elsewhere", "time": "0"}, id="1-0")  # fmt: skip
        connection.close()
        message = (
            "table 't' holds update 3 but the log ends at 1: the log was deleted or replaced, "
            "and which of this replica's updates it lacks cannot be told; serving update 3. "
            "To follow the new log, restart the replica from a table file the new log starts "
            "from (move snapshots of the old log out of the snapshot directory first)"
        )
        until(lambda: message in caplog.text)
        assert REGISTRY.get_sample_value("embedding_update_log_stalled", {"table": "t"}) == 1
        time.sleep(1.0)  # several recovery rounds: none reloads the snapshot at hand
        held = a.lookup_result(np.arange(10), "t")
        assert (held.update_seq, held.version) == (3, 1)
        assert "reloaded snapshot" not in caplog.text
    fresh = start_server({"t": WEIGHTS}, update_log=redis_server.url, **admin_settings(tmp_path))
    with EmbeddingClient(f"127.0.0.1:{fresh.port}", max_attempts=1) as b:
        got = b.lookup_result([9], "t", min_update_seq=1, timeout=10)
        assert got.update_seq == 1
        np.testing.assert_array_equal(got.vectors, np.full((1, 8), 9.0))


# ------------------------------------------------------------------ a fleet


def test_a_fleet_of_2_shards_x_2_replicas_stays_identical_through_a_kill_and_a_redis_restart(
    tmp_path: Path, redis_server: Redis
) -> None:
    """Four server processes (2 shards x 2 replicas) on one log; a sharded client streams
    updates (each to one replica per shard: the log carries it to the other) while
    lookups run; one replica is SIGKILLed mid-stream and started again (from its file:
    it replays its shard's log), then Redis is restarted (its AOF keeps what it
    acknowledged). Every write is read back by its update_seq, on whichever replica
    answers. At the end every replica of a shard holds the same update_seq and the same
    bytes, those of a numpy model that applied every update in order; no update is lost."""
    from embedding_client.sharded import ShardedClient
    from embedding_client.shards import shard_of

    from .conftest import BIN, server_env, wait_serving

    table = random_table(2000, 8, seed=5)
    np.save(tmp_path / "t.npy", table)
    ports = [[free_port(), free_port()], [free_port(), free_port()]]

    def spawn(shard: int, port: int) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0", "--table", f"t={tmp_path / 't.npy'}", "--shard",
             f"{shard}/2", "--update-log", redis_server.url, "--allow-loopback-admin", "true",
             "--connection-max-age", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=server_env(),
        )  # fmt: skip
        wait_serving(f"127.0.0.1:{port}", process)
        return process

    servers = {(s, i): spawn(s, ports[s][i]) for s in range(2) for i in range(2)}
    model = table.copy()
    rng = np.random.default_rng(11)
    stop = threading.Event()
    wrong: list[str] = []

    def reads() -> None:
        with ShardedClient([[f"127.0.0.1:{p}" for p in shard] for shard in ports],
                           timeout=20) as client:  # fmt: skip
            while not stop.is_set():
                ids = np.random.default_rng().integers(0, len(table), 64)
                try:
                    client.lookup(ids, "t")
                except EmbeddingError as exc:
                    if exc.code != grpc.StatusCode.UNAVAILABLE:
                        wrong.append(str(exc))

    reader = threading.Thread(target=reads)
    try:
        reader.start()
        with ShardedClient([[f"127.0.0.1:{p}" for p in shard] for shard in ports],
                           timeout=30) as client:  # fmt: skip
            for k in range(60):
                if k == 20:  # a replica killed mid-stream, started again
                    servers[(0, 1)].kill()
                    servers[(0, 1)].wait(timeout=30)
                    servers[(0, 1)] = spawn(0, ports[0][1])
                if k == 40:  # Redis restarted
                    redis_server.stop()
                    redis_server.start()
                ids = rng.choice(len(table), size=int(rng.integers(1, 30)), replace=False)
                rows = rng.standard_normal((ids.size, 8)).astype(np.float32)
                for _ in range(100):  # an update refused while Redis restarts: sent again
                    try:
                        answers = client.update_rows(ids, rows, "t")
                        break
                    except EmbeddingError as exc:
                        assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
                        time.sleep(0.1)
                else:
                    raise AssertionError(f"update {k} never went through")
                model[ids] = rows
                seqs = {a.shard[0]: a.update_seq for a in answers if a.shard is not None}
                assert len(answers) == len(set(shard_of(ids, 2)))  # one answer per shard
                mine = client.lookup_result(ids, "t", min_update_seq=seqs)
                assert mine.vectors.tobytes() == rows.tobytes(), f"update {k} not read back"
        stop.set()
        reader.join(timeout=60)
        finals = {}
        for s, i in servers:
            with EmbeddingClient(f"127.0.0.1:{ports[s][i]}", max_attempts=1) as direct:
                finals[(s, i)] = direct.tables()[0].update_seq
        for s in range(2):
            held = shard_of(np.arange(len(table)), 2) == s
            ids = np.flatnonzero(held)
            want = max(finals[(s, 0)], finals[(s, 1)])
            results = []
            for i in range(2):
                with EmbeddingClient(f"127.0.0.1:{ports[s][i]}", max_attempts=1) as direct:
                    results.append(direct.lookup_result(ids, "t", min_update_seq=want, timeout=20))
            assert results[0].update_seq == results[1].update_seq == want
            assert results[0].vectors.tobytes() == results[1].vectors.tobytes()
            assert results[0].vectors.tobytes() == model[ids].tobytes()
    finally:
        stop.set()
        reader.join(timeout=60)
        for process in servers.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert not wrong, wrong[:3]


def test_entries_read_together_are_written_as_one_and_a_bad_one_is_skipped(
    start_server: ServerFactory, redis_server: Redis
) -> None:
    """A replica that finds several entries waiting writes them as one (a later entry's
    row over an earlier one's), and an entry it cannot apply (an id past its rows,
    written straight into the stream) is skipped and counted without losing the others."""
    import redis as redis_client
    from prometheus_client import REGISTRY

    from embedding_server.core.updatelog import _entry, _last_writes

    def entry(seq: int, ids: list[int], value: float) -> object:
        fields = {b"ids": np.array(ids, "<i8").tobytes(), b"dim": b"8",
                  b"vectors": np.full((len(ids), 8), value, "<f4").tobytes()}  # fmt: skip
        return _entry(f"{seq}-0".encode(), fields)

    ids, rows = _last_writes([entry(1, [3, 5, 7], 1.0), entry(2, [9, 5], 2.0)], 8)  # type: ignore[list-item]
    assert ids.tolist() == [3, 7, 9, 5] and rows[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    stream = redis_client.Redis.from_url(redis_server.url)
    for seq, (rows_ids, value) in enumerate(([[1, 2], 1.0], [[2, 600], 9.0], [[2, 3], 3.0]), 1):
        stream.xadd("embedding:updates:t", {"ids": np.array(rows_ids, "<i8").tobytes(),
                    "vectors": np.full((2, 8), value, "<f4").tobytes(), "dim": "8",
                    "writer": "test", "time": "0"}, id=f"{seq}-0")  # fmt: skip
    skipped = (
        REGISTRY.get_sample_value(
            "embedding_update_log_errors_total", {"table": "t", "kind": "apply"}
        )
        or 0.0
    )
    (server,) = _replicas(start_server, redis_server.url, 1)
    with EmbeddingClient(server, max_attempts=1) as client:
        result = client.lookup_result([1, 2, 3], "t", min_update_seq=3, timeout=10)
    assert result.update_seq == 3
    assert result.vectors[:, 0].tolist() == [1.0, 3.0, 3.0]  # entry 2 (id 600 of 500) skipped
    assert (
        REGISTRY.get_sample_value(
            "embedding_update_log_errors_total", {"table": "t", "kind": "apply"}
        )
        == skipped + 1
    )
