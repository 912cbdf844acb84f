"""The gRPC transport of table administration: embedding.v1.EmbeddingAdmin (reloads, row
updates, snapshots) and the bookkeeping every reload shares."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server import metrics
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.errors import quoted
from embedding_server.transport.servicer import table_info

log = logging.getLogger(__name__)


Reload = Callable[[str, str], Table]
UpdateRows = Callable[[str, np.ndarray, np.ndarray], Table]


class EmbeddingAdminServicer(pb_grpc.EmbeddingAdminServicer):
    """embedding.v1.EmbeddingAdmin: reloads, row updates and snapshots. Reloads and updates
    are done by `reload(name, source)` and `update(name, ids, vectors)` (default: on this
    store; a worker process asks its supervisor instead)."""

    def __init__(
        self, store: TableStore, reload: Reload | None = None, update: UpdateRows | None = None
    ) -> None:
        self.store = store
        self.reload = reload or partial(reload_table, store)
        self.update = update or store.update_rows

    def ReloadTable(
        self, request: pb.ReloadTableRequest, context: grpc.ServicerContext
    ) -> pb.ReloadTableResponse:
        started = time.perf_counter()
        table = self.reload(request.table, request.source)
        seconds = time.perf_counter() - started
        return pb.ReloadTableResponse(table=table_info(table, self.store), load_seconds=seconds)

    def UpdateRows(
        self, request: pb.UpdateRowsRequest, context: grpc.ServicerContext
    ) -> pb.UpdateRowsResponse:
        table = self.store.get(request.table)
        ids, vectors = codec.decode_update_rows(request, table.dim)
        table = self.update(request.table, ids, vectors)
        metrics.child(metrics.ROWS_UPDATED, table.name).inc(ids.size)
        metrics.TABLE_UPDATE_SEQ.labels(table.name).set(table.update_seq)
        if table.keys is not None:
            metrics.TABLE_KEYS.labels(table.name).set(table.keys.count)
        return pb.UpdateRowsResponse(table=table_info(table, self.store))

    def SnapshotTable(
        self, request: pb.SnapshotTableRequest, context: grpc.ServicerContext
    ) -> pb.SnapshotTableResponse:
        table, stamp, path, size = self.store.snapshot(
            request.table, request.path, overwrite=request.overwrite
        )
        log.info("table %r version %d update_seq %d written to %s (%d bytes)", table.name,
                 stamp.version, stamp.update_seq, quoted(str(path)), size)  # fmt: skip
        return pb.SnapshotTableResponse(
            table=table_info(table, self.store), version=stamp.version, bytes=size,
            path=str(path), update_seq=stamp.update_seq,
        )  # fmt: skip


def reload_table(
    store: TableStore, name: str, source: str = "", snapshot: Path | None = None
) -> Table:
    """`store.reload` with its bookkeeping: the reload counter, the table gauges, a log line.
    The one path for the admin RPC, SIGHUP and the update log alike; errors propagate
    after being counted."""
    label = store.resolve_name(name) or ""
    try:
        table = store.reload(name, source, snapshot=snapshot)
    except Exception:
        metrics.TABLE_RELOADS.labels(label, "failed").inc()
        raise
    metrics.TABLE_RELOADS.labels(table.name, "ok").inc()
    metrics.publish_table(table)
    log.info("table %r reloaded: version %d from %s", table.name, table.version, table.source)
    return table
