"""Test set-up: 8 simulated CPU devices (a pod slice in miniature) and shared built-in data.

XLA_FLAGS must be set before jax is imported anywhere, hence here at the top of conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O2 instead of XLA's default -O3: the suite's programs are tiny and compiling them is
# most of its time. The Perceiver `query` variant's initialiser compiles in 4.2 s instead of
# 15-17 s. -O0 and -O1 compile as fast, but -O0 loses precision in exp/log (six closed-form
# tests failed at rtol 1e-6); -O2 passes them all. A level already in XLA_FLAGS is kept.
_xla_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_xla_flags] + [
    f"{flag}={value}" for flag, value in (("--xla_force_host_platform_device_count", 8),
                                          ("--xla_backend_optimization_level", 2))
    if flag not in _xla_flags]).strip()

# A directory per test session, shared by pytest-xdist's workers: the first process to import
# this file (xdist's controller) makes it and the workers inherit it through the environment.
_SESSION_ENV = "VISTAX_TEST_SESSION_DIR"
if not os.environ.get(_SESSION_ENV):
    import tempfile
    os.environ[_SESSION_ENV] = tempfile.mkdtemp(prefix="vistax-tests-")
# Many tests build the same programs in fresh Experiments or `vistax` subprocesses; a persistent
# compilation cache in the session directory compiles each distinct program once. It is set
# through the environment before jax is imported, so the workers and every subprocess the tests
# start (the CLI, multi-process runs) share it. A cache directory the user set is kept.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ[_SESSION_ENV], "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def vistax_command() -> list[str]:
    """The `vistax` command as tests start it in a subprocess: the console script installed
    beside this Python, else the module (a checkout used without installing)."""
    script = os.path.join(os.path.dirname(sys.executable), "vistax")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "vistax.launch.cli"]


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


# open_clip's wheel: its tokenizer, BPE vocabulary and model code are references for parity
# tests. Pinned here (it is not installed, only unpacked), fetched once into the test cache.
OPEN_CLIP_VERSION = "3.3.0"


def _test_cache_dir() -> str:
    """$VISTAX_TEST_CACHE if set, else ~/.cache/vistax-tests."""
    return os.path.abspath(os.path.expanduser(
        os.environ.get("VISTAX_TEST_CACHE") or "~/.cache/vistax-tests"))


@pytest.fixture(scope="session")
def open_clip_package_dir() -> str:
    """Directory holding the `open_clip/` package of the open-clip-torch wheel (unpacked, not
    installed: its __init__ imports torchvision; load single modules from it by path, or put the
    directory on sys.path). Fetched with `pip download --no-deps` into the test cache and reused;
    the test fails (does not skip) when the download fails, since CI reaches PyPI."""
    import fcntl
    import glob
    import shutil
    import subprocess
    import sys
    import zipfile

    cache = _test_cache_dir()
    target = os.path.join(cache, f"open_clip_torch-{OPEN_CLIP_VERSION}")
    if os.path.isfile(os.path.join(target, "open_clip", "tokenizer.py")):
        return target
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".open_clip.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers fetch it once between them
        if os.path.isfile(os.path.join(target, "open_clip", "tokenizer.py")):
            return target
        wheels = os.path.join(cache, "wheels")
        pattern = os.path.join(wheels, f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl")
        if not glob.glob(pattern):
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 f"open-clip-torch=={OPEN_CLIP_VERSION}", "-d", wheels],
                capture_output=True, text=True, timeout=600)
            if result.returncode != 0 or not glob.glob(pattern):
                pytest.fail(f"pip download open-clip-torch=={OPEN_CLIP_VERSION} failed (exit "
                            f"{result.returncode}):\n{result.stdout[-2000:]}\n"
                            f"{result.stderr[-2000:]}")
        partial = f"{target}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(sorted(glob.glob(pattern))[-1]) as wheel:
            wheel.extractall(partial)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier unpacking
        os.replace(partial, target)
    return target
