"""Test set-up: 8 simulated CPU devices (a pod slice in miniature) and shared built-in data.

XLA_FLAGS must be set before jax is imported anywhere, hence here at the top of conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same programs in fresh Experiments; a persistent compilation cache
# (per test session) compiles each distinct program once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="vistax-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data dir with the built-in `digits` prepared once per session."""
    from vistax.data import pipeline
    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.dataset_info("digits", data_dir=path)
    return path


@pytest.fixture(scope="session")
def small_vit_config(data_dir):
    """make(**{"dotted.key": value}) -> the `tiny` digits config with a smaller, shardable ViT
    (width 64, 4 heads: divisible by 8-way FSDP and 2-way tensor parallelism)."""
    from vistax.configs import vit

    def make(**overrides):
        c = vit.get_config("tiny")
        c.input.data_dir = data_dir
        c.model.update(dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8))
        c.input.batch_size = 32
        c.peak_flops_per_device = 1e11  # skip the start-up CPU benchmark
        c.duration = "6 steps"
        c.schedule.warmup = "2 steps"
        c.log_every = "1 steps"
        c.checkpoint.every = "3 steps"
        c.evals.test.every = "6 steps"
        c.evals.test.batch_size = 64
        c.update_from_flattened_dict(overrides)
        return c

    return make
