"""A probe, not a server: the embedding service's Lookup path served by `grpc.aio`.

What moving the service onto grpc.aio would buy (issue 12), measured before the transport
was rewritten, and where on it the call's Python should run: `--aio-probe
inline,executor,migration` (on the loop; awaited in the handler pool; grpc.aio's own pool
for sync handlers). Inline won by far (docs/performance.md), and the server now answers
plain lookups that way. The probe runs the real per-call code of a Lookup: the servicer with its
limits, id checks, gather, metrics and framing (`EmbeddingServicer.lookup_request`), the
authenticator's check, and the interceptor's gRPC metrics, status mapping and malformed
request answer, on one event loop, inline (a small plain gather blocks the loop for
microseconds; the real server would hand dense and large calls to threads). It has none
of the rest of the server: draining, streams, admin, health, the connection cap, other
RPCs. bench/service.py measures it as `Lookup[aio-probe]` (`--aio-probe`) beside the real
server and the bare servers, in the same run.

`--aio-probe floor` serves the least any server of the contract does instead: parse the
LookupRequest, take the rows, frame the LookupResponse, with none of the service's logic
(`floor_handler`): the floor under the service's per-call cost (docs/performance.md,
"The floor").

    .venv/bin/python bench/service.py --load h2load --aio-probe --kinds Lookup,ceiling
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

SERVICE = "embedding.v1.EmbeddingService"


MODES = ("inline", "executor", "migration", "floor")


def probe_server(port: int, rows: int, mode: str = "inline", malloc_tune: bool = True) -> None:
    """Serve Lookup on 127.0.0.1:`port` over the demo table (`rows` x 128 float32, the
    server's seeded one) until SIGTERM. `mode`: where the call's Python runs: "inline" on
    the event loop; "executor" in the server's handler pool (`CallPool`, 4 threads),
    awaited by a coroutine; "migration" as a sync handler that grpc.aio itself runs in
    that pool (`migration_thread_pool`). `malloc_tune`: the allocator tuned as
    `embedding-server --malloc-tune true` (its default) does (`tune_allocator`)."""
    import grpc
    import torch
    from service_logic import finished  # bench/, beside this script

    from embedding_client import codec
    from embedding_client.proto import embedding_pb2 as pb
    from embedding_server import metrics
    from embedding_server.core.lookup import Limits, Lookups
    from embedding_server.core.sources import demo_table
    from embedding_server.core.store import TableStore
    from embedding_server.process.callpool import CallPool
    from embedding_server.process.server import tune_allocator
    from embedding_server.transport.auth import Authenticator
    from embedding_server.transport.interceptor import (
        MAPPED_ERRORS,
        Malformed,
        _tolerant,
        status_code,
    )
    from embedding_server.transport.servicer import EmbeddingServicer

    if malloc_tune:
        tune_allocator()
    store = TableStore()
    store.add(demo_table(rows, 128, 0, torch.device("cpu")))
    if mode == "floor":
        serve_aio(port, SERVICE, floor_handler(store.get("demo")))
        return
    limits = Limits(max_ids=1 << 20, max_dense_macs=1 << 40, dense_chunk_cells=1 << 22,
                    max_response_bytes=1 << 30)  # fmt: skip
    servicer = EmbeddingServicer(Lookups(store, limits))
    authenticator = Authenticator()

    def lookup(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # The interceptor's `observed`, for this one method (its abort: the caller's).
        metrics.child(metrics.GRPC_STARTED, "unary", SERVICE, "Lookup").inc()
        inflight = metrics.child(metrics.INFLIGHT, "Lookup")
        inflight.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            authenticator.check(context, admin=False)
            if isinstance(request, Malformed):
                raise codec.WireError(f"the request is not a valid {SERVICE}/Lookup message")
            # never suspends: a plain lookup, or the general way run where it is
            return finished(servicer.lookup_request("Lookup", request, context))
        except MAPPED_ERRORS as exc:
            code = status_code(exc)
            raise
        finally:
            inflight.dec()
            seconds = time.perf_counter() - started
            metrics.child(metrics.GRPC_HANDLED, "unary", SERVICE, "Lookup", code.name).inc()
            metrics.child(metrics.GRPC_HANDLING, "unary", SERVICE, "Lookup", code.name).observe(
                seconds
            )

    pool = CallPool(4, 64)

    async def on_loop(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if mode == "inline":
                return lookup(request, context)
            return await asyncio.get_running_loop().run_in_executor(pool, lookup, request, context)
        except MAPPED_ERRORS as exc:
            await context.abort(status_code(exc), str(exc))

    def in_migration_pool(request: Any, context: Any) -> Any:
        try:
            return lookup(request, context)
        except MAPPED_ERRORS as exc:
            context.abort(status_code(exc), str(exc))

    handler = grpc.unary_unary_rpc_method_handler(
        in_migration_pool if mode == "migration" else on_loop,
        request_deserializer=_tolerant(pb.LookupRequest.FromString),
        response_serializer=lambda response: response.SerializeToString(),
    )
    serve_aio(port, SERVICE, handler, pool if mode == "migration" else None)


def floor_handler(table: Any) -> Any:
    """The least any server answering the contract's Lookup does on grpc.aio, on the loop:
    parse the LookupRequest (protobuf), take the rows by numpy, frame the LookupResponse
    (the codec's one-copy framing). No checks, limits, metrics, credentials or error
    handling: not a server anyone should run, the floor under the service's cost."""
    import grpc
    import numpy as np

    from embedding_client import codec
    from embedding_client.proto import embedding_pb2 as pb

    rows, dim, name, version = table.host_array(), table.dim, table.name, table.version

    async def lookup(request: Any, context: grpc.aio.ServicerContext) -> Any:
        ids = np.frombuffer(request.ids, dtype="<i8")
        return codec.EncodedLookupResponse(rows[ids], "float32", (ids.size, dim), name, version)

    return grpc.unary_unary_rpc_method_handler(
        lookup,
        request_deserializer=pb.LookupRequest.FromString,
        response_serializer=lambda response: response.SerializeToString(),
    )


def serve_aio(port: int, service: str, lookup: Any, pool: Any = None) -> None:
    """Serve `lookup` (a grpc method handler) as `service`/Lookup on 127.0.0.1:`port`
    with grpc.aio, on one event loop (sync handlers: in `pool`), until SIGTERM."""
    import grpc

    async def serve() -> None:
        server = grpc.aio.server(migration_thread_pool=pool, options=[("grpc.max_send_message_length", 1 << 30),
                                          ("grpc.max_receive_message_length", 1 << 30),
                                          ("grpc.so_reuseport", 0)])  # fmt: skip
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Lookup": lookup}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(server.stop(0))
        )
        await server.wait_for_termination()

    asyncio.run(serve())
