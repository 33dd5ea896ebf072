"""EpochShuffle: grain's index shuffle, computed in numpy blocks, in the same order."""
from __future__ import annotations

import pickle

import grain
import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import (  # the function grain calls
    index_shuffle_module)

from vistax.data import shuffle


def _grain(indices, max_index: int, seed: int) -> np.ndarray:
    return np.array([index_shuffle_module.index_shuffle(int(i), max_index=max_index, seed=seed,
                                                        rounds=shuffle.ROUNDS) for i in indices])


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1438, 65535, 65536, 65537, 1_281_167, 2**24 + 3,
                               3 * 10**9])
def test_shuffled_equals_grains_index_shuffle(n):
    """Block sizes 16 (table lookups) to 32 bits (walked in place), powers of two included."""
    rng = np.random.default_rng(n)
    indices = np.unique(np.concatenate([np.arange(min(n, 200)), rng.integers(0, n, 200)]))
    for seed in (0, 7, 2**32 - 1, int(rng.integers(2**32))):
        np.testing.assert_array_equal(shuffle.shuffled(indices, n - 1, seed),
                                      _grain(indices, n - 1, seed), err_msg=f"seed {seed}")


def test_block_bits_is_even_and_at_least_16():
    assert [shuffle.block_bits(m) for m in (0, 1, 2**16, 2**16 + 1, 2**17 + 1, 2**40)] == [
        16, 16, 16, 18, 18, 40]


@pytest.mark.parametrize("n", [1438, 70_000])  # one block per epoch, and two
def test_epoch_shuffle_reads_what_grains_shuffle_reads_over_epochs(n, monkeypatch):
    monkeypatch.setattr(shuffle, "_BLOCKS_KEPT", 2)  # blocks are recomputed after eviction
    source = grain.MapDataset.range(n)
    ours = shuffle.EpochShuffle(source, seed=12345).repeat()
    theirs = source.shuffle(seed=12345).repeat()
    rng = np.random.default_rng(0)
    indices = np.concatenate([np.arange(3 * n - 100, 3 * n + 100),  # epochs 2 and 3
                              rng.integers(0, 5 * n, 40)])
    assert [ours[int(i)] for i in indices] == [theirs[int(i)] for i in indices]
    epoch_1 = ours[n:2 * n]
    assert sorted(epoch_1[i] for i in range(len(epoch_1))) == list(range(n))  # a permutation
    copy = pickle.loads(pickle.dumps(ours))  # what grain's worker processes receive
    assert [copy[int(i)] for i in indices[-50:]] == [theirs[int(i)] for i in indices[-50:]]


def test_bad_seed_names_it():
    with pytest.raises(ValueError, match="shuffle seed must be in"):
        shuffle.EpochShuffle(grain.MapDataset.range(4), seed=2**32)
