"""Test set-up: 8 simulated CPU devices (a pod slice in miniature) and shared built-in data.

XLA_FLAGS must be set before jax is imported anywhere, hence here at the top of conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir with the built-in `digits` prepared once per session."""
    from vistax.data import pipeline
    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.dataset_info("digits", data_dir=path)
    return path
