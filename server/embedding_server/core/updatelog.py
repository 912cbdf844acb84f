"""The update log: row updates through a durable, ordered log on Redis Streams, applied by
every replica in log order (`--update-log redis://HOST:PORT/DB`).

One stream per table and shard (`embedding:updates:TABLE`, `...:TABLE:I/N`). An update is
checked here first (`TableStore.prepare_update`: every replica can apply it), then
appended by a Lua script that gives it the next position (`SEQ-0`, one more than the
last: the scripts of concurrent writers run one at a time), and is answered once this
replica has applied it. Every replica, the writer included, reads its streams from the
position its tables hold (`Table.update_seq`: 0 at load, or what a snapshot recorded) and
applies each entry in order with that position as its update_seq: the same number for
the same rows on every replica. The only module that imports redis: a server without a
log never loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from embedding_server import metrics
from embedding_server.core.snapshots import ANY_ROWS, Snapshot, newest_snapshot
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.errors import InvalidRequest, RequestError, Unavailable

log = logging.getLogger(__name__)

STREAM_PREFIX = "embedding:updates:"
# How long a read of the streams blocks waiting for an entry, and the pause after Redis
# failed (doubling up to RETRY_MAX_S): a replica that lost Redis retries on its own.
BLOCK_MS = 500
RETRY_S, RETRY_MAX_S = 0.1, 5.0
# Entries read per stream at once: bounded memory while catching up.
READ_COUNT = 256
SOCKET_TIMEOUT_S = 10.0
ERROR_KINDS = ("append", "read", "gap", "apply")
# How often the streams' heads are read for the lag gauges (and gaps looked for), and
# how often a table stalled at a gap looks for a snapshot to reload.
PUBLISH_EVERY_S = 1.0
RECOVER_EVERY_S = 10.0

# The last position a stream has given (0: none yet; trimmed entries count), in Lua: a
# helper both scripts below begin with.
_LAST = """
local function last_of(key)
  if redis.call('EXISTS', key) == 0 then
    return 0
  end
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      return tonumber(string.match(info[i + 1], '^(%d+)'))
    end
  end
  return 0
end
"""

# The next position of a stream, and the entry at it, in one step (Redis runs a script
# alone: two writers never get the same position). Positions are the IDs' first part.
_APPEND = (
    _LAST
    + """
local seq = last_of(KEYS[1]) + 1
redis.call('XADD', KEYS[1], seq .. '-0', 'ids', ARGV[1], 'vectors', ARGV[2],
           'dim', ARGV[3], 'writer', ARGV[4], 'time', ARGV[5])
return seq
"""
)

# A stream's first and last positions (0 for none) and length, read at one instant.
_BOUNDS = (
    _LAST
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0}
end
local first = 0
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #oldest > 0 then
  first = tonumber(string.match(oldest[1][1], '^(%d+)'))
end
return {first, last_of(KEYS[1]), redis.call('XLEN', KEYS[1])}
"""
)


def stream_key(table: Table) -> str:
    """The stream of `table`: its name, and its shard when it is one."""
    held = table.held_shard
    part = "" if held is None else f":{held}"
    return f"{STREAM_PREFIX}{table.name}{part}"


@dataclass(frozen=True)
class Entry:
    """One update read from a stream."""

    seq: int
    ids: np.ndarray
    vectors: np.ndarray
    written_at: float
    writer: str


def _last_writes(entries: list[Entry], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids `entries` write and each one's last value, in the order of the entries
    (InvalidRequest for an entry not of the table's dim: each is then applied alone)."""
    if any(e.vectors.shape[1] != dim for e in entries):
        raise InvalidRequest("an entry of another dim")
    if len(entries) == 1:
        return entries[0].ids, entries[0].vectors
    ids = np.concatenate([e.ids for e in entries])
    vectors = np.concatenate([e.vectors for e in entries])
    # Each id's last occurrence: the first in the reversed order.
    _, first_from_end = np.unique(ids[::-1], return_index=True)
    last = np.sort(ids.size - 1 - first_from_end)
    return ids[last], vectors[last]


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    dim = int(fields[b"dim"])
    ids = np.frombuffer(fields[b"ids"], dtype="<i8")
    vectors = np.frombuffer(fields[b"vectors"], dtype="<f4").reshape(ids.size, dim)
    return Entry(
        int(entry_id.split(b"-")[0]), ids, vectors, float(fields.get(b"time", b"0")),
        fields.get(b"writer", b"").decode(errors="replace"),
    )  # fmt: skip


class UpdateLog:
    """Appends updates to Redis and applies every table's stream to `store` in order, in
    a thread of its own (`start`/`stop`).

    Parameters
    ----------
    url : redis://HOST:PORT/DB (or rediss:// for TLS).
    store : the tables; updates are written through `store.write_update`.
    writer : who this replica is, recorded in each entry it appends.
    snapshots : the snapshot directory (None: none): where a table the log was trimmed
        past finds a snapshot to reload, and what `trim_every_s` trims to.
    reload : `reload(name, path)` loads a snapshot as table `name`'s next version.
    trim_every_s : every so many seconds, trim each stream up to the update_seq of its
        table's newest snapshot (0: never).
    """

    def __init__(
        self,
        url: str,
        store: TableStore,
        writer: str,
        *,
        snapshots: Path | None = None,
        reload: Callable[[str, Path], Table] | None = None,
        trim_every_s: float = 0.0,
    ) -> None:
        self.url = url
        self.store = store
        self.writer = writer
        self.snapshots = snapshots
        self._reload = reload
        self.trim_every_s = trim_every_s
        self._redis = redis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )
        self._append = self._redis.register_script(_APPEND)
        self._bounds = self._redis.register_script(_BOUNDS)
        self._stop = threading.Event()
        self._applied = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="update-log", daemon=True)
        self.connected = threading.Event()  # set once a read of the streams succeeded
        self.failures = 0  # consecutive failed reads (Redis unreachable)
        self.last_error = ""
        # Tables whose stream was trimmed past what they hold, by the update_seq they were
        # stuck at: left out of reads until a reload moves them (said once, and counted).
        self.stalled: dict[str, int] = {}
        # Of those, the ones a snapshot can mend, by the update_seq it must hold.
        self._gaps: dict[str, int] = {}
        self._published = 0.0  # when the heads were last read
        self._recovering = 0.0  # when stalled tables last looked for a snapshot
        self._trimmed = 0.0  # when the streams were last trimmed
        for table in store:
            metrics.child(metrics.UPDATE_LOG_STALLED, table.name).set(0)
            self._publish(table)
            for kind in ERROR_KINDS:  # pre-registered: a dashboard shows 0, not nothing
                metrics.child(metrics.UPDATE_LOG_ERRORS, table.name, kind)

    # ------------------------------------------------------------------ writing

    def write(self, name: str, ids: np.ndarray, vectors: np.ndarray, timeout: float) -> Table:
        """Check the update, append it to the table's stream, and return the table once
        this replica has applied it (its update_seq is then the entry's position).

        Raises
        ------
        TableNotFound, InvalidRequest, FailedPrecondition
            As `TableStore.prepare_update` (nothing is appended).
        Unavailable
            Redis could not be reached, or the entry was not applied here in `timeout` s.
        """
        prepared = self.store.prepare_update(name, ids, vectors)
        table = prepared.table
        ids = np.ascontiguousarray(ids, dtype="<i8")
        values = np.ascontiguousarray(vectors, dtype="<f4")
        fields: list[bytes | str] = [
            ids.tobytes(),
            values.tobytes(),
            str(table.dim),
            self.writer,
            repr(time.time()),
        ]
        try:
            seq = int(self._append(keys=[stream_key(table)], args=fields))
        except redis.RedisError as exc:
            metrics.child(metrics.UPDATE_LOG_ERRORS, table.name, "append").inc()
            raise Unavailable(
                f"the update log ({self._where()}) could not take the update: {exc}; the "
                "table is unchanged"
            ) from None
        if not self.wait_applied(table.name, seq, timeout):
            raise Unavailable(
                f"update {seq} of table {table.name!r} is in the log ({self._where()}) but "
                f"this replica has not applied it within {timeout:g} s; every replica will"
            )
        return self.store.get(table.name)

    def wait_applied(self, name: str, seq: int, timeout: float) -> bool:
        """Wait until table `name` holds update `seq` (True), or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._applied:
            while self.store.get(name).update_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._applied.wait(left)
        return True

    def _where(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"redis {kwargs.get('host', '?')}:{kwargs.get('port', '?')}"

    # ------------------------------------------------------------------ applying

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=BLOCK_MS / 1000 + SOCKET_TIMEOUT_S)
        self._redis.close()

    def caught_up(self, lag: int = 0) -> bool:
        """Whether every table is within `lag` entries of its stream's head (False while
        Redis cannot be asked)."""
        if not self.connected.is_set():
            return False
        try:
            return all(self.head(t) - t.update_seq <= lag for t in self.store)
        except redis.RedisError:
            return False

    def head(self, table: Table) -> int:
        """The last position of `table`'s stream (0: none yet); Redis errors propagate."""
        return self.bounds(table)[1]

    def bounds(self, table: Table) -> tuple[int, int, int]:
        """`table`'s stream's first and last positions (0: none) and how many entries it
        holds, at one instant; Redis errors propagate."""
        first, last, length = self._bounds(keys=[stream_key(table)])
        return int(first), int(last), int(length)

    def _run(self) -> None:
        pause = RETRY_S
        while not self._stop.is_set():
            try:
                self._read_once()
                self.connected.set()
                if self.failures:
                    log.info("update log %s reachable again: applying from where it stopped",
                             self._where())  # fmt: skip
                self.failures, pause = 0, RETRY_S
            except redis.RedisError as exc:
                self.failures += 1
                self.last_error = str(exc)
                for table in self.store:
                    metrics.child(metrics.UPDATE_LOG_ERRORS, table.name, "read").inc()
                if self.failures == 1:
                    log.warning("update log %s unreachable (%s): lookups go on at the updates "
                                "applied; retrying", self._where(), exc)  # fmt: skip
                self._stop.wait(pause)
                pause = min(pause * 2, RETRY_MAX_S)

    def _read_once(self) -> None:
        """Read and apply what the streams hold past each table (waiting up to BLOCK_MS
        for it), then the periodic work: gauges, stalled tables' snapshots, trims."""
        tables = {stream_key(t): t for t in self.store if not self._is_stalled(t)}
        if tables:
            positions: dict[Any, Any] = {key: f"{t.update_seq}-0" for key, t in tables.items()}
            answer: Any = self._redis.xread(positions, count=READ_COUNT, block=BLOCK_MS)
            for key, entries in answer or []:
                name = key.decode() if isinstance(key, bytes) else key
                self._apply(tables[name].name, [_entry(i, fields) for i, fields in entries])
        else:  # every table stalled: nothing to read, the periodic work goes on
            self._stop.wait(BLOCK_MS / 1000)
        now = time.monotonic()
        if now - self._published >= PUBLISH_EVERY_S:  # heads cost a round trip
            self._published = now
            for table in self.store:
                self._publish(table)
        if self._gaps and now - self._recovering >= RECOVER_EVERY_S:
            self._recovering = now
            for name in list(self._gaps):
                self._recover(name)
        if self.trim_every_s and now - self._trimmed >= self.trim_every_s:
            self._trimmed = now
            for table in self.store:
                self._trim(table)

    def _apply(self, name: str, entries: list[Entry]) -> None:
        """Apply entries read from one stream, in order. Where they allow, as one write:
        the rows they leave (a later entry's row over an earlier one's), under the last
        one's position, so that a replica catching up writes once per read, not once
        per entry; readers see the table before them all or after them all, with the
        matching update_seq. An entry that does not apply here is skipped and said,
        without losing the others. A gap before them (the stream trimmed past what the
        table holds) stops the table."""
        table = self.store.get(name)
        fresh = [e for e in entries if e.seq > table.update_seq]
        if not fresh:
            return  # already held (a snapshot recorded them)
        if fresh[0].seq != table.update_seq + 1:
            self._stall(table, fresh[0].seq)  # trimmed past this replica's position
            return
        started = time.perf_counter()
        try:
            ids, vectors = _last_writes(fresh, table.dim)
            self.store.write_update(self.store.prepare_update(name, ids, vectors), fresh[-1].seq)
        except RequestError:  # e.g. keys past a keyed table's max_keys
            for entry in fresh:  # one at a time, to find and skip the one that does not apply
                self._apply_one(name, entry)
        metrics.child(metrics.UPDATE_LOG_APPLY_SECONDS, name).observe(time.perf_counter() - started)
        metrics.child(metrics.UPDATE_LOG_LAG_SECONDS, name).set(
            max(0.0, time.time() - fresh[-1].written_at)
        )
        metrics.TABLE_UPDATE_SEQ.labels(name).set(fresh[-1].seq)
        keys = self.store.get(name).keys
        if keys is not None:
            metrics.TABLE_KEYS.labels(name).set(keys.count)
        with self._applied:
            self._applied.notify_all()

    def _apply_one(self, name: str, entry: Entry) -> None:
        try:
            self.store.write_update(
                self.store.prepare_update(name, entry.ids, entry.vectors), entry.seq
            )
        except RequestError as exc:
            # Checked before it was appended; refused here only if this replica's table
            # differs (another file), or, for a keyed table, if entries appended at once
            # through two replicas add more keys than max_keys together (every replica
            # applies the log in one order, so all skip the same entry): skipped, so the
            # log does not stall, and said.
            metrics.child(metrics.UPDATE_LOG_ERRORS, name, "apply").inc()
            log.error("table %r: update %d from %s does not apply here (%s): skipped", name,
                      entry.seq, entry.writer, exc)  # fmt: skip
            self.store.get(name).update_seq = entry.seq

    # ------------------------------------------------------------------ gaps and trims

    def _stall(self, table: Table, next_seq: int) -> None:
        """Stop applying `table`: the entries between what it holds and `next_seq` (the
        log's next entry past it) are gone; then look for a snapshot that covers them."""
        metrics.child(metrics.UPDATE_LOG_ERRORS, table.name, "gap").inc()
        held = table.update_seq
        if next_seq <= held:
            log.error("table %r holds update %d but the log ends at %d: the log was deleted "
                      "or replaced, and which of this replica's updates it lacks cannot be "
                      "told; serving update %d. To follow the new log, restart the replica "
                      "from a table file the new log starts from (move snapshots of the old "
                      "log out of the snapshot directory first)",
                      table.name, held, next_seq - 1, held)  # fmt: skip
        else:
            log.error("table %r holds update %d but the log's next entry is %d: the log was "
                      "trimmed past it; looking for a snapshot that holds %d or later",
                      table.name, held, next_seq, next_seq - 1)  # fmt: skip
        self.stalled[table.name] = held
        metrics.child(metrics.UPDATE_LOG_STALLED, table.name).set(1)
        if next_seq > held:  # a snapshot past the gap mends it
            self._gaps[table.name] = next_seq - 1
            self._recover(table.name, say=True)

    def _is_stalled(self, table: Table) -> bool:
        """Whether `table` is stopped at a gap (a reload since, ReloadTable's or ours,
        moved it on)."""
        if table.name in self.stalled and self.stalled[table.name] != table.update_seq:
            del self.stalled[table.name]
            self._gaps.pop(table.name, None)
            metrics.child(metrics.UPDATE_LOG_STALLED, table.name).set(0)
        return table.name in self.stalled

    def _recover(self, name: str, *, say: bool = False) -> None:
        """Reload table `name`, stalled at a gap, from its newest snapshot if that holds
        the entries the gap took (`say`: tell the log when none does)."""
        table = self.store.get(name)
        if not self._is_stalled(table):
            return
        needed = self._gaps[name]
        found = self._newest_snapshot(table)
        if found is None or found.update_seq < needed or self._reload is None:
            if say:
                where = self.snapshots or "none: start with --snapshot-dir"
                log.warning("table %r: no snapshot holding update %d or later in the snapshot "
                            "directory (%s); serving update %d until one is there or the "
                            "table is reloaded (ReloadTable)", name, needed, where,
                            table.update_seq)  # fmt: skip
            return
        try:
            self._reload(name, found.path)
        except Exception as exc:
            log.error("table %r: reloading snapshot %s failed (%s); serving update %d",
                      name, found.path, exc, table.update_seq)  # fmt: skip
            return
        log.info("table %r: reloaded snapshot %s (update %d); applying the log from there",
                 name, found.path, found.update_seq)  # fmt: skip
        self.stalled.pop(name, None)
        self._gaps.pop(name, None)
        metrics.child(metrics.UPDATE_LOG_STALLED, name).set(0)

    def _newest_snapshot(self, table: Table) -> Snapshot | None:
        if self.snapshots is None:
            return None
        rows = table.rows if table.shard is None else table.shard.rows
        if table.keys is not None:
            rows = ANY_ROWS  # a keyed table's keys come and go: its dim must match
        return newest_snapshot(self.snapshots, table.name, table.held_shard, (rows, table.dim))

    def _trim(self, table: Table) -> None:
        """Trim `table`'s stream up to its newest snapshot's update_seq: a replica that
        needed a trimmed entry reloads that snapshot instead."""
        found = self._newest_snapshot(table)
        if found is None:
            return
        trimmed = self._redis.xtrim(
            stream_key(table), minid=f"{found.update_seq + 1}-0", approximate=False
        )
        if trimmed:
            log.info("table %r: %d entries up to update %d trimmed from the log (snapshot %s)",
                     table.name, trimmed, found.update_seq, found.path)  # fmt: skip

    def _publish(self, table: Table) -> None:
        """The gauges of `table`; and a stall when its next entry is gone from the log
        (found here when no entry past it is left to read)."""
        metrics.TABLE_UPDATE_SEQ.labels(table.name).set(table.update_seq)
        try:
            bounds = self.bounds(table) if self.connected.is_set() else None
        except redis.RedisError:
            bounds = None
        if bounds is None:
            return
        first, head, length = bounds
        metrics.child(metrics.UPDATE_LOG_HEAD, table.name).set(head)
        metrics.child(metrics.UPDATE_LOG_LAG, table.name).set(head - table.update_seq)
        metrics.child(metrics.UPDATE_LOG_LENGTH, table.name).set(length)
        if head == table.update_seq:
            metrics.child(metrics.UPDATE_LOG_LAG_SECONDS, table.name).set(0.0)
        if self._is_stalled(table):
            return
        held = table.update_seq
        if head < held:
            self._stall(table, head + 1)
        elif head > held and not 0 < first <= held + 1:
            self._stall(table, first or head + 1)
