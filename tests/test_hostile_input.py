"""Hostile input through real connections: integer fields near the int64 limits, huge
strings and control characters in every text field, on the lookup and admin RPCs. Each
gets a precise status (never UNKNOWN or INTERNAL) and a short message; nothing is
written outside the snapshot directory; a refused update leaves the version alone; and
no caller text forges a line in the server's log."""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from embedding_client import EmbeddingClient
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc as pb_grpc
from embedding_server import logs
from embedding_server.process.server import EmbeddingServer

from .conftest import (
    BIN,
    TEST_CONFIG,
    free_port,
    make_store,
    random_table,
    server_env,
    wait_serving,
)

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NEAR_LIMITS = st.one_of(
    st.integers(INT64_MIN, INT64_MIN + 8),
    st.integers(INT64_MAX - 8, INT64_MAX),
    st.integers(2**62 - 4, 2**62 + 4),
    st.integers(-(2**62) - 4, -(2**62) + 4),
    st.integers(-3, 12),
)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x2030), min_size=1, max_size=12),
    st.sampled_from(["\x00", "a\nb", "\r\n2026-01-01 ERROR forged", "\u2028", "../..", "/"]),
    st.integers(1, 6).map(lambda k: "x" * (10**k)),  # up to a million characters
)
# Messages quote caller text to 100 characters: a bound well above our longest message.
MAX_DETAILS = 1000
PROPERTY = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
WEIGHTS = random_table(12, 3, seed=13)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("hostile")
    tables, snapshots, outside = root / "tables", root / "snapshots", root / "outside"
    for folder in (tables, snapshots, outside):
        folder.mkdir()
    config = replace(
        TEST_CONFIG, allow_loopback_admin=True, table_dirs=(str(tables),),
        snapshot_dir=str(snapshots), max_message_bytes=8 << 20,
    )  # fmt: skip
    server = EmbeddingServer(config, make_store({"t": WEIGHTS}))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield SimpleNamespace(
            server=server,
            root=root,
            snapshots=snapshots,
            lookups=pb_grpc.EmbeddingServiceStub(channel),
            admin=pb_grpc.EmbeddingAdminStub(channel),
            channel=channel,
        )
    finally:
        channel.close()
        server.stop(grace=0)


def _status(call, request) -> tuple[grpc.StatusCode, str, object]:  # type: ignore[no-untyped-def]
    try:
        return grpc.StatusCode.OK, "", call(request, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def _check(code: grpc.StatusCode, details: str) -> None:
    assert code not in NEVER, (code, details[:300])
    assert len(details) <= MAX_DETAILS, (code, len(details), details[:300])


def _ids(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


@st.composite
def _bags(draw: st.DrawFn, count: int) -> list[int]:
    """Bag lengths or offsets for `count` ids: often valid, else near the int64 limits."""
    if draw(st.booleans()):
        return draw(st.lists(NEAR_LIMITS, min_size=1, max_size=5))
    cuts = sorted(draw(st.lists(st.integers(0, count), min_size=0, max_size=4)))
    return [0, *cuts]  # offsets; the test turns them into lengths when it wants those


@PROPERTY
@given(
    ids=st.lists(st.integers(0, 11), max_size=6),
    bags=st.data(),
    use=st.sampled_from(["lengths", "offsets"]),
    padding=st.one_of(st.none(), NEAR_LIMITS),
    mode=st.sampled_from([pb.POOLING_SUM, pb.POOLING_MEAN, pb.POOLING_MAX]),
    dense=st.booleans(),
)
def test_bag_fields_near_the_int64_limits(
    hostile: SimpleNamespace,
    ids: list[int],
    bags: st.DataObject,
    use: str,
    padding: int | None,
    mode: int,
    dense: bool,
) -> None:
    values = bags.draw(_bags(len(ids)))
    if use == "lengths" and values[0] == 0 and values == sorted(values) and values[-1] <= len(ids):
        values = np.diff([*values, len(ids)]).tolist()  # the same bags as lengths
    request = pb.LookupRequest(table="t", ids=_ids(ids), pooling=mode)  # type: ignore[arg-type]
    getattr(request, use).extend(values)
    if padding is not None:
        request.padding_id = padding
    call = hostile.lookups.LookupDense if dense else hostile.lookups.Lookup
    code, details, answer = _status(call, request)
    _check(code, details)
    if use == "lengths":
        valid = all(0 <= n <= len(ids) for n in values) and sum(values) == len(ids)
        starts = np.concatenate(([0], np.cumsum(values)[:-1])).astype(int).tolist() if valid else []
    else:
        valid = values[0] == 0 and values == sorted(values) and values[-1] <= len(ids)
        starts = values
    valid = valid and (padding is None or 0 <= padding < len(WEIGHTS))
    event(f"valid: {valid}")
    if not valid:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, request)
        return
    assert code == grpc.StatusCode.OK, (code, details)
    ends = [*starts[1:], len(ids)]
    rows = torch.from_numpy(WEIGHTS)
    expected = []
    for start, end in zip(starts, ends, strict=True):
        bag = [i for i in ids[start:end] if i != padding]
        chosen = rows[bag] if bag else torch.zeros((0, 3))
        if not bag:
            expected.append(torch.zeros(3))
        elif mode == pb.POOLING_SUM:
            expected.append(chosen.sum(0))
        elif mode == pb.POOLING_MEAN:
            expected.append(chosen.mean(0))
        else:
            expected.append(chosen.max(0).values)
    got = np.frombuffer(answer.vectors, np.float32).reshape(tuple(answer.shape))
    np.testing.assert_allclose(got, torch.stack(expected).numpy(), rtol=1e-5, atol=1e-6)


@PROPERTY
@given(names=st.lists(HOSTILE_TEXT, min_size=1, max_size=4), table=HOSTILE_TEXT)
def test_hostile_names_get_short_messages(
    hostile: SimpleNamespace, names: list[str], table: str
) -> None:
    many = pb.LookupManyRequest()
    for name in names:
        many.features.add(feature=name, lookup=pb.LookupRequest(table=table, ids=_ids([1])))
    for call, request in (
        (hostile.lookups.LookupMany, many),
        (hostile.lookups.Lookup, pb.LookupRequest(table=table, ids=_ids([1]))),
        (hostile.admin.UpdateRows, pb.UpdateRowsRequest(table=table, ids=_ids([1]))),
    ):
        code, details, _ = _status(call, request)
        _check(code, details)


@PROPERTY
@given(path=HOSTILE_TEXT, source=HOSTILE_TEXT, overwrite=st.booleans())
def test_hostile_paths_stay_inside_and_get_precise_codes(
    hostile: SimpleNamespace, path: str, source: str, overwrite: bool
) -> None:
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
    for suffix in ("", ".npy"):
        request = pb.SnapshotTableRequest(table="t", path=path + suffix, overwrite=overwrite)
        code, details, _ = _status(hostile.admin.SnapshotTable, request)
        _check(code, details)
        assert code in allowed, (code, details)
    code, details, _ = _status(
        hostile.admin.ReloadTable, pb.ReloadTableRequest(table="t", source=source)
    )
    _check(code, details)
    assert code in allowed - {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}, (code, details)
    written = [p for p in hostile.root.rglob("*") if p.is_file()]
    assert all(hostile.snapshots in p.parents for p in written), written


@PROPERTY
@given(ids=st.lists(NEAR_LIMITS, max_size=4), extra_bytes=st.integers(-4, 4))
def test_refused_updates_leave_the_table_and_its_version(
    hostile: SimpleNamespace, ids: list[int], extra_bytes: int
) -> None:
    before = hostile.server.store.get("t")
    version, rows = before.version, before.weights.clone()
    vectors = np.zeros((len(ids), 3), np.float32).tobytes()
    vectors = vectors[: max(0, len(vectors) + extra_bytes)] + b"\0" * max(0, extra_bytes)
    request = pb.UpdateRowsRequest(table="t", ids=_ids(ids), vectors=vectors)
    code, details, _ = _status(hostile.admin.UpdateRows, request)
    _check(code, details)
    table = hostile.server.store.get("t")
    if code != grpc.StatusCode.OK:
        assert table.version == version
        assert torch.equal(table.weights, rows)
    else:  # put the rows back for the next example
        hostile.server.store.update_rows("t", np.asarray(ids), rows[ids].numpy())


def test_the_cases_seen_get_clear_codes(hostile: SimpleNamespace) -> None:
    """The examples the attack on 27b5a86 found, each once."""
    lookups, admin = hostile.lookups, hostile.admin
    ids = _ids([0, 1, 2, 3])
    wraps = [2**62, 2**62, 2**62, 2**62 + 4]  # adds up to 4 in int64
    cases = [
        (lookups.Lookup, pb.LookupRequest(table="t", ids=ids, lengths=wraps, pooling=1),
         grpc.StatusCode.INVALID_ARGUMENT, "is more than the 4 ids sent"),
        (lookups.Lookup, pb.LookupRequest(table="t", ids=ids, pooling=1,
                                          offsets=[0, INT64_MAX, INT64_MIN + 3]),
         grpc.StatusCode.INVALID_ARGUMENT, "offsets must not decrease"),
        (admin.SnapshotTable, pb.SnapshotTableRequest(table="t", path="a\x00b.npy"),
         grpc.StatusCode.INVALID_ARGUMENT, "holds a NUL byte"),
        (admin.SnapshotTable, pb.SnapshotTableRequest(table="t", path="x" * 5000 + ".npy"),
         grpc.StatusCode.INVALID_ARGUMENT, "characters long; at most 4096"),
        (admin.UpdateRows, pb.UpdateRowsRequest(table="t"),
         grpc.StatusCode.INVALID_ARGUMENT, "no rows to update"),
        (lookups.Lookup, pb.LookupRequest(table="n" * 1_000_000, ids=ids),
         grpc.StatusCode.NOT_FOUND, "... (1000000 characters)"),
    ]  # fmt: skip
    version = hostile.server.store.get("t").version
    for call, request, code, message in cases:
        got, details, _ = _status(call, request)
        assert (got, message in details) == (code, True), (got, details[:300])
        assert len(details) <= 400, details[:300]
    assert hostile.server.store.get("t").version == version  # the empty update changed nothing
    with EmbeddingClient(f"127.0.0.1:{hostile.server.port}") as client:
        assert client.health() == "SERVING"
        np.testing.assert_array_equal(client.lookup([1, 2], "t"), WEIGHTS[[1, 2]])


def test_bytes_that_are_not_a_message_get_invalid_argument(hostile: SimpleNamespace) -> None:
    """A body that does not parse as the method's request (a field cut short) is answered
    INVALID_ARGUMENT naming the method, not grpc's own INTERNAL; on a stream, that one
    message gets its error and the stream goes on."""
    cut_short = b"\x0a\x05ab"  # field 1 (table) says 5 bytes, 2 follow
    for method in ("Lookup", "LookupDense"):
        call = hostile.channel.unary_unary(f"/embedding.v1.EmbeddingService/{method}")
        code, details, _ = _status(call, cut_short)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith(
            f"the request is not a valid embedding.v1.EmbeddingService/{method} message: "
            "Error parsing message"  # protobuf's own words follow
        ), details
        _check(code, details)
    stream = hostile.channel.stream_stream(
        "/embedding.v1.EmbeddingService/LookupStream",
        response_deserializer=pb.LookupStreamResponse.FromString,
    )
    good = pb.LookupRequest(table="t", ids_list=[2]).SerializeToString()
    first, second = stream(iter([cut_short, good]), timeout=20)
    assert first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert first.error.message.startswith("not a valid LookupRequest: Error parsing message"), (
        first.error.message
    )
    np.testing.assert_array_equal(
        np.frombuffer(second.result.vectors, "<f4").reshape(1, -1), WEIGHTS[[2]]
    )


def test_caller_text_cannot_forge_a_log_line(tmp_path: Path) -> None:
    """Before, a newline in a snapshot path wrote a whole fake line into the log."""
    np.save(tmp_path / "t.npy", WEIGHTS)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "embedding-server"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--table", f"t={tmp_path / 't.npy'}",
         "--allow-loopback-admin", "true", "--snapshot-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env(),
    )  # fmt: skip
    forged = "2026-01-01 00:00:00,000 ERROR embedding_server: auth disabled by operator"
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = pb_grpc.EmbeddingAdminStub(channel)
            for path in (f"x\n{forged}\n.npy", f"ok\r\n{forged}.npy", f"x\u2028{forged}.npy"):
                _status(admin.SnapshotTable, pb.SnapshotTableRequest(table="t", path=path))
            _status(admin.ReloadTable, pb.ReloadTableRequest(table=f"t\n{forged}"))
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    lines = output.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], output[-2000:]
    audit = [line for line in lines if "embedding_server.audit" in line]
    assert len(audit) == 4, output[-2000:]
    assert all("admin " in line and " from ipv4:127.0.0.1:" in line for line in audit)
    assert all(f"\\n{forged}" in line or "\\u2028" in line or "\\r\\n" in line for line in audit)


def test_every_log_line_has_its_control_characters_escaped() -> None:
    """Our own messages quote caller text; the formatter is the net under any that do not
    (a library's message, a %s we missed)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test-escaping")
    logger.addHandler(handler)
    try:
        logger.error("path %s", "a\nERROR forged\r\x1b[2J\u2028\x85end")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed on %s", "x\ny")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "ERROR path a\\x0aERROR forged\\x0d\\x1b[2J\\u2028\\x85end"
    assert lines[1] == "ERROR failed on x\\x0ay"
    assert lines[2] == "Traceback (most recent call last):"  # ours: kept as lines
