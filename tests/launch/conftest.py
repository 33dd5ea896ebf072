"""The `vistax` command run as a subprocess on 8 simulated CPU devices (fixture `cli`), and
stand-in executables that record how they were called (fixture `stand_ins`)."""

import json
import os
import subprocess
import sys

import pytest

from vistax.launch import local


class Cli:
    def __init__(self, command: list[str]):
        self.command = command

    def run(self, *args, cwd, timeout=300, path=None) -> subprocess.CompletedProcess:
        """`path`: the PATH the command sees (default: this one)."""
        env = local.child_env(8)  # the session's XLA_FLAGS, 8 devices
        if path is not None:
            env["PATH"] = path
        return subprocess.run(self.command + list(args), cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)

    @staticmethod
    def explain(result) -> str:
        """Exit code and output tails, for assertion messages."""
        return (f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                f"stderr:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def cli(vistax_command) -> Cli:
    return Cli(vistax_command)


class StandIns:
    """Executables in `bin_dir` standing in for srun, sbatch, gcloud, ...: each appends its
    argv (a JSON list) to `bin_dir`/calls, then runs a shell snippet."""

    def __init__(self, bin_dir):
        self.bin_dir = bin_dir

    def add(self, name: str, text: str) -> None:
        self.bin_dir.mkdir(exist_ok=True)
        path = self.bin_dir / name
        path.write_text("#!/bin/sh\n"
                        f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "
                        f"\"$@\" >> {self.bin_dir}/calls\n{text}\n")
        os.chmod(path, 0o755)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.bin_dir / "calls").read_text().splitlines()]


@pytest.fixture
def stand_ins(tmp_path) -> StandIns:
    return StandIns(tmp_path / "bin")
