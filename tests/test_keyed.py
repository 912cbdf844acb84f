"""Keyed tables (issue 31): rows addressed by raw int64 keys. Loaded from .safetensors /
.npz (keys and values) or two .npy files; looked up through real connections by every
RPC and checked against a Python dict model under each missing-key policy; new keys
inserted by UpdateRows up to max_keys, kept by snapshots, counted in the metrics."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import save_file

from embedding_client import EmbeddingClient, EmbeddingError, Feature, Pooling
from embedding_client.proto import grpc_service_pb2_grpc as oip_grpc
from embedding_client.sharded import ShardedClient
from embedding_client.shards import Shard, shard_of
from embedding_server.config import TableSpec, read_table_config
from embedding_server.core import keys as keys_module
from embedding_server.core.keys import KeyIndex
from embedding_server.core.sources import TableLoadError, load_table
from embedding_server.core.store import TableStore
from embedding_server.errors import KeyNotFound, OverLimit
from embedding_server.process.server import EmbeddingServer, newest_snapshot_of
from embedding_server.split import split

from .conftest import ROOT, TEST_CONFIG, Redis, admin_settings, exactly
from .test_inference import infer, output

DIM = 6
CPU = torch.device("cpu")


def keyed_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct keys spread over the whole int64 range (negative ones and both
    ends included) and their vectors."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=count, dtype=np.int64))
    keys = np.concatenate([keys, [-(2**63), 2**63 - 1, 0, -1]])
    keys = np.unique(keys)
    rng.shuffle(keys)
    return keys, rng.standard_normal((keys.size, DIM)).astype(np.float32)


def save_keyed(path: Path, keys: np.ndarray, values: np.ndarray, **extra: np.ndarray) -> Path:
    if path.suffix == ".npz":
        np.savez(path, keys=keys, values=values, **extra)
    else:
        tensors = {"keys": keys, "values": values, **extra}
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                  str(path))  # fmt: skip
    return path


class Model:
    """What a keyed table answers, as a dict of key -> vector."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, missing: str,
                 default: np.ndarray | None = None, skip: bool = True) -> None:  # fmt: skip
        self.rows = {int(k): values[i].copy() for i, k in enumerate(keys)}
        self.missing, self.skip = missing, skip
        self.fill = np.zeros(DIM, np.float32) if default is None else default.astype(np.float32)

    def vector(self, key: int) -> np.ndarray:
        if key in self.rows:
            return self.rows[key]
        assert self.missing != "error"
        return self.fill if self.missing == "default" else np.zeros(DIM, np.float32)

    def lookup(self, keys: np.ndarray, padding: int | None = None) -> np.ndarray:
        flat = [
            np.zeros(DIM, np.float32) if k == padding else self.vector(int(k))
            for k in keys.reshape(-1)
        ]
        return np.array(flat, np.float32).reshape(*keys.shape, DIM)

    def pooled(self, bags: list[np.ndarray], mode: str, padding: int | None = None) -> np.ndarray:
        out = []
        for bag in bags:
            kept = [int(k) for k in bag if k != padding and (int(k) in self.rows or not self.skip)]
            rows = np.array([self.vector(k) for k in kept], np.float64).reshape(-1, DIM)
            if not kept:
                out.append(np.zeros(DIM))
            elif mode == "sum":
                out.append(rows.sum(0))
            elif mode == "mean":
                out.append(rows.mean(0))
            else:
                out.append(rows.max(0))
        return np.array(out, np.float32)


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[Callable[..., EmbeddingServer]]:
    """Start in-process servers of keyed tables loaded from files by `load_table`."""
    servers: list[EmbeddingServer] = []

    def start(specs: list[TableSpec], **overrides: object) -> EmbeddingServer:
        store = TableStore()
        for spec in specs:
            store.add(load_table(spec, CPU))
        settings = {**admin_settings(tmp_path), **overrides}
        server = EmbeddingServer(replace(TEST_CONFIG, **settings), store)
        server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop(grace=0)


def _probe(held: np.ndarray, rng: np.random.Generator, size: int, misses: bool) -> np.ndarray:
    """Keys to look up: held ones, and (when `misses`) random others over the int64 range."""
    picked = rng.choice(held, size=size)
    if misses:
        others = rng.integers(-(2**63), 2**63 - 1, size=size, dtype=np.int64)
        picked = np.where(rng.random(size) < 0.3, others, picked)
    return picked


# ---------------------------------------------------------------------------- the index


def test_the_index_finds_every_key_and_refuses_a_repeated_one() -> None:
    keys, _ = keyed_data(500, seed=1)
    index = KeyIndex.build(keys, capacity=600)
    np.testing.assert_array_equal(index.find(keys), np.arange(keys.size))
    assert index.find(np.array([12345678901234], np.int64))[0] in (-1, *range(keys.size))
    np.testing.assert_array_equal(index.in_row_order(), keys)
    assert (index.fill_row, index.pad_row, index.count) == (600, 601, keys.size)
    repeated = np.array([5, -7, 9, -7, 5], np.int64)
    with pytest.raises(ValueError, match=exactly(
        "key -7 is given twice (rows 1 and 3); keys must be unique"
    )):  # fmt: skip
        KeyIndex.build(repeated, capacity=10)
    with pytest.raises(ValueError, match="3 keys do not fit max_keys 2"):
        KeyIndex.build(np.array([1, 2, 3]), capacity=2)
    with pytest.raises(ValueError, match="must fit int64"):
        KeyIndex.build(np.array([2**63], np.uint64), capacity=2)
    empty = KeyIndex.build(np.array([], np.int64), capacity=3, missing="zeros")
    np.testing.assert_array_equal(empty.find(np.array([[1, 2]])), [[-1, -1]])


def test_the_index_takes_every_fitting_integer_key_and_names_what_it_refuses() -> None:
    """uint64 keys that fit int64 are taken as they are; a key given three times is named
    by its first two rows; an unknown policy is named with the known ones."""
    small = np.array([0, 126, 2**63 - 1], dtype=np.uint64)
    index = KeyIndex.build(small, capacity=3)
    np.testing.assert_array_equal(index.find(np.array([2**63 - 1, 126, 0])), [2, 1, 0])
    with pytest.raises(ValueError, match=exactly("keys must fit int64 (signed 64-bit)")):
        KeyIndex.build(np.array([1, 2**63], np.uint64), capacity=3)
    with pytest.raises(ValueError, match=exactly(
        "key 4 is given twice (rows 0 and 2); keys must be unique"
    )):  # fmt: skip
        KeyIndex.build(np.array([4, 5, 4, 4], np.int64), capacity=4)
    with pytest.raises(ValueError, match=exactly(
        "missing-key policy 'maybe' is not one of error, zeros, default"
    )):  # fmt: skip
        KeyIndex.build(np.array([1]), capacity=1, missing="maybe")


def test_most_keys_sit_at_their_home_slot() -> None:
    """The hash spreads keys over the whole table (at most 0.7 full): about half sit at
    the slot their hash names, most of the rest just past it. A hash that used part of
    the table, or sent every key to one slot, would still answer right, slowly."""
    keys, _ = keyed_data(20_000, seed=26)
    hashed = KeyIndex.build(keys, keys.size).hashed
    assert hashed is not None
    at = np.flatnonzero(hashed.rows >= 0)
    home = hashed._home(hashed.slots[at])
    assert np.mean(home == at) > 0.45  # 0.54 at this load (0.61)
    assert hashed.slots.size <= 2 * keys.size / keys_module.MAX_LOAD


def test_inserting_keys_gives_free_rows_and_stops_at_max_keys() -> None:
    index = KeyIndex.build(np.array([10, -20], np.int64), capacity=4)
    grown, rows = index.with_keys(np.array([-20, 99, 7], np.int64), "t")
    np.testing.assert_array_equal(rows, [1, 2, 3])
    assert grown.count == 4 and index.count == 2  # the old index is left as it was
    np.testing.assert_array_equal(grown.find(np.array([7, 10, 99, -20, 8])), [3, 0, 2, 1, -1])
    same, rows = grown.with_keys(np.array([7]), "t")
    assert same is grown and rows.tolist() == [3]
    with pytest.raises(OverLimit, match=exactly(
        "table 't' holds 4 keys of its max_keys 4; this update adds 1 new keys: raise max_keys "
        "(a reload with the config's max_keys) or update keys it holds"
    )):  # fmt: skip
        grown.with_keys(np.array([1000, 7]), "t")


def test_both_searches_agree_through_inserts_that_grow_the_hash_table() -> None:
    """Batches from HASH_FROM keys up probe the hash table, smaller ones search the sorted
    keys: both give every row, hits and misses, before and after inserts that fill the
    hash table past half and make it build itself again."""
    rng = np.random.default_rng(23)
    keys, _ = keyed_data(40, seed=24)
    index = KeyIndex.build(keys, capacity=5000)
    held = {int(k): r for r, k in enumerate(keys)}
    slots = index.hashed.slots.size  # type: ignore[union-attr]
    for _ in range(8):
        new = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
        index, rows = index.with_keys(new, "t")
        held.update({int(k): int(r) for k, r in zip(new, rows, strict=True)})
        wanted = np.concatenate([np.array(list(held)), rng.integers(-(2**63), 2**63 - 1, 300)])
        rng.shuffle(wanted)
        expected = np.array([held.get(int(k), -1) for k in wanted])
        assert wanted.size >= keys_module.HASH_FROM
        np.testing.assert_array_equal(index.find(wanted), expected)  # the hash
        small = [index.find(part) for part in np.array_split(wanted, wanted.size // 100)]
        np.testing.assert_array_equal(np.concatenate(small), expected)  # the sorted keys
        np.testing.assert_array_equal(index.find(wanted.reshape(-1, 2)), expected.reshape(-1, 2))
    assert index.hashed.slots.size > slots  # type: ignore[union-attr]


def test_a_missing_key_is_refused_with_its_position_or_reads_the_fill_row() -> None:
    held = np.array([4, 8], np.int64)
    keys = np.array([[4, 8], [8, -3]], np.int64)
    with pytest.raises(KeyNotFound, match=exactly(
        "key -3 at position 3 (index [1, 1]) is not in table 't' (2 keys; its missing-key "
        "policy is 'error')"
    )):  # fmt: skip
        KeyIndex.build(held, 2).translate(keys, "t")
    zeros = KeyIndex.build(held, 2, missing="zeros")
    rows, pad, missing = zeros.translate(keys, "t")
    assert rows.tolist() == [[0, 1], [1, 2]] and pad is None and missing == 1
    rows, pad, missing = zeros.translate(keys, "t", pooled=True)
    assert rows.tolist() == [[0, 1], [1, 3]] and pad == 3 and missing == 1
    rows, pad, missing = zeros.translate(keys, "t", padding_key=-3)
    assert rows.tolist() == [[0, 1], [1, 3]] and pad == 3 and missing == 0
    keep = KeyIndex.build(held, 2, missing="default", skip=False)
    rows, pad, missing = keep.translate(keys, "t", pooled=True)
    assert rows.tolist() == [[0, 1], [1, 2]] and pad is None and missing == 1


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_keys_and_values_file_loads_as_a_keyed_table(tmp_path: Path, suffix: str) -> None:
    keys, values = keyed_data(50, seed=2)
    path = save_keyed(tmp_path / f"k{suffix}", keys, values)
    table = load_table(TableSpec("k", path, max_keys=80), CPU)
    assert table.keys is not None and table.keys.count == keys.size
    assert table.rows == 82  # max_keys, the fill row and the pad row
    np.testing.assert_array_equal(table.weights[: keys.size].numpy(), values)
    assert not table.weights[keys.size :].any()
    np.testing.assert_array_equal(table.keys.find(keys), np.arange(keys.size))


def test_a_config_names_keys_beside_values_and_its_policy(tmp_path: Path) -> None:
    keys, values = keyed_data(30, seed=3)
    np.save(tmp_path / "keys.npy", keys)
    np.save(tmp_path / "values.npy", values)
    default = [0.5] * DIM
    config = tmp_path / "tables.toml"
    config.write_text(
        '[[table]]\nname = "k"\nsource = "values.npy"\nkeys = "keys.npy"\n'
        f'missing = "default"\nmax_keys = 40\ndefault = {default}\nbags_skip_missing = false\n'
    )
    (spec,) = read_table_config(config).tables
    assert spec.keys == tmp_path / "keys.npy" and spec.missing == "default"
    assert (spec.max_keys, spec.default, spec.bags_skip_missing) == (40, tuple(default), False)
    table = load_table(spec, CPU)
    assert table.keys is not None and table.keys.missing == "default"
    np.testing.assert_array_equal(table.weights[40].numpy(), default)  # the fill row
    assert not table.weights[41].any()  # the pad row
    for bad, message in [
        ('missing = "maybe"', "missing 'maybe' is not one of error, zeros, default"),
        ("max_keys = 0", "max_keys must be a positive integer"),
        ('default = ["a"]', "default must be a list of numbers"),
        ("bags_skip_missing = 1", "bags_skip_missing must be true or false"),
        ("keys = 3", "keys must be a path"),
    ]:
        config.write_text(f'[[table]]\nname = "k"\nsource = "values.npy"\n{bad}\n')
        with pytest.raises(ValueError, match=f"table 'k': {bad and message}"):
            read_table_config(config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda k, v: (np.concatenate([k, k[3:4]]), np.concatenate([v, v[:1]])),
         "key {k3} is given twice (rows 3 and {n}); keys must be unique"),
        (lambda k, v: (k[:-1], v), "[{n1}] keys for {n} rows of values; a keyed table holds "
         "one int64 key per row"),
        (lambda k, v: (k.astype(np.float64), v), "keys must be a 1-D integer array, got float64"),
    ],
)  # fmt: skip
def test_a_bad_keyed_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, change: Callable[[np.ndarray, np.ndarray], Any], message: str
) -> None:
    keys, values = keyed_data(20, seed=4)
    bad_keys, bad_values = change(keys, values)
    path = save_keyed(tmp_path / "bad.npz", bad_keys, bad_values)
    expected = message.format(k3=keys[3], n=keys.size, n1=keys.size - 1)
    with pytest.raises(TableLoadError, match=f"^table 'k': {re.escape(expected)}"):
        load_table(TableSpec("k", path), CPU)


def test_a_default_policy_needs_a_default_vector_of_the_tables_dim(tmp_path: Path) -> None:
    keys, values = keyed_data(10, seed=5)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    with pytest.raises(TableLoadError, match="missing = 'default' needs a default vector"):
        load_table(TableSpec("k", path, missing="default"), CPU)
    with pytest.raises(
        TableLoadError, match=f"the default vector has 2 values, the table's dim is {DIM}"
    ):
        load_table(TableSpec("k", path, missing="default", default=(1.0, 2.0)), CPU)
    stored = save_keyed(tmp_path / "d.safetensors", keys, values,
                        default=np.full(DIM, 3.0, np.float32))  # fmt: skip
    table = load_table(TableSpec("k", stored, missing="default"), CPU)
    np.testing.assert_array_equal(table.weights[table.keys.fill_row].numpy(), np.full(DIM, 3.0))  # type: ignore[union-attr]
    with pytest.raises(TableLoadError, match=r"a .npz table holds 'keys' \(int64\) and 'values'"):
        np.savez(tmp_path / "rows.npz", weights=values)
        load_table(TableSpec("k", tmp_path / "rows.npz"), CPU)


# ---------------------------------------------------------------------------- served


@pytest.mark.parametrize("missing", ["error", "zeros", "default"])
def test_every_lookup_rpc_answers_as_a_dict_of_keys_would(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer], missing: str
) -> None:
    """Random keys over the whole int64 range, held and not, through Lookup, LookupDense,
    pooled bags (sum, mean, max; ragged), a padding key, LookupMany, LookupStream and
    ModelInfer, against the dict model; under `error` a missing key is NOT_FOUND."""
    keys, values = keyed_data(300, seed=6)
    default = np.linspace(-1, 1, DIM).astype(np.float32)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    spec = TableSpec("k", path, missing=missing, default=tuple(default.tolist()))
    server = keyed_server([spec])
    model = Model(keys, values, missing, default)
    misses = missing != "error"
    rng = np.random.default_rng(7)
    target = f"127.0.0.1:{server.port}"
    with EmbeddingClient(target, max_attempts=1) as client:
        for _ in range(20):
            probe = _probe(keys, rng, int(rng.integers(1, 60)), misses)
            np.testing.assert_array_equal(client.lookup(probe, "k"), model.lookup(probe))
            np.testing.assert_allclose(client.lookup_dense(probe, "k"), model.lookup(probe),
                                       rtol=0, atol=1e-6)  # fmt: skip
            grid = probe[: (probe.size // 3) * 3].reshape(-1, 3)
            if grid.size:
                np.testing.assert_array_equal(client.lookup(grid, "k"), model.lookup(grid))
            lengths = rng.integers(0, 5, size=int(rng.integers(1, 8)))
            flat = _probe(keys, rng, int(lengths.sum()), misses)
            bags = np.split(flat, np.cumsum(lengths)[:-1])
            for mode in ("sum", "mean", "max"):
                got = client.lookup(flat, "k", pooling=Pooling(mode, lengths=lengths))
                np.testing.assert_allclose(got, model.pooled(bags, mode), rtol=1e-5, atol=1e-5)
            pad = int(flat[0]) if flat.size else 0
            got = client.lookup(flat, "k", pooling=Pooling("sum", lengths=lengths), padding_id=pad)
            np.testing.assert_allclose(got, model.pooled(bags, "sum", pad), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(client.lookup(probe, "k", padding_id=int(probe[0])),
                                          model.lookup(probe, int(probe[0])))  # fmt: skip
        big = _probe(keys, rng, 600, misses).reshape(20, 30)  # sorted before the search
        np.testing.assert_array_equal(client.lookup(big, "k"), model.lookup(big))
        probe = _probe(keys, rng, 40, misses)
        many = client.lookup_many({"a": Feature(probe, "k"), "b": Feature(probe[:5], "k")})
        np.testing.assert_array_equal(many["a"].vectors, model.lookup(probe))
        np.testing.assert_array_equal(many["b"].vectors, model.lookup(probe[:5]))
        streamed = [r.vectors for r in client.lookup_stream([probe[:7], probe[7:]], "k")]
        np.testing.assert_array_equal(np.concatenate(streamed), model.lookup(probe))
        with grpc.insecure_channel(target) as channel:
            answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer(probe, "k"))
            np.testing.assert_array_equal(output(answer), model.lookup(probe))
        (info,) = client.tables()
        assert (info.keys, info.max_keys, info.missing_keys) == (keys.size, keys.size, missing)
        assert info.rows == keys.size
        if missing == "error":
            absent = 12345
            assert absent not in model.rows
            probe = np.array([keys[0], keys[1], absent], np.int64)
            with pytest.raises(EmbeddingError, match=exactly(
                f"NOT_FOUND: key {absent} at position 2 is not in table 'k' ({keys.size} keys; "
                "its missing-key policy is 'error')"
            )):  # fmt: skip
                client.lookup(probe, "k")
            with pytest.raises(
                EmbeddingError, match=r"NOT_FOUND: key 12345 at position 1 \(index \[0, 1\]\)"
            ):
                client.lookup([[keys[0], absent]], "k", pooling="sum")


def test_bags_may_pool_the_fill_row_of_missing_keys_instead_of_skipping_them(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer]
) -> None:
    keys, values = keyed_data(40, seed=8)
    default = np.full(DIM, 2.0, np.float32)
    path = save_keyed(tmp_path / "k.npz", keys, values, default=default)
    server = keyed_server([TableSpec("k", path, missing="default", bags_skip_missing=False)])
    model = Model(keys, values, "default", default, skip=False)
    bags = [np.array([keys[0], 77, keys[1]]), np.array([78, 79])]
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        got = client.lookup(np.concatenate(bags), "k", pooling=Pooling("mean", lengths=[3, 2]))
    np.testing.assert_allclose(got, model.pooled(bags, "mean"), rtol=1e-6)
    np.testing.assert_allclose(got[1], default)


def _missing_total(table: str) -> float:
    return REGISTRY.get_sample_value("embedding_missing_keys_total", {"table": table}) or 0.0


def test_updates_insert_new_keys_up_to_max_keys_and_snapshots_keep_them(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer]
) -> None:
    """Updates of held and new keys against the dict model; past max_keys
    RESOURCE_EXHAUSTED with the table unchanged; a repeated key refused; misses counted
    (padding keys not); a snapshot holds the inserted keys and a reload from it serves
    them under the same policy; a .npy snapshot and a reload from a file of rows are
    refused."""
    keys, values = keyed_data(60, seed=9)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    server = keyed_server([TableSpec("k", path, missing="zeros", max_keys=keys.size + 10)])
    model = Model(keys, values, "zeros")
    rng = np.random.default_rng(10)
    held = list(keys)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        absent = [k for k in (-5, -6, -7, 42) if k not in model.rows]
        before = _missing_total("k")
        client.lookup([keys[0], absent[0], absent[3]], "k", padding_id=absent[3])
        assert _missing_total("k") - before == 1  # the padding key is not missing
        client.lookup(absent[:3], "k", pooling="sum")
        assert _missing_total("k") - before == 4
        for step in range(5):
            new = rng.integers(-(2**63), 2**63 - 1, size=2, dtype=np.int64)
            update = np.concatenate([new, rng.choice(keys, size=3, replace=False)])
            vectors = rng.standard_normal((update.size, DIM)).astype(np.float32)
            info = client.update_rows(update, vectors, "k")
            for key, vector in zip(update, vectors, strict=True):
                model.rows[int(key)] = vector
            held.extend(new)
            assert info.keys == keys.size + 2 * (step + 1) and info.update_seq == step + 1
            probe = _probe(np.array(held), rng, 50, misses=True)
            np.testing.assert_array_equal(client.lookup(probe, "k"), model.lookup(probe))
        gauge = REGISTRY.get_sample_value("embedding_table_keys", {"table": "k"})
        assert gauge == keys.size + 10
        whole = client.lookup(np.array(held), "k")
        with pytest.raises(EmbeddingError, match=exactly(
            f"RESOURCE_EXHAUSTED: table 'k' holds {keys.size + 10} keys of its max_keys "
            f"{keys.size + 10}; this update adds 1 new keys: raise max_keys (a reload with "
            "the config's max_keys) or update keys it holds"
        )):  # fmt: skip
            client.update_rows([held[0], 31337], np.ones((2, DIM), np.float32), "k")
        with pytest.raises(EmbeddingError, match=r"INVALID_ARGUMENT: id .* is given twice"):
            client.update_rows([held[0], held[0]], np.ones((2, DIM), np.float32), "k")
        np.testing.assert_array_equal(client.lookup(np.array(held), "k"), whole)
        assert client.tables()[0].update_seq == 5

        with pytest.raises(EmbeddingError, match=r"keyed: snapshot it to \.safetensors"):
            client.snapshot_table(str(tmp_path / "k.npy"), "k")
        client.snapshot_table(str(tmp_path / "snap.safetensors"), "k")
        info = client.reload_table("k", str(tmp_path / "snap.safetensors"))
        assert (info.version, info.keys, info.missing_keys) == (2, keys.size + 10, "zeros")
        np.testing.assert_array_equal(client.lookup(np.array(held), "k"), whole)
        np.testing.assert_array_equal(client.lookup([31337], "k"), np.zeros((1, DIM)))
        np.save(tmp_path / "rows.npy", values)
        with pytest.raises(EmbeddingError, match="is addressed by keys; the new file holds rows"):
            client.reload_table("k", str(tmp_path / "rows.npy"))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compact_storage_and_a_device_cache_serve_keyed_tables(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer], dtype: str
) -> None:
    keys, values = keyed_data(200, seed=11)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    specs = [
        TableSpec("k", path, dtype=dtype, missing="zeros"),
        TableSpec("cached", path, cache_rows=16, missing="zeros", max_keys=210),
    ]
    server = keyed_server(specs)
    model = Model(keys, values, "zeros")
    probe = _probe(keys, np.random.default_rng(12), 100, misses=True)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        tolerance = 0.02 if dtype == "int8" else 2e-3
        np.testing.assert_allclose(client.lookup(probe, "k"), model.lookup(probe),
                                   atol=tolerance, rtol=tolerance)  # fmt: skip
        np.testing.assert_array_equal(client.lookup(probe, "cached"), model.lookup(probe))
        client.update_rows([555], np.full((1, DIM), 0.25, np.float32), "cached")
        np.testing.assert_array_equal(client.lookup([555], "cached"), np.full((1, DIM), 0.25))


@pytest.mark.parametrize("pooling", [None, "sum"])
def test_a_lookup_racing_an_insert_reads_the_keys_its_rows_hold(
    tmp_path: Path,
    keyed_server: Callable[..., EmbeddingServer],
    monkeypatch: pytest.MonkeyPatch,
    pooling: str | None,
) -> None:
    """An insert lands between a lookup's translation (the key missing then) and its read
    (made to, deterministically: the translation itself writes it to the store): the
    lookup translates again, so the answer's update_seq and rows agree: the new key's
    vector with the insert's update_seq, never the fill row with it."""
    keys, values = keyed_data(20, seed=13)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    server = keyed_server([TableSpec("k", path, missing="zeros", max_keys=30)])
    translate = KeyIndex.translate
    inserts: list[int] = []

    def insert_meanwhile(self: KeyIndex, *args: Any, **kwargs: Any) -> Any:
        answer = translate(self, *args, **kwargs)
        if not inserts:
            inserts.append(1)
            server.store.update_rows("k", np.array([777]), np.full((1, DIM), 9.0, np.float32))
        return answer

    monkeypatch.setattr(keys_module.KeyIndex, "translate", insert_meanwhile)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        result = client.lookup_result([[777, int(keys[0])]], "k", pooling=pooling)
    assert inserts and result.update_seq == 1
    new = np.full(DIM, 9.0, np.float32)
    expected = np.stack([new, values[0]])[None] if pooling is None else (new + values[0])[None]
    np.testing.assert_allclose(result.vectors, expected, rtol=1e-6)


def test_new_keys_go_through_the_update_log_to_every_replica(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer], redis_server: Redis
) -> None:
    """Inserts and overwrites written through two replicas on one log: both end with the
    same keys, rows and update_seq as the dict model; an insert past max_keys is refused
    before it is appended (the log's position does not move)."""
    keys, values = keyed_data(30, seed=14)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    spec = TableSpec("k", path, missing="zeros", max_keys=keys.size + 8)
    first, second = (
        f"127.0.0.1:{keyed_server([spec], update_log=redis_server.url).port}" for _ in range(2)
    )
    model = Model(keys, values, "zeros")
    rng = np.random.default_rng(15)
    held = list(keys)
    with EmbeddingClient(first, max_attempts=1) as a, EmbeddingClient(second, max_attempts=1) as b:
        for step in range(4):
            new = rng.integers(-(2**63), 2**63 - 1, size=2, dtype=np.int64)
            update = np.concatenate([new, [held[step]]])
            vectors = rng.standard_normal((3, DIM)).astype(np.float32)
            info = (a, b)[step % 2].update_rows(update, vectors, "k")
            assert info.update_seq == step + 1
            held.extend(new)
            model.rows.update({int(k): v for k, v in zip(update, vectors, strict=True)})
        with pytest.raises(EmbeddingError, match="RESOURCE_EXHAUSTED: table 'k' holds"):
            a.update_rows([1, 2, 3, held[0]], np.ones((4, DIM), np.float32), "k")
        probe = np.array([*held, 31337])
        for client in (a, b):
            result = client.lookup_result(probe, "k", min_update_seq=4, timeout=10)
            assert result.update_seq == 4
            np.testing.assert_array_equal(result.vectors, model.lookup(probe))
            assert client.tables()[0].keys == keys.size + 8


def test_the_cli_looks_up_negative_keys_and_shows_what_a_table_holds(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer], capsys: pytest.CaptureFixture[str]
) -> None:
    from embedding_client import cli

    keys, values = keyed_data(10, seed=16)  # -1 and 0 among them
    path = save_keyed(tmp_path / "k.npz", keys, values)
    server = keyed_server([TableSpec("k", path, missing="zeros", max_keys=20)])
    target = f"127.0.0.1:{server.port}"
    assert cli.main(["--target", target, "lookup", "--table", "k", "--ids", "-1,0,-77"]) == 0
    shown = capsys.readouterr().out
    model = Model(keys, values, "zeros")
    expected = model.lookup(np.array([-1, 0, -77]))
    first, *lines = shown.splitlines()
    assert first.startswith("Lookup table=k ") and "shape=(3, 6)" in first
    printed = " ".join(lines).replace("[", " ").replace("]", " ").split()
    np.testing.assert_allclose(np.array(printed, float).reshape(3, DIM), expected, atol=1e-5)
    assert cli.main(["--target", target, "tables"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert (cells["keys"], cells["missing"], cells["rows"]) == (f"{keys.size}/20", "zeros", "20")
    assert cli._negative_ids(["--ids", "-3", "--table", ""]) == ["--ids=-3", "--table", ""]
    assert cli._negative_ids(["--ids"]) == ["--ids"]


# ---------------------------------------------------------------------------- shards


def test_a_keyed_table_splits_by_its_keys_from_the_whole_file_or_embedding_split(
    tmp_path: Path,
) -> None:
    """Shard I of N holds the keys with shard_of(key, N) == I, whether read from the whole
    file or from its embedding-split file (which keeps the default vector); a shard's
    file is refused by a server started as another shard, and a file holding another
    shard's key is refused at load."""
    keys, values = keyed_data(300, seed=17)
    default = np.full(DIM, 0.5, np.float32)
    path = save_keyed(tmp_path / "k.npz", keys, values, default=default)
    files = split(str(path), 3, tmp_path / "shards")
    seen: list[np.ndarray] = []
    for index in range(3):
        part = Shard(index, 3)
        whole = load_table(TableSpec("k", path, shard=part, missing="default"), CPU)
        own = load_table(TableSpec("k", files[index], shard=part, missing="default"), CPU)
        for table in (whole, own):
            assert table.keys is not None and table.part == (index, 3)
            held = table.keys.in_row_order()
            assert (shard_of(held, 3) == index).all()
            np.testing.assert_array_equal(np.sort(held), np.sort(whole.keys.in_row_order()))  # type: ignore[union-attr]
            rows = table.weights[: held.size].numpy()
            np.testing.assert_array_equal(
                rows, values[[int(np.flatnonzero(keys == k)[0]) for k in held]]
            )
            np.testing.assert_array_equal(table.weights[table.keys.fill_row].numpy(), default)
        seen.append(whole.keys.in_row_order())  # type: ignore[union-attr]
    assert sorted(np.concatenate(seen).tolist()) == sorted(keys.tolist())
    with pytest.raises(TableLoadError, match=exactly(
        "table 'k': the file holds shard 0/3 of a keyed table, but the server was started "
        "with --shard 1/3: start it with --shard 0/3 (or `shard = \"0/3\"` in the config), "
        "or give it the whole table's file"
    )):  # fmt: skip
        load_table(TableSpec("k", files[0], shard=Shard(1, 3)), CPU)
    with pytest.raises(TableLoadError, match="but the server was started without --shard"):
        load_table(TableSpec("k", files[0]), CPU)
    foreign = int(keys[shard_of(keys, 3) == 1][0])
    with pytest.raises(ValueError, match=f"key {foreign} \\(row 1\\) is on shard 1/3, not 0/3"):
        KeyIndex.build(np.array([int(seen[0][0]), foreign]), 5, part=Shard(0, 3))


def test_the_sharded_client_serves_keyed_shards_as_one_table(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer]
) -> None:
    """Two keyed shard servers behind the sharded client: lookups (plain, sum, max, a
    padding key), new keys routed to their owners, a missing key under `error` named at
    the caller's own position; a mean over shards that skip missing keys refused; a key
    sent to the wrong shard refused, never read as missing."""
    keys, values = keyed_data(200, seed=18)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    targets = []
    for index in range(2):
        part = Shard(index, 2)
        server = keyed_server([
            TableSpec("k", path, missing="zeros", max_keys=200, shard=part),
            TableSpec("e", path, missing="error", shard=part),
        ])  # fmt: skip
        targets.append(f"127.0.0.1:{server.port}")
    model = Model(keys, values, "zeros")
    rng = np.random.default_rng(19)
    with ShardedClient([[t] for t in targets], timeout=10) as client:
        for _ in range(10):
            probe = _probe(keys, rng, 24, misses=True).reshape(4, 6)
            np.testing.assert_array_equal(client.lookup(probe, "k"), model.lookup(probe))
            got = client.lookup(probe, "k", pooling="sum")
            np.testing.assert_allclose(got, model.pooled(list(probe), "sum"), rtol=1e-5, atol=1e-6)
            held = _probe(keys, rng, 24, misses=False).reshape(4, 6)  # `error`: all held
            for mode in ("mean", "max"):
                got = client.lookup(held, "e", pooling=mode)
                np.testing.assert_allclose(
                    got, model.pooled(list(held), mode), rtol=1e-5, atol=1e-6
                )
            pad = int(probe[0, 0])
            got = client.lookup(probe, "k", pooling="sum", padding_id=pad)
            np.testing.assert_allclose(
                got, model.pooled(list(probe), "sum", pad), rtol=1e-5, atol=1e-6
            )
        for mode in ("mean", "max"):
            with pytest.raises(
                EmbeddingError, match=f"INVALID_ARGUMENT: {mode} pooling over the 2"
            ):
                client.lookup(probe, "k", pooling=mode)
        new = rng.integers(-(2**63), 2**63 - 1, size=6, dtype=np.int64)
        vectors = rng.standard_normal((6, DIM)).astype(np.float32)
        client.update_rows(new, vectors, "k")
        model.rows.update({int(k): v for k, v in zip(new, vectors, strict=True)})
        np.testing.assert_array_equal(client.lookup(new, "k"), vectors)
        merged = {t.name: t for t in client.tables()}
        assert (merged["k"].keys, merged["k"].max_keys) == (keys.size + 6, 400)
        held = keys[:5]
        absent = 4242
        assert absent not in model.rows
        probe = np.array([[held[0], held[1], held[2]], [held[3], absent, held[4]]])
        owner = int(shard_of(np.array([absent]), 2)[0])
        with pytest.raises(EmbeddingError, match=exactly(
            f"NOT_FOUND: shard {owner}/2 ({targets[owner]}): key {absent} at position 4 (index "
            f"[1, 1]) is not in table 'e' ({int((shard_of(keys, 2) == owner).sum())} keys; its "
            "missing-key policy is 'error')"
        )):  # fmt: skip
            client.lookup(probe, "e")
    mine, other = int(keys[shard_of(keys, 2) == 0][0]), int(keys[shard_of(keys, 2) == 1][0])
    refused = (
        "FAILED_PRECONDITION: key {key} at position {at} is on shard 1/2 of table 'k'; this "
        "server holds shard 0/2: route keys with embedding_client.shards.shard_of (is the "
        "client's shard map stale?)"
    )
    with EmbeddingClient(targets[0], max_attempts=1) as shard0:
        with pytest.raises(EmbeddingError, match=exactly(refused.format(key=other, at=1))):
            shard0.lookup([mine, other], "k")  # under `zeros`: refused, not read as zeros
        with pytest.raises(EmbeddingError, match=exactly(refused.format(key=other, at=0))):
            shard0.update_rows([other], np.ones((1, DIM), np.float32), "k")
        np.testing.assert_array_equal(shard0.lookup([mine], "k"), model.lookup(np.array([mine])))
        grid = np.array([[mine, mine], [mine, other]])
        with pytest.raises(EmbeddingError, match=exactly(
            refused.format(key=other, at="3 (index [1, 1])").replace(
                "at position 3 (index [1, 1])", "at position 3"
            )
        )):  # fmt: skip
            shard0.lookup(grid, "k")
        # A padding key is skipped wherever its shard: never refused, also beside a key
        # this shard would hold but does not (missing: zeros).
        candidates = np.arange(1, 200, dtype=np.int64)
        absent = int(candidates[(shard_of(candidates, 2) == 0) & ~np.isin(candidates, keys)][0])
        grid = np.array([[mine, absent], [mine, other]])
        pooled = shard0.lookup(grid, "k", pooling="sum", padding_id=other)
        np.testing.assert_allclose(pooled, model.pooled(list(grid), "sum", other), rtol=1e-6)


def test_a_replica_finds_its_keyed_snapshot_to_start_from(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer], redis_server: Redis
) -> None:
    """A keyed table's snapshot (its tensors are keys and values, not the table's name) is
    found by name in the snapshot directory, with any number of keys; a replica starting
    from it holds the keys inserted before it and the update_seq it records; a snapshot
    of another dim is passed over."""
    keys, values = keyed_data(20, seed=20)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    spec = TableSpec("k", path, missing="zeros", max_keys=40)
    (tmp_path / "snaps").mkdir()
    server = keyed_server([spec], update_log=redis_server.url)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        client.update_rows([101, 102], np.full((2, DIM), 7.0, np.float32), "k")
        client.snapshot_table(str(tmp_path / "snaps" / "k-1.safetensors"), "k")
    other = save_keyed(tmp_path / "snaps" / "other.safetensors", keys, values[:, :2])
    assert other.exists()
    found = newest_snapshot_of(spec, tmp_path / "snaps")
    assert found.path == tmp_path / "snaps" / "k-1.safetensors"
    table = load_table(found, CPU)
    assert table.update_seq == 1 and table.keys is not None and table.keys.count == keys.size + 2
    rows = table.keys.find(np.array([101, 102]))
    np.testing.assert_array_equal(table.weights[rows].numpy(), np.full((2, DIM), 7.0))


def test_the_usage_example_runs_end_to_end(
    tmp_path: Path,
    keyed_server: Callable[..., EmbeddingServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/usage.md's keyed-table example as written: its file-making block (in a
    folder of its own), its TOML served, its client block against that server; what it
    prints is what its comments say."""
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text[text.index("### Keyed tables") : text.index("## The dense path")]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    (toml,) = re.findall(r"`tags.toml`.*?```toml\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(python[0], "usage.md (file)", "exec"), {})
    (tmp_path / "tags.toml").write_text(toml)
    specs = read_table_config(tmp_path / "tags.toml").tables
    server = keyed_server(list(specs))
    capsys.readouterr()
    code = python[1].replace("localhost:50051", f"127.0.0.1:{server.port}")
    exec(compile(code, "usage.md (client)", "exec"), {})
    printed = capsys.readouterr().out.split()
    said = [
        line.strip().removeprefix("# ") for line in python[1].splitlines()
        if line.strip().startswith("# ")
    ]  # fmt: skip
    assert printed == " ".join(said).split()


def test_a_keyed_table_answers_bit_for_bit_as_the_same_rows_served_by_index(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer]
) -> None:
    keys, values = keyed_data(150, seed=21)
    keyed = save_keyed(tmp_path / "k.safetensors", keys, values)
    np.save(tmp_path / "rows.npy", values)
    server = keyed_server([TableSpec("k", keyed), TableSpec("r", tmp_path / "rows.npy")])
    rng = np.random.default_rng(22)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        for _ in range(10):
            rows = rng.integers(0, keys.size, size=(5, 7))
            by_key, by_row = keys[rows], rows
            for dtype in ("float32", "float16", "bfloat16"):
                assert client.lookup(by_key, "k", dtype).tobytes() == (
                    client.lookup(by_row, "r", dtype).tobytes()
                )
            assert client.lookup_dense(by_key, "k").tobytes() == (
                client.lookup_dense(by_row, "r").tobytes()
            )
            for mode in ("sum", "mean", "max"):
                assert client.lookup(by_key, "k", pooling=mode).tobytes() == (
                    client.lookup(by_row, "r", pooling=mode).tobytes()
                ), mode
            pad = int(rows[0, 0])
            assert client.lookup(
                by_key, "k", pooling="mean", padding_id=int(keys[pad])
            ).tobytes() == (client.lookup(by_row, "r", pooling="mean", padding_id=pad).tobytes())


def test_an_entry_past_max_keys_in_the_log_is_skipped_and_the_log_goes_on(
    tmp_path: Path, keyed_server: Callable[..., EmbeddingServer], redis_server: Redis
) -> None:
    """Two entries appended at once through different replicas may add more keys than
    max_keys together (each was checked against its writer's table): every replica
    applies the log in one order and skips the same one, counts it, and goes on applying
    (written straight into the stream here, as such a race leaves it)."""
    import redis as redis_client

    keys, values = keyed_data(10, seed=25)
    path = save_keyed(tmp_path / "k.safetensors", keys, values)
    stream = redis_client.Redis.from_url(redis_server.url)
    for seq, (key, value) in enumerate(((1001, 1.0), (1002, 2.0), (int(keys[0]), 3.0)), 1):
        stream.xadd("embedding:updates:k", {"ids": np.array([key], "<i8").tobytes(),
                    "vectors": np.full((1, DIM), value, "<f4").tobytes(), "dim": str(DIM),
                    "writer": "test", "time": "0"}, id=f"{seq}-0")  # fmt: skip
    skipped = REGISTRY.get_sample_value(
        "embedding_update_log_errors_total", {"table": "k", "kind": "apply"}
    ) or 0.0  # fmt: skip
    spec = TableSpec("k", path, missing="zeros", max_keys=keys.size + 1)
    server = keyed_server([spec], update_log=redis_server.url)
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        result = client.lookup_result([1001, 1002, int(keys[0])], "k", min_update_seq=3, timeout=10)
        assert result.update_seq == 3
        assert result.vectors[:, 0].tolist() == [1.0, 0.0, 3.0]  # 1002 did not fit: skipped
        assert REGISTRY.get_sample_value(
            "embedding_update_log_errors_total", {"table": "k", "kind": "apply"}
        ) == skipped + 1  # fmt: skip
        info = client.update_rows([1001], np.full((1, DIM), 4.0, np.float32), "k")
        assert info.update_seq == 4  # the log goes on
        np.testing.assert_array_equal(client.lookup([1001], "k"), np.full((1, DIM), 4.0))
