"""The wire format: ids in, vectors out, and every malformed message refused."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb


@pytest.mark.parametrize(
    ("ids", "shape"),
    [
        ([0, 2, 1, 2], (4,)),
        ([[0, 1], [2, 3]], (2, 2)),
        (7, ()),
        ([], (0,)),
        (np.arange(6, dtype=np.int32).reshape(2, 3), (2, 3)),
        (np.arange(4, dtype=np.uint16), (4,)),
        (torch.arange(6).reshape(3, 2), (3, 2)),
        (torch.tensor(5), ()),
    ],
)
def test_ids_round_trip_through_a_request(ids: object, shape: tuple[int, ...]) -> None:
    request = pb.LookupRequest.FromString(
        codec.encode_lookup_request(ids, "t", "float32").SerializeToString()
    )
    decoded = codec.decode_ids(request)
    expected = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    assert decoded.shape == shape
    assert decoded.dtype == np.dtype("<i8")
    np.testing.assert_array_equal(decoded, expected.reshape(shape))


def test_ids_travel_as_little_endian_int64_bytes() -> None:
    request = codec.encode_lookup_request([1, 256], None, "float16")
    assert request.ids == (1).to_bytes(8, "little") + (256).to_bytes(8, "little")
    assert request.table == ""
    assert request.dtype == pb.DTYPE_FLOAT16


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0.5, 1.0], "must be integers"),
        (["a"], "must be integers"),
        ([[0, 1], [2]], "rectangular"),
        (np.array([2**64 - 1], dtype=np.uint64), "fit in int64"),
        # Past 64 bits Python ints make an object array: the value is named, not "object".
        ([1, 2**70], f"^ids must fit in int64: {2**70} does not$"),
        ([[1], [-(2**63) - 1]], f"^ids must fit in int64: {-(2**63) - 1} does not$"),
    ],
)
def test_bad_ids_are_refused_before_sending(ids: object, message: str) -> None:
    with pytest.raises(codec.WireError, match=message):
        codec.encode_lookup_request(ids, None, "float32")


def test_unknown_dtype_name_is_refused() -> None:
    with pytest.raises(codec.WireError, match="unknown dtype 'int8'"):
        codec.dtype_to_wire("int8")


def test_unknown_dtype_enum_value_is_refused() -> None:
    with pytest.raises(codec.WireError, match="unknown dtype enum value 99"):
        codec.dtype_name(99)
    assert codec.dtype_name(pb.DTYPE_UNSPECIFIED) == "float32"


def test_ids_list_path_decodes_like_bytes() -> None:
    request = pb.LookupRequest(ids_list=[3, 1, 4, 1, 5, 9], ids_shape=pb.Shape(dims=[2, 3]))
    np.testing.assert_array_equal(codec.decode_ids(request), [[3, 1, 4], [1, 5, 9]])


def test_absent_shape_means_one_dimension() -> None:
    request = pb.LookupRequest(ids=np.arange(5, dtype="<i8").tobytes())
    assert codec.decode_ids(request).shape == (5,)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.LookupRequest(ids=b"\x00" * 12), "12 bytes, not a multiple of 8"),
        (pb.LookupRequest(ids=b"\x00" * 8, ids_list=[1]), "not both"),
        (
            pb.LookupRequest(ids=b"\x00" * 16, ids_shape=pb.Shape(dims=[3])),
            r"holds 3 ids but 2 were sent",
        ),
        (
            pb.LookupRequest(ids=b"\x00" * 16, ids_shape=pb.Shape(dims=[-1, -2])),
            "negative dimension",
        ),
        (
            pb.LookupRequest(ids=b"\x00" * 16, ids_shape=pb.Shape(dims=[2**62, 2**62])),
            "is too large: its nonzero dims span",
        ),
        (  # no ids, and dims numpy cannot even hold: refused, not a ValueError inside
            pb.LookupRequest(ids=b"", ids_shape=pb.Shape(dims=[2**62, 2**62, 0])),
            r"ids_shape \[4611686018427387904, 4611686018427387904, 0\] is too large",
        ),
        (
            pb.LookupRequest(ids=b"", ids_shape=pb.Shape(dims=[2**31, 0])),
            "at most 2147483647",
        ),
        (
            pb.LookupRequest(ids=b"", ids_shape=pb.Shape(dims=[1] * 17)),
            "at most 16",
        ),
    ],
)
def test_malformed_requests_are_refused(request_: pb.LookupRequest, message: str) -> None:
    with pytest.raises(codec.WireError, match=message):
        codec.decode_ids(request_)


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"),
    [("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)],
)
def test_vectors_decode_without_copy(dtype: str, numpy_dtype: type) -> None:
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(numpy_dtype)
    response = codec.encode_lookup_response(values.tobytes(), dtype, (2, 3, 4), "t", 3)
    decoded = codec.decode_vectors(response)
    assert decoded.dtype == np.dtype(numpy_dtype)
    np.testing.assert_array_equal(decoded, values)
    assert not decoded.flags.writeable  # a view of the message bytes, not a copy


@pytest.mark.parametrize(
    ("rows", "dim", "dtype", "version"),
    [
        (3, 4, "float32", 1),
        (0, 8, "float32", 2),  # no vectors: protobuf leaves the field out
        (2, 64, "float16", 0),
        (5, 3, "bfloat16", 2**40),
        (16, 8, "float32", 300),  # a length that needs two varint bytes
        (2048, 128, "float32", 7),  # a 1 MiB field: a three-byte length
        (1, 300, "float16", 1),  # a dim past one varint byte
        (200, 2**21, "float32", 1),  # a three-byte dim, 0-byte table name below
    ],
)
@pytest.mark.parametrize("sequence", [0, 1, 200])
@pytest.mark.parametrize("table", ["table", "", "tâble/ü" * 20])  # empty; UTF-8 past 127 bytes
def test_hand_serialized_lookup_responses_are_protobufs_own_bytes(
    rows: int, dim: int, dtype: str, version: int, sequence: int, table: str
) -> None:
    numpy_dtype = np.dtype("<i2") if dtype == "bfloat16" else np.dtype(dtype)
    if rows * dim > 1 << 20:  # the shape's bytes matter here, not the vectors'
        rows = 0
    values = np.random.default_rng(rows).standard_normal((rows, dim)).astype(numpy_dtype)
    update_seq = (version * 7) % 2**41  # 0 (left out) and one- to six-byte varints
    encoded = codec.EncodedLookupResponse(values, dtype, (rows, dim), table, version, update_seq)
    reference = codec.encode_lookup_response(
        values.tobytes(), dtype, (rows, dim), table, version, update_seq
    )
    assert encoded.SerializeToString() == reference.SerializeToString()
    assert pb.LookupResponse.FromString(encoded.SerializeToString()) == reference
    assert encoded.nbytes == values.nbytes
    stream = codec.EncodedStreamResult(sequence, encoded).SerializeToString()
    expected = pb.LookupStreamResponse(sequence=sequence, result=reference)
    assert stream == expected.SerializeToString()
    np.testing.assert_array_equal(
        codec.decode_vectors(pb.LookupStreamResponse.FromString(stream).result).view(numpy_dtype),
        values,
    )


@pytest.mark.parametrize(
    "features",
    [
        [],
        [("users", 3, 8)],
        [("", 2, 4), ("empty", 0, 8)],  # an empty name and an empty result: both written right
        [(f"C{i}", 1024, 128) for i in range(3)],  # 512 KiB results: three-byte lengths
        [("name" * 40, 1, 2)],  # a 160-byte name: a two-byte length
    ],
)
def test_hand_serialized_many_responses_are_protobufs_own_bytes(
    features: list[tuple[str, int, int]],
) -> None:
    rng = np.random.default_rng(len(features))
    encoded, reference = [], pb.LookupManyResponse()
    for name, rows, dim in features:
        values = rng.standard_normal((rows, dim)).astype(np.float32)
        encoded.append((name, codec.EncodedLookupResponse(values, "float32", (rows, dim), "t", 3)))
        result = codec.encode_lookup_response(values.tobytes(), "float32", (rows, dim), "t", 3)
        reference.results.add(feature=name, result=result)
    data = codec.EncodedManyResponse(encoded).SerializeToString()
    assert data == reference.SerializeToString()
    assert pb.LookupManyResponse.FromString(data) == reference


def test_hand_serialized_vectors_of_a_non_contiguous_array_are_its_rows_in_order() -> None:
    values = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # a strided view
    encoded = codec.EncodedLookupResponse(values, "float32", (4, 3), "t", 1)
    decoded = codec.decode_vectors(pb.LookupResponse.FromString(encoded.SerializeToString()))
    np.testing.assert_array_equal(decoded, values)


def test_vectors_of_the_wrong_length_are_refused() -> None:
    response = codec.encode_lookup_response(b"\x00" * 10, "float32", (2, 2), "t", 1)
    with pytest.raises(codec.WireError, match="needs 16"):
        codec.decode_vectors(response)


_responses = st.builds(
    lambda vectors, dtype, shape, table, version, update_seq: pb.LookupResponse(
        vectors=vectors,
        dtype=dtype,
        shape=shape,
        table=table,
        table_version=version,
        update_seq=update_seq,
    ),
    st.binary(max_size=300),
    st.integers(0, 4),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    st.text(max_size=20),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
# Unknown fields a newer server might send: a varint, a fixed64, a string, a fixed32.
_unknown = st.sampled_from([b"", b"\xb8\x01\x05", b"\xb9\x01" + b"\x01" * 8,
                            b"\xba\x01\x03abc", b"\xbd\x01" + b"\x02" * 4])  # fmt: skip


def _same(read: codec.WireLookupResponse, message: pb.LookupResponse) -> None:
    assert bytes(read.vectors) == message.vectors
    assert (read.dtype, read.shape) == (message.dtype, tuple(message.shape))
    assert (read.table, read.table_version) == (message.table, message.table_version)
    assert read.update_seq == message.update_seq


@given(_responses, _unknown, _unknown)
@settings(max_examples=300, deadline=None)
def test_lookup_answers_read_in_place_match_protobufs_parse(
    message: pb.LookupResponse, before: bytes, after: bytes
) -> None:
    data = before + message.SerializeToString() + after
    _same(codec.read_lookup_response(data), pb.LookupResponse.FromString(data))


@given(st.lists(st.tuples(st.text(max_size=10), _responses), max_size=5), _unknown)
@settings(max_examples=200, deadline=None)
def test_many_answers_read_in_place_match_protobufs_parse(
    results: list[tuple[str, pb.LookupResponse]], unknown: bytes
) -> None:
    message = pb.LookupManyResponse()
    for feature, result in results:
        message.results.add(feature=feature, result=result)
    data = message.SerializeToString() + unknown
    read = codec.read_many_response(data)
    parsed = pb.LookupManyResponse.FromString(data)
    assert [r.feature for r in read.results] == [r.feature for r in parsed.results]
    for mine, theirs in zip(read.results, parsed.results, strict=True):
        _same(mine.result, theirs.result)


def test_an_unpacked_shape_is_read_like_a_packed_one() -> None:
    # shape = 3 written unpacked (key 0x18, one varint per dimension): legal on the wire.
    data = b"\x0a\x04abcd\x10\x01\x18\x02\x18\x01"
    read = codec.read_lookup_response(data)
    assert read.shape == tuple(pb.LookupResponse.FromString(data).shape) == (2, 1)


def test_vectors_read_in_place_are_a_view_of_the_received_bytes() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = codec.EncodedLookupResponse(values, "float32", (3, 4), "t", 9).SerializeToString()
    vectors = codec.decode_vectors(codec.read_lookup_response(data))
    np.testing.assert_array_equal(vectors, values)
    assert not vectors.flags.writeable and np.shares_memory(vectors, np.frombuffer(data, np.uint8))


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x10abc", b"\x0a", b"\x80", b"\x0b", b"\x0a\x05ab\x10"],
)
def test_truncated_or_malformed_answers_are_wire_errors(data: bytes) -> None:
    with pytest.raises(codec.WireError):
        codec.read_lookup_response(data)
