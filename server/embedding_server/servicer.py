"""The gRPC transport: a thin servicer and an interceptor that maps errors and records metrics.

The servicer decodes and validates with the codec, calls the core, encodes the
answer and records the service's metrics; it holds no numerics. The interceptor
turns the core's errors into gRPC status codes in one place, turns anything
unexpected into a logged INTERNAL instead of a dead call, and counts every RPC
under the gRPC ecosystem's standard metric names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server import metrics
from embedding_server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    OverLimit,
    RequestError,
    TableNotFound,
)
from embedding_server.lookup import Lookups

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    codec.WireError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TableNotFound: grpc.StatusCode.NOT_FOUND,
    OverLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception the core or codec raised (INTERNAL otherwise)."""
    for kind, code in _STATUS_CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """embedding.v1.EmbeddingService over a `Lookups` core."""

    def __init__(self, lookups: Lookups) -> None:
        self.lookups = lookups

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        return self._lookup("Lookup", request, context)

    def LookupDense(
        self, request: pb.LookupRequest, context: grpc.ServicerContext
    ) -> pb.LookupResponse:
        return self._lookup("LookupDense", request, context)

    def ListTables(
        self, request: pb.ListTablesRequest, context: grpc.ServicerContext
    ) -> pb.ListTablesResponse:
        store = self.lookups.store
        return pb.ListTablesResponse(
            tables=[
                pb.TableInfo(
                    name=t.name,
                    rows=t.rows,
                    dim=t.dim,
                    dtype=codec.dtype_to_wire(t.dtype),
                    device=t.device,
                    version=t.version,
                    bytes=t.nbytes,
                    is_default=t.name == store.default_name,
                )
                for t in store
            ]
        )

    def _lookup(
        self, method: str, request: pb.LookupRequest, context: grpc.ServicerContext
    ) -> pb.LookupResponse:
        started = time.perf_counter()
        # Label by the resolved table only: a caller's made-up names must not become series.
        table = self.lookups.store.resolve_name(request.table) or ""
        code = grpc.StatusCode.OK
        try:
            ids = codec.decode_ids(request)
            dtype = codec.dtype_name(request.dtype)
            out = self.lookups.lookup(
                request.table,
                ids,
                dtype,
                dense=method == "LookupDense",
                deadline=_deadline(context),
            )
            metrics.REQUEST_IDS.labels(method, table).observe(ids.size)
            metrics.RESPONSE_BYTES.labels(method, table).inc(len(out.vectors))
            metrics.KERNEL_SECONDS.labels(
                metrics.KERNEL_NAMES[method], table, out.table.device
            ).observe(out.kernel_seconds)
            return codec.encode_lookup_response(
                out.vectors, out.dtype, out.shape, out.table.name, out.version
            )
        except Exception as exc:
            code = status_code(exc)
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(method, table, code.name).observe(
                time.perf_counter() - started
            )


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before the lookup started")
    return time.monotonic() + remaining


class StatusInterceptor(grpc.ServerInterceptor):
    """Maps core errors to status codes, logs unexpected ones as INTERNAL, records gRPC metrics,
    and drains: once `drain()` is called, new calls (but health checks) get UNAVAILABLE while
    the calls already running finish."""

    def __init__(self) -> None:
        self._running = 0
        self._draining = False
        self._idle = threading.Condition()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to `timeout` s for running ones; True when none is left."""
        with self._idle:
            self._draining = True
            return self._idle.wait_for(lambda: self._running == 0, timeout=timeout)

    def _enter(self, service: str) -> bool:
        with self._idle:
            if self._draining and service != HEALTH_SERVICE:
                return False
            self._running += 1
            return True

    def _leave(self) -> None:
        with self._idle:
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming RPCs (health Watch, reflection) pass through
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        behavior = handler.unary_unary

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            metrics.GRPC_STARTED.labels("unary", service, method).inc()
            if not self._enter(service):
                metrics.GRPC_HANDLED.labels("unary", service, method, "UNAVAILABLE").inc()
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            inflight = metrics.INFLIGHT.labels(method)
            inflight.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return behavior(request, context)
            except (RequestError, codec.WireError) as exc:
                code = status_code(exc)
                context.abort(code, str(exc))
            except Exception as exc:
                # grpc-stubs lags grpcio: ServicerContext.code() exists since 1.38.
                aborted = context.code()  # type: ignore[attr-defined]
                if aborted not in (None, grpc.StatusCode.OK):
                    code = aborted  # the handler aborted the call itself
                    raise
                log.exception("%s failed on an unexpected error", handler_call_details.method)
                code = grpc.StatusCode.INTERNAL
                context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
            finally:
                self._leave()
                inflight.dec()
                metrics.GRPC_HANDLED.labels("unary", service, method, code.name).inc()
                metrics.GRPC_HANDLING.labels("unary", service, method, code.name).observe(
                    time.perf_counter() - started
                )

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
