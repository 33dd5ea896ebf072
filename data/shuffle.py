"""grain's global index shuffle, computed for many indices at once in numpy.

`grain.MapDataset.shuffle` maps each index through a 4-round Simon block cipher keyed by
`seed + epoch`, cycle-walking until the result falls inside the split (Black & Rogaway 2002,
"Ciphers with arbitrary finite domains"). The cipher's block has at least 16 bits, so on a
split of 1,438 records an index walks about 2^16 / 1438 = 46 times, one C++ call per index:
28 us per element on this CPU, a tenth of the tiny MAE preset's whole pipeline.

`EpochShuffle` computes the same permutation, bit for bit (tests compare it with grain's
function), a block of 65,536 indices at a time with numpy: the data order is unchanged.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Any, Sequence

import grain
import numpy as np

# grain's choices (grain/_src/python/dataset/transformations/shuffle.py and index_shuffle.cc).
ROUNDS = 4
MIN_BLOCK_BITS = 16
# Indices whose permutation is computed together and kept (a few blocks at a time).
BLOCK = 1 << 16
_BLOCKS_KEPT = 4
# Block spaces up to 2^TABLE_BITS are encrypted whole (8 MiB at most), so that small splits,
# where an index walks ~2^16 / n times, walk by table lookups.
TABLE_BITS = 20
_MASK32 = 0xFFFFFFFF


def _seed_seq(seed: int, n: int) -> list[int]:
    """`std::seed_seq{seed}.generate(out, out + n)`: the C++ standard's algorithm
    ([rand.util.seedseq]), which grain uses for the round keys."""
    out = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(2, n)  # max(s + 1, n) with one seed word
    for k in range(m):
        x = out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n]
        r1 = (1664525 * (x ^ (x >> 27))) & _MASK32
        r2 = (r1 + (1 if k == 0 else (k % n + seed if k == 1 else k % n))) & _MASK32
        out[(k + p) % n] = (out[(k + p) % n] + r1) & _MASK32
        out[(k + q) % n] = (out[(k + q) % n] + r2) & _MASK32
        out[k % n] = r2
    for k in range(m, m + n):
        x = (out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _MASK32
        r3 = (1566083941 * (x ^ (x >> 27))) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        out[(k + p) % n] ^= r3
        out[(k + q) % n] ^= r4
        out[k % n] = r4
    return out


def block_bits(max_index: int) -> int:
    """The cipher's block size for indices in [0, max_index]: even, at least 16 bits."""
    bits = math.ceil(math.log2(max_index)) if max_index > 0 else 0
    return max(bits + bits % 2, MIN_BLOCK_BITS)


def _encrypt(values: np.ndarray, keys: list[int], word: int) -> np.ndarray:
    """Simon's Feistel rounds on `word`-bit halves of uint64 `values`."""
    mask = np.uint64((1 << word) - 1)
    w = np.uint64(word)

    def rotl(x, r):
        return ((x << np.uint64(r)) | (x >> (w - np.uint64(r)))) & mask

    def f(x):
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    left, right = (values >> w) & mask, values & mask
    for i in range(0, len(keys), 2):
        left ^= f(right) ^ (np.uint64(keys[i]) & mask)
        right ^= f(left) ^ (np.uint64(keys[i + 1]) & mask)
    return (left << w) | right


def shuffled(indices: np.ndarray, max_index: int, seed: int) -> np.ndarray:
    """`grain`'s `index_shuffle(i, max_index, seed, rounds=4)` for every i in `indices`."""
    indices = np.asarray(indices, np.uint64)
    if max_index == 0:
        return np.zeros(indices.shape, np.int64)
    keys = _seed_seq(seed % 2**32, ROUNDS)
    bits = block_bits(max_index)
    if bits <= TABLE_BITS:  # encrypt the whole block space once; then walking is a lookup
        table = _encrypt(np.arange(1 << bits, dtype=np.uint64), keys, bits // 2)
        encrypt = table.__getitem__
    else:
        encrypt = functools.partial(_encrypt, keys=keys, word=bits // 2)
    out = encrypt(indices)
    walking = np.flatnonzero(out > max_index)
    while walking.size:  # cycle-walk the values that fell outside [0, max_index]
        out[walking] = encrypt(out[walking])
        walking = walking[out[walking] > max_index]
    return out.astype(np.int64)


class EpochShuffle(grain.MapDataset):
    """`parent.shuffle(seed)` (a new permutation each epoch when repeated after it) with the
    permutation computed a block of indices at a time; same elements in the same order."""

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        if not 0 <= seed < 2**32:
            raise ValueError(f"shuffle seed must be in [0, 2**32), got {seed}")
        self._seed = int(seed)
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getstate__(self) -> dict[str, Any]:  # worker processes start with no blocks
        state = dict(self.__dict__)
        state["_blocks"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _block(self, epoch: int, block: int) -> np.ndarray:
        key = (epoch, block)
        with self._lock:
            found = self._blocks.get(key)
        if found is None:
            n = len(self._parent)
            start = block * BLOCK
            found = shuffled(np.arange(start, min(start + BLOCK, n)), n - 1,
                             (self._seed + epoch) % 2**32)
            with self._lock:
                if len(self._blocks) >= _BLOCKS_KEPT:
                    self._blocks.pop(next(iter(self._blocks)))
                self._blocks[key] = found
        return found

    def _shuffled_index(self, index: int) -> int:
        n = len(self._parent)
        epoch, in_epoch = divmod(index, n)
        block, offset = divmod(in_epoch, BLOCK)
        return int(self._block(epoch, block)[offset]) + epoch * n

    def parent_index(self, index: int) -> int:
        """Which of the parent's elements `self[index]` is (index >= len: a later epoch's)."""
        return self._shuffled_index(index) % len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._shuffled_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems(  # pylint: disable=protected-access
            [self._shuffled_index(i) for i in indices])
