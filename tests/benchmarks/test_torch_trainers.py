"""Every tiny bench case with a PyTorch reference (one per kind) gets it as `vistax bench`
builds it: from the case's Experiment and first batch, with as many trained parameters as ours,
and one step of it trains (a finite loss)."""

import jax
import numpy as np
import pytest
from flax import nnx

from vistax.benchmarks import cases, pipeline_bench, run
from vistax.train.experiment import Experiment

torch = pytest.importorskip("torch")
torch_trainers = pytest.importorskip("vistax.benchmarks.torch_trainers")

REFERENCED = [name for name, case in cases.CASES.items() if case.torch and name.endswith("_tiny")]


def test_every_reference_kind_is_registered():
    kinds = {case.torch for case in cases.CASES.values() if case.torch}
    assert kinds <= set(torch_trainers.REFERENCES)
    assert kinds == {cases.CASES[name].torch for name in REFERENCED}
    assert {"vit", "two_towers", "mae", "dino"} <= kinds


@pytest.mark.parametrize("name", REFERENCED)
def test_bench_builds_the_reference_of_a_case(name, data_dir):
    case = cases.CASES[name]
    config = case.build_config(data_dir)
    config.input.batch_size = 8
    exp = Experiment(config, devices=jax.devices()[:1])
    _, local = pipeline_bench.run(config, batches=1, warmup=0)
    trainer, status = run._torch_trainer(  # pylint: disable=protected-access
        case, exp, local, torch, "ok")
    assert status == "ok", status
    (step, _), model = trainer
    model_params = nnx.eval_shape(lambda: exp.objective.build_model(nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model_params, nnx.Param)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ours
    assert np.isfinite(float(step()))
