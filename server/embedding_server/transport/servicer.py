"""The gRPC transport of lookups: a thin servicer of embedding.v1.EmbeddingService.

It decodes and validates with the codec, calls the core, encodes the answer and
records the service's metrics; it holds no numerics. Status codes, credentials and
draining are the interceptor's (`interceptor.py`).

Its handlers are coroutines on the server's event loop. A plain lookup (`Lookups.plain`:
W[ids] from a host table, microseconds) is answered there; every other lookup (dense,
pooled, padded, on a device, batched, large) is handed to the handler pool (`offload`),
so the loop never waits for one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server import metrics
from embedding_server.core.lookup import Lookups
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    OverLimit,
    Unavailable,
    quoted,
)
from embedding_server.transport.interceptor import (
    MAPPED_ERRORS,
    Malformed,
    status_code,
)

DENSE_METHODS = ("LookupDense", "LookupManyDense")

# How long a lookup with a min_update_seq waits for this replica to apply that update
# when the call has no deadline of its own.
UPDATE_WAIT_S = 5.0

# The most values a plain lookup takes on the event loop (1 MiB of float32: B = 2,048 at
# dim 128); a larger one goes to the handler pool, where several run at once (numpy's
# take lets go of the GIL) instead of one after another on the loop.
LOOP_TAKE_ELEMENTS = 1 << 18


# Answers larger than this are serialized in the handler pool: a copy of every byte, which
# bytes.join makes with the GIL let go, so several run at once there instead of one after
# another on the loop.
LOOP_ANSWER_BYTES = 1 << 20


class Serialized:
    """An answer serialized already (in the handler pool): grpc's serializer takes it as is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


class Offload(Protocol):
    """Runs `call(*args)` off the event loop and awaits it; `waits`: it may wait long."""

    def __call__(
        self, call: Callable[..., Any], *args: Any, waits: bool = False
    ) -> Awaitable[Any]: ...


async def run_here(call: Callable[..., Any], *args: Any, waits: bool = False) -> Any:
    """An `Offload` that runs the call where it is (outside a server: tests, benchmarks)."""
    return call(*args)


_Answer = TypeVar("_Answer", codec.EncodedLookupResponse, codec.EncodedManyResponse)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """embedding.v1.EmbeddingService over a `Lookups` core; `offload` runs what is not a
    plain lookup (the server's: its handler pool)."""

    def __init__(self, lookups: Lookups, offload: Offload = run_here) -> None:
        self.lookups = lookups
        self.offload = offload

    async def Lookup(
        self, request: pb.LookupRequest, context: grpc.aio.ServicerContext
    ) -> codec.EncodedLookupResponse | Serialized:
        return await self._serialized(await self.lookup_request("Lookup", request, context))

    async def LookupDense(
        self, request: pb.LookupRequest, context: grpc.aio.ServicerContext
    ) -> codec.EncodedLookupResponse | Serialized:
        return await self._serialized(await self.lookup_request("LookupDense", request, context))

    async def _serialized(self, answer: _Answer) -> _Answer | Serialized:
        """`answer` as it is, or serialized in the pool when it is large."""
        if answer.nbytes <= LOOP_ANSWER_BYTES:
            return answer
        return Serialized(await self.offload(answer.SerializeToString))

    async def LookupStream(
        self, requests: AsyncIterator[pb.LookupRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LookupStreamResponse | codec.EncodedStreamResult]:
        sequence = 0
        async for request in requests:
            try:
                if isinstance(request, Malformed):
                    raise codec.WireError(f"not a valid LookupRequest: {request.error}")
                result = await self.lookup_request("LookupStream", request, context)
            except MAPPED_ERRORS as exc:
                error = pb.StreamError(code=status_code(exc).value[0], message=str(exc))
                yield pb.LookupStreamResponse(sequence=sequence, error=error)
            else:
                yield codec.EncodedStreamResult(sequence, result)
            sequence += 1

    async def LookupMany(
        self, request: pb.LookupManyRequest, context: grpc.aio.ServicerContext
    ) -> codec.EncodedManyResponse | Serialized:
        return await self._serialized(await self._lookup_many("LookupMany", request, context))

    async def LookupManyDense(
        self, request: pb.LookupManyRequest, context: grpc.aio.ServicerContext
    ) -> codec.EncodedManyResponse | Serialized:
        return await self._serialized(await self._lookup_many("LookupManyDense", request, context))

    async def _lookup_many(
        self, method: str, request: pb.LookupManyRequest, context: grpc.aio.ServicerContext
    ) -> codec.EncodedManyResponse:
        """Every feature's lookup in order; the first refusal fails the call, naming it.
        The whole call is checked first: its features, ids (a feature counts one at
        least: an empty one still costs a lookup) and, dense, its multiply-adds summed."""
        limits = self.lookups.limits
        if len(request.features) > limits.max_features:
            raise OverLimit(
                f"{len(request.features)} features in one request; this server takes at most "
                f"{limits.max_features} (--max-features): split them over calls"
            )
        names = [f.feature for f in request.features]
        # Counted once (not names.count per name: quadratic in a caller's feature count).
        duplicated = sorted(n for n, seen in Counter(names).items() if seen > 1)
        if duplicated:
            shown = ", ".join(quoted(n) for n in duplicated[:5])
            more = f" and {len(duplicated) - 5} more" if len(duplicated) > 5 else ""
            raise InvalidRequest(f"feature name(s) given twice: {shown}{more}")
        total_ids = sum(max(1, codec.id_count(f.lookup)) for f in request.features)
        if total_ids > limits.max_ids:
            raise OverLimit(
                f"{total_ids} ids over {len(names)} features in one request; this server takes "
                f"at most {limits.max_ids} (--max-ids): split the request"
            )
        if method in DENSE_METHODS:
            self._check_dense_total(request)
        results: list[tuple[str, codec.EncodedLookupResponse]] = []
        total_bytes = 0
        for feature in request.features:
            try:
                result = await self.lookup_request(method, feature.lookup, context)
            except MAPPED_ERRORS as exc:
                raise type(exc)(f"feature {quoted(feature.feature)}: {exc}") from None
            total_bytes += result.nbytes
            if total_bytes > limits.max_response_bytes:
                raise OverLimit(
                    f"the response would exceed the {limits.max_response_bytes}-byte message "
                    "limit (--max-message-bytes): split the features over calls or ask for "
                    "float16/bfloat16"
                )
            results.append((feature.feature, result))
        return codec.EncodedManyResponse(results)

    def _check_dense_total(self, request: pb.LookupManyRequest) -> None:
        """Refuse a LookupManyDense whose features cost more multiply-adds together than
        one call may (each is also checked alone as it runs)."""
        store, limits = self.lookups.store, self.lookups.limits
        total = 0
        for feature in request.features:
            name = store.resolve_name(feature.lookup.table)
            if name is None:
                continue  # refused as it runs, named
            table = store.get(name)
            bags = codec.bag_count(feature.lookup)
            hot_rows = (
                bags if bags and feature.lookup.pooling != pb.POOLING_MAX
                else codec.id_count(feature.lookup)
            )  # fmt: skip
            total += hot_rows * table.rows * table.dim
        if total > limits.max_dense_macs:
            raise OverLimit(
                f"LookupManyDense of {len(request.features)} features costs {total} "
                f"multiply-adds in all, over the limit of {limits.max_dense_macs} "
                "(--max-dense-macs): use LookupMany, or fewer ids"
            )

    async def ListTables(
        self, request: pb.ListTablesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTablesResponse:
        store = self.lookups.store
        return pb.ListTablesResponse(tables=[table_info(t, store) for t in store])

    async def lookup_request(
        self,
        method: str,
        request: pb.LookupRequest,
        context: grpc.aio.ServicerContext,
        dense: bool | None = None,
    ) -> codec.EncodedLookupResponse:
        """One lookup as `method` (the metrics label; dense for LookupDense and
        LookupManyDense unless `dense` says), with its metrics; errors raised as the core's.
        A plain one is answered here, any other in `offload`."""
        started = time.perf_counter()
        # Label by the resolved table only: a caller's made-up names must not become series.
        table = self.lookups.store.resolve_name(request.table) or ""
        code = grpc.StatusCode.OK
        if dense is None:
            dense = method in DENSE_METHODS
        try:
            # Counted before decoding: a 15 MiB list of 1-byte varints is 15 million ids,
            # whose decoding took ~380 MiB before the count refused them.
            self.lookups.check_count(codec.id_count(request), "ids")
            ids = codec.decode_ids(request)
            dtype = codec.dtype_name(request.dtype)
            # Counted from the request's fields before any bag is sized from them.
            self.lookups.check_count(codec.bag_count(request), "bags")
            bags = codec.decode_bags(request, ids)
            deadline = _deadline(context)
            if request.min_update_seq:
                await self._wait_for_update(request.table, request.min_update_seq, deadline)
            plain = not (
                dense
                or bags is not None
                or request.HasField("padding_id")
                or request.HasField("expect_shard")
            )  # W[ids] and no more: the core's short way, when the table allows it
            out = self.lookups.plain(table, ids, dtype, LOOP_TAKE_ELEMENTS) if plain else None
            if out is None:
                general = functools.partial(
                    self.lookups.lookup,
                    request.table,
                    ids,
                    dtype,
                    dense=dense,
                    deadline=deadline,
                    bags=bags,
                    padding_id=request.padding_id if request.HasField("padding_id") else None,
                    expect_shard=(
                        (request.expect_shard.index, request.expect_shard.count)
                        if request.HasField("expect_shard")
                        else None
                    ),
                )
                out = await self.offload(general, waits=dense)
            metrics.child(metrics.REQUEST_IDS, method, table).observe(ids.size)
            if bags is not None:
                metrics.child(metrics.REQUEST_BAGS, method, table).observe(bags.count)
            metrics.child(metrics.RESPONSE_BYTES, method, table).inc(out.vectors.nbytes)
            metrics.child(metrics.KERNEL_SECONDS, out.kernel, table, out.table.device).observe(
                out.kernel_seconds
            )
            return codec.EncodedLookupResponse(
                out.vectors, out.dtype, out.shape, out.table.name, *out.stamp
            )
        except Exception as exc:
            code = status_code(exc)
            raise
        finally:
            metrics.child(metrics.REQUEST_SECONDS, method, table, code.name).observe(
                time.perf_counter() - started
            )

    async def _wait_for_update(self, name: str, wanted: int, deadline: float | None) -> None:
        """Read your writes: wait (on the loop, without holding it) until table `name`
        holds update `wanted`, within the call's deadline (or UPDATE_WAIT_S); then
        UNAVAILABLE, which a sharded client answers by asking another replica."""
        store = self.lookups.store
        # Given up a little before the deadline, so that the refusal reaches the caller
        # before the deadline does (DEADLINE_EXCEEDED would not say why, nor move a
        # sharded client to another replica).
        until = time.monotonic() + UPDATE_WAIT_S if deadline is None else deadline - 0.05
        pause = 0.001
        while (held := store.get(name).update_seq) < wanted:
            left = until - time.monotonic()
            if left <= 0:
                raise Unavailable(
                    f"table {store.get(name).name!r} here holds updates up to {held}; the call "
                    f"asked for {wanted} (min_update_seq), which has not reached this replica "
                    "yet: ask another, or wait"
                )
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)


def table_info(table: Table, store: TableStore) -> pb.TableInfo:
    """A table as the wire describes it (a shard: the whole table's rows, and its part)."""
    shard = table.shard
    part = table.held_shard
    index = table.keys
    rows = table.rows if shard is None else shard.rows
    info = pb.TableInfo(
        name=table.name,
        rows=rows if index is None else index.capacity,
        shard=None if part is None else pb.ShardOf(index=part.index, count=part.count),
        shard_rows=table.rows,
        dim=table.dim,
        dtype=codec.storage_dtype_to_wire(table.dtype),
        device=table.device,
        version=table.version,
        update_seq=table.update_seq,
        update_log=store.update_log is not None,
        bytes=table.nbytes,
        is_default=table.name == store.default_name,
    )
    if index is not None:
        info.keyed, info.keys, info.max_keys = True, index.count, index.capacity
        info.missing_keys, info.bags_skip_missing = index.missing, index.skip_missing_in_bags
    return info


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the lookup started")
    return time.monotonic() + remaining
