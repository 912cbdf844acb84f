"""Python clients for the embedding lookup service: blocking and asyncio.

Both share request building and response decoding with the server through
`embedding_client.codec`, retry UNAVAILABLE through gRPC's service config, allow
large messages, and raise one exception type, `EmbeddingError`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
DEFAULT_PORT = 50051
DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
DEFAULT_TIMEOUT_S = 30.0
# 64k ids x 256 dims of float32 is 64 MiB, far over gRPC's 4 MiB default.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


class EmbeddingError(Exception):
    """A failed call: the gRPC status code and the server's message.

    Attributes
    ----------
    code : grpc.StatusCode
        INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ...
    details : str
        What went wrong, in words a person can act on.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> EmbeddingError:
        """Convert a grpc.RpcError (sync or aio) into an EmbeddingError."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def with_default_port(target: str) -> str:
    """`target` with the service's port (50051) when it names a host without one:
    grpc itself would go to 443. Targets with a scheme (`dns:///`, `unix:`) and bare
    IPv6 addresses are left as they are."""
    if "://" in target or target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return target
    if target.startswith("["):  # [v6] or [v6]:port
        return target if "]:" in target else f"{target}:{DEFAULT_PORT}"
    if target.count(":") == 0:
        return f"{target}:{DEFAULT_PORT}"
    return target


@dataclass(frozen=True)
class TableInfo:
    """One table the server holds."""

    name: str
    rows: int
    dim: int
    dtype: str
    device: str
    version: int
    bytes: int
    is_default: bool
    # The part a shard server holds, (index, count); None for the whole table. `rows` is
    # then the whole table's, `shard_rows` how many this server holds.
    shard: tuple[int, int] | None = None
    shard_rows: int | None = None
    # Row updates applied to this version (the update log's position, with a log): pass
    # an update's as a lookup's `min_update_seq` to read that write on any replica.
    update_seq: int = 0
    # Updates go through an update log every replica applies (write to one replica).
    update_log: bool = False
    # A keyed table (ids are raw int64 keys): the keys it holds, how many it may hold,
    # and what a key it does not hold reads ("error", "zeros" or "default"); None else.
    keys: int | None = None
    max_keys: int | None = None
    missing_keys: str | None = None
    # A keyed table's bags leave missing keys out (else pool their zeros/default vector).
    bags_skip_missing: bool = True


@dataclass(frozen=True)
class LookupResult:
    """Vectors with the table's loaded version and update_seq that produced them."""

    vectors: np.ndarray
    table: str
    version: int
    # From a ShardedClient: each answering shard's version (`version` is the lowest).
    shard_versions: tuple[int, ...] = ()
    update_seq: int = 0
    # From a ShardedClient: each answering shard's update_seq (`update_seq` the lowest).
    shard_update_seqs: tuple[int, ...] = ()


def _service_config(max_attempts: int) -> str:
    retry = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.05s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        # CANCELLED too: a server cancels calls that arrive as it stops. Every RPC here
        # is a read or an idempotent reload, so a retry is safe.
        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
    }
    methods = [{"name": [{"service": SERVICE_NAME}, {"service": "grpc.health.v1.Health"}]}]
    config: dict[str, Any] = {"methodConfig": [dict(methods[0], retryPolicy=retry)]}
    return json.dumps(config)


def _channel_options(max_message_bytes: int, max_attempts: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # On even with max_attempts 1, as in every grpc client without a retry policy:
        # grpc then resends only calls no server saw (a stream refused, or cut by a
        # GOAWAY before the server took it), which is what makes a drain invisible.
        ("grpc.enable_retries", 1),
        # Each client its own connection (grpc shares one between equal channels by
        # default): clients then spread over the processes of a --processes N server.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if max_attempts > 1:
        options.append(("grpc.service_config", _service_config(max_attempts)))
    return options


@dataclass(frozen=True)
class Pooling:
    """A pooled lookup (EmbeddingBag): one vector per bag of ids, the sum, mean or max of
    its rows. Bags are given by `offsets` (start of each bag, like torch's embedding_bag)
    or `lengths` (1-D ids), or, with neither, are the last axis of the ids. `weights`:
    one per id, multiplying its row (sum only). A plain mode string, e.g. ``"mean"``,
    means bags along the last axis."""

    mode: str
    offsets: Any = None
    lengths: Any = None
    weights: Any = None


def _lookup_request(
    ids: Any,
    table: str | None,
    dtype: str,
    pooling: Pooling | str | None = None,
    padding_id: int | None = None,
    min_update_seq: int = 0,
) -> pb.LookupRequest:
    if isinstance(pooling, str):
        pooling = Pooling(pooling)
    bags = {} if pooling is None else {
        "pooling": pooling.mode, "offsets": pooling.offsets, "lengths": pooling.lengths,
        "weights": pooling.weights,
    }  # fmt: skip
    try:
        request = codec.encode_lookup_request(ids, table, dtype, padding_id=padding_id, **bags)
    except codec.WireError as exc:
        raise EmbeddingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    if min_update_seq:
        request.min_update_seq = min_update_seq
    return request


@dataclass(frozen=True)
class Feature:
    """One feature of a `lookup_many` call: its ids, the table they index (default: the
    table named like the feature), output dtype, pooling and padding id."""

    ids: Any
    table: str | None = None
    dtype: str = "float32"
    pooling: Pooling | str | None = None
    padding_id: int | None = None


def _many_request(features: Mapping[str, Any]) -> pb.LookupManyRequest:
    request = pb.LookupManyRequest()
    for name, feature in features.items():
        if not isinstance(feature, Feature):
            feature = Feature(feature)
        lookup = _lookup_request(
            feature.ids, feature.table or name, feature.dtype, feature.pooling, feature.padding_id
        )
        request.features.add(feature=name, lookup=lookup)
    return request


_SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class _LookupMethods:
    """Lookup, LookupDense, LookupMany and LookupManyDense on a channel (sync or aio),
    their answers read in place (`codec.read_lookup_response`) instead of through
    protobuf's messages, which copy the vectors twice more."""

    def __init__(self, channel: Any) -> None:
        def method(name: str, request: Any, read: Any) -> Any:
            return channel.unary_unary(
                f"/{_SERVICE}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=read,
            )

        self.plain = method("Lookup", pb.LookupRequest, codec.read_lookup_response)
        self.dense = method("LookupDense", pb.LookupRequest, codec.read_lookup_response)
        self.many = method("LookupMany", pb.LookupManyRequest, codec.read_many_response)
        self.many_dense = method("LookupManyDense", pb.LookupManyRequest, codec.read_many_response)


def _many_results(
    response: pb.LookupManyResponse | codec.WireManyResponse,
) -> dict[str, LookupResult]:
    return {r.feature: _lookup_result(r.result) for r in response.results}


def _update_request(ids: Any, vectors: Any, table: str | None) -> pb.UpdateRowsRequest:
    try:
        return codec.encode_update_rows(ids, vectors, table)
    except codec.WireError as exc:
        raise EmbeddingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def _lookup_result(response: pb.LookupResponse | codec.WireLookupResponse) -> LookupResult:
    try:
        vectors = codec.decode_vectors(response)
    except codec.WireError as exc:
        raise EmbeddingError(grpc.StatusCode.INTERNAL, str(exc)) from None
    return LookupResult(
        vectors=vectors, table=response.table, version=response.table_version,
        update_seq=response.update_seq,
    )  # fmt: skip


def _table_infos(response: pb.ListTablesResponse) -> list[TableInfo]:
    return [
        TableInfo(
            name=t.name,
            rows=t.rows,
            dim=t.dim,
            dtype=codec.storage_dtype_name(t.dtype),
            device=t.device,
            version=t.version,
            bytes=t.bytes,
            is_default=t.is_default,
            shard=(t.shard.index, t.shard.count) if t.HasField("shard") else None,
            shard_rows=t.shard_rows if t.HasField("shard") else None,
            update_seq=t.update_seq,
            update_log=t.update_log,
            keys=t.keys if t.keyed else None,
            max_keys=t.max_keys if t.keyed else None,
            missing_keys=t.missing_keys if t.keyed else None,
            bags_skip_missing=t.bags_skip_missing if t.keyed else True,
        )
        for t in response.tables
    ]


@dataclass(frozen=True)
class Security:
    """How the client proves who it is and checks the server.

    Attributes
    ----------
    token : bearer token sent as ``authorization: Bearer <token>`` on every call.
    tls : use TLS (implied by any of the certificate options).
    root_certificates : PEM CA bundle that signed the server's certificate (None: system roots).
    client_certificate, client_key : PEM client certificate chain and key (mutual TLS).
    server_name : name to check the server's certificate against, when it differs from
        the target's host.
    """

    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        token: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        tls: bool = False,
    ) -> Security:
        """Build from PEM file paths (None: not given)."""

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        return cls(token, tls, read(ca), read(cert), read(key), server_name)

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(
            x is not None for x in (self.root_certificates, self.client_certificate)
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.client_key, self.client_certificate
        )


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _stream_result(response: pb.LookupStreamResponse) -> LookupResult:
    if response.HasField("error"):
        code = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
        raise EmbeddingError(code, response.error.message)
    return _lookup_result(response.result)


def _table_of(response: Any) -> TableInfo:
    """The TableInfo of an admin response (its `table` field)."""
    return _table_infos(pb.ListTablesResponse(tables=[response.table]))[0]


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class _ClientBase:
    def __init__(
        self,
        target: str,
        timeout: float | None,
        max_attempts: int,
        max_message_bytes: int,
        security: Security | None,
        wait_for_ready: bool,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = with_default_port(target)
        self.timeout = timeout
        self.security = security or Security()
        self.wait_for_ready = wait_for_ready
        self._options = _channel_options(max_message_bytes, max_attempts)
        if self.target.startswith("dns:"):
            # A name with several addresses (a Kubernetes headless Service's replicas):
            # spread calls over all of them, not only the first.
            self._options.append(("grpc.lb_policy_name", "round_robin"))
        self._options.extend(channel_options)
        if self.security.server_name:
            self._options.append(("grpc.ssl_target_name_override", self.security.server_name))
        token = self.security.token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _open_channel(self, channels: Any) -> Any:
        """A channel from `channels` (the grpc or grpc.aio module): TLS when configured."""
        credentials = self.security.channel_credentials()
        if credentials is None:
            return channels.insecure_channel(self.target, options=self._options)
        return channels.secure_channel(self.target, credentials, options=self._options)

    def _error(self, error: grpc.RpcError, *, stream: bool = False) -> EmbeddingError:
        """The EmbeddingError of a failed call, with a hint where grpc's words alone do
        not say what to do."""
        failure = EmbeddingError.from_rpc_error(error)
        if stream and failure.code == grpc.StatusCode.CANCELLED:
            return EmbeddingError(
                failure.code,
                f"{failure.details} (a server cancels a stream that waits longer than its "
                "--stream-idle-timeout for the next batch: send batches more often, or "
                "open a new stream)",
            )
        if (
            failure.code == grpc.StatusCode.UNAVAILABLE
            and not self.security.uses_tls
            and "Socket closed" in failure.details
        ):
            return EmbeddingError(
                failure.code,
                f"{failure.details} (the server closed the connection at once: if it uses "
                "TLS, connect with TLS: Security(tls=True) or a CA; embedding-client --tls "
                "or --tls-ca)",
            )
        hint = _hint(failure, self.security, self.target)
        return EmbeddingError(failure.code, f"{failure.details} ({hint})") if hint else failure

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._metadata,
            "wait_for_ready": self.wait_for_ready or None,
        }


def _hint(failure: EmbeddingError, security: Security, target: str) -> str:
    """What to do about a connection that failed in a way grpc's words do not explain
    ("" when there is nothing to add)."""
    if failure.code != grpc.StatusCode.UNAVAILABLE:
        return ""
    details = failure.details
    if "Connection refused" in details:
        return f"nothing listens at {target}: is the embedding-server running there?"
    if "Hostname Verification Check failed" in details or "peer name" in details.lower():
        return ("the server's certificate does not name the host in the target: connect "
                "with the name it holds: Security(server_name=...); embedding-client "
                "--server-name")  # fmt: skip
    if "WRONG_VERSION_NUMBER" in details:
        return ("the server answered without TLS: connect without it (no Security(tls=...) "
                "or CA; embedding-client without --tls / --tls-ca)")  # fmt: skip
    if (
        security.uses_tls
        and security.client_certificate is None
        and ("Socket closed" in details or "handshake" in details.lower())
    ):
        return ("the server ended the TLS handshake: if it requires client certificates "
                "(mutual TLS), give one: Security(client_certificate=..., client_key=...); "
                "embedding-client --tls-cert and --tls-key")  # fmt: skip
    return ""


class EmbeddingClient(_ClientBase):
    """Blocking client for the embedding lookup service.

    Parameters
    ----------
    target : str
        ``host:port`` of the server.
    timeout : float or None
        Default deadline of each call in seconds (None: no deadline).
    max_attempts : int
        Attempts per call when the server answers UNAVAILABLE or CANCELLED (1 turns
        retries off); gRPC backs off exponentially between them.
    max_message_bytes : int
        Largest request or response accepted, in bytes.
    security : Security, optional
        Bearer token and TLS settings; plaintext without a token when omitted.
    wait_for_ready : bool
        Wait (within the deadline) for an unreachable server to come up instead of
        failing fast with UNAVAILABLE: rides out restarts.
    channel_options : sequence of (name, value)
        More gRPC channel arguments, e.g. ``("grpc.max_reconnect_backoff_ms", 1000)``.

    Examples
    --------
    >>> with EmbeddingClient("localhost:50051") as client:
    ...     vectors = client.lookup([[0, 2], [1, 2]])  # shape (2, 2, dim)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_attempts: int = 5,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: Security | None = None,
        wait_for_ready: bool = False,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target, timeout, max_attempts, max_message_bytes, security, wait_for_ready,
            channel_options,
        )  # fmt: skip
        self._channel: grpc.Channel = self._open_channel(grpc)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._lookups = _LookupMethods(self._channel)
        self._admin = pb_grpc.EmbeddingAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _invoke(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, **self._call(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def lookup(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Look up the vectors of `ids` through the gather path.

        Parameters
        ----------
        ids : list, nested list, numpy array or torch tensor of ints, any shape
        table : str, optional
            Table name; the server's default table when omitted.
        dtype : {"float32", "float16", "bfloat16"}
            Element type of the returned vectors.
        pooling : Pooling or {"sum", "mean", "max"}, optional
            Pool each bag of ids into one vector (EmbeddingBag); see `Pooling`.
        padding_id : int, optional
            An id that stands for nothing: its vector is zeros, and bags skip it (mean
            does not count it), like ``padding_idx`` / Keras ``mask_zero``.
        timeout : float, optional
            Deadline for this call in seconds, instead of the client's default.

        Returns
        -------
        numpy.ndarray
            Shape ``ids.shape + (dim,)`` (pooled: the bags' shape + ``(dim,)``); a
            read-only view of the response bytes (``.copy()`` it to write).

        Raises
        ------
        EmbeddingError
            With the gRPC status code and the server's message.
        """
        result = self.lookup_result(
            ids, table, dtype, pooling=pooling, padding_id=padding_id, timeout=timeout
        )
        return result.vectors

    def lookup_dense(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Like `lookup`, computed as ``one_hot(ids, rows) @ table`` (the debug path)."""
        result = self.lookup_result(
            ids, table, dtype, dense=True, pooling=pooling, padding_id=padding_id, timeout=timeout
        )
        return result.vectors

    def lookup_result(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        dense: bool = False,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        min_update_seq: int = 0,
        timeout: float | None = None,
    ) -> LookupResult:
        """Like `lookup` (or `lookup_dense`), also returning the table, its loaded version
        and the updates applied. `min_update_seq` (an `update_rows` answer's update_seq)
        reads your own write: a replica behind it waits within the deadline, then refuses
        with UNAVAILABLE."""
        method = self._lookups.dense if dense else self._lookups.plain
        request = _lookup_request(ids, table, dtype, pooling, padding_id, min_update_seq)
        return _lookup_result(self._invoke(method, request, timeout))

    def lookup_many(
        self, features: Mapping[str, Any], *, dense: bool = False, timeout: float | None = None
    ) -> dict[str, LookupResult]:
        """Look up several features in one call (`LookupMany`): a ranking service's whole
        example batch, one round trip.

        Parameters
        ----------
        features : mapping of feature name to `Feature`, or to bare ids (then the table
            named like the feature, float32, no pooling)
        dense : compute every feature as `lookup_dense` does

        Returns
        -------
        dict of feature name to LookupResult, in the order given

        Raises
        ------
        EmbeddingError
            At the first refused feature (named in the message); nothing is returned then.
        """
        method = self._lookups.many_dense if dense else self._lookups.many
        return _many_results(self._invoke(method, _many_request(features), timeout))

    def lookup_stream(
        self,
        batches: Iterable[Any],
        table: str | None = None,
        dtype: str = "float32",
        *,
        timeout: float | None = None,
    ) -> Iterator[LookupResult]:
        """Look up many batches of ids over one stream (`LookupStream`): cheaper per batch
        than one call each when batches are small.

        Parameters
        ----------
        batches : iterable of ids (each as `lookup` takes them); read lazily
        table, dtype : as for `lookup`, the same for every batch
        timeout : deadline for the whole stream

        Yields
        ------
        LookupResult
            One per batch, in order.

        Raises
        ------
        EmbeddingError
            At the first refused batch (with that batch's status code and message), or
            when the stream fails.
        """
        requests = (_lookup_request(ids, table, dtype) for ids in batches)
        try:
            for response in self._stub.LookupStream(requests, **self._call(timeout)):
                yield _stream_result(response)
        except grpc.RpcError as exc:
            raise self._error(exc, stream=True) from None

    def tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        """List the server's tables with rows, dim, dtype, device, version and bytes."""
        return _table_infos(self._invoke(self._stub.ListTables, pb.ListTablesRequest(), timeout))

    def reload_table(
        self, table: str | None = None, source: str = "", *, timeout: float | None = None
    ) -> TableInfo:
        """Load a new version of `table` from `source` (PATH[:KEY] inside one of the server's
        table directories, or relative to them; empty: its own file) and swap it in
        atomically (admin RPC). Returns the table as it now serves."""
        request = pb.ReloadTableRequest(table=table or "", source=source)
        return _table_of(self._invoke(self._admin.ReloadTable, request, timeout))

    def update_rows(
        self, ids: Any, vectors: Any, table: str | None = None, *, timeout: float | None = None
    ) -> TableInfo:
        """Overwrite rows `ids` (1-D, each once) of `table` with `vectors` ([len(ids), dim],
        float32/float16/bfloat16) in place (admin RPC). Readers see each row before or
        after, never a mix. Returns the table with its new update_seq."""
        request = _update_request(ids, vectors, table)
        response = self._invoke(self._admin.UpdateRows, request, timeout)
        return _table_of(response)

    def snapshot_table(
        self,
        path: str,
        table: str | None = None,
        *,
        overwrite: bool = False,
        timeout: float | None = None,
    ) -> tuple[TableInfo, int]:
        """Write `table`'s current contents to `path` in the server's snapshot directory
        (relative to it, or absolute inside it; .npy or .safetensors; admin RPC). An
        existing file is replaced only with `overwrite` (else ALREADY_EXISTS). Returns the
        table and the version the file holds."""
        request = pb.SnapshotTableRequest(table=table or "", path=path, overwrite=overwrite)
        response = self._invoke(self._admin.SnapshotTable, request, timeout)
        return _table_of(response), response.version

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of `service` ("" for the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(self._invoke(self._health.Check, request, timeout))

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncEmbeddingClient(_ClientBase):
    """asyncio client for the embedding lookup service; the same API as `EmbeddingClient`.

    Examples
    --------
    >>> async with AsyncEmbeddingClient("localhost:50051") as client:
    ...     vectors = await client.lookup([0, 2, 1, 2])
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_attempts: int = 5,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: Security | None = None,
        wait_for_ready: bool = False,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target, timeout, max_attempts, max_message_bytes, security, wait_for_ready,
            channel_options,
        )  # fmt: skip
        self._channel: grpc.aio.Channel = self._open_channel(grpc.aio)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._lookups = _LookupMethods(self._channel)
        self._admin = pb_grpc.EmbeddingAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _invoke(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, **self._call(timeout))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def lookup(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Look up the vectors of `ids` through the gather path (see `EmbeddingClient.lookup`)."""
        result = await self.lookup_result(
            ids, table, dtype, pooling=pooling, padding_id=padding_id, timeout=timeout
        )
        return result.vectors

    async def lookup_dense(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Like `lookup`, computed as ``one_hot(ids, rows) @ table`` (the debug path)."""
        result = await self.lookup_result(
            ids, table, dtype, dense=True, pooling=pooling, padding_id=padding_id, timeout=timeout
        )
        return result.vectors

    async def lookup_result(
        self,
        ids: Any,
        table: str | None = None,
        dtype: str = "float32",
        *,
        dense: bool = False,
        pooling: Pooling | str | None = None,
        padding_id: int | None = None,
        min_update_seq: int = 0,
        timeout: float | None = None,
    ) -> LookupResult:
        """Like `lookup` (or `lookup_dense`), also returning the table, its loaded version
        and the updates applied (see `EmbeddingClient.lookup_result`)."""
        method = self._lookups.dense if dense else self._lookups.plain
        request = _lookup_request(ids, table, dtype, pooling, padding_id, min_update_seq)
        return _lookup_result(await self._invoke(method, request, timeout))

    async def lookup_many(
        self, features: Mapping[str, Any], *, dense: bool = False, timeout: float | None = None
    ) -> dict[str, LookupResult]:
        """Several features in one call (see `EmbeddingClient.lookup_many`)."""
        method = self._lookups.many_dense if dense else self._lookups.many
        return _many_results(await self._invoke(method, _many_request(features), timeout))

    async def lookup_stream(
        self,
        batches: Iterable[Any],
        table: str | None = None,
        dtype: str = "float32",
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[LookupResult]:
        """Look up many batches over one stream (see `EmbeddingClient.lookup_stream`)."""
        requests = (_lookup_request(ids, table, dtype) for ids in batches)
        try:
            async for response in self._stub.LookupStream(requests, **self._call(timeout)):
                yield _stream_result(response)
        except grpc.RpcError as exc:
            raise self._error(exc, stream=True) from None

    async def tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        """List the server's tables with rows, dim, dtype, device, version and bytes."""
        request = pb.ListTablesRequest()
        return _table_infos(await self._invoke(self._stub.ListTables, request, timeout))

    async def reload_table(
        self, table: str | None = None, source: str = "", *, timeout: float | None = None
    ) -> TableInfo:
        """Load a new version of `table` and swap it in (see `EmbeddingClient.reload_table`)."""
        request = pb.ReloadTableRequest(table=table or "", source=source)
        return _table_of(await self._invoke(self._admin.ReloadTable, request, timeout))

    async def update_rows(
        self, ids: Any, vectors: Any, table: str | None = None, *, timeout: float | None = None
    ) -> TableInfo:
        """Overwrite rows in place (see `EmbeddingClient.update_rows`)."""
        request = _update_request(ids, vectors, table)
        response = await self._invoke(self._admin.UpdateRows, request, timeout)
        return _table_of(response)

    async def snapshot_table(
        self,
        path: str,
        table: str | None = None,
        *,
        overwrite: bool = False,
        timeout: float | None = None,
    ) -> tuple[TableInfo, int]:
        """Write a table to a file on the server (see `EmbeddingClient.snapshot_table`)."""
        request = pb.SnapshotTableRequest(table=table or "", path=path, overwrite=overwrite)
        response = await self._invoke(self._admin.SnapshotTable, request, timeout)
        return _table_of(response), response.version

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of `service` ("" for the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _status_name(await self._invoke(self._health.Check, request, timeout))

    async def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
