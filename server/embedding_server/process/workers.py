"""Several server processes on one port, sharing one copy of each table (`--processes N`).

One Python process tops out at a few thousand calls per second (the GIL serialises
decode, copy and serialise), so N worker processes serve the same port with
SO_REUSEPORT and the kernel spreads connections over them. The supervisor, the process
`embedding-server` started, loads every table once, into shared memory on the CPU or
device memory on CUDA, and hands the workers handles to that memory (torch's
multiprocessing reductions: a shared-memory file descriptor, a CUDA IPC handle), never
a copy. It also serves /metrics: every process writes its metrics in prometheus-client's
multiprocess mode and the supervisor sums them.

Reloads run in the supervisor, which owns the memory: a worker forwards an admin
ReloadTable there, and SIGHUP arrives there. The new version goes to every worker, and
the caller is answered once all of them serve it. A worker that dies is replaced.

Pipe messages, supervisor <- worker: ("ready", port), ("failed", why),
("reload", request_id, table, source), ("update", request_id, table, ids, vectors),
("ack", table, version); supervisor -> worker: ("table", Table),
("done", request_id, error or None).

Row updates (UpdateRows) also run in the supervisor, the one writer: it writes the shared
rows under the table's seqlock (see `Table.read`), so workers need no message to see
them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
import torch.multiprocessing as torch_mp
from prometheus_client import multiprocess

from embedding_server import logs, metrics
from embedding_server.config import ServerConfig
from embedding_server.core.devices import release_unused
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.process.server import (
    APPLY_TIMEOUT_S,
    EmbeddingServer,
    StartupError,
    StopSignals,
    file_access,
    open_update_log,
    prepare_process,
    start_metrics,
    stop_metrics,
    wait_caught_up,
)
from embedding_server.transport.admin import reload_table
from embedding_server.transport.metrics_endpoint import MetricsServer

log = logging.getLogger("embedding_server")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client itself
# How long a worker may take to import, build its server and bind the port.
READY_TIMEOUT_S = 120.0
# How long the supervisor waits for every worker to swap in a reloaded table.
ACK_TIMEOUT_S = 30.0
# A worker that keeps dying is restarted no faster than this.
RESTART_DELAY_S = 1.0
# How often the supervisor frees table versions every worker has let go of.
RELEASE_EVERY_S = 5.0


class WorkerError(Exception):
    """A worker process could not start; the message says why."""


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (without listening) a SO_REUSEPORT socket, to learn the port number when `port`
    is 0 and hold it until the workers have joined it; the kernel hands connections only
    to listening sockets, so it takes none."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock, int(sock.getsockname()[1])


@dataclass
class _Worker:
    """The supervisor's handle on one worker process."""

    index: int
    process: BaseProcess
    conn: Connection
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    # (table, version) pairs the worker has confirmed it serves.
    acks: set[tuple[str, int]] = field(default_factory=set)

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)


class Supervisor:
    """Starts, watches, reloads and stops the worker processes of one server."""

    def __init__(self, config: ServerConfig, store: TableStore, metrics_dir: str) -> None:
        self.config = config
        self.store = store
        store.files = file_access(config)  # reloads run here: the sources they may read
        self.metrics_dir = metrics_dir
        self.port = config.port
        self.metrics_port = config.metrics_port
        self.workers: list[_Worker] = []
        self._context = torch_mp.get_context("spawn")
        self._changed = threading.Condition()  # a worker acked, or the worker list changed
        self._reload_lock = threading.Lock()
        # Reloads and row updates, one at a time, off the pipe-reading threads.
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writes")
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._metrics_httpd: MetricsServer | None = None
        # The host tables and this process's share of the device memory (the workers
        # sample their own).
        self._memory = metrics.DeviceMemory(store.memory)
        # The update log, applied here to the shared tables (the workers send updates here).
        self.update_log = open_update_log(
            config, store, lambda name, path: self.reload(name, snapshot=path)
        )

    def start(self) -> None:
        """Serve /metrics, start every worker and wait until each serves; then watch them.

        Raises
        ------
        StartupError
            prometheus-client was imported before multiprocess mode was set up, or the
            metrics port cannot be bound.
        WorkerError
            A worker could not start (the others are stopped again).
        """
        if not metrics.in_multiprocess_mode():
            raise StartupError(
                f"--processes {self.config.processes} needs prometheus-client's multiprocess "
                f"mode: set {METRICS_DIR_ENV} before prometheus_client is imported "
                "(embedding-server does this itself)"
            )
        registry = metrics.multiprocess_registry(self.metrics_dir, self._processes)
        self._metrics_httpd, self.metrics_port = start_metrics(self.config, registry)
        self._memory.sample()
        for table in self.store:
            metrics.publish_table(table)
            for result in ("ok", "failed"):
                metrics.TABLE_RELOADS.labels(table.name, result)
        if self.update_log is not None:  # workers start once the log is applied
            wait_caught_up(self.update_log, self.config.max_update_lag, self._stopping.is_set)
        reservation = None
        if self.config.port == 0:
            reservation, self.port = reserve_port(self.config.host, 0)
        # All start at once (each imports torch and grpc: ~1.3 s here), then each is
        # waited for; one that fails stops the others.
        launched = [self._launch(index) for index in range(self.config.processes)]
        try:
            for index, process, conn in launched:
                self.workers.append(self._await_ready(index, process, conn))
        except WorkerError:
            for _, process, _ in launched:
                if process.is_alive():
                    process.kill()
            self.stop()
            raise
        finally:
            if reservation is not None:
                reservation.close()
        self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._monitor.start()

    def _processes(self) -> list[tuple[str, int]]:
        """(name, pid) of this process and every live worker, for the memory metric."""
        with self._changed:
            workers = [(f"worker-{w.index}", w.process.pid) for w in self.workers]
        return [("supervisor", os.getpid()), *((n, p) for n, p in workers if p is not None)]

    def _spawn(self, index: int) -> _Worker:
        """Start worker `index` and wait until it serves."""
        return self._await_ready(*self._launch(index))

    def _launch(self, index: int) -> tuple[int, BaseProcess, Connection]:
        parent_conn, child_conn = self._context.Pipe()
        config = replace(self.config, port=self.port)
        process = self._context.Process(
            target=run_worker,
            args=(config, index, list(self.store), child_conn),
            name=f"embedding-worker-{index}",
            # Should the supervisor exit without stop(), multiprocessing terminates
            # daemonic children instead of waiting for them forever.
            daemon=True,
        )
        process.start()
        child_conn.close()
        return index, process, parent_conn

    def _await_ready(self, index: int, process: BaseProcess, conn: Connection) -> _Worker:
        """Wait for a launched worker's "ready" (WorkerError if it fails or takes too long)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            ready = wait([conn, process.sentinel], timeout=deadline - time.monotonic())
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = ("failed", "its pipe closed")
                break
            if ready:  # only the sentinel: the process ended without a word
                process.join()
                message = ("failed", f"it exited with status {process.exitcode}")
                break
            if time.monotonic() >= deadline:
                process.kill()
                message = ("failed", f"it was not serving after {READY_TIMEOUT_S:.0f} s")
                break
        if message[0] != "ready":
            process.join(timeout=5)
            raise WorkerError(f"worker {index} did not start: {message[1]}")
        worker = _Worker(index, process, conn)
        threading.Thread(
            target=self._listen, args=(worker,), name=f"worker-{index}-pipe", daemon=True
        ).start()
        log.info("worker %d (pid %d) serving on port %d", index, process.pid, message[1])
        return worker

    def _listen(self, worker: _Worker) -> None:
        """Read one worker's pipe until it closes: reload and update requests, acks."""
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "reload":
                _, request_id, name, source = message
                self._writes.submit(self._answer, worker, request_id, self.reload, name, source)
            elif message[0] == "update":
                _, request_id, name, ids, vectors = message
                self._writes.submit(
                    self._answer, worker, request_id, self.update_rows, name, ids, vectors
                )
            elif message[0] == "ack":
                with self._changed:
                    worker.acks.add((message[1], message[2]))
                    self._changed.notify_all()

    def _answer(
        self, worker: _Worker, request_id: int, action: Callable[..., Any], *args: Any
    ) -> None:
        """Run a worker's request (a reload or an update) and send it the outcome."""
        error: Exception | None = None
        try:
            action(*args)
        except Exception as exc:
            error = exc
        # A worker gone meanwhile took its caller's connection with it: nobody to answer.
        with contextlib.suppress(OSError, ValueError):
            worker.send(("done", request_id, error))

    def update_rows(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> Table:
        """Write rows of a shared table in place (every worker reads them at once), through
        the update log where there is one."""
        if self.update_log is not None:
            table = self.update_log.write(name, ids, vectors, APPLY_TIMEOUT_S)
        else:
            table = self.store.update_rows(name, ids, vectors)
        metrics.publish_table(table)
        return table

    def reload(self, name: str, source: str = "", snapshot: Path | None = None) -> Table:
        """Load a new version of a table and return once every live worker serves it."""
        with self._reload_lock:
            table = reload_table(self.store, name, source, snapshot)
            with self._changed:
                workers = list(self.workers)
            for worker in workers:
                try:
                    worker.send(("table", table))
                except (OSError, ValueError):
                    continue  # dead: its replacement starts with the new version
            key = (table.name, table.version)
            deadline = time.monotonic() + ACK_TIMEOUT_S
            with self._changed:
                done = self._changed.wait_for(
                    lambda: all(
                        key in w.acks or not w.process.is_alive() or w not in self.workers
                        for w in workers
                    ),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            if not done:
                log.warning("not every worker confirmed version %d of table %r within %.0f s",
                            table.version, table.name, ACK_TIMEOUT_S)  # fmt: skip
            self._release_old_versions()
            return table

    def _release_old_versions(self) -> None:
        """Free the device memory of table versions every worker has let go of.

        A CUDA tensor sent to other processes stays allocated in this one, after this
        process drops it, until torch sees that every receiver has released it and is
        asked to collect (`torch.cuda.ipc_collect`): a replaced version would otherwise
        hold its memory until the device runs short. Called after each reload and every
        few seconds (a worker may still finish a call on the old version after its ack),
        it then hands the freed memory back to the driver, where the workers can use it.
        """
        for device in {d for d, _ in self.store.memory()}:
            freed = release_unused(device)
            if freed:
                log.info("%s: %.1f MiB of replaced table versions freed", device, freed / 2**20)
        self._memory.sample()

    def reload_all(self) -> None:
        """Re-read every table that came from a file (SIGHUP); failures keep the old version."""
        for table in self.store:
            if table.spec is None:
                continue
            try:
                self.reload(table.name)
            except Exception as exc:
                log.error("reload of table %r failed, still serving version %d: %s",
                          table.name, table.version, exc)  # fmt: skip

    def _watch(self) -> None:
        """Replace workers that die, and free released table versions, until stop()."""
        last_release = time.monotonic()
        while not self._stopping.is_set():
            with self._changed:
                by_sentinel = {w.process.sentinel: w for w in self.workers}
            for sentinel in wait(list(by_sentinel), timeout=0.5):
                if self._stopping.is_set():
                    return
                dead = by_sentinel[sentinel]  # type: ignore[index]  # sentinels are ints
                dead.process.join()
                log.error("worker %d (pid %d) exited with status %s; starting a new one",
                          dead.index, dead.process.pid, dead.process.exitcode)  # fmt: skip
                self._warn_stranded(dead)
                self._forget(dead)
                self._replace(dead.index)
            if time.monotonic() - last_release >= RELEASE_EVERY_S:
                last_release = time.monotonic()
                self._release_old_versions()

    def _warn_stranded(self, dead: _Worker) -> None:
        """Say what a worker that died leaves behind on CUDA devices: torch counts the
        receivers of a shared tensor in shared memory, and a receiver that dies without
        running its cleanup (always so when killed by a signal) is never uncounted. The
        table versions it held still serve, but this process can no longer free them: a
        version replaced later stays allocated until the server restarts."""
        held = [t for t in self.store if t.weights.device.type == "cuda"]
        if not held:
            return
        log.warning(
            "worker %d died (exit status %s) holding CUDA tables %s (%.1f MiB): once they "
            "are reloaded, their current versions may stay allocated until the server "
            "restarts (see docs/operations.md)",
            dead.index, dead.process.exitcode, ", ".join(repr(t.name) for t in held),
            sum(t.nbytes for t in held) / 2**20,
        )  # fmt: skip

    def _replace(self, index: int) -> None:
        while not self._stopping.is_set():
            try:
                worker = self._spawn(index)
            except WorkerError as exc:
                log.error("%s; trying again in %.0f s", exc, RESTART_DELAY_S)
                self._stopping.wait(RESTART_DELAY_S)
                continue
            with self._changed:
                if not self._stopping.is_set():
                    self.workers.append(worker)
                    self._changed.notify_all()
                    return
            # stop() ran while this worker started and did not see it.
            worker.process.terminate()
            worker.process.join(timeout=self.config.grace_s + 5.0)
            self._forget(worker)
            return

    def _forget(self, worker: _Worker) -> None:
        with self._changed:
            if worker in self.workers:
                self.workers.remove(worker)
            self._changed.notify_all()
        worker.conn.close()
        if worker.process.pid is not None:
            # Its in-flight gauge must stop counting; its counters stay summed in.
            multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)

    def stop(self, hurry: threading.Event | None = None) -> bool:
        """SIGTERM every worker (each stops as EmbeddingServer.stop does, within the drain
        delay and the grace period), wait, then kill whatever is left. `hurry` set: a
        second SIGTERM to each, which stops at once. Returns True (the workers' calls
        ended with them)."""
        with self._changed:
            self._stopping.set()
            workers = list(self.workers)
        self._signal(workers)
        if hurry is not None:
            asked = hurry

            def again() -> None:
                asked.wait()
                self._signal(workers)

            threading.Thread(target=again, name="stop-hurry", daemon=True).start()
        deadline = time.monotonic() + self.config.drain_delay_s + self.config.grace_s + 5.0
        for worker in workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("worker %d did not stop in time: killing it", worker.index)
                worker.process.kill()
                worker.process.join()
            self._forget(worker)
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        self._writes.shutdown(wait=False, cancel_futures=True)
        if self.update_log is not None:
            self.update_log.stop()
        if self._metrics_httpd is not None:
            stop_metrics(self._metrics_httpd)
        return True

    @staticmethod
    def _signal(workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)


class SupervisorLink:
    """A worker's end of its pipe: applies new table versions the supervisor sends and
    forwards reloads and row updates to it."""

    def __init__(self, conn: Connection, store: TableStore) -> None:
        self.conn = conn
        self.store = store
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Exception | None]] = {}
        self._ids = itertools.count()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def reload(self, name: str, source: str) -> Table:
        """Have the supervisor reload table `name` for every worker; the new version once
        this worker serves it. Raises what the supervisor's reload raised."""
        self._ask("reload", name, source)
        return self.store.get(name)

    def update(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> Table:
        """Have the supervisor write rows of table `name` (shared: this worker sees them
        once it answers). Raises what the supervisor's update raised."""
        self._ask("update", name, ids, vectors)
        return self.store.get(name)

    def _ask(self, kind: str, *args: Any) -> None:
        request_id = next(self._ids)
        answer: Future[Exception | None] = Future()
        self._pending[request_id] = answer
        self.send((kind, request_id, *args))
        error = answer.result()
        if error is not None:
            raise error

    def run(self, on_closed: Callable[[], None]) -> None:
        """Read the pipe until the supervisor is gone, then call `on_closed`."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "table":
                table: Table = message[1]
                self.store.replace(table)
                metrics.publish_table(table)
                self.send(("ack", table.name, table.version))
            elif message[0] == "done":
                self._pending.pop(message[1]).set_result(message[2])
        gone = ConnectionError("the supervisor process is gone")
        for answer in self._pending.values():
            answer.set_result(gone)
        on_closed()


def run_worker(config: ServerConfig, index: int, tables: list[Table], conn: Connection) -> None:
    """A worker process: serve `tables` (shared with the supervisor) on the common port."""
    logs.configure(
        config.log_level, f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s"
    )
    for line in prepare_process(config):  # spawned: the supervisor's setup is not inherited
        log.info("%s", line)
    # A process group of its own: a terminal's Ctrl-C or a `kill` of the supervisor's
    # group reaches the supervisor only, which stops the workers in order (otherwise a
    # worker that stopped first would look dead and be replaced during the shutdown).
    os.setpgrp()
    store = TableStore(shared=True)
    for table in tables:
        store.add(table)
    if config.update_log:
        store.update_log = "applied by the supervisor"  # ListTables says the table has one
    link = SupervisorLink(conn, store)
    server = EmbeddingServer(
        config,
        store,
        reuse_port=True,
        metrics_endpoint=False,
        reload=link.reload,
        update=link.update,
    )
    try:
        server.start()
    except StartupError as exc:
        link.send(("failed", str(exc)))
        return
    signals = StopSignals()  # SIGHUP ignored: reloads go through the supervisor
    # The supervisor gone (its pipe closed) stops this worker like SIGTERM.
    threading.Thread(
        target=link.run, args=(signals.stop,), name="supervisor-pipe", daemon=True
    ).start()
    link.send(("ready", server.port))
    signals.wait()
    if not server.stop(hurry=signals.hurry()):
        logging.shutdown()
        os._exit(0)  # a cancelled call still runs in a handler thread: see __main__
