"""The wire format, shared by client and server: ids and vectors <-> protobuf bytes.

Ids travel as raw little-endian int64 (or a packed repeated int64), vectors as one
raw row-major buffer with its dtype and shape. Everything here is numpy-only, so
the client never needs torch, and both sides agree on bytes, dtypes and shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from embedding_client.proto import embedding_pb2 as pb

ID_DTYPE = np.dtype("<i8")
MAX_ID_DIMS = 16
# The most cells a shape of ids may span, counting only its nonzero dims: far above any
# message (1 GiB holds 2^27 ids), and where numpy, and any count made from the shape
# (bags over its last axis), stays an ordinary integer. A shape of 0 ids with huge dims
# ([2^62, 2^62, 0]) is refused here, before anything is sized from it.
MAX_SHAPE_CELLS = (1 << 31) - 1

# Wire dtype enum <-> numpy dtype (little-endian). bfloat16 comes from ml_dtypes (the
# numpy extension JAX and TensorFlow use for it), imported on first use only: it takes
# ~0.5-1 s to import, most of a command-line client's start for float32 lookups.
_NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}


@functools.cache
def bfloat16() -> np.dtype[Any]:
    """numpy's bfloat16 (ml_dtypes), imported when first asked for."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


_DTYPE_NAMES: dict[int, str] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
}
DTYPE_NAMES = tuple(_DTYPE_NAMES.values())


class WireError(ValueError):
    """A message that does not follow the wire format (bad bytes, shape or dtype)."""


def dtype_to_wire(name: str) -> pb.DType:
    """Map a dtype name ("float32", "float16", "bfloat16") to its wire enum value."""
    for value, known in _DTYPE_NAMES.items():
        if known == name:
            return cast(pb.DType, value)
    raise WireError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")


STORAGE_ONLY = {"int8": pb.DTYPE_INT8_ROWWISE}


def storage_dtype_to_wire(name: str) -> pb.DType:
    """A table's storage dtype name ("float32", ..., "int8") as its wire enum value."""
    return STORAGE_ONLY[name] if name in STORAGE_ONLY else dtype_to_wire(name)


def storage_dtype_name(value: int) -> str:
    """A TableInfo dtype enum value as its name (the float dtypes, or "int8")."""
    names: dict[int, str] = {v: k for k, v in STORAGE_ONLY.items()}
    return names[value] if value in names else dtype_name(value)


def dtype_name(value: int) -> str:
    """Map a wire dtype enum value to its name; unspecified means float32."""
    if value == pb.DTYPE_UNSPECIFIED:
        return "float32"
    if value in STORAGE_ONLY.values():
        raise WireError(
            "int8 is a storage type (row-wise quantized tables); vectors come back as "
            f"{', '.join(DTYPE_NAMES)}"
        )
    try:
        return _DTYPE_NAMES[value]
    except KeyError:
        raise WireError(
            f"unknown dtype enum value {value}: expected one of "
            + ", ".join(f"{v} ({n})" for v, n in _DTYPE_NAMES.items())
        ) from None


def numpy_dtype(value: int) -> np.dtype[Any]:
    """The numpy dtype of vectors sent with wire dtype `value`."""
    wire = dtype_to_wire(dtype_name(value))
    return bfloat16() if wire == pb.DTYPE_BFLOAT16 else _NUMPY_DTYPES[wire]


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def as_id_array(ids: Any) -> np.ndarray:
    """Turn a list, nested list, numpy array or torch tensor of ints into int64 ids.

    Torch tensors are accepted without importing torch (through `.numpy()`).
    Raises WireError for non-integer or ragged input and for values that do not
    fit in int64.
    """
    if type(ids).__module__.split(".")[0] == "torch":
        ids = ids.detach().cpu().numpy()
    try:
        array = np.asarray(ids)
    except ValueError as exc:  # ragged nested lists
        raise WireError(f"ids must form a rectangular array: {exc}") from None
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(ID_DTYPE)  # np.asarray([]) is float64
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(ID_DTYPE).max:
        raise WireError("ids must fit in int64")
    if array.dtype.kind == "O" and array.size:
        # Python ints past 64 bits make an object array: name the value, not the dtype.
        big = next((v for v in array.flat if isinstance(v, int) and not isinstance(v, bool)
                    and not INT64_MIN <= v <= INT64_MAX), None)  # fmt: skip
        if big is not None:
            raise WireError(f"ids must fit in int64: {big} does not")
    if array.dtype.kind not in "iu":
        raise WireError(f"ids must be integers, got dtype {array.dtype}")
    if array.ndim > MAX_ID_DIMS:
        raise WireError(f"ids have {array.ndim} dimensions; at most {MAX_ID_DIMS} are supported")
    # Not np.ascontiguousarray: it turns a scalar into shape (1,).
    return np.require(array, dtype=ID_DTYPE, requirements="C")


POOLING_MODES = ("sum", "mean", "max")
_POOLING_WIRE = {"sum": pb.POOLING_SUM, "mean": pb.POOLING_MEAN, "max": pb.POOLING_MAX}


@dataclass(frozen=True)
class Bags:
    """How a pooled lookup splits its ids: bag b is flat ids[offsets[b]:offsets[b + 1]]
    (the last one runs to the end), reduced by `mode`, optionally weighting each id."""

    mode: str  # one of POOLING_MODES
    offsets: np.ndarray  # int64, one per bag
    shape: tuple[int, ...]  # the bags' shape: the response is shape + [dim]
    weights: np.ndarray | None = None  # float32, one per id (sum only)

    @property
    def count(self) -> int:
        return len(self.offsets)


def encode_lookup_request(
    ids: Any,
    table: str | None,
    dtype: str,
    *,
    pooling: str | None = None,
    offsets: Any = None,
    lengths: Any = None,
    weights: Any = None,
    padding_id: int | None = None,
) -> pb.LookupRequest:
    """Build a LookupRequest carrying `ids` as raw bytes plus their exact shape; with
    `pooling` ("sum", "mean", "max") a pooled lookup over bags given by `offsets` or
    `lengths` (or the last axis of `ids`), with optional per-id `weights`."""
    array = as_id_array(ids)
    request = pb.LookupRequest(table=table or "", ids=array.tobytes(), dtype=dtype_to_wire(dtype))
    request.ids_shape.SetInParent()  # present even with no dims: a scalar id
    request.ids_shape.dims.extend(array.shape)
    if padding_id is not None:
        request.padding_id = int(padding_id)
    if pooling is None:
        if offsets is not None or lengths is not None or weights is not None:
            raise WireError("offsets, lengths and weights describe bags: give pooling too")
        return request
    if pooling not in _POOLING_WIRE:
        raise WireError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLING_MODES)}")
    request.pooling = _POOLING_WIRE[pooling]
    if offsets is not None:
        request.offsets.extend(as_id_array(offsets).reshape(-1).tolist())
    if lengths is not None:
        request.lengths.extend(as_id_array(lengths).reshape(-1).tolist())
    if weights is not None:
        request.per_id_weights = np.asarray(weights, dtype="<f4").tobytes()  # row-major
    return request


def decode_bags(request: pb.LookupRequest, ids: np.ndarray) -> Bags | None:
    """The bags of a pooled request (None: not pooled), checked against its ids.

    Raises WireError for bag fields without pooling, both offsets and lengths, offsets
    or lengths that do not fit the ids, weights of the wrong size or mode, or an
    unknown pooling value.
    """
    has_bag_fields = bool(request.offsets or request.lengths or request.per_id_weights)
    if request.pooling == pb.POOLING_NONE:
        if has_bag_fields:
            raise WireError("offsets, lengths and per_id_weights need pooling SUM, MEAN or MAX")
        return None
    mode = {v: k for k, v in _POOLING_WIRE.items()}.get(request.pooling)
    if mode is None:
        raise WireError(
            f"unknown pooling enum value {request.pooling}: expected 0 (none), 1 (sum), "
            "2 (mean) or 3 (max)"
        )
    count = ids.size
    if request.offsets and request.lengths:
        raise WireError("set either offsets or lengths, not both")
    if request.offsets or request.lengths:
        if ids.ndim != 1:
            raise WireError(
                f"offsets and lengths need 1-D ids; the ids have shape {list(ids.shape)}"
            )
        offsets = _bag_offsets(request, count)
        shape: tuple[int, ...] = (len(offsets),)
    else:
        if ids.ndim == 0:
            raise WireError("a pooled lookup needs bags: offsets, lengths, or ids of 1+ axes")
        length = ids.shape[-1]
        shape = tuple(ids.shape[:-1])
        offsets = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=ID_DTYPE) * length
    weights = None
    if request.per_id_weights:
        if mode != "sum":
            raise WireError(
                f"per-id weights need pooling SUM (as torch's embedding_bag), not {mode.upper()}"
            )
        if len(request.per_id_weights) != 4 * count:
            raise WireError(
                f"per_id_weights is {len(request.per_id_weights)} bytes; {count} ids need "
                f"{4 * count} (one little-endian float32 each)"
            )
        weights = np.frombuffer(request.per_id_weights, dtype="<f4")
        if not np.isfinite(weights).all():
            raise WireError("per_id_weights must be finite")
    return Bags(mode, offsets, shape, weights)


def _bag_offsets(request: pb.LookupRequest, count: int) -> np.ndarray:
    if request.offsets:
        offsets = np.asarray(request.offsets, dtype=ID_DTYPE)
        if offsets[0] != 0:
            raise WireError(f"offsets must start at 0, got {int(offsets[0])}")
        # Compared, not subtracted: np.diff wraps around near the int64 limits.
        falls = offsets[1:] < offsets[:-1]
        if falls.any():
            at = int(np.flatnonzero(falls)[0]) + 1
            raise WireError(
                f"offsets must not decrease: offsets[{at}] = {int(offsets[at])} "
                f"< offsets[{at - 1}] = {int(offsets[at - 1])}"
            )
        if int(offsets[-1]) > count:
            raise WireError(
                f"offsets[{len(offsets) - 1}] = {int(offsets[-1])} is past the {count} ids"
            )
        return offsets
    lengths = np.asarray(request.lengths, dtype=ID_DTYPE)
    if (lengths < 0).any():
        at = int(np.flatnonzero(lengths < 0)[0])
        raise WireError(f"lengths[{at}] = {int(lengths[at])} is negative")
    if (lengths > count).any():
        # Each at most the id count (< 2^28 in a message under 2 GiB), over fewer than 2^31
        # lengths: the int64 sum below cannot wrap around to the id count.
        at = int(np.flatnonzero(lengths > count)[0])
        raise WireError(f"lengths[{at}] = {int(lengths[at])} is more than the {count} ids sent")
    if int(lengths.sum()) != count:
        raise WireError(f"lengths add up to {int(lengths.sum())} but {count} ids were sent")
    return np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(ID_DTYPE)


def id_count(request: pb.LookupRequest) -> int:
    """How many ids a request carries, without decoding them."""
    return len(request.ids) // ID_DTYPE.itemsize if request.ids else len(request.ids_list)


def decode_ids(request: pb.LookupRequest) -> np.ndarray:
    """The request's ids as an int64 array of their declared shape (zero-copy for bytes).

    Raises WireError for a byte length that is not a multiple of 8, both id fields
    set, or a shape that does not match the number of ids.
    """
    raw = request.ids  # each read of a bytes field copies it: read once
    if raw and request.ids_list:
        raise WireError("set either ids (bytes) or ids_list, not both")
    if raw:
        if len(raw) % ID_DTYPE.itemsize:
            raise WireError(
                f"ids is {len(raw)} bytes, not a multiple of 8 (ids are little-endian int64)"
            )
        flat = np.frombuffer(raw, dtype=ID_DTYPE)
    else:
        flat = np.asarray(request.ids_list, dtype=ID_DTYPE)
    if not request.HasField("ids_shape"):
        return flat
    shape = request.ids_shape.dims
    if len(shape) == 1 and shape[0] == flat.size:
        return flat  # what the client sends for a list of ids: nothing to reshape
    dims = tuple(shape)
    held = shape_ids(dims, "ids_shape")
    if held != flat.size:
        raise WireError(f"ids_shape {list(dims)} holds {held} ids but {flat.size} were sent")
    return flat.reshape(dims)


def shape_ids(dims: tuple[int, ...], what: str) -> int:
    """How many ids the shape `dims` holds; WireError unless it has at most MAX_ID_DIMS
    dims, none negative, spanning at most MAX_SHAPE_CELLS cells over its nonzero dims.
    Messages show a shape only once it is known to be short."""
    if len(dims) > MAX_ID_DIMS:
        raise WireError(f"{what} has {len(dims)} dims; at most {MAX_ID_DIMS} are supported")
    if any(d < 0 for d in dims):
        raise WireError(f"{what} {list(dims)} has a negative dimension")
    cells = 1
    for d in dims:
        cells *= d or 1  # Python ints: no overflow on huge shapes
    if cells > MAX_SHAPE_CELLS:
        raise WireError(
            f"{what} {list(dims)} is too large: its nonzero dims span {cells} cells, at most "
            f"{MAX_SHAPE_CELLS}"
        )
    return 0 if 0 in dims else cells


def bag_count(request: pb.LookupRequest) -> int:
    """How many bags (pooled output vectors) a request asks for, from its fields alone:
    what a server checks against its limits before sizing anything from it (0 when it is
    not pooled). The bags themselves are checked by `decode_bags`."""
    if request.pooling == pb.POOLING_NONE:
        return 0
    if request.offsets or request.lengths:
        return max(len(request.offsets), len(request.lengths))
    if not request.HasField("ids_shape"):
        return 1  # 1-D ids: one bag of them all
    cells = 1
    for d in request.ids_shape.dims[:-1]:
        cells *= d  # Python ints; a shape decode_ids accepted keeps this small
    return cells


def encode_update_rows(ids: Any, vectors: Any, table: str | None) -> pb.UpdateRowsRequest:
    """Build an UpdateRowsRequest: 1-D ids and a [len(ids), dim] array of new rows
    (float32, float16 or bfloat16)."""
    array = as_id_array(ids)
    values = np.asarray(vectors)
    wire = next((v for v, d in _NUMPY_DTYPES.items() if d == values.dtype), None)
    if wire is None and values.dtype.name == "bfloat16":  # only ml_dtypes makes these
        wire = pb.DTYPE_BFLOAT16
    if wire is None:
        values, wire = values.astype("<f4"), pb.DTYPE_FLOAT32
    if values.ndim != 2 or array.ndim != 1 or values.shape[0] != array.size:
        raise WireError(
            f"give 1-D ids and one row per id: ids shape {list(array.shape)}, vectors shape "
            f"{list(values.shape)}"
        )
    return pb.UpdateRowsRequest(
        table=table or "",
        ids=array.tobytes(),
        vectors=np.ascontiguousarray(values).tobytes(),
        dtype=cast(pb.DType, wire),
    )


def decode_update_rows(request: pb.UpdateRowsRequest, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids and the [len(ids), dim] rows of an UpdateRowsRequest for a table of `dim`."""
    raw_ids, raw_vectors = request.ids, request.vectors  # each read copies: read once
    if len(raw_ids) % ID_DTYPE.itemsize:
        raise WireError(f"ids is {len(raw_ids)} bytes, not a multiple of 8")
    ids = np.frombuffer(raw_ids, dtype=ID_DTYPE)
    dtype = numpy_dtype(request.dtype)
    expected = ids.size * dim * dtype.itemsize
    if len(raw_vectors) != expected:
        raise WireError(
            f"vectors is {len(raw_vectors)} bytes; {ids.size} rows of dim {dim} in "
            f"{dtype_name(request.dtype)} need {expected}"
        )
    return ids, np.frombuffer(raw_vectors, dtype=dtype).reshape(ids.size, dim)


def encode_lookup_response(
    vectors: bytes,
    dtype: str,
    shape: tuple[int, ...],
    table: str,
    version: int,
    update_seq: int = 0,
) -> pb.LookupResponse:
    """Wrap raw row-major vector bytes into a LookupResponse."""
    return pb.LookupResponse(
        vectors=vectors,
        dtype=dtype_to_wire(dtype),
        shape=shape,
        table=table,
        table_version=version,
        update_seq=update_seq,
    )


def _varint(value: int) -> bytes:
    if value < _SMALL:
        return _SMALL_VARINTS[value]
    return _encode_varint(value)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Every varint of one or two bytes, made once: the answers' lengths and shapes need a few
# per call.
_SMALL = 1 << 14
_SMALL_VARINTS = [_encode_varint(value) for value in range(_SMALL)]

# Wire keys (field number << 3 | wire type) of the fields serialized by hand below.
_LOOKUP_VECTORS = b"\x0a"  # LookupResponse.vectors = 1, length-delimited
_STREAM_SEQUENCE = b"\x08"  # LookupStreamResponse.sequence = 1, varint
_STREAM_RESULT = b"\x12"  # LookupStreamResponse.result = 2, length-delimited
_MANY_RESULTS = b"\x0a"  # LookupManyResponse.results = 1, length-delimited (repeated)
_FEATURE_NAME = b"\x0a"  # FeatureResult.feature = 1, length-delimited
_FEATURE_RESULT = b"\x12"  # FeatureResult.result = 2, length-delimited


_LOOKUP_DTYPE = b"\x10"  # LookupResponse.dtype = 2, varint
_LOOKUP_SHAPE = b"\x1a"  # LookupResponse.shape = 3, packed (length-delimited)
_LOOKUP_TABLE = b"\x22"  # LookupResponse.table = 4, length-delimited
_LOOKUP_VERSION = b"\x28"  # LookupResponse.table_version = 5, varint
_LOOKUP_UPDATE_SEQ = b"\x30"  # LookupResponse.update_seq = 6, varint


def _lookup_response_tail(
    dtype: str, shape: tuple[int, ...], table: str, version: int, update_seq: int
) -> bytes:
    """LookupResponse's fields after the vectors, as protobuf writes them (in field order,
    proto3 defaults left out; shape dims are never negative), framed by hand: building a
    message to serialize them cost a busy server several microseconds per call."""
    parts = [_DTYPE_FIELDS[dtype]]
    if shape:
        dims = b"".join([_varint(d) for d in shape])
        parts += [_LOOKUP_SHAPE, _varint(len(dims)), dims]
    if table:
        name = table.encode()
        parts += [_LOOKUP_TABLE, _varint(len(name)), name]
    if version:
        parts += [_LOOKUP_VERSION, _varint(version)]
    if update_seq:
        parts += [_LOOKUP_UPDATE_SEQ, _varint(update_seq)]
    return b"".join(parts)


_DTYPE_FIELDS = {name: _LOOKUP_DTYPE + _varint(dtype_to_wire(name)) for name in DTYPE_NAMES}


class EncodedLookupResponse:
    """A LookupResponse whose vectors are a numpy array (straight from the kernel), serialized
    with one copy of them.

    Building a `pb.LookupResponse` copies the vectors into the message and serializing it
    copies them again (at 8 MiB: ~0.6 + ~1 ms here, on top of `tobytes()`). Here the
    vectors field (number 1, so first, as protobuf writes it) is framed by hand and the
    small fields after it are serialized by protobuf: the same bytes protobuf would write
    (tests/test_codec.py checks they are equal). gRPC calls `SerializeToString()`.
    """

    __slots__ = (
        "_tail", "dtype", "nbytes", "shape", "table", "update_seq", "vectors", "version"
    )  # fmt: skip

    def __init__(
        self,
        vectors: np.ndarray,
        dtype: str,
        shape: tuple[int, ...],
        table: str,
        version: int,
        update_seq: int = 0,
    ) -> None:
        # A flat byte view, whatever the dtype (a copy only if not contiguous).
        self.vectors = np.ascontiguousarray(vectors).reshape(-1).view(np.uint8).data
        self.nbytes = self.vectors.nbytes
        self.dtype, self.shape, self.table, self.version = dtype, shape, table, version
        self.update_seq = update_seq
        self._tail = _lookup_response_tail(dtype, shape, table, version, update_seq)

    def _parts(self) -> list[Any]:
        if not self.nbytes:
            return [self._tail]  # protobuf leaves an empty bytes field out
        return [_LOOKUP_VECTORS, _varint(self.nbytes), self.vectors, self._tail]

    def SerializeToString(self) -> bytes:
        return b"".join(self._parts())


class EncodedStreamResult:
    """A LookupStreamResponse carrying an `EncodedLookupResponse`, serialized the same way."""

    __slots__ = ("result", "sequence")

    def __init__(self, sequence: int, result: EncodedLookupResponse) -> None:
        self.sequence = sequence
        self.result = result

    def SerializeToString(self) -> bytes:
        head = [_STREAM_SEQUENCE, _varint(self.sequence)] if self.sequence else []
        return b"".join([*head, *_embedded(_STREAM_RESULT, self.result._parts())])


class EncodedManyResponse:
    """A LookupManyResponse of `EncodedLookupResponse`s, serialized with one copy of all
    their vectors (building the protobuf messages copied them three times: into each
    LookupResponse, into its FeatureResult, into the LookupManyResponse, then once more
    to serialize: ~4 x 13 MB for a ranking call of 26 features x 1,024 ids x 128)."""

    __slots__ = ("nbytes", "results")

    def __init__(self, results: list[tuple[str, EncodedLookupResponse]]) -> None:
        self.results = results
        self.nbytes = sum(result.nbytes for _, result in results)  # of the vectors

    def SerializeToString(self) -> bytes:
        parts: list[Any] = []
        for feature, result in self.results:
            name = feature.encode()
            fields = [_FEATURE_NAME, _varint(len(name)), name] if name else []
            fields += _embedded(_FEATURE_RESULT, result._parts())
            parts += _embedded(_MANY_RESULTS, fields)
        return b"".join(parts)


def _embedded(key: bytes, parts: list[Any]) -> list[Any]:
    """`parts` (bytes, and memoryviews of bytes) framed as the length-delimited field
    `key`: the key, the length, the parts, still unjoined."""
    return [key, _varint(sum(len(part) for part in parts)), *parts]


# ---------------------------------------------------------------- answers read in place
#
# protobuf's parser copies a bytes field into its message, and each read of the field
# copies it again: a 13.6 MB ranking answer (LookupMany) was copied twice more on its way
# to numpy, ~2-12 ms here. The client reads Lookup and LookupMany answers itself instead:
# the small fields are decoded, the vectors stay where gRPC put them (a memoryview), and
# `decode_vectors` makes a numpy view of them. tests/test_codec.py checks these readers
# against protobuf's on random messages, unknown fields and unpacked shapes included.


@dataclass(frozen=True)
class WireLookupResponse:
    """A LookupResponse read from its bytes; `vectors` is a view of them, not a copy."""

    vectors: memoryview
    dtype: int = 0
    shape: tuple[int, ...] = ()
    table: str = ""
    table_version: int = 0
    update_seq: int = 0


@dataclass(frozen=True)
class WireFeatureResult:
    feature: str
    result: WireLookupResponse


@dataclass(frozen=True)
class WireManyResponse:
    results: list[WireFeatureResult]


def read_lookup_response(data: bytes) -> WireLookupResponse:
    """Parse a serialized LookupResponse (a gRPC response deserializer)."""
    view = memoryview(data)
    return _lookup_fields(view, 0, len(view))


def read_many_response(data: bytes) -> WireManyResponse:
    """Parse a serialized LookupManyResponse (a gRPC response deserializer)."""
    view = memoryview(data)
    results = []
    for number, kind, at, size in _fields(view, 0, len(view)):
        if number == 1 and kind == 2:
            feature, result = "", _lookup_fields(view, 0, 0)
            for inner, inner_kind, inner_at, inner_size in _fields(view, at, at + size):
                if inner == 1 and inner_kind == 2:
                    feature = str(view[inner_at : inner_at + inner_size], "utf-8")
                elif inner == 2 and inner_kind == 2:
                    result = _lookup_fields(view, inner_at, inner_at + inner_size)
            results.append(WireFeatureResult(feature, result))
    return WireManyResponse(results)


def _lookup_fields(view: memoryview, start: int, end: int) -> WireLookupResponse:
    vectors, dtype, table, version, update_seq = view[0:0], 0, "", 0, 0
    shape: list[int] = []
    for number, kind, at, size in _fields(view, start, end):
        if number == 1 and kind == 2:
            vectors = view[at : at + size]
        elif number == 2 and kind == 0:
            dtype = at
        elif number == 3 and kind == 2:  # packed, as protobuf writes it
            position = at
            while position < at + size:
                value, position = _read_varint(view, position)
                shape.append(_signed64(value))
        elif number == 3 and kind == 0:  # unpacked: parsers must take both
            shape.append(_signed64(at))
        elif number == 4 and kind == 2:
            table = str(view[at : at + size], "utf-8")
        elif number == 5 and kind == 0:
            version = at
        elif number == 6 and kind == 0:
            update_seq = at
    return WireLookupResponse(vectors, dtype, tuple(shape), table, version, update_seq)


def _fields(view: memoryview, position: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value, 0) for varints, (number, 2, offset, length) for
    length-delimited fields, of the message in view[position:end]; other wire types are
    skipped, as unknown fields must be."""
    while position < end:
        key, position = _read_varint(view, position)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, position = _read_varint(view, position)
            yield number, 0, value, 0
        elif kind == 2:
            size, position = _read_varint(view, position)
            if position + size > end:
                raise WireError(f"field {number} runs past the end of its message")
            yield number, 2, position, size
            position += size
        elif kind in (1, 5):
            position += 8 if kind == 1 else 4
        else:
            raise WireError(f"field {number} has wire type {kind}, which proto3 does not use")
    if position != end:
        raise WireError("a field runs past the end of its message")


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(view) or shift > 63:
            raise WireError("a varint runs past the end of the message")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_vectors(response: pb.LookupResponse | WireLookupResponse) -> np.ndarray:
    """The response's vectors as a read-only numpy view of its bytes (no copy)."""
    dtype = numpy_dtype(response.dtype)
    shape = tuple(response.shape)
    vectors = response.vectors  # each read of a bytes field copies it: read once
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if len(vectors) != expected:
        raise WireError(
            f"response holds {len(vectors)} bytes; shape {list(shape)} of "
            f"{dtype_name(response.dtype)} needs {expected}"
        )
    return np.frombuffer(vectors, dtype=dtype).reshape(shape)
