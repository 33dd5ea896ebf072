"""The `vistax` command run as a subprocess on 8 simulated CPU devices (fixture `cli`)."""

import os
import subprocess
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "vistax")
VISTAX = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "vistax.launch.cli"]


class Cli:
    @staticmethod
    def run(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=8")
        return subprocess.run(VISTAX + list(args), cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)

    @staticmethod
    def explain(result) -> str:
        """Exit code and output tails, for assertion messages."""
        return (f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                f"stderr:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()
