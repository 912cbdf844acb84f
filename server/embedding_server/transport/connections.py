"""Bounds on client connections: grpc's server options for the connection cap, handshake
timeout, idle time, age and keepalive; the open-file limit they need; the open
connections counted for /metrics; and, for a stop, no new connections.

Without them, TCP connections that never send a byte stay open (grpc's handshake
timeout defaults to 120 s) and enough of them use up the process's file descriptors,
after which every call fails. With them, connections past `--max-connections` are
closed as soon as they are accepted, silent ones after `--handshake-timeout`, and the
cap stays below the open-file limit, so the server keeps serving the connections it has.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
from pathlib import Path
from typing import Any

from embedding_server import metrics
from embedding_server.config import ServerConfig
from embedding_server.transport import metrics_endpoint

log = logging.getLogger(__name__)

# Files the process needs besides client connections: tables, pipes, shared memory, logs,
# a CUDA context's, and the metrics endpoint's connections (at most MAX_CONNECTIONS).
RESERVED_FILES = 112 + metrics_endpoint.MAX_CONNECTIONS
# The server pings a connection idle this long, and closes it if no answer comes within
# the timeout (a client gone without closing: a crashed host, a dropped NAT entry).
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# A client may ping at most this often with no call in flight; past two such strikes the
# server sends GOAWAY (grpc's ping-flood protection).
MIN_CLIENT_PING_INTERVAL_MS = 60_000
MAX_PING_STRIKES = 2
SAMPLE_EVERY_S = 1.0


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return int(hard if soft == resource.RLIM_INFINITY else soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return int(soft)
    return int(hard)


def connection_cap(requested: int) -> int:
    """`requested` (--max-connections), lowered where the open-file limit cannot hold that
    many connections beside the files the server needs itself."""
    room = max(1, raise_open_file_limit() - RESERVED_FILES)
    if requested > room:
        log.warning("--max-connections %d lowered to %d: the open-file limit (ulimit -n) "
                    "leaves room for no more", requested, room)  # fmt: skip
        return room
    return requested


def server_options(config: ServerConfig, cap: int) -> list[tuple[str, Any]]:
    """grpc server options bounding connections (see the module docstring)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_allowed_incoming_connections", cap),
        # HTTP/2 MAX_CONCURRENT_STREAMS: one connection's share of the calls in flight.
        ("grpc.max_concurrent_streams", config.max_calls_per_connection),
        ("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout_s)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]
    if config.connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(config.connection_idle_s)))
    if config.connection_age_s > 0:
        # GOAWAY at this age (+-10%): the client opens a new connection for new calls
        # (re-resolving its target: load spreads after scaling) and a stop uses it to send
        # clients away without losing a call (EmbeddingServer.stop). No age grace: calls
        # and streams already on the connection finish on it, however long they take.
        options.append(("grpc.max_connection_age_ms", _ms(config.connection_age_s)))
    return options


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class ConnectionWatch:
    """Counts this process's client connections on `port` once a second, from /proc
    (Linux): the open ones as a gauge, the ones seen opening and closing as counters."""

    def __init__(self, port: int, cap: int) -> None:
        self.port = port
        metrics.CONNECTION_LIMIT.set(cap)
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connections", daemon=True)

    def start(self) -> None:
        if Path("/proc/net/tcp").exists():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def sample(self) -> int:
        """Count now; returns the connections open."""
        current = established_sockets(self.port) & _own_sockets()
        metrics.CONNECTIONS.set(len(current))
        opened, closed = len(current - self._seen), len(self._seen - current)
        if opened:
            metrics.CONNECTIONS_OPENED.inc(opened)
        if closed:
            metrics.CONNECTIONS_CLOSED.inc(closed)
        self._seen = current
        return len(current)


_ESTABLISHED, _LISTEN = "01", "0A"  # TCP states as /proc/net/tcp writes them


def established_sockets(port: int) -> set[int]:
    """Inodes of the established TCP sockets (IPv4 and IPv6) whose local port is `port`."""
    return _tcp_sockets(port, _ESTABLISHED)


def _tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) in `state` whose local port is `port`."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)  # header
                for line in lines:
                    fields = line.split()
                    # local_address is ADDR:PORT in hex.
                    if fields[3] == state and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(int(fields[9]))
        except (OSError, IndexError, ValueError):
            continue
    return inodes


def open_connections(port: int) -> int:
    """This process's established client connections on `port`."""
    return len(established_sockets(port) & _own_sockets())


def stop_listening(port: int) -> int:
    """Stop accepting connections on `port` (this process's listening sockets; a worker's
    siblings keep theirs), while the connections already open go on: new clients are
    refused at once and go to another address, and a client told to go away (GOAWAY at
    its connection's max age) cannot come back here. grpc has no call for this short of
    its own stop, which cancels every call that arrives until the client has read the
    GOAWAY; shutting the socket down makes grpc's acceptor stop (it logs "Closing
    acceptor. Failed accept4: Invalid argument" once). Returns the sockets shut (0
    without /proc: Linux only)."""
    listening = _tcp_sockets(port, _LISTEN)
    shut = 0
    for fd, inode in _own_socket_fds().items():
        if inode not in listening:
            continue
        # A duplicate of grpc's descriptor: shutdown acts on the socket, close only on ours.
        with socket.socket(fileno=os.dup(fd)) as listener:
            try:
                listener.shutdown(socket.SHUT_RDWR)
                shut += 1
            except OSError:
                continue
    return shut


def _own_sockets() -> set[int]:
    """Inodes of the sockets this process holds open."""
    return set(_own_socket_fds().values())


def _own_socket_fds() -> dict[int, int]:
    """This process's socket descriptors and their inodes."""
    sockets: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return sockets
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            sockets[int(name)] = int(target[8:-1])
    return sockets
