"""The one place every RPC passes: status codes, metrics, credentials and draining.

The interceptor turns the core's errors into gRPC status codes in one place, turns
anything unexpected into a logged INTERNAL instead of a dead call, answers unparseable
requests with INVALID_ARGUMENT, and counts every RPC under the gRPC ecosystem's
standard metric names.

It is not a grpc interceptor but the server's one generic handler, wrapping the
services it was given (it stands in for the server in their generated
`add_*_to_server`): grpc.aio runs an interceptor chain of coroutines on every call, and
waits on one pending request per registered method on every call (`asyncio.wait` over
all of them: 20 with ours registered, ~8 us a call more than over the generic one alone;
docs/performance.md).

The server is a `grpc.aio` server: every call's Python starts on its one event loop.
Handlers written as coroutines (the lookups, health, reflection) run there; a plain
lookup is answered on the loop in microseconds, and hands anything longer to the
handler pool itself (`offload`). Handlers written as plain functions (admin, the Open
Inference Protocol's metadata calls) run in the handler pool, so none of them blocks
the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_server import logs, metrics
from embedding_server.core.sources import TableLoadError
from embedding_server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    KeyNotFound,
    OverLimit,
    PermissionDenied,
    RequestError,
    TableNotFound,
    Unauthenticated,
    Unavailable,
)
from embedding_server.transport.auth import Authenticator

if TYPE_CHECKING:  # the process layer hands its pool down; nothing here imports it
    from embedding_server.process.callpool import CallPool

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingAdmin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_HEALTH_PREFIX = f"/{HEALTH_SERVICE}/"
# Probes that answer through a stop: health, and the inference protocol's liveness and
# readiness (live stays true while the process runs; ready turns false).
_PROBES = tuple(
    f"/inference.GRPCInferenceService/{name}"
    for name in ("ServerLive", "ServerReady", "ModelReady")
)

_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    TableLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    codec.WireError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TableNotFound: grpc.StatusCode.NOT_FOUND,
    KeyNotFound: grpc.StatusCode.NOT_FOUND,
    OverLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
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


class _Ended(Exception):
    """The server ended a stream that waited for its next message (idle, or draining)."""


class Malformed:
    """Stands in for a request whose bytes did not parse, so the call gets INVALID_ARGUMENT
    instead of grpc's own INTERNAL ("Exception deserializing request!")."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _ended_outside(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code of a call that grpc ended while its handler ran: DEADLINE_EXCEEDED when
    its deadline has passed, else CANCELLED (the caller cancelled it, or went away)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


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


@dataclass
class _OpenStream:
    """A stream the interceptor admitted: its context and task, since when it has waited
    for its next message (None: it is handling one), and why the server ended it."""

    context: grpc.aio.ServicerContext
    method: str
    task: asyncio.Task[Any] | None
    loop: asyncio.AbstractEventLoop
    waiting_since: float | None = None
    ended: str = ""  # why the server ended it while it waited ("" while it has not)


def _refused(
    handler: grpc.RpcMethodHandler, full_method: str, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once with `code` and `message`, counted as started
    and handled under the method's own type. It takes the request as a stream, so grpc
    calls it without waiting for a message: a caller that sends headers and nothing more
    holds no place."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    kind = "unary" if handler.unary_unary is not None else "bidi_stream"

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics.child(metrics.GRPC_STARTED, kind, service, method).inc()
        metrics.child(metrics.GRPC_HANDLED, kind, service, method, code.name).inc()
        if service == ADMIN_SERVICE:  # every admin call leaves an audit line, refused or not
            who = "a caller without a valid credential"
            logs.audit_admin_call(method, who, context.peer(), None, code.name, message, 0.0)
        await context.abort(code, message)

    if kind == "unary":
        return grpc.stream_unary_rpc_method_handler(refuse)

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(requests, context)
        yield  # never reached: makes this an async generator, as grpc expects

    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class StatusInterceptor(grpc.GenericRpcHandler):
    """The one place every RPC passes: authentication, status codes, metrics, draining.

    Give it the services (`add_generic_rpc_handlers`, as to a server; the generated
    `add_*_to_server` functions do) and give it to the server as its only generic
    handler: it answers each call with the service's handler, wrapped.

    Maps core errors to status codes, turns anything unexpected into a logged INTERNAL,
    answers unparseable requests with INVALID_ARGUMENT, records the gRPC metrics, checks
    credentials (all RPCs but health) and writes the audit line of admin calls, bounds
    open streams (count and idle time), runs handlers that are plain functions in the
    handler pool, and takes part in a stop: `close_streams()` ends the streams (they
    cannot be handed to another server) while unary calls are still served, and once
    `drain()` is called, calls that arrive (probes excepted) get UNAVAILABLE while every
    call received before finishes.

    Parameters
    ----------
    authenticator : who may call what (default: anyone, admin off).
    max_streams : most streams open at once.
    pool : the handler pool, where calls that are not coroutines run (its `blocking()`
        around calls that wait long); None: asyncio's default executor.
    stream_idle_s : a stream waiting longer than this for its next message is cancelled.
    max_watches : most health Watch streams open at once.
    """

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        max_streams: int = 8,
        pool: CallPool | None = None,
        stream_idle_s: float = 30.0,
        max_watches: int = 64,
    ) -> None:
        self.authenticator = authenticator or Authenticator()
        self.max_watches = max_watches  # health Watch streams open at once
        self._watches = 0
        # Each open stream holds its messages' buffers and a task: bounded.
        self.max_streams = max_streams
        self.pool = pool
        # Entered around calls that wait long (dense, admin, reloads) so that the handler
        # pool lets another call run meanwhile.
        self.waiting: Callable[[], contextlib.AbstractContextManager[None]] = (
            contextlib.nullcontext if pool is None else pool.blocking
        )
        self.stream_idle_s = stream_idle_s
        self._running = 0  # calls and stream messages being answered
        self._draining = False
        self._streams_closed = False  # streams refused and ended: the server is stopping
        self._drained = threading.Event()  # set when the last call ends while draining
        self._streams_lock = threading.Lock()
        self._services: list[grpc.GenericRpcHandler] = []
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}
        self._streams: dict[int, _OpenStream] = {}
        self._reaper: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        """Whether calls that arrive now are refused (`drain()` was called)."""
        return self._draining

    async def offload(self, call: Callable[..., Any], *args: Any, waits: bool = False) -> Any:
        """`call(*args)` in the handler pool, the event loop free meanwhile; `waits`: it
        may wait long (a one-hot matmul, a reload), so it does not hold a running place."""
        loop = asyncio.get_running_loop()
        if waits:
            return await loop.run_in_executor(self.pool, self._waiting_call, call, args)
        return await loop.run_in_executor(self.pool, call, *args)

    async def close(self) -> None:
        """Stop the idle reaper (on the event loop, as the server stops)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    def _waiting_call(self, call: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with self.waiting():
            return call(*args)

    def close_streams(self) -> None:
        """A stop begins: end the streams waiting for their next message, and refuse new
        streams and further messages on open ones with UNAVAILABLE (unary calls are still
        answered). A stream holds its connection open, which would keep the drain waiting
        for it to the end of the grace period; its caller reopens it elsewhere."""
        self._streams_closed = True
        self._end_idle_streams()

    def _end_idle_streams(self) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.loop.call_soon_threadsafe(
                self._end, stream, "the server is shutting down: reopen the stream elsewhere"
            )

    def drain(self, timeout: float) -> bool:
        """Refuse calls that arrive from now on; wait up to `timeout` s for every call
        received before and for answers in progress on streams; then end streams left
        idle so they do not hold the shutdown for the whole grace period. True when all
        of them finished in time. Called off the event loop (it blocks)."""
        deadline = time.monotonic() + timeout
        self._draining = True  # then read the count: `_leave` writes them the other way
        drained = True
        while self._running:
            left = deadline - time.monotonic()
            if left <= 0:
                drained = False
                break
            self._drained.wait(min(left, 0.05))
        self._end_idle_streams()
        return drained

    # The count of calls running is written on the event loop only, without a lock (two
    # lock round trips a call were ~3% of the loop's time); `drain`, on another thread,
    # only reads it.
    def _enter(self, admit_while_draining: bool = False) -> bool:
        if self._draining and not admit_while_draining:
            return False
        self._running += 1
        return True

    def _leave(self) -> None:
        self._running -= 1  # then read the flag: `drain` writes them the other way
        if self._draining and not self._running:
            self._drained.set()

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Take services' handlers, as a server does (before the server starts)."""
        self._services.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Ignored: the generated `add_*_to_server` also registers each method with the
        server, which grpc.aio then pays for on every call; the same handlers came in
        through `add_generic_rpc_handlers`."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        # grpc calls this as it receives a call: the moment that decides whether the call
        # was received before draining.
        method = handler_call_details.method
        # Handlers are fixed per method, so each is wrapped once, not on every call.
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._find(handler_call_details)
            if handler is None:  # not a method of this server: grpc answers UNIMPLEMENTED
                return None
            wrapped = self._wrap(handler, method)
            self._wrapped[method] = wrapped
        if method.startswith(_HEALTH_PREFIX):
            return wrapped
        try:
            self.authenticator.check_arrival(handler_call_details.invocation_metadata or ())
        except Unauthenticated as exc:
            return _refused(wrapped, method, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if self._draining and method not in _PROBES:
            return self._refusal(wrapped, method)
        return wrapped

    def _find(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for services in self._services:
            handler = services.service(handler_call_details)
            if handler is not None:
                return handler
        return None

    def _refusal(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        """The handler of a call that arrived while the server drains: UNAVAILABLE."""
        refusal = self._refusals.get(full_method)
        if refusal is None:
            refusal = _refused(
                handler, full_method, grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down: retry on another server",
            )  # fmt: skip
            self._refusals[full_method] = refusal
        return refusal

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        if handler.unary_unary is None:
            return self._streaming(handler, service, method)
        behavior: Any = handler.unary_unary  # a coroutine function, or one for the pool
        on_loop = inspect.iscoroutinefunction(behavior)
        admin = service == ADMIN_SERVICE
        checks_callers = service != HEALTH_SERVICE
        authenticator = self.authenticator

        # This method's series whose labels do not depend on the call: found once.
        calls_started = metrics.child(metrics.GRPC_STARTED, "unary", service, method)
        inflight = metrics.child(metrics.INFLIGHT, method)

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            calls_started.inc()
            inflight.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            details = ""
            who = "a caller without a valid credential"
            self._enter(admit_while_draining=True)  # received before draining: answered
            try:
                if checks_callers:
                    who = authenticator.check(context, admin=admin)
                if isinstance(request, Malformed):
                    raise codec.WireError(
                        f"the request is not a valid {service}/{method} message: {request.error}"
                    )
                if on_loop:
                    return await behavior(request, context)
                # Plain functions that may wait long are admin ones (a dense lookup is a
                # coroutine, and the servicer marks its own pool work as waiting).
                return await self.offload(behavior, request, context, waits=admin)
            except MAPPED_ERRORS as exc:
                code, details = status_code(exc), str(exc)
                who = getattr(exc, "caller", "") or who  # a refused credential says whose
            except asyncio.CancelledError:  # grpc ended the call while it ran
                code = _ended_outside(context)
                raise
            except Exception as exc:
                aborted = context.code()
                if aborted not in (None, grpc.StatusCode.OK):
                    code = aborted  # the handler aborted the call itself (and sent its status)
                    raise
                log.exception("%s failed on an unexpected error", full_method)
                code = grpc.StatusCode.INTERNAL
                details = f"internal error ({type(exc).__name__}); see the server log"
            finally:
                self._leave()
                inflight.dec()
                seconds = time.perf_counter() - started
                metrics.child(metrics.GRPC_HANDLED, "unary", service, method, code.name).inc()
                metrics.child(metrics.GRPC_HANDLING, "unary", service, method, code.name).observe(
                    seconds
                )
                if admin:
                    logs.audit_admin_call(
                        method, who, context.peer(), request, code.name, details, seconds
                    )
            # A refusal: counted and logged above first, as grpc.aio's abort sends the
            # status at once (a caller that reads the metrics next finds its call there).
            await context.abort(code, details)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=_serializer(handler),
        )

    def _streaming(
        self, handler: grpc.RpcMethodHandler, service: str, method: str
    ) -> grpc.RpcMethodHandler:
        """Streaming RPCs: credentials checked, at most `max_streams` open, each ended
        when idle past `stream_idle_s`; a bidirectional stream counts as running only while
        it handles a message, so drain waits for answers in progress, not idle streams."""
        if service == HEALTH_SERVICE and handler.unary_stream is not None:
            return self._counted_watch(handler, method)
        if handler.stream_stream is None:
            return handler
        behavior: Any = handler.stream_stream  # an async generator function, on grpc.aio

        streams_started = metrics.child(metrics.GRPC_STARTED, "bidi_stream", service, method)

        async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            streams_started.inc()
            busy = False
            code = grpc.StatusCode.OK
            details = ""
            loop = asyncio.get_running_loop()
            stream = _OpenStream(context, method, asyncio.current_task(), loop)

            async def counted() -> AsyncIterator[Any]:
                nonlocal busy
                while True:
                    stream.waiting_since = time.monotonic()
                    try:
                        request = await anext(requests, _END)
                    except asyncio.CancelledError:
                        if not stream.ended:
                            raise  # by the caller
                        if stream.task is not None:
                            stream.task.uncancel()  # handled here: the task goes on
                        raise _Ended(stream.ended) from None
                    stream.waiting_since = None
                    if request is _END:
                        return
                    if self._streams_closed or not self._enter():
                        raise _Draining
                    busy = True
                    yield request  # resumes once the answer to it has been handed on
                    busy = False
                    self._leave()
                    if self._streams_closed:  # the stop began while it answered
                        raise _Draining

            admitted = False
            try:
                self.authenticator.check(context, admin=False)
                if self._streams_closed:
                    raise _Draining
                admitted = self._admit(stream)
                if not admitted:
                    raise OverLimit(
                        f"{self.max_streams} streams are open, the most this server takes "
                        "(--max-streams): use unary Lookup, or retry later"
                    )
                async for response in behavior(counted(), context):
                    yield response
            except _Draining:
                code = grpc.StatusCode.UNAVAILABLE
                details = "the server is shutting down: resend the rest elsewhere"
            except _Ended as ended:
                code, details = grpc.StatusCode.CANCELLED, str(ended)
            except MAPPED_ERRORS as exc:
                code, details = status_code(exc), str(exc)
            except (asyncio.CancelledError, GeneratorExit):
                # grpc ended the call while it ran: it cancels the task, or, when an answer
                # was ready before grpc noticed, stops taking answers (closes this generator)
                code = _ended_outside(context)
                raise
            finally:
                if admitted:
                    with self._streams_lock:
                        self._streams.pop(id(stream), None)
                if busy:
                    self._leave()
                metrics.child(metrics.GRPC_HANDLED, "bidi_stream", service, method, code.name).inc()
            if code is not grpc.StatusCode.OK:  # ended by the server: counted first
                await context.abort(code, details)

        return grpc.stream_stream_rpc_method_handler(
            checked,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=_serializer(handler),
        )

    def _counted_watch(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """Health Watch: open to probes like Check (no credential), but at most
        `max_watches` at once: each holds a place among the calls in flight for as long
        as its caller keeps it, so 256 anonymous ones filled them all."""
        behavior: Any = handler.unary_stream

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self._watches >= self.max_watches:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.max_watches} health Watch streams are open, the most this server "
                    "takes (--max-health-watches): use Check, or watch less",
                )
            self._watches += 1  # on the event loop only, like _running
            try:
                answers = behavior(request, context)
                if inspect.isasyncgen(answers):
                    async for response in answers:
                        await context.write(response)
                else:  # grpc's health servicer writes its answers itself
                    await answers
            finally:
                self._watches -= 1

        return grpc.unary_stream_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _admit(self, stream: _OpenStream) -> bool:
        """Count a new stream in, if there is room; start the idle reaper if none runs."""
        with self._streams_lock:
            if len(self._streams) >= self.max_streams:
                return False
            self._streams[id(stream)] = stream
        if self._reaper is None:
            self._reaper = stream.loop.create_task(self._reap(), name="stream-reaper")
        return True

    def _end(self, stream: _OpenStream, why: str) -> None:
        """End `stream` if it waits for its next message (on the event loop, where its
        task runs: the task is then suspended in that wait). A stream answering a message
        is left to finish it."""
        if stream.waiting_since is not None and not stream.ended and stream.task is not None:
            stream.ended = why
            stream.task.cancel()

    async def _reap(self) -> None:
        """End streams that waited longer than `stream_idle_s` for their next message,
        while any stream is open."""
        period = min(1.0, self.stream_idle_s / 4)
        try:
            while True:
                await asyncio.sleep(period)
                now = time.monotonic()
                with self._streams_lock:
                    if not self._streams:
                        return
                    idle = [
                        s for s in self._streams.values()
                        if not s.ended and s.waiting_since is not None
                        and now - s.waiting_since > self.stream_idle_s
                    ]  # fmt: skip
                for stream in idle:
                    log.info("%s stream from %s idle for over %.0f s: cancelled",
                             stream.method, stream.context.peer(), self.stream_idle_s)  # fmt: skip
                    metrics.child(metrics.STREAM_IDLE_TIMEOUTS, stream.method).inc()
                    self._end(
                        stream,
                        f"the stream waited over {self.stream_idle_s:g} s for its next message "
                        "(--stream-idle-timeout): cancelled",
                    )
        finally:
            self._reaper = None
