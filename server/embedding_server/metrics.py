"""Every Prometheus metric the server exports, named once here and imported where recorded.

The gRPC ones follow the ecosystem's names (grpc_server_handled_total,
grpc_server_handling_seconds with grpc_service/grpc_method/grpc_code), so existing
dashboards and alerts work; the service's own live under `embedding_`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
    values,
)
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from embedding_server.core.tables import Table

# `_created` series double the exposition and no dashboard reads them.
disable_created_metrics()

# Latency buckets from 10 us: a gather is tens of microseconds, a one-hot matmul seconds.
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
IDS_BUCKETS = tuple(float(4**k) for k in range(11))  # 1 .. 1,048,576

GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to its answer, as the server sees it.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "embedding_request_duration_seconds",
    "Lookup/LookupDense latency inside the servicer, by table and status code.",
    ["method", "table", "code"],
    buckets=LATENCY_BUCKETS,
)
REQUEST_IDS = Histogram(
    "embedding_request_ids",
    "Ids per Lookup/LookupDense request.",
    ["method", "table"],
    buckets=IDS_BUCKETS,
)
REQUEST_BAGS = Histogram(
    "embedding_request_bags",
    "Bags per pooled (EmbeddingBag) request: vectors returned after pooling.",
    ["method", "table"],
    buckets=IDS_BUCKETS,
)
RESPONSE_BYTES = Counter(
    "embedding_response_bytes_total",
    "Vector bytes returned.",
    ["method", "table"],
)
KERNEL_SECONDS = Histogram(
    "embedding_kernel_seconds",
    "Device time of the gather or one-hot matmul of one request.",
    ["kernel", "table", "device"],
    buckets=LATENCY_BUCKETS,
)
BATCH_QUEUE_SECONDS = Histogram(
    "embedding_batch_queue_seconds",
    "Time a Lookup waited in the batcher before its coalesced gather started (--batching).",
    ["table"],
    buckets=LATENCY_BUCKETS,
)
BATCH_IDS = Histogram(
    "embedding_batch_ids",
    "Ids per coalesced gather of the batcher (--batching).",
    ["table"],
    buckets=IDS_BUCKETS,
)
BATCH_REQUESTS = Histogram(
    "embedding_batch_requests",
    "Requests coalesced into one gather by the batcher (--batching).",
    ["table"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_METRICS = (BATCH_QUEUE_SECONDS, BATCH_IDS, BATCH_REQUESTS)

# multiprocess_mode matters with --processes > 1 only: in-flight calls add up over the
# live processes; a table's gauges are the value written last (all processes agree).
INFLIGHT = Gauge(
    "embedding_inflight_requests",
    "RPCs being handled right now.",
    ["method"],
    multiprocess_mode="livesum",
)
TABLE_ROWS = Gauge(
    "embedding_table_rows", "Rows of each table.", ["table"], multiprocess_mode="mostrecent"
)
TABLE_DIM = Gauge(
    "embedding_table_dim", "Dimension of each table.", ["table"], multiprocess_mode="mostrecent"
)
TABLE_BYTES = Gauge(
    "embedding_table_bytes",
    "Bytes each table occupies on its device.",
    ["table", "device", "dtype"],
    multiprocess_mode="mostrecent",
)
TABLE_VERSION = Gauge(
    "embedding_table_version",
    "Version of each table's contents.",
    ["table"],
    multiprocess_mode="mostrecent",
)

CACHE_LOOKUPS = Counter(
    "embedding_cache_lookups_total",
    "Distinct ids per request looked up in a table's device cache, by result (hit, miss).",
    ["table", "result"],
)
CACHE_EVICTIONS = Counter(
    "embedding_cache_evictions_total", "Rows evicted from a table's device cache.", ["table"]
)
CACHE_ROWS = Gauge(
    "embedding_cache_capacity_rows",
    "Rows a table's device cache holds at most (tables with cache_rows).",
    ["table"],
    multiprocess_mode="mostrecent",
)
ROWS_UPDATED = Counter("embedding_rows_updated_total", "Rows overwritten by UpdateRows.", ["table"])
TABLE_RELOADS = Counter(
    "embedding_table_reloads_total", "Table reloads, by result (ok, failed).", ["table", "result"]
)

STREAM_IDLE_TIMEOUTS = Counter(
    "embedding_stream_idle_timeouts_total",
    "Streams cancelled for waiting longer than --stream-idle-timeout for their next message.",
    ["grpc_method"],
)
CONNECTIONS = Gauge(
    "embedding_grpc_connections",
    "Client connections open on the gRPC port (sampled every second).",
    multiprocess_mode="livesum",
)
CONNECTION_LIMIT = Gauge(
    "embedding_grpc_connection_limit",
    "Most client connections the gRPC port takes (--max-connections, per process); past "
    "it new connections are closed at once.",
    multiprocess_mode="livesum",
)
CONNECTIONS_OPENED = Counter(
    "embedding_grpc_connections_opened_total",
    "Client connections seen opening on the gRPC port (sampled every second: ones that "
    "open and close between two samples, such as those refused past the limit, are not "
    "counted).",
)
CONNECTIONS_CLOSED = Counter(
    "embedding_grpc_connections_closed_total",
    "Client connections seen closing on the gRPC port (sampled like the opened count).",
)

# The kernels each method runs, plain and pooled: the label sets pre-registered at start.
KERNEL_NAMES = {
    "Lookup": ("gather", "embedding_bag"),
    "LookupDense": ("one_hot_matmul", "multi_hot_matmul"),
    "LookupStream": ("gather", "embedding_bag"),
    "LookupMany": ("gather", "embedding_bag"),
    "LookupManyDense": ("one_hot_matmul", "multi_hot_matmul"),
}


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: the hot path records ~8 series per call and
    prometheus-client's labels() costs a lock and a dict build each time (bounded here,
    since labels are methods, resolved table names and status codes)."""
    return metric.labels(*labels)


class CacheMetrics:
    """Records one cached table's hits, misses and evictions (picklable: a worker process
    gets its own, writing to the same series)."""

    def __init__(self, table: str) -> None:
        self.table = table

    def __call__(self, hits: int, misses: int, evictions: int) -> None:
        child(CACHE_LOOKUPS, self.table, "hit").inc(hits)
        child(CACHE_LOOKUPS, self.table, "miss").inc(misses)
        if evictions:
            child(CACHE_EVICTIONS, self.table).inc(evictions)


_table_bytes_labels: dict[str, tuple[str, str, str]] = {}


def publish_table(table: Table) -> None:
    """Set one table's gauges (rows, dim, bytes, version), replacing earlier label sets."""
    metrics_labels = (table.name, table.device, table.dtype)
    previous = _table_bytes_labels.get(table.name)
    if previous is not None and previous != metrics_labels:
        TABLE_BYTES.remove(*previous)
    _table_bytes_labels[table.name] = metrics_labels
    TABLE_ROWS.labels(table.name).set(table.rows)
    TABLE_DIM.labels(table.name).set(table.dim)
    TABLE_BYTES.labels(*metrics_labels).set(table.nbytes)
    TABLE_VERSION.labels(table.name).set(table.version)
    if table.cache is not None:
        CACHE_ROWS.labels(table.name).set(table.cache.slots)
        CACHE_EVICTIONS.labels(table.name)
        for result in ("hit", "miss"):
            CACHE_LOOKUPS.labels(table.name, result)


class DeviceMemoryCollector(Collector):
    """Memory of each device that holds tables, read at scrape time.

    CUDA: what torch's caching allocator holds (allocated) and reserves. CPU: the bytes
    of the tables held there (the process's RSS is process_resident_memory_bytes).
    """

    def __init__(self, tables: Callable[[], Iterable[tuple[torch.device, int]]]) -> None:
        self.tables = tables

    def collect(self) -> Iterator[GaugeMetricFamily]:
        allocated = GaugeMetricFamily(
            "embedding_device_memory_allocated_bytes",
            "Device memory held: by tensors on CUDA, by tables on the CPU.",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "embedding_device_memory_reserved_bytes",
            "Device memory reserved by torch's caching allocator (CUDA only).",
            labels=["device"],
        )
        cpu_bytes: dict[str, int] = {}
        cuda_devices: set[torch.device] = set()
        for device, nbytes in self.tables():
            if device.type == "cuda":
                cuda_devices.add(device)
            else:
                cpu_bytes[str(device)] = cpu_bytes.get(str(device), 0) + nbytes
        for device in sorted(cuda_devices, key=str):
            allocated.add_metric([str(device)], torch.cuda.memory_allocated(device))
            reserved.add_metric([str(device)], torch.cuda.memory_reserved(device))
        for name, nbytes in sorted(cpu_bytes.items()):
            allocated.add_metric([name], nbytes)
        yield allocated
        yield reserved


_device_collector: DeviceMemoryCollector | None = None


def watch_devices(tables: Callable[[], Iterable[tuple[torch.device, int]]]) -> None:
    """Export memory gauges for the devices `tables()` reports (replacing an earlier set)."""
    global _device_collector
    if _device_collector is not None:
        REGISTRY.unregister(_device_collector)
    _device_collector = DeviceMemoryCollector(tables)
    REGISTRY.register(_device_collector)


class ProcessMemoryCollector(Collector):
    """Proportional set size (PSS) of the supervisor and each worker, read from
    /proc/PID/smaps_rollup at scrape time: shared pages (the tables) are split between the
    processes that map them, so the series add up to what the server really uses (RSS
    would count a shared table once per process)."""

    def __init__(self, processes: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self.processes = processes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "embedding_process_pss_bytes",
            "Proportional set size of each server process (supervisor, worker-N).",
            labels=["process"],
        )
        for name, pid in self.processes():
            pss = _pss_bytes(pid)
            if pss is not None:
                family.add_metric([name], pss)
        yield family


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None  # not Linux, or the process is gone
    return None


def in_multiprocess_mode() -> bool:
    """Whether this process writes its metrics to PROMETHEUS_MULTIPROC_DIR's files, which
    prometheus-client decides once, when it is first imported."""
    return values.ValueClass is not values.MutexValue


def multiprocess_registry(
    directory: str,
    tables: Callable[[], Iterable[tuple[torch.device, int]]],
    processes: Callable[[], Iterable[tuple[str, int]]],
) -> CollectorRegistry:
    """What the supervisor of several server processes serves on /metrics: every process's
    metrics from `directory`, summed as each metric's mode says, this process's own memory
    and CPU, every process's PSS, and the memory of the devices holding the (shared)
    tables."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    ProcessCollector(registry=registry)
    registry.register(ProcessMemoryCollector(processes))
    registry.register(DeviceMemoryCollector(tables))
    return registry
