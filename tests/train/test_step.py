"""The train step and loop guards: gradient accumulation equals the full batch, a NaN/Inf stops
the run without saving the bad state, metrics go to metrics.jsonl and TensorBoard."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from vistax.train import loop
from vistax.train.checkpointing import Checkpointer
from vistax.train.experiment import Experiment

RNG = np.random.RandomState(1)
BATCH = {"image": RNG.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32),
         "label": RNG.randint(0, 10, (32,)).astype(np.int32)}


def _one_step(config):
    exp = Experiment(config)
    state = exp.init_state()
    state, metrics = exp.train_step(state, exp.global_batch(BATCH))
    return jax.device_get(state["params"]), jax.device_get(metrics)


def test_gradient_accumulation_equals_the_full_batch(small_vit_config):
    # SGD makes the update linear in the gradient, so any accumulation error shows directly.
    base = {"optimizer.name": "sgd", "optimizer.momentum": 0.0, "schedule.base_lr": 0.5,
            "schedule.warmup": "0 steps", "model.head_zero_init": False, "mesh.data": 8}
    full_params, full = _one_step(small_vit_config(**base))
    acc_params, acc = _one_step(small_vit_config(**base, grad_accum_steps=4))
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-5)
    # Parameters moved by lr x grad with lr 0.5 (updates of order 1): summing 4 microbatch
    # gradients in another order changes them by ~1e-5 absolute; a wrong scale would be ~0.1-1.
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_trains_float32_parameters(small_vit_config):
    base = {"model.head_zero_init": False, "schedule.warmup": "0 steps"}
    params16, m16 = _one_step(small_vit_config(**base, **{"model.dtype": "bfloat16"}))
    params32, m32 = _one_step(small_vit_config(**base))
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params16))
    # bf16 keeps 8 bits of mantissa: loss and gradient norm agree to about 1%.
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)


def test_non_finite_loss_stops_without_saving(small_vit_config, tmp_path):
    # Adam moves every weight by ~lr per step: lr 1e30 overflows the logits at step 2.
    config = small_vit_config(**{"schedule.base_lr": 1e30, "schedule.warmup": "0 steps",
                                 "schedule.name": "constant", "checkpoint.every": "1 steps",
                                 "model.head_zero_init": False})
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.NonFiniteError, match=r"first at step 2.*last good checkpoint is step 1"):
        loop.train(config, workdir)
    assert Checkpointer(workdir, keep=3, asynchronous=False).all_steps() == [1]


def test_metrics_jsonl_and_tensorboard(small_vit_config, tmp_path):
    workdir = str(tmp_path / "run")
    loop.train(small_vit_config(**{"duration": "4 steps", "log_every": "2 steps",
                                   "evals.test.every": "4 steps"}), workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for row in train_rows:
        for key in ("train/loss", "train/grad_norm", "train/learning_rate", "train/accuracy",
                    "perf/images_per_sec", "perf/mfu", "train/epoch"):
            assert isinstance(row[key], float), key
        assert row["train/epoch"] == pytest.approx(row["step"] * 32 / 1438)
    evals = [r for r in rows if "eval/test/accuracy" in r]
    assert [r["step"] for r in evals] == [4] and evals[0]["eval/test/num_examples"] == 359
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 64
