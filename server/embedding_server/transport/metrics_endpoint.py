"""The Prometheus endpoint (`/metrics` over HTTP), bounded like the gRPC port: at most
`MAX_CONNECTIONS` connections at once (more are closed as soon as they are accepted),
each with `TIMEOUT_S` to send its request and take its answer, one thread each.

prometheus-client's own `start_http_server` gives every connection a thread of its
own and no timeout: ~1,000 silent connections held as many threads and descriptors,
starved the gRPC port of descriptors and broke scraping. The answer itself is still
prometheus-client's (`make_wsgi_app`), multiprocess mode included.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

# Scrapers at once (Prometheus, a person with curl, a second Prometheus): plenty. Counted
# in the gRPC port's descriptor reserve (connections.RESERVED_FILES).
MAX_CONNECTIONS = 16
# Seconds a connection has to send its request line and headers, and for each write of
# the answer: a scrape takes milliseconds.
TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape; a request that times out ends quietly."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    """A WSGI server of bounded connections (see the module docstring)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.address_family = family
        self.timeout_s = timeout_s
        self._places = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections closed at once: every place was taken
        super().__init__(address, _QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        connection.settimeout(self.timeout_s)
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._places.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._places.release()  # no thread started to give it back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._places.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or went away is the caller's business, not a
        traceback on stderr."""
        log.debug("metrics connection from %s ended on an error", client_address, exc_info=True)


def start(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` on host:port (0: a free port) in a thread; raises OSError when it
    cannot bind."""
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = MetricsServer((str(address[0]), int(address[1])), family)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def stop(server: MetricsServer) -> None:
    server.shutdown()
    server.server_close()
