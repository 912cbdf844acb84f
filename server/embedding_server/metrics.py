"""Every Prometheus metric the server exports, named once here and imported where recorded.

The gRPC ones follow the ecosystem's names (grpc_server_handled_total,
grpc_server_handling_seconds with grpc_service/grpc_method/grpc_code), so existing
dashboards and alerts work; the service's own live under `embedding_`.
"""

from __future__ import annotations

import functools
import threading
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
    "Loaded version of each table: 1 at start, +1 per reload.",
    ["table"],
    multiprocess_mode="mostrecent",
)
TABLE_UPDATE_SEQ = Gauge(
    "embedding_table_update_seq",
    "Row updates applied to each table's loaded version: the update log's position "
    "with a log, else a count of this server's updates.",
    ["table"],
    multiprocess_mode="mostrecent",
)
# Keyed tables: how many keys each holds, and the keys lookups asked for that it does
# not hold (a rising miss rate says the table is stale).
TABLE_KEYS = Gauge(
    "embedding_table_keys",
    "Keys each keyed table holds (its capacity is max_keys).",
    ["table"],
    multiprocess_mode="mostrecent",
)
MISSING_KEYS = Counter(
    "embedding_missing_keys_total",
    "Keys lookups asked a keyed table for that it does not hold (padding keys not counted).",
    ["table"],
)
# The update log (--update-log): where each table's stream is, how far behind this replica
# is, how long an entry takes to apply, and what went wrong.
UPDATE_LOG_HEAD = Gauge(
    "embedding_update_log_head_seq",
    "Position of the newest entry in each table's update log stream.",
    ["table"],
    multiprocess_mode="mostrecent",
)
UPDATE_LOG_LENGTH = Gauge(
    "embedding_update_log_entries",
    "Entries each table's update log stream holds (trimmed up to the newest snapshot "
    "with --trim-update-log).",
    ["table"],
    multiprocess_mode="mostrecent",
)
UPDATE_LOG_STALLED = Gauge(
    "embedding_update_log_stalled",
    "1 while this replica has stopped applying a table's update log at a gap (entries it "
    "needs were trimmed, or the log ends before what it holds), until a snapshot reload.",
    ["table"],
    multiprocess_mode="mostrecent",
)
UPDATE_LOG_LAG = Gauge(
    "embedding_update_log_lag_entries",
    "Entries of each table's update log this replica has not applied yet.",
    ["table"],
    multiprocess_mode="mostrecent",
)
UPDATE_LOG_LAG_SECONDS = Gauge(
    "embedding_update_log_lag_seconds",
    "Age of the last update applied, when it was applied (0 when caught up): how stale "
    "this replica's rows may be.",
    ["table"],
    multiprocess_mode="mostrecent",
)
UPDATE_LOG_APPLY_SECONDS = Histogram(
    "embedding_update_log_apply_seconds",
    "Time to apply what one read of a table's update log brought (one entry when caught "
    "up, up to 256 while catching up: checked, converted, written as one, under the "
    "table's lock).",
    ["table"],
    buckets=LATENCY_BUCKETS,
)
UPDATE_LOG_ERRORS = Counter(
    "embedding_update_log_errors_total",
    "Update log failures by kind: append (an update not taken), read (Redis unreachable), "
    "gap (the stream trimmed past this replica), apply (an entry that does not apply here).",
    ["table", "kind"],
)
# An info gauge (always 1): join it on (instance, table) to split any table series by shard.
TABLE_SHARD = Gauge(
    "embedding_table_shard",
    "The part of each table this server holds: shard `shard` of `shards` (0 of 1: all of it).",
    ["table", "shard", "shards"],
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


_table_bytes_labels: dict[str, set[tuple[str, str, str]]] = {}


def publish_table(table: Table) -> None:
    """Set one table's gauges (rows, dim, version, and its bytes on each device it uses:
    a cached table has its host table on the CPU and its cache on the device), replacing
    earlier label sets."""
    held = {(table.name, str(device), table.dtype): n for device, n in table.memory().items()}
    for stale in _table_bytes_labels.get(table.name, set()) - held.keys():
        TABLE_BYTES.remove(*stale)
    _table_bytes_labels[table.name] = set(held)
    TABLE_ROWS.labels(table.name).set(table.rows)
    TABLE_DIM.labels(table.name).set(table.dim)
    for labels, nbytes in held.items():
        TABLE_BYTES.labels(*labels).set(nbytes)
    TABLE_VERSION.labels(table.name).set(table.version)
    TABLE_UPDATE_SEQ.labels(table.name).set(table.update_seq)
    TABLE_SHARD.labels(table.name, *(str(n) for n in table.part)).set(1)
    if table.keys is not None:
        TABLE_KEYS.labels(table.name).set(table.keys.count)
        MISSING_KEYS.labels(table.name)  # pre-registered: a dashboard shows 0, not nothing
    if table.cache is not None:
        CACHE_ROWS.labels(table.name).set(table.cache.slots)
        CACHE_EVICTIONS.labels(table.name)
        for result in ("hit", "miss"):
            CACHE_LOOKUPS.labels(table.name, result)


_ALLOCATED = (
    "embedding_device_memory_allocated_bytes",
    "Device memory held: on CUDA by torch's allocator in the server's processes (tables, "
    "caches, requests' temporaries), on the CPU by the tables.",
)
_RESERVED = (
    "embedding_device_memory_reserved_bytes",
    "Device memory reserved by torch's caching allocator in the server's processes (CUDA only).",
)
# With several server processes, each writes its own numbers (sampled) and the
# supervisor's /metrics adds up the live ones. Not registered: one process serves them
# through DeviceMemory.collect instead.
DEVICE_ALLOCATED = Gauge(*_ALLOCATED, ["device"], multiprocess_mode="livesum", registry=None)
DEVICE_RESERVED = Gauge(*_RESERVED, ["device"], multiprocess_mode="livesum", registry=None)


class DeviceMemory(Collector):
    """Memory of each device that holds tables.

    CUDA: what torch's caching allocator of this process holds (allocated) and reserves,
    for every CUDA device a table or cache is on. CPU: the bytes of the tables held there,
    when `host_tables` (a worker process reads the supervisor's tables: not its to count).
    One server process serves it at scrape time (`collect`); with several, each process
    `sample()`s it into gauges the supervisor sums.
    """

    def __init__(
        self, tables: Callable[[], Iterable[tuple[torch.device, int]]], host_tables: bool = True
    ) -> None:
        self.tables = tables
        self.host_tables = host_tables

    def usage(self) -> tuple[dict[str, int], dict[str, int]]:
        """(allocated, reserved) bytes by device name, now."""
        allocated: dict[str, int] = {}
        reserved: dict[str, int] = {}
        cuda_devices: set[torch.device] = set()
        for device, nbytes in self.tables():
            if device.type == "cuda":
                cuda_devices.add(device)
            elif self.host_tables:
                allocated[str(device)] = allocated.get(str(device), 0) + nbytes
        for device in sorted(cuda_devices, key=str):
            allocated[str(device)] = torch.cuda.memory_allocated(device)
            reserved[str(device)] = torch.cuda.memory_reserved(device)
        return allocated, reserved

    def collect(self) -> Iterator[GaugeMetricFamily]:
        allocated, reserved = self.usage()
        for (name, documentation), values_by_device in (
            (_ALLOCATED, allocated),
            (_RESERVED, reserved),
        ):
            family = GaugeMetricFamily(name, documentation, labels=["device"])
            for device, value in sorted(values_by_device.items()):
                family.add_metric([device], value)
            yield family

    def sample(self) -> None:
        """Write this process's numbers into the multiprocess gauges."""
        allocated, reserved = self.usage()
        for device, value in allocated.items():
            DEVICE_ALLOCATED.labels(device).set(value)
        for device, value in reserved.items():
            DEVICE_RESERVED.labels(device).set(value)


class DeviceMemorySampler:
    """`DeviceMemory.sample()` now and then every `every_s` seconds, in a thread, until
    `stop()` (for processes whose metrics another process serves)."""

    def __init__(self, memory: DeviceMemory, every_s: float = 1.0) -> None:
        self.memory = memory
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-memory", daemon=True)

    def start(self) -> None:
        self.memory.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.memory.sample()


_device_memory: DeviceMemory | None = None


def watch_devices(memory: DeviceMemory) -> None:
    """Serve `memory` from this process's /metrics (replacing an earlier one)."""
    global _device_memory
    if _device_memory is not None:
        REGISTRY.unregister(_device_memory)
    _device_memory = memory
    REGISTRY.register(memory)


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
    directory: str, processes: Callable[[], Iterable[tuple[str, int]]]
) -> CollectorRegistry:
    """What the supervisor of several server processes serves on /metrics: every process's
    metrics from `directory`, summed as each metric's mode says (device memory included:
    each process samples its own), this process's own memory and CPU, and every
    process's PSS."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    ProcessCollector(registry=registry)
    registry.register(ProcessMemoryCollector(processes))
    return registry
