"""Online updates (UpdateRows) and snapshots: atomic rows under concurrent reads."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load_file as load_safetensors

from embedding_client import EmbeddingClient, EmbeddingError, Security
from embedding_server.core.cache import CachedRows
from embedding_server.core.store import TableStore
from embedding_server.core.tables import Table
from embedding_server.errors import FailedPrecondition

from .conftest import ServerFactory, admin_settings, random_table

WEIGHTS = random_table(200, 16, seed=71)


def test_updated_rows_are_served_by_both_paths_and_move_the_update_seq(
    start_server: ServerFactory,
) -> None:
    server = start_server({"t": WEIGHTS, "half": WEIGHTS.astype(np.float16)}, **admin_settings())
    labels = {"table": "t"}
    before = REGISTRY.get_sample_value("embedding_rows_updated_total", labels) or 0.0
    new = random_table(3, 16, seed=72)
    with EmbeddingClient(f"127.0.0.1:{server.port}") as client:
        info = client.update_rows([5, 0, 199], new, "t")
        assert (info.version, info.update_seq) == (1, 1)  # the loaded version stays
        expected = WEIGHTS.copy()
        expected[[5, 0, 199]] = new
        for dense in (False, True):
            result = client.lookup_result([0, 1, 5, 199], "t", dense=dense)
            assert (result.version, result.update_seq) == (1, 1)
            np.testing.assert_array_equal(result.vectors, expected[[0, 1, 5, 199]])
        # bfloat16 rows into a float16 table: stored as float16.
        rows = np.full((1, 16), 1.5, dtype=ml_dtypes.bfloat16)
        assert client.update_rows([7], rows, "half").update_seq == 1
        np.testing.assert_array_equal(client.lookup([7], "half"), np.full((1, 16), 1.5))
    assert REGISTRY.get_sample_value("embedding_rows_updated_total", labels) == before + 3
    assert REGISTRY.get_sample_value("embedding_table_version", labels) == 1
    assert REGISTRY.get_sample_value("embedding_table_update_seq", labels) == 1


@pytest.mark.parametrize(
    ("ids", "vectors", "message"),
    [
        ([1, 1], np.zeros((2, 16)), "id 1 is given twice"),
        ([1, 200], np.zeros((2, 16)), "id 200 at position 1 is out of range"),
        ([-1], np.zeros((1, 16)), "id -1 at position 0 is out of range"),
        ([1], np.full((1, 16), np.nan), "vector 0 (id 1), element 0 holds nan; tables must be"),
        ([1, 2], np.zeros((3, 16)), "one row per id"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(
    start_server: ServerFactory, ids: list[int], vectors: np.ndarray, message: str
) -> None:
    server = start_server({"t": WEIGHTS}, **admin_settings())
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        with pytest.raises(EmbeddingError) as refused:
            client.update_rows(ids, vectors, "t")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in refused.value.details
        result = client.lookup_result(np.arange(200), "t")
        assert (result.version, result.update_seq) == (1, 0)
        np.testing.assert_array_equal(result.vectors, WEIGHTS)


def test_wrong_dim_and_too_large_for_float16(start_server: ServerFactory) -> None:
    server = start_server({"t": WEIGHTS, "half": WEIGHTS.astype(np.float16)}, **admin_settings())
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        with pytest.raises(EmbeddingError, match="2 rows of dim 16 in float32 need 128"):
            client.update_rows([1, 2], np.zeros((2, 4), np.float32), "t")
        with pytest.raises(EmbeddingError, match=r"element 0 holds 1000000\.0, which does not fit"):
            client.update_rows([1], np.full((1, 16), 1e6, np.float32), "half")


def test_readers_never_see_a_torn_row(start_server: ServerFactory) -> None:
    """Every row of the table is always one constant vector (all elements equal); a
    writer keeps replacing rows with new constants while readers check every answer."""
    rows, dim = 64, 512
    server = start_server({"t": np.zeros((rows, dim), np.float32)}, **admin_settings())
    target = f"127.0.0.1:{server.port}"
    stop = threading.Event()
    torn: list[str] = []
    reads = [0]
    seqs_went_back = []

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        last = 0
        with EmbeddingClient(target) as client:
            while not stop.is_set():
                result = client.lookup_result(rng.integers(0, rows, size=32), "t")
                values = result.vectors
                for row in values:
                    if not (row == row[0]).all():
                        torn.append(f"row mixes {np.unique(row)[:4]}")
                if result.update_seq < last:
                    seqs_went_back.append((last, result.update_seq))
                last = result.update_seq
                reads[0] += 1

    def write() -> None:
        rng = np.random.default_rng(99)
        with EmbeddingClient(target) as client:
            for k in range(1, 400):
                if stop.is_set():
                    return
                ids = rng.choice(rows, size=int(rng.integers(1, rows)), replace=False)
                client.update_rows(ids, np.full((ids.size, dim), float(k), np.float32), "t")

    readers = [threading.Thread(target=read, args=(seed,)) for seed in range(3)]
    writer = threading.Thread(target=write)
    for thread in [*readers, writer]:
        thread.start()
    writer.join(timeout=120)
    stop.set()
    for thread in readers:
        thread.join(timeout=30)
    assert reads[0] > 50, "the readers hardly ran"
    assert not torn, torn[:3]
    assert not seqs_went_back


def test_the_update_seq_an_answer_reports_is_that_of_its_rows(start_server: ServerFactory) -> None:
    """Update k writes k into every row: each answer's rows must all hold exactly the
    update_seq it reports (issue 29: an update_seq read apart from the rows, before or
    after the table's read section, could name another update than the rows')."""
    rows, dim = 32, 64
    server = start_server({"t": np.zeros((rows, dim), np.float32)}, **admin_settings())
    target = f"127.0.0.1:{server.port}"
    stop = threading.Event()
    wrong: list[tuple[int, float]] = []
    reads = [0]

    def read() -> None:
        with EmbeddingClient(target) as client:
            while not stop.is_set():
                result = client.lookup_result(np.arange(rows), "t")
                held = np.unique(result.vectors)
                if held.size != 1 or held[0] != result.update_seq:
                    wrong.append((result.update_seq, float(held[0])))
                reads[0] += 1

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        with EmbeddingClient(target) as client:
            for k in range(1, 300):
                client.update_rows(np.arange(rows), np.full((rows, dim), float(k), np.float32), "t")
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=30)
    assert reads[0] > 50, "the readers hardly ran"
    assert not wrong, wrong[:5]


def test_snapshot_writes_a_file_the_server_can_reload(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    bf = torch.from_numpy(WEIGHTS[:10]).bfloat16()
    server = start_server({"t": WEIGHTS, "bf": bf}, **admin_settings(tmp_path))
    with EmbeddingClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        client.update_rows([3], np.ones((1, 16), np.float32), "t")
        info, version = client.snapshot_table(str(tmp_path / "t.npy"), "t")
        assert (info.version, info.update_seq, version) == (1, 1, 1)
        saved = np.load(tmp_path / "t.npy")
        expected = WEIGHTS.copy()
        expected[3] = 1
        np.testing.assert_array_equal(saved, expected)
        client.snapshot_table(str(tmp_path / "t.safetensors"), "t")  # records update_seq 1
        assert client.update_rows([3], np.zeros((1, 16), np.float32), "t").update_seq == 2
        reloaded = client.reload_table("t", str(tmp_path / "t.safetensors"))
        assert (reloaded.version, reloaded.update_seq) == (2, 1)  # the file's own
        np.testing.assert_array_equal(client.lookup([3], "t"), np.ones((1, 16)))
        client.snapshot_table(str(tmp_path / "bf.npy"), "bf")  # .npy: bfloat16 as float32
        assert np.load(tmp_path / "bf.npy").dtype == np.float32
        client.snapshot_table(
            "bf.safetensors", "bf"
        )  # the storage dtype, by safetensors' own reader
        assert torch.equal(load_safetensors(tmp_path / "bf.safetensors")["bf"], bf)
        assert client.snapshot_table("relative.npy", "t")[1] == 2  # in the snapshot dir
        assert (tmp_path / "relative.npy").exists()
        for path, code, message in (
            (str(tmp_path / "t.csv"), "INVALID_ARGUMENT", "must name a file ending in .npy"),
            (str(tmp_path / "missing" / "t.npy"), "FAILED_PRECONDITION", "does not exist"),
            ("t.npy", "ALREADY_EXISTS", "exists already; ask to overwrite it"),
        ):
            with pytest.raises(EmbeddingError) as refused:
                client.snapshot_table(path, "t")
            assert (refused.value.code.name, message) == (code, message)
            assert message in refused.value.details
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_updates_need_the_admin_credential(start_server: ServerFactory) -> None:
    server = start_server(
        {"t": WEIGHTS}, auth_tokens=("reader-token",), admin_tokens=("writer-token",)
    )
    target = f"127.0.0.1:{server.port}"
    with EmbeddingClient(target, max_attempts=1) as anonymous:
        with pytest.raises(EmbeddingError) as refused:
            anonymous.update_rows([1], np.zeros((1, 16)), "t")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with EmbeddingClient(target, max_attempts=1, security=Security(token="reader-token")) as reader:
        with pytest.raises(EmbeddingError) as refused:
            reader.update_rows([1], np.zeros((1, 16)), "t")
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "data role" in refused.value.details
    with EmbeddingClient(target, security=Security(token="writer-token")) as client:
        assert client.update_rows([1], np.zeros((1, 16)), "t").update_seq == 1


def test_a_shared_table_is_updated_under_its_seqlock() -> None:
    """Tables shared by processes carry [sequence, version, update_seq] in shared memory:
    an update leaves the sequence even again and moves the update_seq there (to the log
    position it is given, with a log)."""
    table = Table("t", torch.from_numpy(WEIGHTS.copy()).share_memory_(), "test")
    table.shared_state = torch.tensor([0, 1, 0]).share_memory_()
    store = TableStore(shared=True)
    store.add(table)
    store.update_rows("t", np.array([1]), np.ones((1, 16), np.float32))
    assert table.shared_state.tolist() == [2, 1, 1] and table.stamp == (1, 1)
    store.update_rows("t", np.array([2]), np.ones((1, 16), np.float32), seq=41)
    assert table.shared_state.tolist() == [4, 1, 41]
    vectors, stamp = table.read(lambda: table.weights[[1, 2]].clone())
    assert stamp == (1, 41) and (vectors[0] == 1).all()
    table.cache = CachedRows(table.weights, 10, torch.device("cpu"))
    with pytest.raises(FailedPrecondition, match="cached on the device by each"):
        store.update_rows("t", np.array([1]), np.zeros((1, 16), np.float32))
