"""The one place every RPC passes: status codes, metrics, credentials and draining.

The interceptor turns the core's errors into gRPC status codes in one place, turns
anything unexpected into a logged INTERNAL instead of a dead call, answers unparseable
requests with INVALID_ARGUMENT, and counts every RPC under the gRPC ecosystem's
standard metric names.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_server import metrics
from embedding_server.auth import Authenticator
from embedding_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    OverLimit,
    PermissionDenied,
    RequestError,
    TableNotFound,
    Unauthenticated,
)
from embedding_server.sources import TableLoadError

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingAdmin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

DENSE_METHODS = ("LookupDense", "LookupManyDense")

_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    TableLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    codec.WireError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TableNotFound: grpc.StatusCode.NOT_FOUND,
    OverLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# The errors a handler may raise on purpose: each becomes its status code, not INTERNAL.
MAPPED_ERRORS: tuple[type[Exception], ...] = (RequestError, *_STATUS_CODES)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception the core or codec raised (INTERNAL otherwise)."""
    for kind, code in _STATUS_CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


_END = object()  # no further message on a stream


class _Draining(Exception):
    """A stream's next request arrived while the server drains."""


class Malformed:
    """Stands in for a request whose bytes did not parse, so the call gets INVALID_ARGUMENT
    instead of grpc's own INTERNAL ("Exception deserializing request!")."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _serializer(handler: grpc.RpcMethodHandler) -> Callable[[Any], bytes] | None:
    """Serialize responses by their own SerializeToString: protobuf messages and the
    lookup responses codec serializes by hand (EncodedLookupResponse) alike."""
    return None if handler.response_serializer is None else _serialize


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError and others
            return Malformed(exc)

    return parse


class StatusInterceptor(grpc.ServerInterceptor):
    """The one place every RPC passes: authentication, status codes, metrics, draining.

    Maps core errors to status codes, turns anything unexpected into a logged INTERNAL,
    answers unparseable requests with INVALID_ARGUMENT, records the gRPC metrics, checks
    credentials (all RPCs but health), and drains: once `drain()` is called, new calls
    (health checks excepted) get UNAVAILABLE while running ones finish.
    """

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        max_streams: int = 8,
        waiting: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.authenticator = authenticator or Authenticator()
        # A sync gRPC server runs each open stream on one handler thread for its lifetime:
        # past the thread count, further streams (and unary calls) would wait forever.
        self.max_streams = max_streams
        # Entered around calls that wait long (dense, admin, streams) so that the handler
        # pool lets another call run meanwhile (CallPool.blocking).
        self.waiting = waiting
        self._running = 0
        self._draining = False
        self._idle = threading.Condition()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._streams: dict[int, grpc.ServicerContext] = {}

    def drain(self, timeout: float) -> bool:
        """Refuse new calls, wait up to `timeout` s for running ones, then cancel streams left
        idle (nothing in progress on them) so they do not hold the shutdown for the whole
        grace period. True when nothing was running any more."""
        with self._idle:
            self._draining = True
            drained = self._idle.wait_for(lambda: self._running == 0, timeout=timeout)
            idle_streams = list(self._streams.values())
        for context in idle_streams:
            context.cancel()
        return drained

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

    def _authenticate(self, service: str, context: grpc.ServicerContext) -> None:
        if service != HEALTH_SERVICE:
            self.authenticator.check(
                context.invocation_metadata(), admin=service == ADMIN_SERVICE, peer=context.peer()
            )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        # Handlers are fixed per method, so each is wrapped once, not on every call.
        wrapped = self._wrapped.get(handler_call_details.method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrap(handler, handler_call_details.method)
            self._wrapped[handler_call_details.method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        if handler.unary_unary is None:
            return self._streaming(handler, service, method)
        behavior = handler.unary_unary
        slow = service == ADMIN_SERVICE or method in DENSE_METHODS

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            metrics.child(metrics.GRPC_STARTED, "unary", service, method).inc()
            if not self._enter(service):
                metrics.child(metrics.GRPC_HANDLED, "unary", service, method, "UNAVAILABLE").inc()
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            inflight = metrics.child(metrics.INFLIGHT, method)
            inflight.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._authenticate(service, context)
                if isinstance(request, Malformed):
                    raise codec.WireError(
                        f"the request is not a valid {service}/{method} message: {request.error}"
                    )
                if slow:
                    with self.waiting():
                        return behavior(request, context)
                return behavior(request, context)
            except MAPPED_ERRORS as exc:
                code = status_code(exc)
                context.abort(code, str(exc))
            except Exception as exc:
                # grpc-stubs lags grpcio: ServicerContext.code() exists since 1.38.
                aborted = context.code()  # type: ignore[attr-defined]
                if aborted not in (None, grpc.StatusCode.OK):
                    code = aborted  # the handler aborted the call itself
                    raise
                log.exception("%s failed on an unexpected error", full_method)
                code = grpc.StatusCode.INTERNAL
                context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
            finally:
                self._leave()
                inflight.dec()
                metrics.child(metrics.GRPC_HANDLED, "unary", service, method, code.name).inc()
                metrics.child(metrics.GRPC_HANDLING, "unary", service, method, code.name).observe(
                    time.perf_counter() - started
                )

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=_serializer(handler),
        )

    def _streaming(
        self, handler: grpc.RpcMethodHandler, service: str, method: str
    ) -> grpc.RpcMethodHandler:
        """Streaming RPCs: credentials checked; a bidirectional stream counts as running only
        while it handles a message, so drain waits for answers in progress, not idle streams."""
        if service == HEALTH_SERVICE or handler.stream_stream is None:
            return handler  # health Watch: open to probes, like Check
        behavior = handler.stream_stream

        def checked(requests: Any, context: grpc.ServicerContext) -> Any:
            metrics.child(metrics.GRPC_STARTED, "bidi_stream", service, method).inc()
            busy = [False]

            def counted() -> Any:
                while True:
                    with self.waiting():  # for the next message: let other calls run
                        request = next(requests, _END)
                    if request is _END:
                        return
                    if not self._enter(service):
                        raise _Draining
                    busy[0] = True
                    yield request  # resumes once the answer to it has been handed on
                    busy[0] = False
                    self._leave()

            code = grpc.StatusCode.OK
            with self._idle:
                admitted = len(self._streams) < self.max_streams
                if admitted:
                    self._streams[id(context)] = context
            if not admitted:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                metrics.child(metrics.GRPC_HANDLED, "bidi_stream", service, method, code.name).inc()
                context.abort(
                    code,
                    f"{self.max_streams} streams are open, the most this server takes "
                    "(--max-streams): use unary Lookup, or retry later",
                )
            try:
                self._authenticate(service, context)
                yield from behavior(counted(), context)
            except _Draining:
                code = grpc.StatusCode.UNAVAILABLE
                context.abort(code, "the server is shutting down: resend the rest elsewhere")
            except MAPPED_ERRORS as exc:
                code = status_code(exc)
                context.abort(code, str(exc))
            finally:
                with self._idle:
                    self._streams.pop(id(context), None)
                if busy[0]:
                    self._leave()
                metrics.child(metrics.GRPC_HANDLED, "bidi_stream", service, method, code.name).inc()

        return grpc.stream_stream_rpc_method_handler(
            checked,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=_serializer(handler),
        )
