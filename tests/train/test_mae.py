"""MAE through the trainer: sharded runs equal one device, and the downstream protocols
(linear probe, fine-tuning) load the pretrained encoder by name, with the probe's encoder
frozen (unchanged, and no backward pass through it) and its BatchNorm statistics moving."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from vistax.configs import mae as mae_configs
from vistax.configs import mae_finetune, mae_linear_probe
from vistax.train import init_from, loop, param_groups
from vistax.train.checkpointing import Checkpointer
from vistax.train.experiment import Experiment

ENCODER = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8)
DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def shrink(c, data_dir, steps=4):
    """A preset's config on a small encoder, a few steps, evaluations at the end."""
    c.input.data_dir = data_dir
    c.input.batch_size = 32
    c.model.update(ENCODER)
    if "mae" in c:
        c.mae.update(DECODER)
    c.peak_flops_per_device = 1e11
    c.duration = f"{steps} steps"
    c.schedule.warmup = "1 steps"
    c.log_every = "2 steps"
    c.checkpoint.every = f"{steps} steps"
    for ev in c.evals.values():
        ev.update(every=f"{steps} steps", batch_size=16)
    return c


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """A 4-step tiny MAE run (its probe dropped: tests/evals covers it); returns the workdir."""
    c = shrink(mae_configs.get_config("tiny"), data_dir)
    del c.evals["probe"]
    workdir = str(tmp_path_factory.mktemp("mae"))
    loop.train(c, workdir)
    return workdir


def test_mae_run_writes_reconstruction_pictures(pretrained):
    path = os.path.join(pretrained, "reconstructions", "pictures_00000004.png")
    picture = np.asarray(Image.open(path))
    cfg = mae_configs.get_config("tiny").evals.pictures
    rows = cfg.num_images + len(cfg.photos)
    cell = 96 + 4  # 32 px x 3, and a 2 px white frame
    assert picture.shape == (rows * cell, 4 * cell, 3)
    metrics = [line for line in open(os.path.join(pretrained, "metrics.jsonl"))]
    assert any("eval/pictures/masked_mse" in line and "photos_masked_mse" in line
               for line in metrics)


RNG = np.random.RandomState(0)
BATCHES = [{"image": RNG.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32)} for _ in range(4)]


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, tensor=1),
                                  dict(data=2, fsdp=2, tensor=2)], ids=["dp8", "dp2_fsdp2_tp2"])
def test_sharded_mae_matches_one_device(data_dir, mesh, step_losses):
    """Masks are drawn per example from the step key, identically however the batch is split."""
    def config(**mesh_sizes):
        c = shrink(mae_configs.get_config("tiny"), data_dir)
        c.evals = {}
        c.mesh.update(mesh_sizes)
        return c

    single = step_losses(config(data=1), jax.devices()[:1], BATCHES)
    sharded = step_losses(config(**mesh), jax.devices(), BATCHES)
    assert single[-1] < single[0]
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


def test_linear_probe_trains_only_the_head_on_the_frozen_encoder(pretrained, data_dir, tmp_path):
    c = shrink(mae_linear_probe.get_config(f"tiny,init={pretrained}"), data_dir, steps=3)
    workdir = str(tmp_path / "probe")
    loop.train(c, workdir)
    source, probe = init_from.read_params(pretrained), init_from.read_params(workdir)
    encoder_names = [n for n in probe if not n.startswith("head/")]
    assert len(encoder_names) == len([n for n in source if n.startswith("vit/")])
    for name in encoder_names:  # loaded by name, then never updated
        np.testing.assert_array_equal(probe[name], source[f"vit/{name}"], err_msg=name)
    assert np.abs(probe["head/kernel"]).sum() > 0  # trained from its zero init
    # BatchNorm without affine parameters: running statistics only, moved by training.
    exp = Experiment(c)
    state = Checkpointer(workdir, keep=1, asynchronous=False, create=False).restore(
        3, exp.abstract_state)
    stats = {"/".join(map(str, k)): np.asarray(v) for k, v in
             jax.tree_util.tree_flatten_with_path(jax.device_get(state["model_state"]))[0]}
    mean = next(v for k, v in stats.items() if "head_norm" in k and "mean" in k)
    assert mean.shape == (32,) and np.abs(mean).sum() > 0


def test_frozen_encoder_costs_no_backward_pass(data_dir):
    """Compiled FLOPs of a probe step (encoder frozen: stop_gradient) vs a fine-tuning step on
    the same model: the forward pass only, i.e. about a third."""
    def step_flops(module):
        c = shrink(module.get_config("tiny"), data_dir)
        c.evals = {}
        c.loss.update(mixup_alpha=0.0, cutmix_alpha=0.0)
        exp = Experiment(c, devices=jax.devices()[:1])
        batch = {"image": np.zeros((32, 32, 32, 3), np.float32),
                 "labels": np.zeros((32, 10), np.float32)}
        with exp.context():
            lowered = exp._step.lower(exp.abstract_state, exp.global_batch(batch))
        cost = lowered.compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    ratio = step_flops(mae_linear_probe) / step_flops(mae_finetune)
    assert ratio < 0.45, ratio


def test_finetune_loads_the_encoder_and_drops_the_decoder(pretrained, data_dir):
    c = shrink(mae_finetune.get_config(f"tiny,init={pretrained}"), data_dir)
    exp = Experiment(c, devices=jax.devices()[:1])
    params, summary = init_from.apply(c.init_from, exp.init_state()["params"])
    assert summary["fresh"] == ["head/bias", "head/kernel"]
    source = init_from.read_params(pretrained)
    loaded = summary["loaded"]
    assert set(loaded) == {n[len("vit/"):] for n in source if n.startswith("vit/")}
    flat = {n: np.asarray(x) for n, x in zip(param_groups.names(params), jax.tree.leaves(params))}
    for name in loaded:
        np.testing.assert_array_equal(flat[name], source[f"vit/{name}"], err_msg=name)
    assert c.param_groups.layer_decay == 0.75 and c.model.drop_path == 0.1
