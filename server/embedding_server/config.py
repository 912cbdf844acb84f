"""Server configuration: one typed object built from CLI flags and their environment twins.

Every flag `--some-flag` has a twin `EMBEDDING_SOME_FLAG`; a flag given on the command
line wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from embedding_client.cli import ArgumentParser, version_text
from embedding_client.shards import Shard

ENV_PREFIX = "EMBEDDING_"


STORAGE_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class TableSpec:
    """A table to load: `NAME=PATH` or `NAME=PATH:KEY` (KEY: a tensor inside a checkpoint),
    with, from a config file, how to store it (`dtype`) and where (`device`)."""

    name: str
    path: Path
    key: str | None = None
    dtype: str | None = None  # storage dtype; None: the file's (float64 as float32)
    device: str | None = None  # None: the server's --device
    # Keep the table in host memory and this many hot rows on the device (None: all there).
    cache_rows: int | None = None
    # Named by a caller (ReloadTable), not the operator: read only inside the table
    # directories, through a checked descriptor (see filesystem.FileAccess).
    confined: bool = False
    # Hold only this shard's rows (None: the whole table). `shard_given`: the config file
    # said so for this table (even "none"), so the server's --shard does not apply.
    shard: Shard | None = None
    shard_given: bool = False
    # A keyed table (see core.keys): its keys in a .npy of their own (a .safetensors or
    # .npz holding `keys` and `values` needs none), the policy for a key it does not hold,
    # how many keys it may hold (None: those it loads), the default vector (`default`
    # policy; else from the file's `default` tensor), and whether bags skip missing keys.
    keys: Path | None = None
    missing: str = "error"
    max_keys: int | None = None
    default: tuple[float, ...] | None = None
    bags_skip_missing: bool = True

    @classmethod
    def parse(
        cls,
        text: str,
        dtype: str | None = None,
        device: str | None = None,
        cache_rows: int | None = None,
        shard: str | None = None,
        keyed: Mapping[str, Any] | None = None,
    ) -> TableSpec:
        name, sep, location = text.partition("=")
        name = name.strip()
        if not sep or not name or not location:
            raise ValueError(f"table {text!r} is not NAME=PATH or NAME=PATH:KEY")
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"table name {name!r} may hold only letters, digits, '_', '-', '.'")
        if dtype is not None and dtype not in STORAGE_DTYPE_NAMES:
            raise ValueError(
                f"table {name!r}: dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPE_NAMES)}"
            )
        if device is not None:
            try:
                device = _device(device)
            except ValueError as exc:
                raise ValueError(f"table {name!r}: {exc}") from None
        if cache_rows is not None:
            if isinstance(cache_rows, bool) or not isinstance(cache_rows, int) or cache_rows < 1:
                raise ValueError(f"table {name!r}: cache_rows must be a positive integer")
            if dtype == "int8":
                raise ValueError(f"table {name!r}: cache_rows works with float tables, not int8")
        try:
            parts = None if shard is None else _shard(shard)
        except ValueError as exc:
            raise ValueError(f"table {name!r}: {exc}") from None
        path, key = split_key(location, lambda candidate: Path(candidate).exists())
        try:
            options = _keyed_options(keyed or {})
        except ValueError as exc:
            raise ValueError(f"table {name!r}: {exc}") from None
        return cls(
            name=name, path=Path(path), key=key, dtype=dtype, device=device,
            cache_rows=cache_rows, shard=parts, shard_given=shard is not None, **options,
        )  # fmt: skip

    def __str__(self) -> str:
        text = f"{self.name}={self.path}" + (f":{self.key}" if self.key else "")
        extras = [
            f"{k} {v}"
            for k, v in (
                ("dtype", self.dtype),
                ("device", self.device),
                ("cache", self.cache_rows),
                ("shard", self.shard),
            )
            if v
        ]
        return text + (f" ({', '.join(extras)})" if extras else "")


KEYED_KEYS = ("keys", "missing", "max_keys", "default", "bags_skip_missing")


def _keyed_options(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A config entry's keyed-table options (`KEYED_KEYS`), checked."""
    options: dict[str, Any] = {}
    if "keys" in entry:
        if not isinstance(entry["keys"], str):
            raise ValueError("keys must be a path (a string) to a .npy of int64 keys")
        options["keys"] = Path(entry["keys"])
    if "missing" in entry:
        from embedding_server.core.keys import MISSING_POLICIES

        if entry["missing"] not in MISSING_POLICIES:
            raise ValueError(
                f"missing {entry['missing']!r} is not one of {', '.join(MISSING_POLICIES)}"
            )
        options["missing"] = entry["missing"]
    if "max_keys" in entry:
        value = entry["max_keys"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("max_keys must be a positive integer")
        options["max_keys"] = value
    if "default" in entry:
        value = entry["default"]
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError("default must be a list of numbers (the default vector)")
        options["default"] = tuple(float(v) for v in value)
    if "bags_skip_missing" in entry:
        if not isinstance(entry["bags_skip_missing"], bool):
            raise ValueError("bags_skip_missing must be true or false")
        options["bags_skip_missing"] = entry["bags_skip_missing"]
    return options


def split_key(location: str, exists: Callable[[str], bool]) -> tuple[str, str | None]:
    """PATH or PATH:KEY (KEY: a tensor inside a checkpoint) as (PATH, KEY or None). The
    text is split at its last ':' only when it does not name an existing file as a
    whole (`exists`): paths may contain ':'."""
    if ":" not in location or exists(location):
        return location, None
    head, _, tail = location.rpartition(":")
    return head, tail or None


@dataclass(frozen=True)
class ConfigFile:
    """What a TOML config file says: its tables and the directories admin RPCs may use."""

    tables: tuple[TableSpec, ...]
    table_dirs: tuple[str, ...] = ()
    snapshot_dir: str = ""
    update_log: str = ""


CONFIG_FILE_KEYS = ("table", "table_dirs", "snapshot_dir", "update_log")


def read_table_config(path: Path) -> ConfigFile:
    """The tables of a TOML config file: one `[[table]]` entry each, with `name` and
    `source` (PATH or PATH:KEY, relative to the file's folder) and optional `dtype`
    (storage), `device` and `cache_rows` (host table, hot rows cached on the device);
    and, at the top level, optional `table_dirs` (a list) and `snapshot_dir`, the
    directories ReloadTable may read and SnapshotTable may write (relative to the
    file's folder).

    Raises
    ------
    ValueError
        Unreadable or invalid TOML, or an entry that is not a valid table; the message
        names the file and the entry.
    """
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - set(CONFIG_FILE_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected [[table]], "
            "table_dirs, snapshot_dir, update_log"
        )
    table_dirs = document.get("table_dirs", [])
    if not isinstance(table_dirs, list) or not all(isinstance(d, str) for d in table_dirs):
        raise ValueError(f"{path}: table_dirs must be a list of strings")
    snapshot_dir = document.get("snapshot_dir", "")
    if not isinstance(snapshot_dir, str):
        raise ValueError(f"{path}: snapshot_dir must be a string")
    update_log = document.get("update_log", "")
    if not isinstance(update_log, str):
        raise ValueError(f"{path}: update_log must be a string (redis://HOST:PORT/DB)")
    entries = document.get("table", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: no [[table]] entries")
    specs = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: [[table]] #{number}"
        known = {"name", "source", "dtype", "device", "cache_rows", "shard", *KEYED_KEYS}
        extra = sorted(set(entry) - known)
        if extra:
            raise ValueError(f"{where}: unknown key(s) {', '.join(extra)}")
        missing = [k for k in ("name", "source") if not isinstance(entry.get(k), str)]
        if missing:
            raise ValueError(f"{where}: needs {' and '.join(missing)} (strings)")
        source = _beside(path, entry["source"])
        try:
            specs.append(
                TableSpec.parse(
                    f"{entry['name']}={source}",
                    entry.get("dtype"),
                    entry.get("device"),
                    entry.get("cache_rows"),
                    entry.get("shard"),
                    {
                        **entry,
                        **(
                            {"keys": _beside(path, entry["keys"])}
                            if isinstance(entry.get("keys"), str)
                            else {}
                        ),
                    },
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return ConfigFile(
        tuple(specs),
        tuple(_beside(path, d) for d in table_dirs),
        _beside(path, snapshot_dir) if snapshot_dir else "",
        update_log,
    )


def _keyed_entry(config_file: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """A config entry with its keys file (if any) relative to the config file's folder."""
    keys = entry.get("keys")
    return {**entry, "keys": _beside(config_file, keys)} if isinstance(keys, str) else entry


def _beside(config_file: Path, location: str) -> str:
    """A location from a config file: absolute, or relative to the file's folder."""
    return location if location.startswith("/") else str(config_file.parent / location)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start, with the defaults a fresh machine runs with."""

    tables: tuple[TableSpec, ...] = ()
    config: str = ""
    device: str = "auto"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8000
    max_ids: int = 262_144
    max_features: int = 1024
    max_dense_macs: int = 16_000_000_000
    dense_chunk_cells: int = 16_777_216
    dense_concurrency: int = 2
    max_message_bytes: int = 1 << 30
    max_request_bytes: int = 8 << 20
    workers: int = 4
    max_threads: int = 64
    processes: int = 1
    batching: bool = False
    batch_delay_us: float = 200.0
    batch_max_ids: int = 65_536
    grace_s: float = 40.0
    drain_delay_s: float = 0.0
    demo_rows: int = 100_000
    demo_dim: int = 128
    demo_seed: int = 0
    log_level: str = "INFO"
    max_inflight: int = 256
    max_streams: int = 8
    max_health_watches: int = 64
    max_calls_per_connection: int = 100
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens_file: str = ""
    admin_tokens_file: str = ""
    admin_client_names: tuple[str, ...] = ()
    allow_loopback_admin: bool = False
    table_dirs: tuple[str, ...] = ()
    snapshot_dir: str = ""
    update_log: str = ""
    max_update_lag: int = 0
    trim_update_log_s: float = 0.0
    max_connections: int = 1000
    handshake_timeout_s: float = 10.0
    connection_idle_s: float = 300.0
    connection_age_s: float = 30.0
    stream_idle_s: float = 30.0
    reflection: bool = True
    malloc_tune: bool = True
    torch_threads: int = 1
    pinned_staging_bytes: int = 128 << 20
    shard: Shard | None = None
    # Not flags (secrets stay out of argv): read from --auth-tokens-file and
    # --admin-tokens-file and the EMBEDDING_AUTH_TOKENS / EMBEDDING_ADMIN_TOKENS variables.
    auth_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()

    def warnings(self) -> list[str]:
        """Settings that work but defeat each other, one line each, for the start-up log."""
        found = []
        if self.connection_age_s > 0 and self.grace_s < 1.1 * self.connection_age_s:
            found.append(
                f"--grace {self.grace_s:g} is below 1.1 x --connection-max-age "
                f"{self.connection_age_s:g}: a stop cannot wait for every client to leave "
                "by itself, and calls that arrive as it ends are cancelled"
            )
        if (
            (self.auth_tokens or self.admin_tokens)
            and not self.tls_cert
            and not _loopback(self.host)
        ):
            found.append(
                f"bearer tokens over plaintext on {self.host}: anyone on the network path "
                "can read them from a call; give --tls-cert and --tls-key (or bind to "
                "127.0.0.1 behind a TLS proxy)"
            )
        return found

    def security(self) -> str:
        """How callers connect and prove who they are, for the "serving" line."""
        transport = (
            ("mutual TLS" if self.tls_client_ca else "TLS") if self.tls_cert else "plaintext"
        )
        if self.auth_tokens or self.admin_tokens:
            who = f"{len(self.auth_tokens)} data and {len(self.admin_tokens)} admin tokens"
        elif self.tls_client_ca:
            who = "client certificates"
        else:
            who = "no credential needed"
        return f"{transport}, {who}"

    def describe(self) -> list[str]:
        """One `name = value` line per setting, for the start-up log."""
        lines = []
        for name, value in asdict(self).items():
            if name == "tables":
                value = ", ".join(str(t) for t in self.tables) or "(none: seeded demo table)"
            elif name == "shard":
                value = str(self.shard) if self.shard else "none (whole tables)"
            elif name == "update_log":
                value = redacted_url(value) or "(none: updates in memory)"
            elif name in ("auth_tokens", "admin_tokens"):
                value = f"({len(value)} tokens)" if value else "(none)"
            lines.append(f"{name} = {value}")
        return lines


def _loopback(host: str) -> bool:
    """Whether `host` (a --host value) is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be in 0..65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (
        text.startswith("cuda:") and text.removeprefix("cuda:").isdigit()
    ):
        return text
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def _shard(text: str) -> Shard | None:
    """`I/N`, or `none` (the whole table)."""
    if not isinstance(text, str):
        raise ValueError(f"shard {text!r} must be a string, I/N or none")
    return None if text.strip().lower() in ("", "none") else Shard.parse(text)


def redacted_url(url: str) -> str:
    """`url` without its password (a Redis URL may carry one), for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _update_log_url(text: str) -> str:
    """redis:// or rediss:// (or empty: no log)."""
    if text and not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{text[:60]!r} is not a Redis URL: redis://HOST:PORT/DB")
    return text


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _tables(text: str) -> tuple[TableSpec, ...]:
    return tuple(TableSpec.parse(part) for part in text.split(",") if part.strip())


# (flag, field, type, help). The env twin of `--some-flag` is EMBEDDING_SOME_FLAG.
OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--config", "config", str,
     "TOML file of tables ([[table]] name, source, dtype, device), served before any --table"),
    ("--device", "device", _device, "where tables live: auto (CUDA if present), cpu, cuda, cuda:N"),
    ("--host", "host", str, "address the gRPC server binds"),
    ("--port", "port", _port, "gRPC port (0 picks a free one)"),
    ("--metrics-host", "metrics_host", str,
     "address the Prometheus endpoint binds (this host only by default: /metrics needs no "
     "credential; 0.0.0.0 for a scraper elsewhere, as the image sets)"),
    ("--metrics-port", "metrics_port", _port, "Prometheus /metrics port (0 picks a free one)"),
    ("--max-ids", "max_ids", _positive_int, "most ids one request may carry"),
    ("--max-features", "max_features", _positive_int,
     "most features (lookups) in one LookupMany call; each counts at least one id "
     "against --max-ids"),
    ("--max-dense-macs", "max_dense_macs", _positive_int,
     "most multiply-adds (ids x rows x dim) one LookupDense call may cost, or one "
     "LookupManyDense call over all its features"),
    ("--dense-chunk-cells", "dense_chunk_cells", _positive_int,
     "one-hot cells (ids x rows) materialised at once on the dense path"),
    ("--dense-concurrency", "dense_concurrency", _positive_int,
     "one-hot matmuls (LookupDense) running at once; more wait their turn within their "
     "deadline (each uses every core, or the whole device, by itself)"),
    ("--max-request-bytes", "max_request_bytes", _positive_int,
     "largest request message, in bytes, after decompression (RESOURCE_EXHAUSTED past it): "
     "262,144 ids take 2 MiB; with --max-inflight it bounds the memory callers can hold"),
    ("--max-message-bytes", "max_message_bytes", _positive_int,
     "largest response message, in bytes (larger lookups are refused up front)"),
    ("--workers", "workers", _positive_int,
     "calls running at once in the handler pool per process (all but plain lookups, which "
     "the event loop answers); more queue (calls waiting in a dense lookup or a reload do "
     "not count)"),
    ("--max-threads", "max_threads", _positive_int,
     "most handler threads per process, counting those waiting in a dense lookup or a "
     "reload"),
    ("--processes", "processes", _positive_int,
     "server processes sharing the gRPC port (SO_REUSEPORT) and one copy of each table; "
     "1 serves from this process"),
    ("--batching", "batching", _bool,
     "coalesce concurrent Lookup calls to one table into one gather (true/false; off: "
     "no win measured on CPU yet, see docs/performance.md)"),
    ("--batch-delay-us", "batch_delay_us", _non_negative_float,
     "with --batching: longest a call waits for others to join its gather, microseconds"),
    ("--batch-max-ids", "batch_max_ids", _positive_int,
     "with --batching: most ids in one coalesced gather"),
    ("--grace", "grace_s", _non_negative_float,
     "on SIGTERM/SIGINT, after the drain delay: seconds for clients to leave (each "
     "connection is asked to go at its --connection-max-age, and new ones are refused) "
     "and for calls in flight to finish; what is left then is cancelled. Keep it above "
     "1.1 x --connection-max-age for a stop no client notices"),
    ("--drain-delay", "drain_delay_s", _non_negative_float,
     "on SIGTERM/SIGINT, seconds to keep serving as usual with health NOT_SERVING before "
     "the drain begins (Kubernetes: time for the pod to leave its Service's endpoints)"),
    ("--demo-rows", "demo_rows", _positive_int, "rows of the seeded demo table (no --table)"),
    ("--demo-dim", "demo_dim", _positive_int, "dim of the seeded demo table (no --table)"),
    ("--demo-seed", "demo_seed", int, "seed of the demo table (numpy default_rng)"),
    ("--log-level", "log_level", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    ("--max-inflight", "max_inflight", _positive_int,
     "most RPCs in flight (running or queued); past it calls get RESOURCE_EXHAUSTED at once"),
    ("--max-streams", "max_streams", _positive_int,
     "most LookupStream streams open at once (an open stream holds no thread; its "
     "messages are answered like Lookup calls)"),
    ("--max-health-watches", "max_health_watches", _positive_int,
     "most grpc.health.v1 Watch streams open at once (probes need no credential; each "
     "holds a place among --max-inflight); Check is not limited"),
    ("--max-calls-per-connection", "max_calls_per_connection", _positive_int,
     "most calls and streams open at once on one connection (HTTP/2 "
     "MAX_CONCURRENT_STREAMS): one caller cannot take every place"),
    ("--tls-cert", "tls_cert", str, "PEM server certificate (chain): turns TLS on"),
    ("--tls-key", "tls_key", str, "PEM private key of --tls-cert"),
    ("--tls-client-ca", "tls_client_ca", str,
     "PEM CA bundle: clients must present a certificate it signed (mutual TLS)"),
    ("--auth-tokens-file", "auth_tokens_file", str,
     "file of data bearer tokens, one per line: lookups, ListTables and reflection need "
     "one (or an admin token); EMBEDDING_AUTH_TOKENS adds comma-separated tokens"),
    ("--admin-tokens-file", "admin_tokens_file", str,
     "file of admin bearer tokens, one per line: ReloadTable, UpdateRows and SnapshotTable "
     "need one (they also work for data RPCs); EMBEDDING_ADMIN_TOKENS adds comma-separated "
     "tokens"),
    ("--admin-client-names", "admin_client_names", _names,
     "with mutual TLS: comma-separated client certificate names (subject alternative "
     "names or common name) that may call admin RPCs"),
    ("--allow-loopback-admin", "allow_loopback_admin", _bool,
     "development only: admin RPCs from loopback callers need no admin credential "
     "(true/false)"),
    ("--table-dir", "table_dirs", _names,
     "comma-separated directories ReloadTable may read new table files from (none: "
     "reloads only re-read a table's own file)"),
    ("--snapshot-dir", "snapshot_dir", str,
     "directory SnapshotTable writes into (none: snapshots are off)"),
    ("--update-log", "update_log", _update_log_url,
     "redis://HOST:PORT/DB: row updates go through a Redis Streams log that every replica "
     "applies in order (none: each server keeps its own updates in memory)"),
    ("--max-update-lag", "max_update_lag", _non_negative_int,
     "with --update-log: a starting server reports SERVING once this many entries or fewer "
     "of the log are left to apply (0: caught up)"),
    ("--trim-update-log", "trim_update_log_s", _non_negative_float,
     "with --update-log and --snapshot-dir: every this many seconds, trim each table's "
     "stream up to the update_seq of its newest snapshot there (0: never). Only where "
     "every replica reads that directory (a shared volume): a replica the trim leaves "
     "behind reloads that snapshot"),
    ("--max-connections", "max_connections", _positive_int,
     "most open client connections; past it new ones are closed at once"),
    ("--handshake-timeout", "handshake_timeout_s", _positive_float,
     "seconds a new connection has to finish its TLS and HTTP/2 handshake"),
    ("--connection-idle-timeout", "connection_idle_s", _non_negative_float,
     "seconds a connection may stay open with no call before it is closed (0: never)"),
    ("--connection-max-age", "connection_age_s", _non_negative_float,
     "seconds after which a connection is asked to go away (HTTP/2 GOAWAY: clients "
     "reconnect, no call is lost; +-10%% jitter); also how long a drain waits for clients "
     "to leave (0: never, and a stop then cancels calls that arrive as it closes)"),
    ("--stream-idle-timeout", "stream_idle_s", _positive_float,
     "seconds a LookupStream may wait for its next request before it is cancelled"),
    ("--reflection", "reflection", _bool, "serve gRPC reflection (true/false)"),
    ("--pinned-staging-bytes", "pinned_staging_bytes", _non_negative_int,
     "page-locked host memory per process for results leaving a CUDA device, in 8 MiB "
     "blocks kept for reuse; larger results, or more at once, are copied to pageable "
     "memory (0: never pin)"),
    ("--malloc-tune", "malloc_tune", _bool,
     "raise glibc's mmap/trim thresholds and use one allocator arena for every thread, "
     "so freed response buffers are reused instead of faulted in afresh for every call "
     "(true/false, in every process; -20%% server CPU per call at 8 MB responses, see "
     "docs/performance.md; the heap keeps up to 1 GiB it could return)"),
    ("--torch-threads", "torch_threads", _positive_int,
     "threads torch's CPU kernels may use inside one call (a dtype conversion, pooling, "
     "a one-hot matmul), per process; calls already run side by side, and under load "
     "more than 1 costs CPU waiting at torch's joins (see docs/performance.md); more "
     "speeds up one large LookupDense at a time"),
    ("--shard", "shard", _shard,
     "hold one shard of every table, I/N (shard I of N, from 0): the rows whose "
     "embedding_client.shards.shard_of(id, N) is I; ids stay global and other shards' ids "
     "are refused (a config file's per-table `shard` wins; none: whole tables)"),
)  # fmt: skip


def env_name(flag: str) -> str:
    """The environment variable twin of a flag: --max-ids -> EMBEDDING_MAX_IDS."""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def _argtype(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(convert, "__name__", "value").lstrip("_")
    return parse


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The `embedding-server` argument parser, its defaults taken from `env` where set."""
    parser = ArgumentParser(
        prog="embedding-server",
        description="Serve embedding tables over gRPC: Lookup (gather) and LookupDense "
        "(one-hot matmul), with Prometheus metrics.",
        epilog="Every flag has an environment twin, e.g. --max-ids -> EMBEDDING_MAX_IDS; "
        "--table's twin EMBEDDING_TABLES takes comma-separated specs. Flags win.",
    )
    parser.add_argument("--version", action="version", version=version_text(parser.prog))
    try:
        env_tables = _tables(env.get(ENV_PREFIX + "TABLES", ""))
    except ValueError as exc:
        parser.error(f"{ENV_PREFIX}TABLES: {exc}")
    parser.add_argument(
        "--table",
        dest="tables",
        action="append",
        type=_argtype(TableSpec.parse),
        metavar="NAME=PATH[:KEY]",
        help="table from .npy, .safetensors or a torch checkpoint (KEY names a tensor in it); "
        "repeatable, the first is the default; none: a seeded demo table (env EMBEDDING_TABLES)",
    )
    parser.set_defaults(env_tables=env_tables)
    defaults = ServerConfig()
    for flag, dest, convert, help_text in OPTIONS:
        default = getattr(defaults, dest)
        text = env.get(env_name(flag))
        if text is not None:
            try:
                default = convert(text)
            except ValueError as exc:
                parser.error(f"{env_name(flag)}={text!r}: {exc}")
        # A yes/no flag alone means yes (`--batching`); `--batching false` turns it off.
        alone = {"nargs": "?", "const": True} if convert is _bool else {}
        shown = (
            str(getattr(defaults, dest)).lower() if convert is _bool else getattr(defaults, dest)
        )
        parser.add_argument(
            flag,
            dest=dest,
            type=_argtype(convert),
            default=default,
            help=f"{help_text} (env {env_name(flag)}, default {shown})",
            **alone,  # type: ignore[arg-type]
        )
    return parser


def load_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build the configuration from flags (`argv`) over environment variables (`env`)."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    values = vars(parser.parse_args(argv))
    env_tables = values.pop("env_tables")
    values["tables"] = tuple(values["tables"] or env_tables)
    if values["config"]:
        try:
            config_file = read_table_config(Path(values["config"]))
        except ValueError as exc:
            parser.error(f"--config {exc}")
        values["tables"] = config_file.tables + values["tables"]
        values["table_dirs"] = values["table_dirs"] or config_file.table_dirs
        values["snapshot_dir"] = values["snapshot_dir"] or config_file.snapshot_dir
        values["update_log"] = values["update_log"] or config_file.update_log
    values["auth_tokens"] = _tokens(parser, "AUTH_TOKENS", values["auth_tokens_file"], env)
    values["admin_tokens"] = _tokens(parser, "ADMIN_TOKENS", values["admin_tokens_file"], env)
    if set(values["auth_tokens"]) & set(values["admin_tokens"]):
        parser.error("a token is both a data and an admin token: give each role its own")
    for flag, folder in [
        *(("--table-dir", d) for d in values["table_dirs"]),
        ("--snapshot-dir", values["snapshot_dir"]),
    ]:
        if folder and not Path(folder).is_dir():
            parser.error(f"{flag} {folder}: not a directory")
    if values["admin_client_names"] and not values["tls_client_ca"]:
        parser.error("--admin-client-names needs mutual TLS (--tls-client-ca)")
    if values["workers"] > values["max_threads"]:
        parser.error(
            f"--workers ({values['workers']}) must not exceed --max-threads "
            f"({values['max_threads']}): the handler pool runs that many calls at once"
        )
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        parser.error("--tls-cert and --tls-key go together")
    if values["tls_client_ca"] and not values["tls_cert"]:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if values["trim_update_log_s"] and not (values["update_log"] and values["snapshot_dir"]):
        parser.error(
            "--trim-update-log needs --update-log and --snapshot-dir: the log is trimmed "
            "only up to a snapshot every replica can reload"
        )
    values["tables"] = tuple(
        t if t.shard_given else replace(t, shard=values["shard"]) for t in values["tables"]
    )
    names = [t.name for t in values["tables"]]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        parser.error(f"table name given twice: {', '.join(duplicated)}")
    return ServerConfig(**values)


def _tokens(
    parser: argparse.ArgumentParser, variable: str, path: str, env: Mapping[str, str]
) -> tuple[str, ...]:
    tokens = [t.strip() for t in env.get(ENV_PREFIX + variable, "").split(",")]
    if path:
        try:
            tokens += [line.strip() for line in Path(path).read_text().splitlines()]
        except OSError as exc:
            flag = "--" + variable.lower().replace("_", "-") + "-file"
            parser.error(f"{flag} {path}: {exc.strerror}")
    return tuple(t for t in tokens if t and not t.startswith("#"))
