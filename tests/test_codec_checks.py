"""Every check of the wire codec, one at a time, with the exact message a caller reads.

The server-level tests reach these checks through real calls; here each branch is pinned
at the codec itself, values and messages both (the messages are the service's contract:
they name the field, the number and the fix). Written against mutation testing's
survivors (`make mutate MODULE=codec`): each test below failed against at least one
planted bug that every other test let through.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from embedding_client import codec
from embedding_client.proto import embedding_pb2 as pb

from .conftest import exactly


def refused(message: str) -> pytest.RaisesExc[codec.WireError]:
    """Expect a WireError whose message is exactly `message`."""
    return pytest.raises(codec.WireError, match=exactly(message))


def ids_request(ids: list[int], **fields: Any) -> pb.LookupRequest:
    return pb.LookupRequest(ids=np.asarray(ids, dtype="<i8").tobytes(), **fields)


# ----------------------------------------------------------------------------- dtypes


def test_dtype_names_and_wire_values_map_both_ways() -> None:
    wire = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16}
    for name, value in wire.items():
        assert codec.dtype_to_wire(name) == value
        assert codec.dtype_name(value) == name
        assert codec.storage_dtype_to_wire(name) == value
        assert codec.storage_dtype_name(value) == name
    assert codec.storage_dtype_to_wire("int8") == pb.DTYPE_INT8_ROWWISE
    assert codec.storage_dtype_name(pb.DTYPE_INT8_ROWWISE) == "int8"
    assert codec.dtype_name(pb.DTYPE_UNSPECIFIED) == "float32"
    assert codec.numpy_dtype(pb.DTYPE_UNSPECIFIED) == np.dtype("<f4")
    assert codec.numpy_dtype(pb.DTYPE_FLOAT16) == np.dtype("<f2")
    assert codec.numpy_dtype(pb.DTYPE_BFLOAT16) == np.dtype(ml_dtypes.bfloat16)


def test_dtype_refusals_say_what_is_accepted() -> None:
    with refused("unknown dtype 'int8': expected one of float32, float16, bfloat16"):
        codec.dtype_to_wire("int8")
    with refused(
        "int8 is a storage type (row-wise quantized tables); vectors come back as "
        "float32, float16, bfloat16"
    ):
        codec.dtype_name(pb.DTYPE_INT8_ROWWISE)
    with refused(
        "unknown dtype enum value 99: expected one of 1 (float32), 2 (float16), 3 (bfloat16)"
    ):
        codec.dtype_name(99)


# -------------------------------------------------------------------------------- ids


def test_id_arrays_keep_their_values_shape_and_become_int64() -> None:
    unsigned = codec.as_id_array(np.array([0, 2**63 - 1], dtype=np.uint64))
    assert unsigned.dtype == np.dtype("<i8") and unsigned.tolist() == [0, 2**63 - 1]
    empty = codec.as_id_array([])
    assert empty.dtype == np.dtype("<i8") and empty.shape == (0,)
    no_rows = codec.as_id_array(np.zeros((0, 2)))  # empty float arrays: numpy's default
    assert no_rows.dtype == np.dtype("<i8") and no_rows.shape == (0, 2)
    scalar = codec.as_id_array(np.int32(7))
    assert scalar.shape == () and int(scalar) == 7
    strided = codec.as_id_array(np.arange(12).reshape(3, 4)[:, ::2])
    assert strided.flags.c_contiguous and strided.tolist() == [[0, 2], [4, 6], [8, 10]]
    deepest = np.zeros((1,) * codec.MAX_ID_DIMS, dtype=np.int64)
    assert codec.as_id_array(deepest).shape == deepest.shape


def test_id_array_refusals() -> None:
    with refused("ids must fit in int64"):
        codec.as_id_array(np.array([1, 2**63], dtype=np.uint64))
    with refused("ids must be integers, got dtype float64"):
        codec.as_id_array([0.5])
    with refused("ids must be integers, got dtype bool"):
        codec.as_id_array([True])
    with refused("ids have 17 dimensions; at most 16 are supported"):
        codec.as_id_array(np.zeros((1,) * 17, dtype=np.int64))
    # A tensor is read through torch (numpy cannot read one that requires grad).
    with refused("ids must be integers, got dtype float32"):
        codec.as_id_array(torch.tensor([1.0, 2.0], requires_grad=True))
    with refused("ids must be integers, got dtype float32"):  # a class of a torch submodule
        codec.as_id_array(torch.nn.Parameter(torch.tensor([1.0, 2.0])))
    with pytest.raises(codec.WireError, match=r"^ids must form a rectangular array: "):
        codec.as_id_array([[1, 2], [3]])


def test_id_count_counts_either_id_field_without_decoding() -> None:
    assert repr(codec.id_count(ids_request([5, 6, 7]))) == "3"  # an int: it goes into messages
    assert codec.id_count(pb.LookupRequest(ids_list=[1, 2])) == 2
    assert codec.id_count(pb.LookupRequest()) == 0


def test_decoded_ids_keep_their_shape_and_refusals_name_the_numbers() -> None:
    assert codec.decode_ids(
        ids_request([1, 2, 3, 4], ids_shape=pb.Shape(dims=[2, 2]))
    ).tolist() == [
        [1, 2],
        [3, 4],
    ]
    scalar = codec.decode_ids(ids_request([9], ids_shape=pb.Shape()))
    assert scalar.shape == () and int(scalar) == 9
    deepest = codec.decode_ids(ids_request([9], ids_shape=pb.Shape(dims=[1] * 16)))
    assert deepest.shape == (1,) * 16
    empty = codec.decode_ids(pb.LookupRequest(ids_shape=pb.Shape(dims=[0, 3])))
    assert empty.shape == (0, 3) and empty.dtype == np.dtype("<i8")
    assert codec.decode_ids(pb.LookupRequest()).dtype == np.dtype("<i8")
    with refused("set either ids (bytes) or ids_list, not both"):
        codec.decode_ids(ids_request([1], ids_list=[1]))
    with refused("ids is 12 bytes, not a multiple of 8 (ids are little-endian int64)"):
        codec.decode_ids(pb.LookupRequest(ids=b"\x00" * 12))
    with refused("ids_shape has 17 dims; at most 16 are supported"):
        codec.decode_ids(pb.LookupRequest(ids_shape=pb.Shape(dims=[1] * 17)))
    with refused("ids_shape [2, -1] has a negative dimension"):
        codec.decode_ids(ids_request([1, 2], ids_shape=pb.Shape(dims=[2, -1])))
    with refused("ids_shape [0, -1] has a negative dimension"):
        codec.decode_ids(pb.LookupRequest(ids_shape=pb.Shape(dims=[0, -1])))
    with refused("ids_shape [3, 2] holds 6 ids but 4 were sent"):
        codec.decode_ids(ids_request([1, 2, 3, 4], ids_shape=pb.Shape(dims=[3, 2])))


# --------------------------------------------------------------------- pooled requests


def test_a_pooled_request_carries_its_bags_fields() -> None:
    request = codec.encode_lookup_request(
        [1, 2, 3], "t", "float16", pooling="sum", offsets=[0, 2], weights=[0.5, 1.0, 2.0],
        padding_id=0,
    )  # fmt: skip
    assert request.pooling == pb.POOLING_SUM and list(request.offsets) == [0, 2]
    assert not request.lengths and request.HasField("padding_id") and request.padding_id == 0
    assert np.frombuffer(request.per_id_weights, "<f4").tolist() == [0.5, 1.0, 2.0]
    assert list(request.ids_shape.dims) == [3] and request.dtype == pb.DTYPE_FLOAT16
    assert request.table == "t"
    by_lengths = codec.encode_lookup_request(
        [1, 2, 3], None, "float32", pooling="max", lengths=[1, 2]
    )
    assert by_lengths.pooling == pb.POOLING_MAX and list(by_lengths.lengths) == [1, 2]
    assert not by_lengths.offsets and not by_lengths.per_id_weights
    assert not by_lengths.HasField("padding_id") and by_lengths.table == ""
    columns = codec.encode_lookup_request(
        [1, 2, 3], None, "float32", pooling="sum", offsets=np.array([[0], [1]]), weights=[[1, 2, 3]]
    )  # bag fields of any shape are flattened
    assert list(columns.offsets) == [0, 1]
    assert np.frombuffer(columns.per_id_weights, "<f4").tolist() == [1, 2, 3]
    lengths = codec.encode_lookup_request([1, 2], None, "float32", pooling="sum", lengths=[[1, 1]])
    assert list(lengths.lengths) == [1, 1]
    mean = codec.encode_lookup_request([[1, 2]], None, "float32", pooling="mean")
    assert mean.pooling == pb.POOLING_MEAN and list(mean.ids_shape.dims) == [1, 2]
    scalar = codec.encode_lookup_request(3, None, "float32")
    assert scalar.HasField("ids_shape") and list(scalar.ids_shape.dims) == []
    assert codec.decode_bags(scalar, codec.decode_ids(scalar)) is None


def test_pooled_request_refusals_on_the_client() -> None:
    for field in ("offsets", "lengths", "weights"):
        with refused("offsets, lengths and weights describe bags: give pooling too"):
            codec.encode_lookup_request([1, 2], None, "float32", **{field: [0]})  # type: ignore[arg-type]
    with refused("unknown pooling 'median': expected one of sum, mean, max"):
        codec.encode_lookup_request([1, 2], None, "float32", pooling="median")


def bags_of(**fields: Any) -> codec.Bags | None:
    ids = fields.pop("ids", [10, 11, 12, 13, 14])
    request = ids_request(ids, **fields)
    return codec.decode_bags(request, codec.decode_ids(request))


def test_bags_from_offsets_lengths_and_the_last_axis() -> None:
    by_offsets = bags_of(pooling=pb.POOLING_SUM, offsets=[0, 2, 2, 5])
    assert by_offsets is not None
    assert (by_offsets.mode, by_offsets.offsets.tolist(), by_offsets.shape) == (
        "sum",
        [0, 2, 2, 5],
        (4,),
    )
    assert by_offsets.offsets.dtype == np.dtype("<i8") and by_offsets.weights is None
    assert by_offsets.count == 4
    by_lengths = bags_of(pooling=pb.POOLING_MEAN, lengths=[2, 0, 3])
    assert by_lengths is not None
    assert (by_lengths.mode, by_lengths.offsets.tolist(), by_lengths.shape) == (
        "mean",
        [0, 2, 2],
        (3,),
    )
    assert by_lengths.offsets.dtype == np.dtype("<i8")
    one_bag = bags_of(pooling=pb.POOLING_MAX, lengths=[5])
    assert one_bag is not None and one_bag.offsets.tolist() == [0] and one_bag.mode == "max"
    grid = bags_of(ids=list(range(12)), ids_shape=pb.Shape(dims=[2, 3, 2]), pooling=pb.POOLING_MAX)
    assert grid is not None
    assert (grid.offsets.tolist(), grid.shape, grid.count) == ([0, 2, 4, 6, 8, 10], (2, 3), 6)
    assert grid.offsets.dtype == np.dtype("<i8")
    row = bags_of(pooling=pb.POOLING_SUM)
    assert row is not None and (row.offsets.tolist(), row.shape) == ([0], ())
    weights = np.array([0.5, 1, 2, 4, 8], "<f4")
    weighted = bags_of(pooling=pb.POOLING_SUM, lengths=[5], per_id_weights=weights.tobytes())
    assert weighted is not None and weighted.weights is not None
    assert weighted.weights.tolist() == weights.tolist()


NEEDS_POOLING = "offsets, lengths and per_id_weights need pooling SUM, MEAN or MAX"


def f4(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


def test_bag_refusals_name_the_field_the_position_and_the_numbers() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"offsets": [0]}, NEEDS_POOLING),
        ({"lengths": [5]}, NEEDS_POOLING),
        ({"per_id_weights": b"\x00" * 20}, NEEDS_POOLING),
        (
            {"pooling": 7},
            "unknown pooling enum value 7: expected 0 (none), 1 (sum), 2 (mean) or 3 (max)",
        ),
        ({"pooling": 1, "offsets": [0], "lengths": [5]}, "set either offsets or lengths, not both"),
        ({"pooling": 1, "offsets": [1, 2]}, "offsets must start at 0, got 1"),
        (
            {"pooling": 1, "offsets": [0, 3, 2, 4]},
            "offsets must not decrease: offsets[2] = 2 < offsets[1] = 3",
        ),
        ({"pooling": 1, "offsets": [0, 6]}, "offsets[1] = 6 is past the 5 ids"),
        ({"pooling": 1, "offsets": [0, 2, 6]}, "offsets[2] = 6 is past the 5 ids"),
        ({"pooling": 1, "lengths": [2, -1, 4]}, "lengths[1] = -1 is negative"),
        ({"pooling": 1, "lengths": [2, 0, -3, 6]}, "lengths[2] = -3 is negative"),
        ({"pooling": 1, "lengths": [0, 6]}, "lengths[1] = 6 is more than the 5 ids sent"),
        ({"pooling": 1, "lengths": [5, 6]}, "lengths[1] = 6 is more than the 5 ids sent"),
        ({"pooling": 1, "lengths": [2, 2]}, "lengths add up to 4 but 5 ids were sent"),
        ({"pooling": 1, "lengths": [2, 2, 2]}, "lengths add up to 6 but 5 ids were sent"),
        (
            {"pooling": 1, "offsets": [0], "ids_shape": pb.Shape(dims=[5, 1])},
            "offsets and lengths need 1-D ids; the ids have shape [5, 1]",
        ),
        (
            {"pooling": 1, "lengths": [1], "ids": [4], "ids_shape": pb.Shape()},
            "offsets and lengths need 1-D ids; the ids have shape []",
        ),
        (
            {"pooling": 2, "ids": [4], "ids_shape": pb.Shape()},
            "a pooled lookup needs bags: offsets, lengths, or ids of 1+ axes",
        ),
        (
            {"pooling": 3, "lengths": [5], "per_id_weights": b"\x00" * 20},
            "per-id weights need pooling SUM (as torch's embedding_bag), not MAX",
        ),
        (
            {"pooling": 2, "lengths": [5], "per_id_weights": b"\x00" * 20},
            "per-id weights need pooling SUM (as torch's embedding_bag), not MEAN",
        ),
        (
            {"pooling": 1, "lengths": [5], "per_id_weights": b"\x00" * 16},
            "per_id_weights is 16 bytes; 5 ids need 20 (one little-endian float32 each)",
        ),
        (
            {"pooling": 1, "lengths": [5], "per_id_weights": f4(1, 1, np.inf, 1, 1)},
            "per_id_weights must be finite",
        ),
        (
            {"pooling": 1, "lengths": [5], "per_id_weights": f4(1, np.nan, 1, 1, 1)},
            "per_id_weights must be finite",
        ),
    ]
    for fields, message in cases:
        with refused(message):
            bags_of(**fields)


def test_offsets_at_the_id_count_are_trailing_empty_bags() -> None:
    bags = bags_of(pooling=pb.POOLING_SUM, offsets=[0, 5, 5])
    assert bags is not None and bags.offsets.tolist() == [0, 5, 5]


# ------------------------------------------------------------------------- row updates


def test_row_updates_round_trip_in_each_dtype() -> None:
    ids = [4, 0, 7]
    for values, wire in [
        (np.arange(6, dtype=np.float32).reshape(3, 2), pb.DTYPE_FLOAT32),
        (np.arange(6, dtype=np.float16).reshape(3, 2), pb.DTYPE_FLOAT16),
        (
            np.arange(6, dtype=np.float32).reshape(3, 2).astype(ml_dtypes.bfloat16),
            pb.DTYPE_BFLOAT16,
        ),
        (np.arange(6, dtype=np.float64).reshape(3, 2), pb.DTYPE_FLOAT32),
        (np.arange(6, dtype=np.float32).reshape(2, 3).T, pb.DTYPE_FLOAT32),
    ]:
        request = codec.encode_update_rows(ids, values, "t")
        assert request.dtype == wire and request.table == "t"
        assert np.frombuffer(request.ids, "<i8").tolist() == ids
        back_ids, rows = codec.decode_update_rows(request, 2)
        assert back_ids.tolist() == ids and rows.shape == (3, 2)
        np.testing.assert_array_equal(rows.astype(np.float64), np.asarray(values, np.float64))
    assert codec.encode_update_rows([1], np.zeros((1, 2), np.float32), None).table == ""


def test_row_update_refusals() -> None:
    cases: list[tuple[Any, Any, str]] = [
        ([1, 2], np.zeros((2,)), "ids shape [2], vectors shape [2]"),
        ([[1, 2]], np.zeros((2, 4)), "ids shape [1, 2], vectors shape [2, 4]"),
        ([1, 2], np.zeros((3, 4)), "ids shape [2], vectors shape [3, 4]"),
    ]
    for ids, values, shapes in cases:
        with refused(f"give 1-D ids and one row per id: {shapes}"):
            codec.encode_update_rows(ids, values, None)
    with refused("ids is 9 bytes, not a multiple of 8"):
        codec.decode_update_rows(pb.UpdateRowsRequest(ids=b"\x00" * 9), 2)
    short = pb.UpdateRowsRequest(ids=b"\x00" * 16, vectors=b"\x00" * 12, dtype=pb.DTYPE_FLOAT16)
    with refused("vectors is 12 bytes; 2 rows of dim 4 in float16 need 16"):
        codec.decode_update_rows(short, 4)
    with refused("vectors is 12 bytes; 2 rows of dim 2 in float32 need 16"):
        codec.decode_update_rows(pb.UpdateRowsRequest(ids=b"\x00" * 16, vectors=b"\x00" * 12), 2)


# ----------------------------------------------------------------------------- answers


def test_encoded_answers_keep_their_fields() -> None:
    response = codec.encode_lookup_response(b"\x01" * 8, "float16", (2, 2), "t", 7)
    assert (response.dtype, list(response.shape), response.table, response.table_version) == (
        pb.DTYPE_FLOAT16,
        [2, 2],
        "t",
        7,
    )
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    encoded = codec.EncodedLookupResponse(values, "float32", (2, 3), "t", 7)
    assert (encoded.nbytes, encoded.dtype, encoded.shape, encoded.table, encoded.version) == (
        24,
        "float32",
        (2, 3),
        "t",
        7,
    )
    assert bytes(encoded.vectors) == values.tobytes()


@pytest.mark.parametrize(
    "value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32, 2**63 - 1, 2**64 - 1]
)
def test_varints_are_protobufs_own(value: int) -> None:
    # protobuf leaves a zero field out; its varint is one zero byte.
    own = pb.LookupResponse(table_version=value).SerializeToString()[1:] if value else b"\x00"
    assert codec._varint(value) == own
    data = codec._varint(value)
    assert codec._read_varint(memoryview(data), 0) == (value, len(data))


def test_varints_longer_than_ten_bytes_are_refused() -> None:
    with refused("a varint runs past the end of the message"):
        codec._read_varint(memoryview(b"\xff" * 10 + b"\x01"), 0)
    with refused("a varint runs past the end of the message"):
        codec._read_varint(memoryview(b"\xff\xff"), 0)


def test_answer_readers_name_what_is_wrong() -> None:
    with refused("field 1 runs past the end of its message"):
        codec.read_lookup_response(b"\x0a\x05abc")
    with refused("field 1 has wire type 3, which proto3 does not use"):
        codec.read_lookup_response(b"\x0b")
    with refused("a field runs past the end of its message"):
        codec.read_lookup_response(b"\x0a\x01a\x15\x00")  # fixed32 of 1 byte
    with refused("response holds 10 bytes; shape [2, 2] of float32 needs 16"):
        codec.decode_vectors(codec.encode_lookup_response(b"\x00" * 10, "float32", (2, 2), "t", 1))
    # Unknown fields of every wire type, skipped by their sizes: fixed64, fixed32.
    data = b"\xb9\x01" + b"\x01" * 8 + b"\xbd\x01" + b"\x02" * 4 + b"\x28\x05"
    assert codec.read_lookup_response(data).table_version == 5


def test_a_many_answer_reads_each_feature_and_skips_unknown_inner_fields() -> None:
    inner = codec.encode_lookup_response(b"\x00" * 4, "float32", (1, 1), "t", 3)
    message = pb.LookupManyResponse()
    message.results.add(feature="a", result=inner)
    message.results.add(feature="", result=inner)
    data = message.SerializeToString()
    read = codec.read_many_response(data)
    assert [r.feature for r in read.results] == ["a", ""]
    assert [r.result.table_version for r in read.results] == [3, 3]
    assert [r.result.shape for r in read.results] == [(1, 1), (1, 1)]
    # A FeatureResult with fields a newer server might add: a string (3) and a varint (4).
    result = inner.SerializeToString()
    feature = b"\x0a\x01b\x12" + codec._varint(len(result)) + result + b"\x1a\x02zz\x20\x07"
    data = b"\x0a" + codec._varint(len(feature)) + feature
    (read_one,) = codec.read_many_response(data).results
    (parsed,) = pb.LookupManyResponse.FromString(data).results
    assert read_one.feature == parsed.feature == "b"
    assert read_one.result.table_version == parsed.result.table_version == 3
    assert bytes(read_one.result.vectors) == parsed.result.vectors
