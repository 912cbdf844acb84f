"""Keyed tables: rows addressed by raw 64-bit keys (feature values, hashes) instead of
row indices, through a key index beside the weights.

A keyed table's weights hold `capacity` rows for keys (`max_keys`, those not yet given a
key are zeros) and two more: the fill row, what a missing key reads under the `zeros`
(zeros) or `default` (the stored default vector) policy, and the pad row (zeros), what
padding keys and the missing keys a pooled bag skips read; the kernels skip it in bags
as they skip a padding id. A lookup translates keys to rows, then runs as for any table.

The index is immutable: sorted keys and the row of each, so a translation is a binary
search (`np.searchsorted`: no Python per key, and no hashing to get wrong). An insert
makes a new index and swaps it in under the table's write lock, after the new rows are
written; a lookup that translated with an older one reads again (`Table.keys` changed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from embedding_client.shards import Shard, shard_of
from embedding_server.errors import FailedPrecondition, KeyNotFound, OverLimit, quoted

MISSING_POLICIES = ("error", "zeros", "default")
# From this many keys a lookup sorts them before searching (bench/keys.py).
SORT_QUERIES_FROM = 256
# The keys and values of a keyed table file (.safetensors, .npz), and its default vector.
KEYS_TENSOR, VALUES_TENSOR, DEFAULT_TENSOR = "keys", "values", "default"
# A keyed snapshot's metadata: the table it holds (its tensors are not named after it).
TABLE_KEY = "embedding.table"


class Translated(NamedTuple):
    """Keys as rows of a keyed table, for one lookup."""

    rows: np.ndarray  # int64, the shape of the keys
    padding_row: int | None  # the pad row when some key reads it (the kernels skip it)
    missing: int  # keys the table does not hold (padding keys not counted)


@dataclass(frozen=True)
class KeyIndex:
    """Keys -> rows of one keyed table (see the module's note).

    sorted_keys : int64, ascending, unique: the keys the table holds.
    rows : int64, the row of each of `sorted_keys`.
    capacity : rows for keys (`max_keys`); the fill row is `capacity`, the pad row one more.
    missing : the policy for a key the table does not hold: error, zeros or default.
    skip_missing_in_bags : pooled bags leave missing keys out (else they pool the fill row).
    part : the shard held (see the field's note).
    """

    sorted_keys: np.ndarray
    rows: np.ndarray
    capacity: int
    missing: str = "error"
    skip_missing_in_bags: bool = True
    # The shard of the keyed table this index holds (the keys k with shard_of(k, N) == I),
    # None for all of it: a key another shard holds is refused, never read as missing.
    part: Shard | None = None

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        capacity: int,
        missing: str = "error",
        skip: bool = True,
        part: Shard | None = None,
    ) -> KeyIndex:
        """The index of a table whose row r holds key `keys[r]`.

        Raises
        ------
        ValueError
            Keys not 1-D int64, repeated (the first repeat named), more than `capacity`,
            or an unknown policy.
        """
        if missing not in MISSING_POLICIES:
            raise ValueError(
                f"missing-key policy {missing!r} is not one of {', '.join(MISSING_POLICIES)}"
            )
        keys = np.asarray(keys)
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise ValueError(
                f"keys must be a 1-D integer array, got {keys.dtype} {list(keys.shape)}"
            )
        if keys.dtype == np.uint64 and keys.size and int(keys.max()) >= 2**63:
            raise ValueError("keys must fit int64 (signed 64-bit)")
        keys = keys.astype(np.int64, copy=False)
        if keys.size > capacity:
            raise ValueError(f"{keys.size} keys do not fit max_keys {capacity}")
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        repeated = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if repeated.size:
            key = int(sorted_keys[repeated[0]])
            first, second = (int(i) for i in np.flatnonzero(keys == key)[:2])
            raise ValueError(
                f"key {key} is given twice (rows {first} and {second}); keys must be unique"
            )
        if part is not None and keys.size:
            foreign = np.flatnonzero(shard_of(keys, part.count) != part.index)
            if foreign.size:
                row, key = int(foreign[0]), int(keys[foreign[0]])
                owner = int(shard_of(np.array([key]), part.count)[0])
                raise ValueError(
                    f"key {key} (row {row}) is on shard {owner}/{part.count}, not {part}: the "
                    f"file holds keys of other shards"
                )
        return cls(sorted_keys, order.astype(np.int64), capacity, missing, skip, part)

    @property
    def count(self) -> int:
        return int(self.sorted_keys.size)

    @property
    def fill_row(self) -> int:
        return self.capacity

    @property
    def pad_row(self) -> int:
        return self.capacity + 1

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key (any shape), -1 where the table does not hold it."""
        if not self.count:
            return np.full(keys.shape, -1, dtype=np.int64)
        if keys.size >= SORT_QUERIES_FROM:
            # Searched in order, neighbouring searches share the cache lines they touch
            # (bench/keys.py: 1.7x at 1,024 keys, 4.8x at 16,384 over a million keys).
            order = np.argsort(keys, axis=None)
            flat = np.empty(keys.size, dtype=np.intp)
            flat[order] = np.searchsorted(self.sorted_keys, keys.reshape(-1)[order])
            at: np.ndarray = flat.reshape(keys.shape)
        else:
            at = np.searchsorted(self.sorted_keys, keys)
        np.minimum(at, self.count - 1, out=at)
        found = self.sorted_keys[at] == keys
        return np.where(found, self.rows[at], -1)

    def check_owned(self, keys: np.ndarray, table: str, among: np.ndarray | None = None) -> None:
        """Refuse keys (any shape; only those `among` marks, if given) another shard
        holds: FailedPrecondition naming the first, its position and its shard."""
        part = self.part
        if part is None or part.count == 1:
            return
        foreign = shard_of(keys, part.count) != part.index
        if among is not None:
            foreign &= among
        if not foreign.any():
            return
        position = int(np.flatnonzero(foreign.reshape(-1))[0])
        key = int(keys.reshape(-1)[position])
        owner = int(shard_of(np.array([key]), part.count)[0])
        raise FailedPrecondition(
            f"key {key} at position {position} is on shard {owner}/{part.count} of table "
            f"{quoted(table)}; this server holds shard {part}: route keys with "
            "embedding_client.shards.shard_of (is the client's shard map stale?)"
        )

    def translate(
        self, keys: np.ndarray, table: str, *, pooled: bool = False, padding_key: int | None = None
    ) -> Translated:
        """The rows `keys` read: padding keys read the pad row; a missing key is refused
        (`error`), or reads the fill row, or in a pooled bag the pad row when bags skip
        missing keys.

        Raises
        ------
        KeyNotFound
            Under `error`, naming the first missing key and its position.
        """
        rows = self.find(keys)
        absent = rows < 0
        padded = False
        if padding_key is not None:
            padding = keys == padding_key
            if padding.any():
                rows[padding] = self.pad_row
                absent &= ~padding
                padded = True
        missing = int(np.count_nonzero(absent))
        if missing and self.part is not None:  # a missing key may be another shard's
            self.check_owned(keys, table, among=absent)
        if missing:
            if self.missing == "error":
                flat = np.flatnonzero(absent.reshape(-1))[0]
                where = f"position {int(flat)}"
                if keys.ndim > 1:
                    index = [int(i) for i in np.unravel_index(flat, keys.shape)]
                    where += f" (index {index})"
                raise KeyNotFound(
                    f"key {int(keys.reshape(-1)[flat])} at {where} is not in table "
                    f"{quoted(table)} ({self.count} keys; its missing-key policy is 'error')"
                )
            skip = pooled and self.skip_missing_in_bags
            rows[absent] = self.pad_row if skip else self.fill_row
            padded = padded or skip
        return Translated(rows, self.pad_row if padded else None, missing)

    def with_keys(self, keys: np.ndarray, table: str) -> tuple[KeyIndex, np.ndarray]:
        """The index after inserting the keys of `keys` it does not hold (each given a
        free row, in order), and the row of every key of `keys`.

        Raises
        ------
        OverLimit
            More keys than `capacity` would be held.
        """
        rows = self.find(keys)
        new = rows < 0
        added = int(np.count_nonzero(new))
        if not added:
            return self, rows
        self.check_owned(keys, table, among=new)
        if self.count + added > self.capacity:
            raise OverLimit(
                f"table {quoted(table)} holds {self.count} keys of its max_keys "
                f"{self.capacity}; this update adds {added} new keys: raise max_keys (a "
                "reload with the config's max_keys) or update keys it holds"
            )
        rows[new] = np.arange(self.count, self.count + added, dtype=np.int64)
        merged = np.concatenate([self.sorted_keys, keys[new]])
        merged_rows = np.concatenate([self.rows, rows[new]])
        order = np.argsort(merged, kind="stable")
        index = KeyIndex(merged[order], merged_rows[order], self.capacity, self.missing,
                         self.skip_missing_in_bags, self.part)  # fmt: skip
        return index, rows

    def in_row_order(self) -> np.ndarray:
        """The keys by row: `keys[r]` is row r's key, for rows [0, count)."""
        keys = np.empty(self.count, dtype=np.int64)
        keys[self.rows] = self.sorted_keys
        return keys
