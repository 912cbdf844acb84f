"""Which shard holds a row: the one partition function, shared by client and server.

A table split into N shards keeps row `id` on shard ``mix64(id) % N``. `mix64` is
splitmix64's finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", 2014): a bijection on 64-bit integers whose every output bit depends on
every input bit, so contiguous hot id ranges spread evenly over the shards instead of
landing on one. Ids on the wire stay global; only the placement uses the mix.

Anyone can compute it without this package::

    z = id & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    z ^= z >> 31
    shard = z % N
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The most shards a table may have: ShardOf's index and count are uint32 on the wire.
MAX_SHARDS = (1 << 32) - 1
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of each id (as uint64), elementwise; any shape."""
    z = np.asarray(ids).astype(np.uint64)  # a copy: the steps below work in place
    with np.errstate(over="ignore"):  # multiplication modulo 2**64 is the point
        z ^= z >> _S30
        z *= _M1
        z ^= z >> _S27
        z *= _M2
        z ^= z >> _S31
    return z


def shard_of(ids: np.ndarray, count: int) -> np.ndarray:
    """The shard (0 .. count-1, as int64) of each id in a table split into `count`."""
    if count < 1:
        raise ValueError(f"a table has at least one shard, not {count}")
    if count == 1:
        return np.zeros(np.shape(ids), dtype=np.int64)
    return (mix64(ids) % np.uint64(count)).astype(np.int64)


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (written ``I/N``, counting from 0)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count} does not exist: I/N needs 0 <= I < N"
            )
        if self.count > MAX_SHARDS:
            raise ValueError(
                f"shard {self.index}/{self.count}: at most {MAX_SHARDS} shards (the wire's "
                "ShardOf carries 32-bit numbers)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (e.g. ``"0/4"``, the first of four) as a Shard."""
        index, sep, count = str(text).strip().partition("/")
        try:
            if not sep:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError as exc:
            detail = f": {exc}" if str(exc) else ""
            raise ValueError(
                f"shard {text!r} is not I/N (shard I of N, counting from 0: 0/2 and 1/2 "
                f"split a table in two){detail}"
            ) from None

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owned(self, rows: int, chunk: int = 1 << 22) -> np.ndarray:
        """The global ids in [0, rows) this shard holds, ascending (int64); its local row
        `k` holds global id ``owned[k]``."""
        parts = []
        for start in range(0, rows, chunk):
            ids = np.arange(start, min(rows, start + chunk))
            parts.append(start + np.flatnonzero(shard_of(ids, self.count) == self.index))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
