"""Table loading: every format gives the same values; every bad file stops with one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors_numpy
from safetensors.torch import save_file as save_safetensors

from embedding_server.config import TableSpec
from embedding_server.core.sources import TableLoadError, demo_table, load_table

from .conftest import random_table

CPU = torch.device("cpu")


def _load(path: Path, key: str | None = None) -> torch.Tensor:
    return load_table(TableSpec("t", path, key), CPU).weights


@pytest.fixture
def weights() -> np.ndarray:
    return random_table(257, 7, seed=5)


def test_every_format_loads_the_same_values(tmp_path: Path, weights: np.ndarray) -> None:
    np.save(tmp_path / "t.npy", weights)
    save_safetensors_numpy({"emb": weights}, str(tmp_path / "t.safetensors"))
    state = {"embedding.weight": torch.from_numpy(weights), "other.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "t.pt")
    torch.save(torch.from_numpy(weights), tmp_path / "bare.pth")

    for loaded in (
        _load(tmp_path / "t.npy"),
        _load(tmp_path / "t.safetensors"),
        _load(tmp_path / "t.pt", "embedding.weight"),
        _load(tmp_path / "bare.pth"),
    ):
        assert loaded.dtype == torch.float32
        np.testing.assert_array_equal(loaded.numpy(), weights)


def test_spec_parses_a_key_after_the_path(tmp_path: Path, weights: np.ndarray) -> None:
    torch.save({"a.weight": torch.from_numpy(weights)}, tmp_path / "m.pt")
    spec = TableSpec.parse(f"users={tmp_path / 'm.pt'}:a.weight")
    assert (spec.name, spec.path, spec.key) == ("users", tmp_path / "m.pt", "a.weight")
    np.testing.assert_array_equal(load_table(spec, CPU).weights.numpy(), weights)


def test_half_precision_tables_keep_their_dtype(tmp_path: Path, weights: np.ndarray) -> None:
    save_safetensors({"w": torch.from_numpy(weights).bfloat16()}, str(tmp_path / "b.safetensors"))
    np.save(tmp_path / "h.npy", weights.astype(np.float16))
    bf16 = _load(tmp_path / "b.safetensors")
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, torch.from_numpy(weights).bfloat16())
    assert _load(tmp_path / "h.npy").dtype == torch.float16


def test_float64_and_big_endian_files_are_stored_as_native_float32(
    tmp_path: Path, weights: np.ndarray
) -> None:
    np.save(tmp_path / "d.npy", weights.astype(np.float64))
    np.save(tmp_path / "be.npy", weights.astype(">f4"))
    for name in ("d.npy", "be.npy"):
        loaded = _load(tmp_path / name)
        assert loaded.dtype == torch.float32
        np.testing.assert_array_equal(loaded.numpy(), weights)


def test_negative_zeros_become_positive(tmp_path: Path) -> None:
    np.save(tmp_path / "z.npy", np.array([[-0.0, 1.0], [2.0, -0.0]], dtype=np.float32))
    loaded = _load(tmp_path / "z.npy")
    assert not torch.signbit(loaded).any()
    assert loaded.tolist() == [[0.0, 1.0], [2.0, 0.0]]


def test_large_npy_loads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedding_server.core import sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)  # many chunks over a small file
    values = random_table(3001, 9, seed=6)
    np.save(tmp_path / "big.npy", values)
    reads: list[tuple[int, int]] = []
    open_source = sources._npy_source

    def recorded(path: Path) -> sources.RowSource:
        source = open_source(path)
        read = source.read

        def chunk(start: int, stop: int) -> torch.Tensor:
            reads.append((start, stop))
            return read(start, stop)

        return sources.RowSource(source.shape, source.dtype, chunk)

    monkeypatch.setattr(sources, "_npy_source", recorded)
    np.testing.assert_array_equal(_load(tmp_path / "big.npy").numpy(), values)
    # Never more than a chunk's rows at once (1,000 bytes: 27 rows of 9 float32), in
    # order, covering every row once.
    assert len(reads) == -(-3001 // 27) and all(stop - start <= 27 for start, stop in reads)
    assert [start for start, _ in reads] == list(range(0, 3001, 27)) and reads[-1][1] == 3001


def test_demo_table_is_reproducible_with_numpy_alone() -> None:
    table = demo_table(100, 8, 3, CPU)
    expected = np.random.default_rng(3).standard_normal((100, 8), dtype=np.float32)
    assert table.name == "demo"
    np.testing.assert_array_equal(table.weights.numpy(), expected)


@pytest.mark.parametrize(
    ("make", "key", "message"),
    [
        (lambda p: None, None, "no such file"),
        (lambda p: p.mkdir(), None, "not a file"),
        (lambda p: p.write_bytes(b"definitely not numpy"), None, "not a plain numeric .npy"),
        (lambda p: np.save(p, np.zeros(5, np.float32)), None, r"expected a 2-D \[rows, dim\]"),
        (lambda p: np.save(p, np.zeros((2, 3, 4), np.float32)), None, "got shape"),
        (lambda p: np.save(p, np.zeros((0, 4), np.float32)), None, "no rows or no dim"),
        (lambda p: np.save(p, np.array([["a", "b"]])), None, "not numbers"),
        (lambda p: np.save(p, np.arange(6).reshape(2, 3)), None, "must be floating point"),
        (lambda p: np.save(p, np.zeros((2, 2), np.float32)), "k", "drop ':k'"),
    ],
)
def test_bad_npy_files_are_refused(make, key: str | None, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises(TableLoadError, match=message) as raised:
        _load(path, key)
    assert str(raised.value).startswith("table 't': ")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_tables_are_refused(tmp_path: Path, bad: float) -> None:
    values = np.ones((5, 3), dtype=np.float32)
    values[3, 2] = bad
    np.save(tmp_path / "n.npy", values)
    with pytest.raises(TableLoadError, match=r"row 3, column 2 holds .*must be finite"):
        _load(tmp_path / "n.npy")


def test_checkpoint_keys_are_checked(tmp_path: Path, weights: np.ndarray) -> None:
    state = {"a.weight": torch.from_numpy(weights), "b.weight": torch.from_numpy(weights * 2)}
    torch.save(state, tmp_path / "m.pt")
    save_safetensors(state, str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.safetensors"):
        with pytest.raises(TableLoadError, match="holds 2 tensors; name one as PATH:KEY"):
            _load(tmp_path / name)
        with pytest.raises(TableLoadError, match=r"no tensor 'c'; it holds: a\.weight, b\.weight"):
            _load(tmp_path / name, "c")


def test_other_bad_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"garbage")
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    (tmp_path / "x.csv").write_text("1,2\n")
    torch.save({"ids": torch.arange(4).reshape(2, 2)}, tmp_path / "ints.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = {
        "x.pt": "not a loadable torch checkpoint",
        "x.safetensors": "not a readable .safetensors",
        "x.csv": "unknown table format '.csv'",
        "ints.pt": "must be floating point",
        "list.pt": "holds a list, not a tensor or state dict",
    }
    for name, message in cases.items():
        with pytest.raises(TableLoadError, match=message):
            _load(tmp_path / name)


def test_pickled_code_in_a_checkpoint_is_not_run(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(TableLoadError, match="not a loadable torch checkpoint"):
        _load(tmp_path / "evil.pt")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_table_can_be_stored_in_a_smaller_dtype(tmp_path: Path, dtype: str) -> None:
    weights = random_table(100, 8)
    np.save(tmp_path / "t.npy", weights.astype(np.float64))
    table = load_table(TableSpec("t", tmp_path / "t.npy", dtype=dtype), torch.device("cpu"))
    assert table.dtype == dtype
    assert table.nbytes == weights.size * {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    expected = torch.from_numpy(weights).to(getattr(torch, dtype))
    assert torch.equal(table.weights, expected)


def test_values_too_large_for_float16_are_refused(tmp_path: Path) -> None:
    weights = random_table(10, 4)
    weights[3, 2] = 1e6
    np.save(tmp_path / "t.npy", weights)
    with pytest.raises(
        TableLoadError, match=r"row 3, column 2 holds 1000000.0, which does not fit float16"
    ):
        load_table(TableSpec("t", tmp_path / "t.npy", dtype="float16"), torch.device("cpu"))
