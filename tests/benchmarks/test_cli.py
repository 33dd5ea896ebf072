"""`vistax bench` end to end in a subprocess: one tiny case (with its PyTorch equivalent where
torch is installed) and a checkpoint save, two timed steps, the table and the JSON report."""

import importlib.util
import os
import subprocess
import sys

import pytest

from vistax.benchmarks import report
from vistax.train import compile_options

@pytest.fixture
def bench(vistax_command):
    """bench(*args, cwd) -> `vistax bench *args` run on one CPU device with the CLI's own
    malloc settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "VISTAX_MALLOC_TUNING")}
    env["JAX_PLATFORMS"] = "cpu"

    def run(*args, cwd):
        return subprocess.run(vistax_command + ["bench", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
    return run


@pytest.mark.slow
def test_bench_one_tiny_case_writes_the_report(bench, tmp_path, data_dir):
    path = str(tmp_path / "bench.json")
    result = bench("--cases=vit_tiny,checkpoint:vit_tiny", "--steps=2", "--warmup=1",
                   "--peak_size=128", f"--data_dir={data_dir}", f"--json={path}",
                   cwd=str(tmp_path))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rep = report.read_json(path)
    (case,) = rep["cases"]
    assert case["name"] == "vit_tiny" and case["batch_size"] == 128
    assert case["shapes"] == {"image": [128, 32, 32, 3], "labels": [128, 10]}
    assert case["jax"]["step_s"]["n"] == 2 and case["jax"]["examples_per_s"] > 0
    assert 0 < case["jax"]["mfu"] and case["flops_source"] == "analytic"
    assert case["compiler_options"] == compile_options.CPU_DOTS["eigen"]
    assert case["pipeline"]["examples_per_s"] > 0 and case["pipeline"]["ratio_to_step"] > 0
    if importlib.util.find_spec("torch") is not None:
        assert case["torch"]["status"] == "ok", case["torch"]
        assert case["torch"]["params"] == case["params"] and case["ratio"] > 0
    else:
        assert case["torch"]["status"] == "torch not installed" and case["ratio"] is None
    ck = rep["checkpoint"]
    assert ck["case"] == "vit_tiny" and ck["every"] == "1000 steps" and ck["bytes"] > 0
    assert 0 < ck["blocking_share_pct"] < 100
    assert rep["protocol"]["steps"] == 2 and rep["peak"]["size"] == 128
    # The CLI restarted itself with glibc's huge-page malloc (Linux/glibc), and says so.
    import platform  # pylint: disable=import-outside-toplevel
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert "glibc.malloc.hugetlb=1" in rep["host"]["glibc_tunables"]
        assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in result.stdout
    assert "vit_tiny" in result.stdout and "JAX/torch" in result.stdout
    assert f"wrote {path}" in result.stdout


def test_unknown_case_is_a_usage_error(bench, tmp_path):
    result = bench("--cases=vit_huge", cwd=str(tmp_path))
    assert result.returncode != 0
    assert "unknown case 'vit_huge'" in result.stderr


def test_accelerator_cases_are_a_usage_error_on_cpu(bench, tmp_path):
    result = bench("--cases=accelerator", cwd=str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "are sized for a GPU/TPU chip" in result.stderr
    assert "vit_b16_224_bf16" in result.stderr
