"""`python -m embedding_server` and the `embedding-server` console script: the process
around the server (configuration, logging, signals), with one or several server processes."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from embedding_server.config import ServerConfig, load_config

log = logging.getLogger("embedding_server")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir() -> tuple[str, bool]:
    """Point prometheus-client's multiprocess mode at a directory, before anything imports
    prometheus_client (it reads the variable once, on import). An operator's
    PROMETHEUS_MULTIPROC_DIR is used and emptied of stale files; otherwise a private
    temporary one is made. Returns the directory and whether it is ours to delete."""
    directory = os.environ.get(METRICS_DIR_ENV, "")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, "*.db")):
            os.remove(stale)
        return directory, False
    directory = tempfile.mkdtemp(prefix="embedding-metrics-")
    os.environ[METRICS_DIR_ENV] = directory
    return directory, True


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server; say how to install it when the server extra is missing."""
    config = load_config(argv)
    for spec in config.tables:
        # Said before torch is imported (seconds): a typo should not wait for it.
        if not spec.path.exists():
            print(f"embedding-server: error: table {spec.name!r}: {spec.path}: no such file",
                  file=sys.stderr)  # fmt: skip
            return 2
    metrics_dir, own_metrics_dir = "", False
    if config.processes > 1:  # before anything imports prometheus_client
        metrics_dir, own_metrics_dir = prepare_metrics_dir()
    try:
        import prometheus_client  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(
            f"embedding-server: error: {exc.name} is not installed; the server needs the "
            "server extra: pip install 'embedding-service[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        return serve(config, metrics_dir)
    finally:
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(config: ServerConfig, metrics_dir: str = "") -> int:
    """Run the server until SIGTERM or SIGINT; the exit status of `embedding-server`.
    With `config.processes > 1` this process supervises workers that share the port."""
    from embedding_server import logs
    from embedding_server.core.sources import TableLoadError
    from embedding_server.process import server, workers

    logs.configure(config.log_level)
    log.info("embedding-server starting with:")
    for line in config.describe():
        log.info("  %s", line)
    for line in config.warnings():
        log.warning("%s", line)
    for line in server.prepare_process(config):
        log.info("%s", line)
    running: server.EmbeddingServer | workers.Supervisor
    try:
        server.check_port_free(config.host, config.port, "gRPC")
        server.check_port_free(config.metrics_host, config.metrics_port, "metrics")
        device = server.resolve_device(config.device)
        store = server.build_store(config, device)
        if config.processes > 1:
            running = workers.Supervisor(config, store, metrics_dir)
        else:
            running = server.EmbeddingServer(config, store)
        running.start()
    except (server.StartupError, workers.WorkerError, TableLoadError) as exc:
        print(f"embedding-server: error: {exc}", file=sys.stderr)
        return 2
    log.info(
        "serving %s on %s:%d (%s; default table %r, %d process%s); metrics on "
        "http://%s:%d/metrics",
        ", ".join(t.name for t in store), config.host, running.port, config.security(),
        store.default_name, config.processes, "es" if config.processes > 1 else "",
        config.metrics_host, running.metrics_port,
    )  # fmt: skip
    signals = server.StopSignals(reload=running.reload_all)
    signals.wait()
    log.info(
        "shutting down: health NOT_SERVING, %.1f s drain delay, then up to %.1f s for "
        "clients to leave and calls to finish (signal again to stop at once)",
        config.drain_delay_s, config.grace_s,
    )  # fmt: skip
    finished = running.stop(hurry=signals.hurry())
    log.info("stopped" if finished else "stopped; calls cut off at the grace period")
    if not finished:
        # A handler thread still runs a call grpc has cancelled (a long one-hot matmul):
        # interpreter shutdown would wait for it, or abort in torch's threads
        # ("terminate called without an active exception"). Nothing is left to save.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
