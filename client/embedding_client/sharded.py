"""Clients for tables split over shards, each shard served by interchangeable replicas.

The client routes, as the field does (HugeCTR's parameter server, TF Serving's "route
above the shards"): it groups a call's ids by `shards.shard_of`, sends one sub-request
per shard at once under the call's one deadline, and puts the rows back in request
order; pooled bags that cross shards are pooled per shard and combined here (sums add,
means from sums and counts, max of maxima). A replica that answers UNAVAILABLE is
retried on another replica of its shard within the deadline; with `hedge_after`, a
second replica is asked when the first is slow, and the loser is cancelled.

Every sub-request names the shard it is for (`expect_shard`), and the shard map is
checked against each server's ListTables on first use: a stale map fails with
FAILED_PRECONDITION instead of being served wrong rows.

`AsyncShardedClient` does the work on asyncio; `ShardedClient` is its blocking twin,
running it on an event loop thread of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
import numpy as np

from embedding_client import codec
from embedding_client.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    AsyncEmbeddingClient,
    EmbeddingError,
    Feature,
    LookupResult,
    Pooling,
    Security,
    TableInfo,
    _lookup_request,
    _lookup_result,
    _many_results,
    _update_request,
    with_default_port,
)
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.shards import shard_of

T = TypeVar("T")

# Codes after which another replica of the shard is tried: the replica is down,
# restarting or draining (a stopping server cancels calls that arrive as it stops).
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
LATENCY_SAMPLES = 2048  # per shard, for stats()
# When every replica of a shard refused: pause (doubling to 1 s) and go round again,
# until the deadline, or this many rounds for a call without one.
FIRST_PAUSE_S = 0.05
FAILOVER_ROUNDS = 5
# A replica back from a restart is reconnected to within a second (gRPC's default
# backoff grows to two minutes, long after its twin may have gone down for its turn).
REPLICA_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True)
class ShardMap:
    """Where each shard is served: per shard, its replicas' targets (``host:port``), or
    one ``dns:///NAME:PORT`` whose addresses are the replicas (a Kubernetes headless
    Service; gRPC balances over them round-robin)."""

    shards: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.shards or not all(self.shards):
            raise ValueError("a shard map needs at least one shard, each with a target")

    @classmethod
    def of(cls, shards: ShardMap | str | Sequence[str | Sequence[str]]) -> ShardMap:
        """From a ShardMap, its text form (see `parse`), or a list with per shard one
        target or a list of targets."""
        if isinstance(shards, ShardMap):
            return shards
        if isinstance(shards, str):
            return cls.parse(shards)
        return cls(tuple((s,) if isinstance(s, str) else tuple(s) for s in shards))

    @classmethod
    def parse(cls, text: str) -> ShardMap:
        """``"a:50051,b:50051;c:50051,d:50051"``: shards separated by ';', in order, each
        a comma-separated list of replicas."""
        shards = [
            tuple(t.strip() for t in part.split(",") if t.strip()) for part in text.split(";")
        ]
        return cls(tuple(shards))

    def __str__(self) -> str:
        return ";".join(",".join(replicas) for replicas in self.shards)


@dataclass(frozen=True)
class _Layout:
    """A table as the shard servers hold it: split over `count` shards (1: every server
    holds all of it), `rows` global rows of `dim`."""

    name: str
    count: int
    rows: int
    dim: int
    # Its updates go through an update log: one replica per shard takes each.
    update_log: bool = False
    # Keyed (ids are raw int64 keys, any value): its missing-key policy, and whether its
    # bags leave missing keys out; None for a table of rows.
    missing_keys: str | None = None
    bags_skip_missing: bool = True


@dataclass
class _Part:
    """One sub-request of a routed call: to `shard` (None: any shard holding the whole
    table), `request` a LookupRequest."""

    shard: int | None
    request: pb.LookupRequest
    # Where its ids sit in the call's (flat ids, shape): a shard's error about its k-th
    # id is said of the call's own position; None when it is the whole call.
    positions: tuple[np.ndarray, tuple[int, ...]] | None = None


@dataclass
class _Routed:
    parts: list[_Part]
    combine: Callable[[list[LookupResult]], np.ndarray]  # results in the parts' order


@dataclass
class ShardStats:
    """What one shard's sub-requests did: calls, failovers to another replica, hedges
    sent and won, failures, and latencies (seconds) of the last few calls."""

    calls: int = 0
    failovers: int = 0
    hedges: int = 0
    hedge_wins: int = 0
    failures: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else 0.0

        return {
            "calls": self.calls,
            "failovers": self.failovers,
            "hedges": self.hedges,
            "hedge_wins": self.hedge_wins,
            "failures": self.failures,
            "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99),
        }


def _keys_added(seen: TableInfo, info: TableInfo) -> dict[str, Any]:
    """A keyed table's keys and max_keys over its shards: their sums."""
    if seen.keys is None or info.keys is None:
        return {}
    return {"keys": seen.keys + info.keys, "max_keys": (seen.max_keys or 0) + (info.max_keys or 0),
            "rows": seen.rows + info.rows}  # fmt: skip


def _invalid(message: str) -> EmbeddingError:
    return EmbeddingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_ids(flat: np.ndarray, shape: tuple[int, ...], layout: _Layout) -> None:
    """Refuse ids outside the table's global rows as one server would (same words)."""
    bad = (flat < 0) | (flat >= layout.rows)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        where = f"position {position}"
        if len(shape) > 1:
            where += f" (index {[int(i) for i in np.unravel_index(position, shape)]})"
        raise _invalid(
            f"id {int(flat[position])} at {where} is out of range: table has {layout.rows} "
            f"rows, ids must be in [0, {layout.rows})"
        )


def _sub_request(
    layout: _Layout, shard: int, ids: np.ndarray, dtype: str, **bags: Any
) -> pb.LookupRequest:
    request = codec.encode_lookup_request(ids, layout.name, dtype, **bags)
    request.expect_shard.index, request.expect_shard.count = shard, layout.count
    return request


def route(
    layout: _Layout,
    ids: Any,
    dtype: str,
    pooling: Pooling | str | None,
    padding_id: int | None,
) -> _Routed:
    """Split one lookup over the shards of `layout`, and how to put the answers together.

    Plain lookups: each shard gets its own ids (padding ids are not sent: their rows are
    zeros) and the rows go back to their places, bit for bit as one server answers.
    Pooled: each shard pools its part of every bag (sum for sum and mean, max for max,
    in float32), then sums add, means divide the sum by the bag's count, and maxima
    take the largest of the shards that had ids in the bag.
    """
    request = _lookup_request(ids, layout.name, dtype, pooling, padding_id)
    if layout.count == 1:
        return _Routed([_Part(None, request)], lambda results: results[0].vectors)
    try:
        array = codec.decode_ids(request)
        bags = codec.decode_bags(request, array)
    except codec.WireError as exc:
        raise _invalid(str(exc)) from None
    flat = array.reshape(-1)
    if layout.missing_keys is None:  # keyed tables take any key: their shards say
        _check_ids(flat, array.shape, layout)
        if padding_id is not None and not 0 <= padding_id < layout.rows:
            raise _invalid(
                f"padding_id {padding_id} is not a row of table {layout.name!r}: it must be in "
                f"[0, {layout.rows})"
            )
    elif (
        bags is not None and bags.mode != "sum" and layout.missing_keys != "error"
        and layout.bags_skip_missing
    ):  # fmt: skip
        # Combining means or maxima needs whether (and how many) keys each shard pooled.
        raise _invalid(
            f"{bags.mode} pooling over the {layout.count} shards of keyed table "
            f"{layout.name!r}, whose bags leave missing keys out (missing = "
            f"{layout.missing_keys!r}): how many keys each shard pooled is not on the wire "
            "yet; pool with sum, or look the rows up and pool them yourself"
        )
    owner = shard_of(flat, layout.count)
    if padding_id is not None:
        owner[flat == padding_id] = -1  # sent nowhere
    out_dtype = codec.numpy_dtype(codec.dtype_to_wire(dtype))
    dim = layout.dim
    if bags is None:
        places = [np.flatnonzero(owner == s) for s in range(layout.count)]
        used = [s for s in range(layout.count) if places[s].size]

        def put_back(results: list[LookupResult]) -> np.ndarray:
            rows = np.zeros((flat.size, dim), dtype=out_dtype)
            for s, result in zip(used, results, strict=True):
                rows[places[s]] = result.vectors
            return rows.reshape((*array.shape, dim))

        parts = [
            _Part(s, _sub_request(layout, s, flat[places[s]], dtype), (places[s], array.shape))
            for s in used
        ]
        return _Routed(parts, put_back)
    return _route_bags(layout, flat, owner, bags, out_dtype)


def _route_bags(
    layout: _Layout, flat: np.ndarray, owner: np.ndarray, bags: codec.Bags, out_dtype: Any
) -> _Routed:
    count, dim = bags.count, layout.dim
    lengths = np.diff(np.append(bags.offsets, flat.size))
    bag_of = np.repeat(np.arange(count), lengths)
    kept = np.bincount(bag_of[owner >= 0], minlength=count)  # ids pooled, padding left out
    parts, has_ids = [], []
    for s in range(layout.count):
        mine = owner == s
        if not mine.any():
            continue
        sub_lengths = np.bincount(bag_of[mine], minlength=count)
        weights = None if bags.weights is None else bags.weights[mine]
        mode = "max" if bags.mode == "max" else "sum"
        request = _sub_request(layout, s, flat[mine], "float32", pooling=mode,
                               lengths=sub_lengths, weights=weights)  # fmt: skip
        parts.append(_Part(s, request, (np.flatnonzero(mine), (flat.size,))))
        has_ids.append(sub_lengths > 0)

    def combine(results: list[LookupResult]) -> np.ndarray:
        if bags.mode == "max":
            pooled = np.full((count, dim), -np.inf, dtype=np.float32)
            for result, present in zip(results, has_ids, strict=True):
                np.maximum(pooled, result.vectors, out=pooled, where=present[:, None])
            pooled[kept == 0] = 0.0  # a bag with no rows is zeros, as on one server
        else:
            pooled = np.zeros((count, dim), dtype=np.float32)
            for result in results:
                pooled += result.vectors
            if bags.mode == "mean":
                pooled /= np.maximum(kept, 1).astype(np.float32)[:, None]
        return pooled.astype(out_dtype).reshape((*bags.shape, dim))

    return _Routed(parts, combine)


class AsyncShardedClient:
    """asyncio client for tables split over shards, each shard served by replicas; the
    same lookup methods and result types as `AsyncEmbeddingClient`.

    Parameters
    ----------
    shards : ShardMap, its text (``"a:1,b:1;c:1,d:1"``: shards by ';', replicas by ','),
        or a list with per shard a target or a list of replica targets, in shard order
    timeout : default deadline of each call in seconds, shared by its sub-requests
    hedge_after : seconds after which a sub-request still unanswered is also sent to
        another replica of its shard (the first answer wins, the other is cancelled);
        None: no hedging
    security, max_message_bytes : as for `EmbeddingClient`, for every replica

    Tables that every server holds whole (not sharded) are served by any of them.
    """

    def __init__(
        self,
        shards: ShardMap | str | Sequence[str | Sequence[str]],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        hedge_after: float | None = None,
        security: Security | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.map = ShardMap.of(shards)
        self.timeout = timeout
        self.hedge_after = hedge_after
        self._security = security
        self._max_message_bytes = max_message_bytes
        self._replicas: list[list[AsyncEmbeddingClient]] = []
        self._turns = [itertools.count() for _ in self.map.shards]
        self._any_shard = itertools.count()
        self._layouts: dict[str, _Layout] = {}
        self._default = ""
        self._stats = [ShardStats() for _ in self.map.shards]

    def _client(self, target: str) -> AsyncEmbeddingClient:
        # Failover is ours (to another replica); a dns:/// target is several replicas
        # behind one channel, where gRPC's own retries reach another address.
        attempts = 3 if target.startswith("dns:") else 1
        return AsyncEmbeddingClient(
            target, timeout=None, max_attempts=attempts, security=self._security,
            max_message_bytes=self._max_message_bytes, channel_options=REPLICA_CHANNEL_OPTIONS,
        )  # fmt: skip

    def _open(self) -> None:
        if not self._replicas:
            self._replicas = [[self._client(t) for t in shard] for shard in self.map.shards]

    @property
    def shard_count(self) -> int:
        return len(self.map.shards)

    # ------------------------------------------------------------ the shard map

    async def refresh(self, *, timeout: float | None = None) -> None:
        """Read every shard's tables (ListTables) and check them against the map: each
        server must hold, of each sharded table, the shard the map puts it at, of as
        many as the map has (FAILED_PRECONDITION naming the server otherwise)."""
        self._open()
        deadline = self._deadline(timeout)
        listed = await asyncio.gather(
            *(self._on_shard(s, lambda c: c.tables(timeout=self._remaining(deadline)), deadline)
              for s in range(self.shard_count))
        )  # fmt: skip
        layouts: dict[str, _Layout] = {}
        for s, (target, infos) in enumerate(listed):
            for info in infos:
                layout = self._check_table(s, target, info)
                known = layouts.setdefault(info.name, layout)
                if known != layout:
                    raise EmbeddingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"table {info.name!r} differs between shard servers: {known} on "
                        f"shard 0, {layout} on shard {s} ({target})",
                    )
            if s == 0:
                self._default = next((i.name for i in infos if i.is_default), "")
        self._layouts = layouts

    def _check_table(self, s: int, target: str, info: TableInfo) -> _Layout:
        keyed = (info.missing_keys, info.bags_skip_missing)
        # A keyed table's shards hold their own numbers of keys: no global rows to agree on.
        rows = 0 if info.missing_keys is not None else info.rows
        if info.shard is None:
            return _Layout(info.name, 1, rows, info.dim, info.update_log, *keyed)
        if info.shard != (s, self.shard_count):
            raise EmbeddingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{target} holds shard {info.shard[0]}/{info.shard[1]} of table "
                f"{info.name!r}, but the shard map puts it at shard {s}/{self.shard_count}: "
                "the map is stale (or the servers were started with other --shard values)",
            )
        return _Layout(info.name, info.shard[1], rows, info.dim, info.update_log, *keyed)

    async def _layout(self, table: str | None, deadline: float) -> _Layout:
        if not self._layouts:
            await self.refresh(timeout=self._remaining(deadline))
        name = table or self._default
        layout = self._layouts.get(name)
        if layout is None:
            known = ", ".join(sorted(self._layouts)) or "none"
            raise EmbeddingError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown table {_quoted(name)}; the shard servers hold: {known}",
            )
        return layout

    # ------------------------------------------------------------ calls

    def _deadline(self, timeout: float | None) -> float:
        chosen = self.timeout if timeout is None else timeout
        return math.inf if chosen is None else time.monotonic() + chosen

    @staticmethod
    def _remaining(deadline: float) -> float | None:
        return None if deadline == math.inf else max(0.0, deadline - time.monotonic())

    async def _on_shard(
        self,
        shard: int | None,
        call: Callable[[AsyncEmbeddingClient], Awaitable[T]],
        deadline: float,
    ) -> tuple[str, T]:
        """`call` on a replica of `shard` (None: of any shard, in turn): the next replica
        in turn first, another after UNAVAILABLE, a second at once when the first is
        slower than `hedge_after`. Returns the answering replica's target and answer."""
        self._open()
        if shard is None:
            shard = next(self._any_shard) % self.shard_count
        replicas = self._replicas[shard]
        start = next(self._turns[shard]) % len(replicas)
        # In turn, but replicas whose connection is failing last: a replica known to be
        # down (killed, restarting) is not asked first by every other call.
        order = sorted(replicas[start:] + replicas[:start], key=_failing)
        stats = self._stats[shard]
        stats.calls += 1
        started = time.monotonic()
        running: dict[asyncio.Task[T], AsyncEmbeddingClient] = {}
        tried = 0
        hedged = False
        pause = FIRST_PAUSE_S
        last: dict[str, EmbeddingError] = {}  # each replica's last answer in this call

        def launch() -> None:
            nonlocal tried
            client = order[tried % len(order)]
            tried += 1
            running[asyncio.ensure_future(self._timed(call, client, deadline))] = client

        launch()
        try:
            while True:
                wait = self._remaining(deadline)
                hedging = self.hedge_after is not None and len(running) == 1 and tried < len(order)
                if hedging:
                    until_hedge = started + float(self.hedge_after or 0) - time.monotonic()
                    wait = (
                        max(0.0, until_hedge) if wait is None else min(wait, max(0.0, until_hedge))
                    )
                done, _ = await asyncio.wait(
                    running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if time.monotonic() >= deadline:
                        raise EmbeddingError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"shard {shard}/{self.shard_count} did not answer within the deadline",
                        )
                    if hedging:
                        stats.hedges += 1
                        hedged = True
                        launch()
                    continue
                for task in done:
                    client = running.pop(task)
                    error = task.exception()
                    if error is None:
                        stats.hedge_wins += hedged and client is not order[0]
                        stats.latencies.append(time.monotonic() - started)
                        return client.target, task.result()
                    if not isinstance(error, EmbeddingError):
                        raise error
                    if error.details != "the deadline passed":
                        last[client.target] = error
                    retry = error.code in FAILOVER_CODES and time.monotonic() < deadline
                    if retry and tried < len(order):
                        stats.failovers += 1
                        launch()
                    elif (
                        retry
                        and not running
                        and (deadline != math.inf or tried < len(order) * FAILOVER_ROUNDS)
                    ):
                        # Every replica refused: they may be restarting (a rolling update).
                        # Round again after a pause, within the deadline.
                        await asyncio.sleep(min(pause, self._remaining(deadline) or pause))
                        pause = min(2 * pause, 1.0)
                        stats.failovers += 1
                        launch()
                    elif not running:
                        stats.failures += 1
                        raise _shard_failure(
                            f"shard {shard}/{self.shard_count}", client.target, error, last,
                            len(order),
                        ) from None  # fmt: skip
        finally:
            for task in running:
                task.cancel()

    async def _timed(
        self, call: Callable[[AsyncEmbeddingClient], Awaitable[T]], client: AsyncEmbeddingClient,
        deadline: float,
    ) -> T:  # fmt: skip
        remaining = self._remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise EmbeddingError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")
        return await call(client)

    async def _send(self, parts: list[_Part], dense: bool, deadline: float) -> list[LookupResult]:
        async def one(part: _Part) -> LookupResult:
            async def ask(client: AsyncEmbeddingClient) -> Any:
                method = client._lookups.dense if dense else client._lookups.plain
                return await client._invoke(method, part.request, self._remaining(deadline))

            try:
                return _lookup_result((await self._on_shard(part.shard, ask, deadline))[1])
            except EmbeddingError as error:
                raise _at_call_position(error, part) from None

        return await _all(one(part) for part in parts)

    async def lookup_result(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        dense: bool = False,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        min_update_seq: Mapping[int, int] | None = None,
        timeout: float | None = None,
    ) -> LookupResult:
        """Like `AsyncEmbeddingClient.lookup_result`, over the shards. `version` is the
        lowest table version among the shards that answered (`shard_versions`: each),
        `update_seq` likewise. `min_update_seq`, by shard index (`update_rows`' answers
        say each shard's), reads your own writes: a replica behind waits, then refuses,
        and the next replica is asked."""
        deadline = self._deadline(timeout)
        layout = await self._layout(table, deadline)
        routed = route(layout, ids, dtype, pooling, padding_id)
        for part in routed.parts:
            wanted = (min_update_seq or {}).get(0 if part.shard is None else part.shard, 0)
            if wanted:
                part.request.min_update_seq = wanted
        results = await self._send(routed.parts, dense, deadline)
        return _merged(layout.name, routed.combine(results), results)

    async def lookup(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """The vectors of `ids` (see `EmbeddingClient.lookup`), from the shards holding them."""
        result = await self.lookup_result(
            ids, table, dtype, pooling=pooling, padding_id=padding_id, timeout=timeout
        )
        return result.vectors

    async def lookup_dense(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Like `lookup`, each shard computing its part as a one-hot matmul."""
        result = await self.lookup_result(
            ids, table, dtype, dense=True, pooling=pooling, padding_id=padding_id, timeout=timeout
        )
        return result.vectors

    async def lookup_many(
        self, features: Mapping[str, Any], *, dense: bool = False, timeout: float | None = None
    ) -> dict[str, LookupResult]:
        """Several features, sharded tables or whole ones (see
        `EmbeddingClient.lookup_many`): one LookupMany per shard server holding a part."""
        deadline = self._deadline(timeout)
        routed: dict[str, _Routed] = {}
        names: dict[str, str] = {}
        for name, feature in features.items():
            if not isinstance(feature, Feature):
                feature = Feature(feature)
            layout = await self._layout(feature.table or name, deadline)
            names[name] = layout.name
            routed[name] = route(layout, feature.ids, feature.dtype, feature.pooling,
                                 feature.padding_id)  # fmt: skip
        # Whole tables' parts go to one shard server per call, in turn.
        anywhere = next(self._any_shard) % self.shard_count
        per_shard: dict[int, pb.LookupManyRequest] = {}
        for name, plan in routed.items():
            for part in plan.parts:
                shard = anywhere if part.shard is None else part.shard
                request = per_shard.setdefault(shard, pb.LookupManyRequest())
                request.features.add(feature=name, lookup=part.request)

        async def one(shard: int, request: pb.LookupManyRequest) -> dict[str, LookupResult]:
            async def ask(client: AsyncEmbeddingClient) -> dict[str, LookupResult]:
                method = client._lookups.many_dense if dense else client._lookups.many
                answer = await client._invoke(method, request, self._remaining(deadline))
                return _many_results(answer)

            return (await self._on_shard(shard, ask, deadline))[1]

        answers = await _all(one(s, r) for s, r in per_shard.items())
        by_shard = dict(zip(per_shard, answers, strict=True))
        out = {}
        for name, plan in routed.items():
            results = [by_shard[anywhere if p.shard is None else p.shard][name] for p in plan.parts]
            out[name] = _merged(names[name], plan.combine(results), results)
        return out

    async def update_rows(
        self, ids: Any, vectors: Any, table: str | None = None, *, timeout: float | None = None
    ) -> list[TableInfo]:
        """Overwrite rows (see `EmbeddingClient.update_rows`) on every replica of the
        shards holding them (each address behind a dns:/// target); where the table's
        updates go through an update log, on one replica of each such shard (the next
        one when a replica is unavailable), which puts them in the log every replica
        applies. Returns each answer (its update_seq: a lookup's `min_update_seq`).

        Raises
        ------
        EmbeddingError
            When any replica did not take its rows, naming each such replica (the
            others did: retry the call, it is idempotent).
        """
        deadline = self._deadline(timeout)
        layout = await self._layout(table, deadline)
        request = _update_request(ids, vectors, layout.name)
        flat = np.frombuffer(request.ids, dtype=codec.ID_DTYPE)
        rows = np.frombuffer(request.vectors, dtype=codec.numpy_dtype(request.dtype))
        rows = rows.reshape(flat.size, -1) if flat.size else rows
        # A sharded table's rows go to their shard; a whole table is on every server.
        owner = shard_of(flat, layout.count) if layout.count > 1 else None
        jobs: list[tuple[str, Coroutine[Any, Any, TableInfo]]] = []
        for s in range(self.shard_count):
            mine = np.ones(flat.size, dtype=bool) if owner is None else owner == s
            if not mine.any():
                continue
            targets = await _addresses(self.map.shards[s])
            if layout.update_log:
                job = _update_through_log(self, targets, flat[mine], rows[mine], layout.name,
                                          deadline)  # fmt: skip
                jobs.append((" or ".join(targets), job))
                continue
            for target in targets:
                client = self._client(target)
                jobs.append((target, _update_one(client, flat[mine], rows[mine], layout.name,
                                                 self._remaining(deadline))))  # fmt: skip
        answers = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
        failed = [
            (t, a) for (t, _), a in zip(jobs, answers, strict=True) if isinstance(a, BaseException)
        ]
        if failed:
            first = failed[0][1]
            code = first.code if isinstance(first, EmbeddingError) else grpc.StatusCode.INTERNAL
            # The same refusal from every replica (admin RPCs off, say) is said once.
            by_reason: dict[str, list[str]] = {}
            for target, answer in failed:
                by_reason.setdefault(str(answer), []).append(target)
            shown = "; ".join(f"{', '.join(t)} ({reason})" for reason, t in by_reason.items())
            raise EmbeddingError(
                code,
                f"update of table {layout.name!r} reached {len(jobs) - len(failed)} of "
                f"{len(jobs)} replicas; not applied on: {shown}",
            )
        return [a for a in answers if isinstance(a, TableInfo)]

    async def tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        """The tables as the shard servers hold them together: whole tables' rows,
        bytes summed over the shards (one replica each), the lowest version."""
        deadline = self._deadline(timeout)
        self._open()
        listed = await _all(
            self._on_shard(s, lambda c: c.tables(timeout=self._remaining(deadline)), deadline)
            for s in range(self.shard_count)
        )
        merged: dict[str, TableInfo] = {}
        for _, infos in listed:
            for info in infos:
                seen = merged.get(info.name)
                if seen is None:
                    merged[info.name] = replace(info, shard=None, shard_rows=None)
                elif info.shard is not None:  # another part of a sharded table
                    merged[info.name] = replace(
                        seen, bytes=seen.bytes + info.bytes,
                        version=min(seen.version, info.version),
                        update_seq=min(seen.update_seq, info.update_seq),
                        **_keys_added(seen, info),
                    )  # fmt: skip
        return list(merged.values())

    def stats(self) -> list[dict[str, float]]:
        """Per shard: calls, failovers, hedges, hedge wins, failures, p50/p99 latency (ms)."""
        return [s.summary() for s in self._stats]

    async def close(self) -> None:
        for replicas in self._replicas:
            for client in replicas:
                await client.close()
        self._replicas = []

    async def __aenter__(self) -> AsyncShardedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _failing(client: AsyncEmbeddingClient) -> bool:
    return bool(client._channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE)


def _quoted(text: str) -> str:
    return repr(text) if len(text) <= 100 else f"{text[:100]!r}... ({len(text)} characters)"


async def _all(calls: Any) -> list[Any]:
    """Await every call at once; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _addresses(targets: Sequence[str]) -> list[str]:
    """Every replica's address: explicit targets as given, a dns:/// target resolved."""
    found: list[str] = []
    loop = asyncio.get_running_loop()
    for target in targets:
        if not target.startswith("dns:"):
            found.append(with_default_port(target))
            continue
        host, _, port = target.split("/")[-1].rpartition(":")
        host = host.strip("[]")  # an IPv6 literal, dns:///[::1]:50051
        infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        for family, _, _, _, address in infos:
            host_text = str(address[0])
            found.append(
                f"[{host_text}]:{port}" if family == socket.AF_INET6 else f"{host_text}:{port}"
            )
    return sorted(set(found))


async def _update_one(
    client: AsyncEmbeddingClient, ids: np.ndarray, rows: np.ndarray, table: str,
    timeout: float | None,
) -> TableInfo:  # fmt: skip
    try:
        return await client.update_rows(ids, rows, table, timeout=timeout)
    finally:
        await client.close()


async def _update_through_log(
    client: AsyncShardedClient,
    targets: list[str],
    ids: np.ndarray,
    rows: np.ndarray,
    table: str,
    deadline: float,
) -> TableInfo:
    """An update of one shard's rows through its log: the first replica that takes it
    (UNAVAILABLE from one, or no connection: the next)."""
    error: EmbeddingError | None = None
    for target in targets:
        try:
            return await _update_one(
                client._client(target), ids, rows, table, client._remaining(deadline)
            )
        except EmbeddingError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise
            error = exc
    assert error is not None, "a shard has at least one replica"
    raise error


def _merged(table: str, vectors: np.ndarray, results: list[LookupResult]) -> LookupResult:
    versions = tuple(r.version for r in results)
    seqs = tuple(r.update_seq for r in results)
    return LookupResult(vectors=vectors, table=table, version=min(versions, default=0),
                        shard_versions=versions, update_seq=min(seqs, default=0),
                        shard_update_seqs=seqs)  # fmt: skip


_AT_POSITION = re.compile(r"at position (\d+)( \(index \[[0-9, ]*\]\))?")


def _at_call_position(error: EmbeddingError, part: _Part) -> EmbeddingError:
    """A shard's error naming the position of one of its ids (a keyed table's missing
    key) said of that id's position in the caller's own ids."""
    found = _AT_POSITION.search(error.details)
    if part.positions is None or found is None:
        return error
    positions, shape = part.positions
    local = int(found.group(1))
    if local >= positions.size:
        return error
    flat = int(positions[local])
    where = f"at position {flat}"
    if len(shape) > 1:
        where += f" (index {[int(i) for i in np.unravel_index(flat, shape)]})"
    details = error.details[: found.start()] + where + error.details[found.end() :]
    return EmbeddingError(error.code, details)


def _shard_failure(
    shard: str, target: str, error: EmbeddingError, last: dict[str, EmbeddingError],
    replicas: int,
) -> EmbeddingError:  # fmt: skip
    """The error a failed sub-request raises: the replica's own where one replica
    answered it; where every replica was asked and refused, each one's reason."""
    if len(last) < 2 or replicas < 2:
        reason = last.get(target, error)
        code = error.code if error.details == "the deadline passed" else reason.code
        return EmbeddingError(code, f"{shard} ({target}): {reason.details}")
    refused = all("Connection refused" in e.details for e in last.values())
    summary = (f"every replica refused the connection: is {shard} running?" if refused
               else f"no replica of {shard} answered")  # fmt: skip
    each = "; ".join(f"{t}: {e.code.name}: {e.details[:300]}" for t, e in last.items())
    return EmbeddingError(error.code, f"{shard}: {summary} (asked until the deadline; {each})")


class ShardedClient:
    """Blocking client for tables split over shards: `AsyncShardedClient`'s work on an
    event loop thread of its own, with the same parameters and methods (not coroutines).

    Examples
    --------
    >>> with ShardedClient([["a:50051", "b:50051"], ["c:50051", "d:50051"]]) as client:
    ...     vectors = client.lookup([[0, 2], [1, 2]])  # as one server holding every row
    """

    def __init__(self, shards: ShardMap | str | Sequence[str | Sequence[str]], **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sharded-client",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self._async = AsyncShardedClient(shards, **options)
        self.map = self._async.map

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    def lookup(self, ids: Any, table: str | None = None, dtype: str = "float32",
               **options: Any) -> np.ndarray:  # fmt: skip
        """See `EmbeddingClient.lookup`."""
        return self._run(self._async.lookup(ids, table, dtype, **options))

    def lookup_dense(self, ids: Any, table: str | None = None, dtype: str = "float32",
                     **options: Any) -> np.ndarray:  # fmt: skip
        """See `EmbeddingClient.lookup_dense`."""
        return self._run(self._async.lookup_dense(ids, table, dtype, **options))

    def lookup_result(self, ids: Any, table: str | None = None, dtype: str = "float32",
                      **options: Any) -> LookupResult:  # fmt: skip
        """See `AsyncShardedClient.lookup_result`."""
        return self._run(self._async.lookup_result(ids, table, dtype, **options))

    def lookup_many(self, features: Mapping[str, Any], **options: Any) -> dict[str, LookupResult]:
        """See `AsyncShardedClient.lookup_many`."""
        return self._run(self._async.lookup_many(features, **options))

    def update_rows(self, ids: Any, vectors: Any, table: str | None = None,
                    **options: Any) -> list[TableInfo]:  # fmt: skip
        """See `AsyncShardedClient.update_rows`."""
        return self._run(self._async.update_rows(ids, vectors, table, **options))

    def tables(self, **options: Any) -> list[TableInfo]:
        """See `AsyncShardedClient.tables`."""
        return self._run(self._async.tables(**options))

    def refresh(self, **options: Any) -> None:
        """See `AsyncShardedClient.refresh`."""
        self._run(self._async.refresh(**options))

    def stats(self) -> list[dict[str, float]]:
        """See `AsyncShardedClient.stats`."""
        return self._async.stats()

    def close(self) -> None:
        """Close every channel and stop the loop thread."""
        try:
            self._run(self._async.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
