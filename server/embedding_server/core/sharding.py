"""One shard of a table: which global ids it holds, where they live, and its files.

A server started with `--shard I/N` holds the rows `embedding_client.shards.shard_of`
places on shard I: read from the full table file (memory-mapped; the rest is skipped)
or from a per-shard `.safetensors` file written by `embedding-split` (or by
SnapshotTable on a shard server), whose metadata says which shard of how many rows it
holds. Ids on the wire stay global; `ShardRows.localise` turns them into the shard's
own row numbers and refuses ids another shard holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from embedding_client.shards import Shard, shard_of
from embedding_server.core.tables import Table, check_ids, check_padding_id
from embedding_server.errors import FailedPrecondition

# Metadata keys of a per-shard .safetensors file.
SHARD_KEY = "embedding.shard"  # "I/N"
ROWS_KEY = "embedding.rows"  # rows of the whole table (the global id space)

_ONE = np.uint64(1)

# Most global rows read at once while picking a shard's rows out of a full file.
SPAN_ROWS = 1 << 18


@dataclass(frozen=True)
class ShardRows:
    """Shard `shard` of a table of `rows` global rows: `owned[k]` is the global id of its
    local row k (ascending).

    Ids are turned into local rows by a rank bitmap (a bit per global row, set where
    this shard holds it, in 64-bit words, with the count of set bits before each word):
    one word read and one popcount per id, a quarter of a byte per global row, where a
    binary search over `owned` cost 30x more on 8,192 ids.
    """

    shard: Shard
    rows: int
    owned: np.ndarray
    words: np.ndarray = field(repr=False)  # uint64, bit (id % 64) of word id // 64
    before: np.ndarray = field(repr=False)  # int64, set bits in the words before each

    @classmethod
    def of(cls, shard: Shard, rows: int, chunk: int = 1 << 22) -> ShardRows:
        assert chunk % 64 == 0, "a chunk fills whole words"
        owned, words = [], []
        for start in range(0, rows, chunk):  # chunk: a multiple of 64
            held = shard_of(np.arange(start, min(rows, start + chunk)), shard.count) == shard.index
            owned.append(start + np.flatnonzero(held))
            packed = np.packbits(held, bitorder="little")
            words.append(np.pad(packed, (0, -packed.size % 8)).view("<u8"))
        all_words = np.concatenate(words) if words else np.zeros(0, np.uint64)
        counts = np.bitwise_count(all_words).astype(np.int64)
        before = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        ids = np.concatenate(owned).astype(np.int64) if owned else np.zeros(0, np.int64)
        return cls(shard, rows, ids, all_words.astype(np.uint64), before)

    def metadata(self) -> dict[str, str]:
        """What a per-shard file says about itself."""
        return {SHARD_KEY: str(self.shard), ROWS_KEY: str(self.rows)}

    def localise(
        self, ids: np.ndarray, padding_id: int | None, table: str
    ) -> tuple[np.ndarray, int | None]:
        """Global `ids` as this shard's local rows, and `padding_id` as a local row (None
        when another shard holds it: no id of this request can then equal it).

        Raises
        ------
        InvalidRequest
            An id, or the padding id, outside the table's global rows.
        FailedPrecondition
            An id another shard holds (the caller's shard map is wrong or stale).
        """
        check_ids(ids, self.rows)
        if padding_id is not None:
            check_padding_id(padding_id, self.rows, table)
        held, local = self._rank(ids)
        if not held.all():
            position = int(np.flatnonzero(~held.reshape(-1))[0])
            foreign = int(ids.reshape(-1)[position])
            owner = int(shard_of(np.array([foreign]), self.shard.count)[0])
            raise FailedPrecondition(
                f"id {foreign} at position {position} is on shard {owner}/{self.shard.count} "
                f"of table {table!r}; this server holds shard {self.shard}: route ids with "
                "embedding_client.shards.shard_of (is the client's shard map stale?)"
            )
        if padding_id is not None:
            padding_held, padding_local = self._rank(np.array([padding_id], dtype=np.int64))
            padding_id = int(padding_local[0]) if padding_held[0] else None
        return local, padding_id

    def _rank(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global ids in [0, rows): whether this shard holds each, and its local row
        (the set bits before it; meaningful where held)."""
        word = ids >> 6
        bit = (ids & 63).astype(np.uint64)
        bits = self.words[word]
        held = ((bits >> bit) & _ONE).astype(bool)
        local = self.before[word] + np.bitwise_count(bits & ((_ONE << bit) - _ONE))
        return held, local.astype(np.int64, copy=False)


def expect(table: Table, index: int, count: int) -> None:
    """Refuse a request whose client believes this server holds shard `index`/`count` of
    `table` when it does not (a stale shard map); (0, 1) stands for the whole table."""
    if table.part != (index, count):
        held = table.held_shard
        what = "the whole table" if held is None else f"shard {held}"
        raise FailedPrecondition(
            f"the request is for shard {index}/{count} of table {table.name!r}, but this "
            f"server holds {what}: the client's shard map is stale (rebuild it from ListTables)"
        )


def pick_rows(
    read: Callable[[int, int], torch.Tensor], owned: np.ndarray, start: int, stop: int
) -> torch.Tensor:
    """Local rows [start, stop) of a shard, picked out of a full table read by `read`
    (global rows [a, b) as a tensor), never more than `SPAN_ROWS` global rows at once."""
    wanted = owned[start:stop]
    parts = []
    begin = 0
    while begin < wanted.size:
        first = int(wanted[begin])
        end = int(np.searchsorted(wanted, first + SPAN_ROWS))
        block = read(first, int(wanted[end - 1]) + 1)
        parts.append(block[torch.from_numpy(wanted[begin:end] - first)])
        begin = end
    return torch.cat(parts) if len(parts) > 1 else parts[0]
