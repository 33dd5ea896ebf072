"""Checkpoints: an interrupted and resumed run ends bitwise identical to an uninterrupted one
(augmentation, dropout and data order included); a checkpoint restores onto another mesh."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from vistax.train import loop
from vistax.train.checkpointing import Checkpointer
from vistax.train.experiment import Experiment


def _final_params(config, workdir):
    exp = Experiment(config)
    ckpt = Checkpointer(workdir, keep=3, asynchronous=False)
    state = ckpt.restore(ckpt.latest_step(), exp.abstract_state)
    ckpt.close()
    return jax.device_get(state)


def test_interrupted_run_resumes_bitwise(small_vit_config, tmp_path):
    # Random crops, label smoothing, mixup/cutmix and drop path all draw randomness.
    config = small_vit_config(**{"model.drop_path": 0.1, "loss.mixup_alpha": 0.8,
                                 "loss.cutmix_alpha": 1.0, "mesh.data": 4, "mesh.fsdp": 2})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train(config, straight)
    loop.train(config, resumed, stop_after=4)  # dies after step 4; step 3 was checkpointed
    assert Checkpointer(resumed, keep=3, asynchronous=False).all_steps() == [3]
    loop.train(config, resumed)  # resumes from step 3
    a, b = _final_params(config, straight), _final_params(config, resumed)
    assert int(a["step"]) == int(b["step"]) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

    def losses(workdir):
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    # The resumed run logs steps 1-4, then 4-6 again; every step's loss equals the straight run's.
    straight_losses = losses(straight)
    for step, value in losses(resumed).items():
        assert value == straight_losses[step]


def test_checkpoint_restores_onto_a_smaller_mesh(small_vit_config, tmp_path):
    workdir = str(tmp_path / "run")
    config8 = small_vit_config(**{"mesh.data": 1, "mesh.fsdp": 8, "duration": "3 steps"})
    loop.train(config8, workdir)
    saved = _final_params(config8, workdir)

    config4 = small_vit_config(**{"mesh.data": 2, "mesh.fsdp": 2, "duration": "3 steps"})
    exp4 = Experiment(config4, devices=jax.devices()[:4])
    ckpt = Checkpointer(workdir, keep=3, asynchronous=False)
    state4 = ckpt.restore(3, exp4.abstract_state)
    ckpt.close()
    kernel = state4["params"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    assert kernel.sharding.shard_shape(kernel.shape) == (2, 64 // 2, 128)
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(state4))):
        np.testing.assert_array_equal(x, y)
    # And training continues on the new mesh.
    batch = {"image": np.zeros((32, 32, 32, 3), np.float32), "label": np.zeros(32, np.int32)}
    state4, metrics = exp4.train_step(state4, exp4.global_batch(batch))
    assert int(state4["step"]) == 4 and np.isfinite(float(metrics["loss"]))


def test_checkpoint_of_another_model_is_refused_clearly(small_vit_config, tmp_path):
    workdir = str(tmp_path / "run")
    loop.train(small_vit_config(**{"duration": "3 steps"}), workdir)
    wider = small_vit_config(**{"duration": "3 steps", "model.mlp_dim": 256})
    # Refused from the checkpoint's metadata before any read, naming the arrays and shapes.
    with pytest.raises(ValueError, match=r"does not fit.*: params/\S*mlp\S* is \(2, 128\) in "
                                         r"the checkpoint, \(2, 256\) in this config.*"
                                         r"\(9 differences\)"):
        loop.train(wider, workdir)
    # Another global batch size cannot continue the data stream without repeats or gaps.
    bigger = small_vit_config(**{"duration": "4 steps", "input.batch_size": 64})
    with pytest.raises(ValueError, match=r"input.batch_size=64, but checkpoint step 3 .* "
                                         r"trained with 32"):
        loop.train(bigger, workdir)
    # The refused runs wrote no checkpoint and kept the original one.
    assert Checkpointer(workdir, keep=3, asynchronous=False).all_steps() == [3]


def test_training_resumes_on_another_mesh_shape(small_vit_config, tmp_path):
    """FSDP 8 -> FSDP 4 x tensor 2: the trainer restores the checkpoint into the new shardings
    and continues where the uninterrupted FSDP run would be (same data, float-close losses)."""
    fsdp = small_vit_config(**{"mesh.data": 1, "mesh.fsdp": 8})
    mixed = small_vit_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    loop.train(fsdp, straight)
    loop.train(fsdp, moved, stop_after=4)  # checkpoint at step 3
    loop.train(mixed, moved)

    def losses(workdir):
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    a, b = losses(straight), losses(moved)
    np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [a[s] for s in (4, 5, 6)], rtol=1e-5)
    state = _final_params(mixed, moved)
    assert int(state["step"]) == 6
    exp = Experiment(mixed)
    kernel = exp.abstract_state["params"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (2, 64 // 4, 128 // 2)


def test_sigterm_in_a_single_process_run_saves_the_step_and_returns(small_vit_config, tmp_path,
                                                                    monkeypatch):
    """Without peers, the notice is taken after the step in flight: that step is saved, the
    trainer returns normally (exit code 0 from the CLI) and restores the SIGTERM handler."""
    workdir = str(tmp_path / "run")
    train_step = Experiment.train_step

    def step_then_signal(self, state, batch):
        state, metrics = train_step(self, state, batch)
        if int(state["step"]) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    monkeypatch.setattr(Experiment, "train_step", step_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    loop.train(small_vit_config(), workdir)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert Checkpointer(workdir, keep=3, asynchronous=False).all_steps() == [2]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "preempted" in r] == [2]
    assert max(r["step"] for r in rows) == 2
