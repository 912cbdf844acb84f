"""The server: tables on a device, the gRPC server with health and reflection, the
Prometheus endpoint, and graceful shutdown (the process around it: `__main__`).

The gRPC server is `grpc.aio`'s, on an event loop in a thread of its own ("grpc-loop"):
a plain lookup is answered on the loop, everything longer runs in the handler pool
(`CallPool`). `EmbeddingServer.start()` and `stop()` are plain calls, made from any
other thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry

from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server import metrics
from embedding_server.config import ServerConfig, TableSpec, redacted_url
from embedding_server.core.batcher import Batcher
from embedding_server.core.devices import PinnedBlocks
from embedding_server.core.filesystem import FileAccess
from embedding_server.core.lookup import Limits, Lookups
from embedding_server.core.snapshots import ANY_ROWS, global_shape, newest_snapshot
from embedding_server.core.sources import TableLoadError, demo_table, load_table, open_table
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.process.callpool import CallPool
from embedding_server.transport import connections, inference
from embedding_server.transport import metrics_endpoint as metrics_http
from embedding_server.transport.admin import (
    EmbeddingAdminServicer,
    Reload,
    UpdateRows,
    reload_table,
)
from embedding_server.transport.auth import Authenticator
from embedding_server.transport.interceptor import (
    ADMIN_SERVICE,
    HEALTH_SERVICE,
    SERVICE_NAME,
    StatusInterceptor,
)
from embedding_server.transport.servicer import EmbeddingServicer

if TYPE_CHECKING:  # imported where a log is configured: redis stays out otherwise
    from embedding_server.core.updatelog import UpdateLog

log = logging.getLogger("embedding_server")

_T = TypeVar("_T")


# Time for the last responses' bytes to leave before connections close.
LINGER_S = 0.5


class StartupError(Exception):
    """The server cannot start; the message says why in one line."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda`/`cuda:N` must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            log.info(
                "device auto: CUDA is available, using cuda:0 (%s)", torch.cuda.get_device_name(0)
            )
            return torch.device("cuda:0")
        log.info("device auto: CUDA is not available, using cpu")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"--device {name}: CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StartupError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", index)
    return device


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def tune_allocator() -> bool:
    """Keep freed response buffers in the heap instead of returning them to the OS.

    Responses of 0.5-32 MB are allocated and freed per call; by default glibc serves
    them with mmap and gives the pages back on free, so every call faults fresh pages in.
    Raising the mmap and trim thresholds lets the heap reuse them. One arena for every
    thread: a thread's own arena is made of 64 MB heaps that glibc unmaps whenever one
    empties, whatever the trim threshold, so answers built in the handler pool faulted
    their pages in again (~50,000 faults/s at B = 16,384 with 32 calls in flight); the
    threads allocate under the GIL anyway. Call it before any thread starts. Returns
    False where glibc is not the allocator (nothing is changed then).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok = ok and libc.mallopt(_M_ARENA_MAX, 1) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False


def prepare_process(config: ServerConfig) -> list[str]:
    """What every serving process sets up before it starts a thread: the allocator
    (`--malloc-tune`) and torch's threads per call (`--torch-threads`). Returns lines for
    the log."""
    done = []
    if config.malloc_tune:  # first: an arena is chosen as a thread first allocates
        done.append(f"allocator tuning (mallopt): {'on' if tune_allocator() else 'unavailable'}")
    torch.set_num_threads(config.torch_threads)
    done.append(f"torch threads per call: {config.torch_threads}")
    return done


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail fast, before a long table load, when a port is taken (port 0: any free one)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            flag = "--port" if what == "gRPC" else "--metrics-port"
            hint = (f" (another server runs there? Pick another port: {flag} N, or with "
                    f'make run: make run ARGS="{flag} N")')  # fmt: skip
        raise StartupError(f"cannot bind {what} to {host}:{port}: {exc.strerror}{hint}") from None


# Device memory a worker process's CUDA context takes before it allocates anything: an
# estimate (about 0.3-0.6 GiB on recent GPUs with CUDA 12's lazy module loading), kept
# free for each worker on every CUDA device its tables use. `bench/device.sh check`
# measures the real figure.
CUDA_CONTEXT_BYTES = 512 << 20


def build_store(config: ServerConfig, device: torch.device) -> TableStore:
    """Load the configured tables (or the seeded demo table) onto `device` (or the device
    a table's config entry names); with several server processes, CPU tables go to
    shared memory so that all of them read one copy, each worker keeps its own device
    cache of a cached table, and each needs room for its CUDA context: a table that
    would not leave it is refused before it loads (`load_table`)."""
    shared = config.processes > 1
    store = TableStore(shared=shared, cache_copies=config.processes if shared else 1)

    def keep_free(where: torch.device) -> int:
        return config.processes * CUDA_CONTEXT_BYTES if shared and where.type == "cuda" else 0

    if not config.tables:
        store.add(
            demo_table(
                config.demo_rows,
                config.demo_dim,
                config.demo_seed,
                device,
                shared=shared,
                shard=config.shard,
            )
        )
    for spec in config.tables:
        where = resolve_device(spec.device) if spec.device else device
        if config.update_log and config.snapshot_dir:
            spec = newest_snapshot_of(spec, Path(config.snapshot_dir))
        store.add(
            load_table(
                spec, where, shared=shared, cache_copies=store.cache_copies, keep_free=keep_free
            )
        )
    return store


def newest_snapshot_of(spec: TableSpec, folder: Path) -> TableSpec:
    """`spec`, or its table's newest snapshot in `folder` when there is one (of the same
    shape, with an update_seq above 0): a replica on an update log starts from it and
    replays the log from its update_seq, where the log may be trimmed."""
    try:
        opened = open_table(spec)
    except TableLoadError:
        return spec  # loading it says what is wrong
    shape = global_shape(opened.shape, opened.metadata)
    if opened.index is not None:  # a keyed table: any number of keys, the same dim
        shape = (ANY_ROWS, shape[1])
    found = newest_snapshot(folder, spec.name, spec.shard, shape)
    if found is None:
        return spec
    log.info("table %r: starting from snapshot %s (update_seq %d), not %s", spec.name,
             found.path, found.update_seq, spec.path)  # fmt: skip
    return replace(spec, path=found.path, key=spec.name)


def file_access(config: ServerConfig) -> FileAccess:
    """The directories callers may use, as configured (StartupError for a bad one)."""
    try:
        return FileAccess(config.table_dirs, config.snapshot_dir)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def authenticator(config: ServerConfig) -> Authenticator:
    """Who may call what, as configured; says so in the log when admin is wide open."""
    auth = Authenticator(
        config.auth_tokens,
        config.admin_tokens,
        mutual_tls=bool(config.tls_client_ca),
        admin_names=config.admin_client_names,
        loopback_admin=config.allow_loopback_admin,
    )
    if config.allow_loopback_admin:
        log.warning(
            "--allow-loopback-admin: any process on this host may reload, update and "
            "snapshot tables without a credential; a development setting"
        )
    if not auth.admin_enabled:
        log.info("admin RPCs are off (no admin token or admin client certificate configured)")
    return auth


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (None: plaintext)."""
    if not config.tls_cert:
        return None
    key = Path(config.tls_key).read_bytes()
    chain = Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def start_metrics(
    config: ServerConfig, registry: CollectorRegistry = REGISTRY
) -> tuple[metrics_http.MetricsServer, int]:
    """Serve `registry` on the configured metrics address; returns the server and its port."""
    try:
        httpd = metrics_http.start(config.metrics_host, config.metrics_port, registry)
    except OSError as exc:
        raise StartupError(
            f"cannot bind metrics to {config.metrics_host}:{config.metrics_port} "
            f"({exc.strerror or exc})"
        ) from None
    return httpd, httpd.server_port


def stop_metrics(httpd: metrics_http.MetricsServer) -> None:
    metrics_http.stop(httpd)


# How long an update written through the log may take to be applied here before the
# writer is told it is in the log but not yet applied (UNAVAILABLE).
APPLY_TIMEOUT_S = 10.0
# How often a replica catching up with the log says how far it is.
CATCH_UP_REPORT_S = 5.0


def open_update_log(
    config: ServerConfig, store: TableStore, reload: Callable[[str, Path], Table]
) -> UpdateLog | None:
    """The update log of `--update-log`, started (applying in a thread of its own); None
    without one. redis is imported only then: a server without a log never loads it.
    `reload(name, snapshot)` loads a snapshot the log finds in the snapshot directory
    (a table the log was trimmed past)."""
    if not config.update_log:
        return None
    from embedding_server.core.updatelog import UpdateLog

    writer = f"{socket.gethostname()} pid {os.getpid()}"
    snapshots = Path(config.snapshot_dir) if config.snapshot_dir else None
    update_log = UpdateLog(
        config.update_log, store, writer, snapshots=snapshots, reload=reload,
        trim_every_s=config.trim_update_log_s,
    )  # fmt: skip
    store.update_log = update_log
    update_log.start()
    log.info("update log: %s (tables start at update_seq %s)", redacted_url(config.update_log),
             ", ".join(f"{t.name}={t.update_seq}" for t in store))  # fmt: skip
    return update_log


def wait_caught_up(update_log: UpdateLog, lag: int, stopping: Callable[[], bool]) -> None:
    """Block until the log's every table is within `lag` entries of its head (or a stop
    begins), saying how far it is every few seconds."""
    said = time.monotonic()
    while not stopping() and not update_log.caught_up(lag):
        time.sleep(0.05)
        if time.monotonic() - said >= CATCH_UP_REPORT_S:
            said = time.monotonic()
            if update_log.connected.is_set():
                behind = ", ".join(f"{t.name} at {t.update_seq}" for t in update_log.store)
                log.info("catching up with the update log: %s", behind)
            else:
                log.warning("the update log is unreachable (%s): not serving until it is "
                            "applied", update_log.last_error)  # fmt: skip
    if not stopping():
        log.info("update log applied: %s",
                 ", ".join(f"{t.name} at {t.update_seq}" for t in update_log.store))  # fmt: skip


class EmbeddingServer:
    """A running gRPC server plus its metrics endpoint, over a loaded TableStore.

    A worker of several server processes shares the port (`reuse_port`), leaves /metrics
    to its supervisor (`metrics_endpoint=False`) and reloads and updates rows through it
    (`reload`, `update`).
    """

    def __init__(
        self,
        config: ServerConfig,
        store: TableStore,
        *,
        reuse_port: bool = False,
        metrics_endpoint: bool = True,
        reload: Reload | None = None,
        update: UpdateRows | None = None,
    ) -> None:
        self.config = config
        self.store = store
        store.files = file_access(config)  # what callers may read and write: the config's
        self.metrics_endpoint = metrics_endpoint
        limits = Limits(
            max_ids=config.max_ids,
            max_dense_macs=config.max_dense_macs,
            dense_chunk_cells=config.dense_chunk_cells,
            dense_concurrency=config.dense_concurrency,
            max_response_bytes=config.max_message_bytes,
            max_features=config.max_features,
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # no stubs for it
        self.authenticator = authenticator(config)
        # Few calls run at once (the GIL), more threads only for calls that wait.
        self.pool = CallPool(config.workers, config.max_threads)
        self._interceptor = StatusInterceptor(
            self.authenticator, config.max_streams, self.pool, config.stream_idle_s,
            config.max_health_watches,
        )  # fmt: skip
        self.connection_cap = connections.connection_cap(config.max_connections)
        self._reuse_port = reuse_port
        # Results leaving a CUDA device go through a bounded set of pinned blocks.
        staging = PinnedBlocks.with_budget(config.pinned_staging_bytes)
        self.batcher = (
            Batcher(config.batch_delay_us / 1e6, config.batch_max_ids, self.pool.blocking, staging)
            if config.batching
            else None
        )
        self.lookups = EmbeddingServicer(
            Lookups(store, limits, self.batcher, staging), self._interceptor.offload
        )
        # The Open Inference Protocol on the same port, over the same lookups.
        self.inference = inference.InferenceServicer(self.lookups, lambda: not self.stopping)
        # The update log, in the process that writes the tables (a worker of several sends
        # its updates to the supervisor, which holds the log).
        self.update_log = (
            open_update_log(config, store, lambda name, path: reload_table(store, name, "", path))
            if update is None
            else None
        )
        if self.update_log is not None:
            update = partial(self.update_log.write, timeout=APPLY_TIMEOUT_S)
        self.admin = EmbeddingAdminServicer(store, reload, update)
        self.port = 0
        self.metrics_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_httpd: metrics_http.MetricsServer | None = None
        self._connections: connections.ConnectionWatch | None = None
        self._memory_sampler: metrics.DeviceMemorySampler | None = None
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """Whether a stop has begun (health NOT_SERVING, readiness false)."""
        return self._stopping

    @property
    def draining(self) -> bool:
        """Whether a stop is in its last phase: calls that arrive now are refused."""
        return self._interceptor.draining

    def _on_loop(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run `work` on the server's event loop and wait for its result."""
        assert self._loop is not None, "the server has not started"
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Build the gRPC server with every service (on the loop, which it belongs to) and
        bind its port."""
        config = self.config
        self._grpc = server = grpc.aio.server(
            migration_thread_pool=self.pool,
            # Backpressure: past this many RPCs running, grpc answers RESOURCE_EXHAUSTED
            # at once instead of queueing without bound.
            maximum_concurrent_rpcs=config.max_inflight,
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_request_bytes),
                # A second server on the same port must fail, not share it by accident;
                # the processes of one server share it on purpose.
                ("grpc.so_reuseport", int(self._reuse_port)),
                *connections.server_options(config, self.connection_cap),
            ],
        )
        services = self._interceptor  # every call passes it: it wraps each service
        pb_grpc.add_EmbeddingServiceServicer_to_server(self.lookups, services)
        inference.add_to_server(self.inference, services)
        pb_grpc.add_EmbeddingAdminServicer_to_server(self.admin, services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        if config.reflection:  # grpc's aio servicer, named (enable_server_reflection would
            # pick the sync one for anything that is not a grpc.aio.Server)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]  # no stubs
                    (
                        SERVICE_NAME,
                        ADMIN_SERVICE,
                        inference.SERVICE_NAME,
                        HEALTH_SERVICE,
                        reflection.SERVICE_NAME,
                    )
                ),
                services,
            )
        server.add_generic_rpc_handlers((services,))
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)

    def start(self) -> None:
        """Bind both ports, publish table gauges, and mark the service SERVING."""
        config = self.config
        address = f"{config.host}:{config.port}"
        try:
            credentials = server_credentials(config)
        except OSError as exc:
            raise StartupError(f"cannot read TLS files: {exc}") from None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="grpc-loop", daemon=True
        )
        self._loop_thread.start()
        try:
            self.port = self._on_loop(self._bind(address, credentials))
            if self.metrics_endpoint:
                self._metrics_httpd, self.metrics_port = start_metrics(config)
        except RuntimeError as exc:
            self._close_loop()
            raise StartupError(f"cannot bind gRPC to {config.host}:{config.port} ({exc})") from None
        except StartupError:
            self._close_loop()
            raise
        self._publish_tables()
        self._on_loop(self._serve())
        self._connections = connections.ConnectionWatch(self.port, self.connection_cap)
        self._connections.start()

    async def _serve(self) -> None:
        assert self._grpc is not None
        await self._grpc.start()
        if self.update_log is not None and not self.update_log.caught_up(
            self.config.max_update_lag
        ):
            # Readiness waits for the log: a replica behind its peers serves no one yet.
            for service in ("", SERVICE_NAME):
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            threading.Thread(target=self._serve_once_caught_up, name="catch-up",
                             daemon=True).start()  # fmt: skip
            return
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def _serve_once_caught_up(self) -> None:
        """Health SERVING once the update log is applied to within --max-update-lag."""
        assert self.update_log is not None
        wait_caught_up(self.update_log, self.config.max_update_lag, lambda: self._stopping)
        if self._stopping or self._loop is None or self._loop.is_closed():
            return
        for service in ("", SERVICE_NAME):
            self._on_loop(self.health.set(service, health_pb2.HealthCheckResponse.SERVING))

    def _close_loop(self) -> None:
        if self._loop is None or self._loop_thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()

    def _publish_tables(self) -> None:
        # A worker of several processes reads the supervisor's host tables: not its to
        # count. Its metrics are served by the supervisor, so it samples them into files.
        memory = metrics.DeviceMemory(self.store.memory, host_tables=not self.store.shared)
        if metrics.in_multiprocess_mode():
            self._memory_sampler = metrics.DeviceMemorySampler(memory)
            self._memory_sampler.start()
        else:
            metrics.watch_devices(memory)
        for table in self.store:
            metrics.publish_table(table)
            metrics.ROWS_UPDATED.labels(table.name)
            metrics.TABLE_RELOADS.labels(table.name, "ok")
            metrics.TABLE_RELOADS.labels(table.name, "failed")
            # Pre-register the series a dashboard reads, so /metrics is full before traffic.
            for method, kernel_names in metrics.KERNEL_NAMES.items():
                metrics.REQUEST_SECONDS.labels(method, table.name, "OK")
                metrics.REQUEST_IDS.labels(method, table.name)
                metrics.REQUEST_BAGS.labels(method, table.name)
                metrics.RESPONSE_BYTES.labels(method, table.name)
                for kernel in kernel_names:
                    metrics.KERNEL_SECONDS.labels(kernel, table.name, table.device)
            if self.batcher is not None:
                for batch_metric in metrics.BATCH_METRICS:
                    batch_metric.labels(table.name)
        metrics.STREAM_IDLE_TIMEOUTS.labels("LookupStream")
        for method in ("Lookup", "LookupDense", "LookupMany", "LookupManyDense", "ListTables"):
            metrics.INFLIGHT.labels(method)
            metrics.GRPC_STARTED.labels("unary", SERVICE_NAME, method)
            metrics.GRPC_HANDLED.labels("unary", SERVICE_NAME, method, "OK")
            metrics.GRPC_HANDLING.labels("unary", SERVICE_NAME, method, "OK")

    def reload_all(self) -> None:
        """Re-read every table that came from a file (SIGHUP); failures keep the old version."""
        for table in self.store:
            if table.spec is None:
                continue
            try:
                reload_table(self.store, table.name)
            except Exception as exc:
                log.error("reload of table %r failed, still serving version %d: %s",
                          table.name, table.version, exc)  # fmt: skip

    def not_serving(self) -> None:
        """Health NOT_SERVING for every service, for good: a stop's first step."""
        self._on_loop(self.health.enter_graceful_shutdown())

    def stop(self, grace: float | None = None, hurry: threading.Event | None = None) -> bool:
        """Stop so that no grpc client sees a call fail, retry policy or not: health
        NOT_SERVING (readiness false) and the drain delay, serving as usual; then no new
        connections, streams ended (they cannot be handed on), and up to `grace` seconds
        for the open connections to close, each asked to go (HTTP/2 GOAWAY, which the
        client obeys by itself) as it reaches its --connection-max-age, while every call
        is answered; then calls still arriving are refused, those running get what is
        left of the grace, and grpc stops. `hurry` set (a second signal) skips the
        waiting. Returns whether every call finished in time."""
        if self._grpc is None or self._loop is None or self._loop.is_closed():
            return True  # never started, or stopped already
        config = self.config
        grace = config.grace_s if grace is None else grace
        hurry = hurry if hurry is not None else threading.Event()
        self._stopping = True
        self.not_serving()
        if config.drain_delay_s > 0 and not hurry.is_set():
            log.info("health NOT_SERVING; serving as usual for the %.1f s drain delay",
                     config.drain_delay_s)  # fmt: skip
            hurry.wait(config.drain_delay_s)
        deadline = time.monotonic() + grace
        self._interceptor.close_streams()
        self._let_clients_leave(deadline, hurry)
        # grpc's own stop() destroys the server, and with it every connection, as soon as
        # the last handler has returned, while a large response may still be in the
        # transport (seen: 2 of 6 in-flight 3 MB responses reset). So drain first: refuse
        # calls that arrive, let every call received (running, or waiting for a handler
        # thread) finish and its bytes leave, then stop.
        drained = self._interceptor.drain(timeout=max(0.0, deadline - time.monotonic()))
        if not drained:
            log.warning("calls still running after the %.1f s grace period: cancelling", grace)
        time.sleep(max(0.0, min(LINGER_S, deadline - time.monotonic())))
        self._on_loop(self._grpc.stop(max(0.0, deadline - time.monotonic())))
        self._on_loop(self._interceptor.close())
        self._close_loop()
        if self.batcher is not None:
            self.batcher.close()
        if self._connections is not None:
            self._connections.stop()
        if self._memory_sampler is not None:
            self._memory_sampler.stop()
        if self.update_log is not None:
            self.update_log.stop()
        self.pool.shutdown(wait=False)
        if self._metrics_httpd is not None:
            stop_metrics(self._metrics_httpd)
        return drained

    def _let_clients_leave(self, deadline: float, hurry: threading.Event) -> None:
        """Refuse new connections and wait (until `deadline`, or `hurry`) for the open ones
        to close. grpc's stop would tell them to go too, but it cancels every call that
        reaches it before the client has read that GOAWAY; a connection's max age sends
        the same GOAWAY with the server still answering, so nothing is lost."""
        if hurry.is_set():
            return
        log.info("no new connections on port %d (grpc says 'Closing acceptor. Failed accept4: "
                 "Invalid argument' as the socket is shut: expected)", self.port)  # fmt: skip
        if not connections.stop_listening(self.port):
            log.warning("could not stop accepting connections on port %d (needs Linux's "
                        "/proc): calls that arrive as the server stops are cancelled",
                        self.port)  # fmt: skip
            return
        waiting = connections.open_connections(self.port)
        if not waiting:
            return
        if self.config.connection_age_s <= 0:
            log.warning("%d connections open and --connection-max-age 0: nothing asks "
                        "them to go; calls that arrive as the server stops are cancelled",
                        waiting)  # fmt: skip
            return
        log.info("no new connections; waiting up to %.1f s for %d open ones to close (each "
                 "is asked to go at its %.0f s max age)", max(0.0, deadline - time.monotonic()),
                 waiting, self.config.connection_age_s)  # fmt: skip
        while waiting and not hurry.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("%d connections still open at the end of the grace period: "
                            "calls that arrive on them as the server stops are cancelled",
                            waiting)  # fmt: skip
                return
            hurry.wait(min(left, 0.05))
            waiting = connections.open_connections(self.port)


class StopSignals:
    """SIGTERM, SIGINT (and SIGHUP, for `reload`) for the main thread to wait on.

    Python's C-level handler writes each signal's number to a socket
    (`signal.set_wakeup_fd`) and the Python-level handlers do nothing, so no handler ever
    takes a lock: one that did (Event.set) deadlocked when a second signal arrived inside
    it, as when a signal goes to the process group and to the process itself. Create it
    in the main thread; `stop()` may be called from any thread.
    """

    _STOP = 0  # the byte stop() writes: no signal has number 0

    def __init__(self, reload: Callable[[], None] | None = None) -> None:
        self.reload = reload
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._noted)
        if reload is None:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    @staticmethod
    def _noted(signum: int, frame: FrameType | None) -> None:
        """Nothing to do: the number already went down the wakeup socket."""

    def stop(self) -> None:
        """Wake `wait()` as if a stopping signal had come (e.g. the supervisor is gone)."""
        self._writer.send(bytes([self._STOP]))

    def hurry(self, after: float = 0.5) -> threading.Event:
        """An event the next SIGTERM or SIGINT sets, if it comes at least `after` seconds
        from now (one signal sent to the process group and to the process counts once):
        asked again, a stop skips its waiting. Call it after `wait()` returned."""
        event = threading.Event()
        since = time.monotonic()

        def watch() -> None:
            while not event.is_set():
                for signum in self._reader.recv(64):
                    if signum in (signal.SIGTERM, signal.SIGINT) and (
                        time.monotonic() - since >= after
                    ):
                        log.info("received %s again: stopping now", signal.Signals(signum).name)
                        event.set()

        threading.Thread(target=watch, name="stop-hurry", daemon=True).start()
        return event

    def wait(self) -> int:
        """Block until a stopping signal (its number) or `stop()` (0); start `reload` in a
        thread for each SIGHUP meanwhile."""
        while True:
            for signum in self._reader.recv(64):
                if signum == self._STOP:
                    return 0
                log.info("received %s", signal.Signals(signum).name)
                if signum != signal.SIGHUP:
                    return signum
                if self.reload is not None:
                    threading.Thread(target=self.reload, name="reload", daemon=True).start()
