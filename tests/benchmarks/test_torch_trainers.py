"""Every tiny bench case with a PyTorch reference (one per kind) gets it as `vistax bench`
builds it: from the case's Experiment and first batch, with as many trained parameters as ours,
and one step of it trains (a finite loss)."""

import jax
import numpy as np
import pytest

from vistax.benchmarks import cases, pipeline_bench, run
from vistax.train.experiment import Experiment

torch = pytest.importorskip("torch")
torch_trainers = pytest.importorskip("vistax.benchmarks.torch_trainers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCED = [name for name, case in cases.CASES.items() if case.torch and name.endswith("_tiny")]


def test_every_reference_kind_is_registered():
    kinds = {case.torch for case in cases.CASES.values() if case.torch}
    assert kinds <= set(torch_trainers.REFERENCES)
    assert kinds == {cases.CASES[name].torch for name in REFERENCED}
    assert {"vit", "two_towers", "mae", "dino"} <= kinds


@pytest.mark.parametrize("name", REFERENCED)
def test_bench_builds_the_reference_of_a_case(name, data_dir, count_params):
    case = cases.CASES[name]
    config = case.build_config(data_dir)
    config.input.batch_size = 8
    exp = Experiment(config, devices=jax.devices()[:1])
    _, local = pipeline_bench.run(config, batches=1, warmup=0)
    trainer, status = run._torch_trainer(  # pylint: disable=protected-access
        case, exp, local, torch, "ok")
    assert status == "ok", status
    (step, _), model = trainer
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == count_params(exp.objective)
    assert np.isfinite(float(step()))
