"""Datasets prepared once per test session into a temporary data dir."""
from __future__ import annotations

import pytest

from vistax.data import builtins

# Small `shapes` sizes keep preparation well under a second.
SHAPES_SIZES = dict(num_train=240, num_test=48, num_heldout=48)


@pytest.fixture(scope="session")
def shapes_sizes() -> dict[str, int]:
    return dict(SHAPES_SIZES)


@pytest.fixture(scope="session")
def digits_dir(data_dir) -> str:
    """Version directory of the prepared `digits` dataset."""
    return builtins.prepare_builtin("digits", data_dir)


@pytest.fixture(scope="session")
def shapes_dir(data_dir) -> str:
    """Version directory of a small prepared `shapes` dataset."""
    return builtins.prepare_builtin("shapes", data_dir, **SHAPES_SIZES)
