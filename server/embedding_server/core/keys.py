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

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from embedding_client.shards import Shard, shard_of
from embedding_server.errors import FailedPrecondition, KeyNotFound, OverLimit, quoted

MISSING_POLICIES = ("error", "zeros", "default")
# From this many keys a lookup probes the hash table instead of searching the sorted
# keys (bench/keys.py, a million keys, cold caches: the search 37 us at B = 64 against
# the hash's 48; at B = 1,024 268 us against 159).
HASH_FROM = 256
MAX_LOAD = 0.7  # keys per slot at most: ~2 probes per hit, ~6 per miss
_EMPTY = np.iinfo(np.int64).min  # a free slot's key (its row is -1, which says so)
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: the slot of a key


@dataclass(frozen=True)
class _Hash:
    """Open addressing with linear probing over `slots` (keys) and `rows`, a power of two
    long, at most `MAX_LOAD` full; every key of a batch probed at once (numpy, no Python
    per key). Never changed once built: `added` makes a new one."""

    slots: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray, room: int) -> _Hash:
        """The table of `keys` -> `rows`, with slots for `room` keys at most MAX_LOAD full."""
        size = 1 << max(4, int(np.ceil(np.log2(max(room, keys.size, 1) / MAX_LOAD))))
        table = cls(np.full(size, _EMPTY, dtype=np.int64), np.full(size, -1, dtype=np.int64))
        # Into an empty table, by home slot: each key at its home or just past the key
        # before it (pos_i = max(home_i, pos_i-1 + 1) = i + max over j <= i of home_j - j),
        # one sort instead of a round per probe step; those run past the end wrap round
        # by probing.
        homes = table._home(keys)
        order = np.argsort(homes, kind="stable")
        step = np.arange(keys.size)
        at = step + np.maximum.accumulate(homes[order] - step) if keys.size else step
        inside = at < size
        table.slots[at[inside]] = keys[order[inside]]
        table.rows[at[inside]] = rows[order[inside]]
        table._place(keys[order[~inside]], rows[order[~inside]])
        return table

    def _home(self, keys: np.ndarray) -> np.ndarray:
        """Each key's home slot: the top bits of key x 2**64/golden ratio (1-D keys)."""
        shift = np.uint64(64 - int(self.slots.size).bit_length() + 1)
        with np.errstate(over="ignore"):
            mixed = np.multiply(keys.view(np.uint64), _FIBONACCI)
        np.right_shift(mixed, shift, out=mixed)
        return mixed.view(np.int64)  # below 2**63 after the shift: the same values

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Put `keys` (not held yet) in their first free slots from home, in place."""
        mask = self.slots.size - 1
        at = self._home(keys)
        while keys.size:
            free = self.rows[at] < 0
            # Of several keys wanting one free slot, the first takes it, the rest move on.
            _, first = np.unique(at[free], return_index=True)
            placed = np.flatnonzero(free)[first]
            self.slots[at[placed]], self.rows[at[placed]] = keys[placed], rows[placed]
            keep = np.ones(keys.size, dtype=bool)
            keep[placed] = False
            keys, rows, at = keys[keep], rows[keep], (at[keep] + 1) & mask

    def added(
        self, keys: np.ndarray, rows: np.ndarray, every_key: np.ndarray, every_row: np.ndarray
    ) -> _Hash:
        """A new table with `keys` -> `rows` added (`every_key`/`every_row`: all the keys
        then held, for a table grown past MAX_LOAD, built again with twice the room)."""
        if every_key.size > MAX_LOAD * self.slots.size:
            return _Hash.of(every_key, every_row, 2 * every_key.size)
        table = _Hash(self.slots.copy(), self.rows.copy())
        table._place(keys, rows)
        return table

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key (any shape), -1 where it holds none. Most keys are at
        their home slot: that first probe is taken for all at once, and only those
        neither found nor at a free slot probe on."""
        flat = keys.reshape(-1)
        at = self._home(flat)
        rows = self.rows[at]
        used = rows >= 0  # a free slot's key (int64's least) may be a real key
        hit = self.slots[at] == flat
        hit &= used
        out = np.where(hit, rows, -1)
        going = used & ~hit
        if going.any():
            mask = self.slots.size - 1
            todo = np.flatnonzero(going)
            at = (at[todo] + 1) & mask
            while todo.size:
                rows = self.rows[at]
                hit = (self.slots[at] == flat[todo]) & (rows >= 0)
                out[todo[hit]] = rows[hit]
                going = ~hit & (rows >= 0)  # neither found nor at a free slot: probe on
                todo, at = todo[going], (at[going] + 1) & mask
        return out.reshape(keys.shape)


def _first_foreign(
    keys: np.ndarray, part: Shard | None, among: np.ndarray | None = None
) -> tuple[int, int, int] | None:
    """The first key (any shape; only those `among` marks, if given) that shard `part`
    does not hold: its flat position, the key and the shard that holds it; None when
    there is none, or no part (the whole table)."""
    if part is None or part.count == 1 or not keys.size:
        return None
    foreign = shard_of(keys, part.count) != part.index
    if among is not None:
        foreign &= among
    if not foreign.any():
        return None
    position = int(np.flatnonzero(foreign.reshape(-1))[0])
    key = int(keys.reshape(-1)[position])
    return position, key, int(shard_of(np.array([key]), part.count)[0])


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
    # The same keys as a hash table, for large batches (made from the others if not given).
    hashed: _Hash | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hashed is None:
            hashed = _Hash.of(self.sorted_keys, self.rows, self.count)
            object.__setattr__(self, "hashed", hashed)

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
        foreign = _first_foreign(keys, part)
        if part is not None and foreign is not None:
            row, key, owner = foreign
            raise ValueError(
                f"key {key} (row {row}) is on shard {owner}/{part.count}, not {part}: the "
                "file holds keys of other shards"
            )
        return cls(sorted_keys, order.astype(np.int64), capacity, missing, skip, part)

    @property
    def count(self) -> int:
        return int(self.sorted_keys.size)

    @property
    def nbytes(self) -> int:
        """Host memory the index holds: the sorted keys, their rows, the hash table."""
        hashed = 0 if self.hashed is None else self.hashed.slots.nbytes + self.hashed.rows.nbytes
        return self.sorted_keys.nbytes + self.rows.nbytes + hashed

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
        if keys.size >= HASH_FROM and self.hashed is not None:
            return self.hashed.find(keys)
        at = np.searchsorted(self.sorted_keys, keys)
        np.minimum(at, self.count - 1, out=at)
        found = self.sorted_keys[at] == keys
        return np.where(found, self.rows[at], -1)

    def check_owned(self, keys: np.ndarray, table: str, among: np.ndarray | None = None) -> None:
        """Refuse keys (any shape; only those `among` marks, if given) another shard
        holds: FailedPrecondition naming the first, its position and its shard."""
        part = self.part
        foreign = _first_foreign(keys, part, among)
        if part is None or foreign is None:
            return
        position, key, owner = foreign
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

    def check_update(self, keys: np.ndarray, table: str) -> np.ndarray:
        """The row of each key of an update, -1 for the keys it would add, once checked
        that those are this shard's and fit max_keys (what `with_keys` checks, without
        building the new index: an update's check before it is written or logged).

        Raises
        ------
        FailedPrecondition, OverLimit
            A new key another shard holds; more keys than `capacity` would be held.
        """
        rows = self.find(keys)
        new = rows < 0
        added = int(np.count_nonzero(new))
        if added:
            self.check_owned(keys, table, among=new)
            if self.count + added > self.capacity:
                raise OverLimit(
                    f"table {quoted(table)} holds {self.count} keys of its max_keys "
                    f"{self.capacity}; this update adds {added} new keys: raise max_keys (a "
                    "reload with the config's max_keys) or update keys it holds"
                )
        return rows

    def with_keys(self, keys: np.ndarray, table: str) -> tuple[KeyIndex, np.ndarray]:
        """The index after inserting the keys of `keys` it does not hold (each given a
        free row, in order), and the row of every key of `keys`.

        Raises
        ------
        FailedPrecondition, OverLimit
            As `check_update`.
        """
        rows = self.check_update(keys, table)
        new = rows < 0
        added = int(np.count_nonzero(new))
        if not added:
            return self, rows
        rows[new] = np.arange(self.count, self.count + added, dtype=np.int64)
        merged = np.concatenate([self.sorted_keys, keys[new]])
        merged_rows = np.concatenate([self.rows, rows[new]])
        order = np.argsort(merged, kind="stable")
        assert self.hashed is not None
        hashed = self.hashed.added(keys[new], rows[new], merged, merged_rows)
        index = KeyIndex(merged[order], merged_rows[order], self.capacity, self.missing,
                         self.skip_missing_in_bags, self.part, hashed)  # fmt: skip
        return index, rows

    def in_row_order(self) -> np.ndarray:
        """The keys by row: `keys[r]` is row r's key, for rows [0, count)."""
        keys = np.empty(self.count, dtype=np.int64)
        keys[self.rows] = self.sorted_keys
        return keys
