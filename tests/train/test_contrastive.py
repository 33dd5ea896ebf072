"""The contrastive objectives (CLIP / SigLIP / LiT / CoCa) through the shared trainer: sharded
runs equal one device, the CLIP temperature clip, LiT's locked tower, CoCa's weighted loss, and a
whole run with its evaluators."""

import json
import math
import os

import jax
import numpy as np
import pytest

from vistax.configs import clip, coca, lit, siglip
from vistax.data import builtins
from vistax.train import loop, sharding
from vistax.train.experiment import Experiment

TEXT_LENGTH = 16


@pytest.fixture(scope="module")
def shapes_path(data_dir):
    return builtins.prepare_builtin("shapes", data_dir, num_train=96, num_test=48, num_heldout=48)


@pytest.fixture(scope="module")
def small_config(shapes_path, data_dir):
    """make(module, **{"dotted.key": value}) -> the module's `tiny` config, shrunk."""

    def make(module, **overrides):
        c = module.get_config(f"tiny,text_length={TEXT_LENGTH}")
        c.input.data_dir = data_dir
        c.input.batch_size = 32
        c.input.pp = c.input.pp.replace("resize(48)", "resize(16)")
        c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=8,
                             image_size=16)
        c.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=4, max_len=TEXT_LENGTH)
        c.model.embed_dim = 16
        if "decoder_depth" in c.model:
            c.model.update(decoder_depth=1, caption_queries=4)
        c.peak_flops_per_device = 1e11
        c.duration = "6 steps"
        c.schedule.warmup = "2 steps"
        c.log_every = "3 steps"
        c.checkpoint.every = "6 steps"
        for name in list(c.evals):
            ev = c.evals[name]
            ev.update(dataset=shapes_path, batch_size=16, every="6 steps",
                      pp=ev.pp.replace("resize(48)", "resize(16)"))
        c.input.dataset = shapes_path
        c.update_from_flattened_dict(overrides)
        return c

    return make


RNG = np.random.RandomState(0)


def _batch(n=32):
    """Random images and byte-token texts with the end-of-text (2) at a random position."""
    tokens = RNG.randint(3, 259, (n, TEXT_LENGTH)).astype(np.int32)
    ends = RNG.randint(2, TEXT_LENGTH, n)
    tokens[np.arange(n), ends] = 2
    tokens[np.arange(TEXT_LENGTH)[None] > ends[:, None]] = 0
    return {"image": RNG.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32), "text": tokens}


BATCHES = [_batch() for _ in range(5)]


def _run(config, devices, steps=5):
    exp = Experiment(config, devices=devices)
    state = exp.init_state()
    losses = []
    for batch in BATCHES[:steps]:
        state, metrics = exp.train_step(state, exp.global_batch(batch))
        losses.append(float(jax.device_get(metrics["loss"])))
    return exp, state, np.array(losses)


DP8, DP2_FSDP2_TP2 = dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def one_device_losses(small_config):
    """losses(module): the dense loss on one device over BATCHES, computed once per module."""
    cache = {}

    def losses(module):
        if module.__name__ not in cache:
            config = small_config(module, **{"mesh.data": 1, "loss.impl": "dense"})
            cache[module.__name__] = _run(config, jax.devices()[:1])[2]
        return cache[module.__name__]

    return losses


# CoCa's contrastive part is CLIP's: its 3-D mesh case covers CLIP's loss on that mesh and the
# decoder's shardings.
@pytest.mark.parametrize("module, mesh", [
    pytest.param(clip, DP8, id="clip-dp8"), pytest.param(siglip, DP8, id="siglip-dp8"),
    pytest.param(siglip, DP2_FSDP2_TP2, id="siglip-dp2_fsdp2_tp2"),
    pytest.param(coca, DP2_FSDP2_TP2, id="coca-dp2_fsdp2_tp2")])
def test_sharded_losses_match_one_device(small_config, one_device_losses, module, mesh):
    single = one_device_losses(module)
    overrides = {f"mesh.{k}": v for k, v in mesh.items()}
    _, _, sharded = _run(small_config(module, **overrides, **{"loss.impl": "sharded"}),
                         jax.devices())
    assert single[-1] < single[0]
    # Tolerance: float32 sums in another order over 5 Adam steps (observed ~1e-7 relative).
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


def test_clip_temperature_is_clipped_at_100_after_every_step(small_config):
    config = small_config(clip, **{"model.log_temperature_init": math.log(300.0)})
    exp = Experiment(config, devices=jax.devices()[:1])
    state = exp.init_state()
    values = []
    for batch in BATCHES[:3]:
        state, _ = exp.train_step(state, exp.global_batch(batch))
        values.append(float(state["params"]["log_temperature"][...]))
    # One Adam step cannot move ln 300 below ln 100: the first step lands exactly on the clip;
    # later steps may move it down, never above.
    assert values[0] == pytest.approx(math.log(100.0), abs=1e-7)
    assert max(values) <= math.log(100.0) + 1e-7
    # SigLIP has no clip: its temperature moves freely from ln 10.
    _, state, _ = _run(small_config(siglip, **{"model.log_temperature_init": math.log(300.0)}),
                       jax.devices()[:1], steps=2)
    assert float(state["params"]["log_temperature"][...]) > math.log(200.0)


def test_lit_keeps_the_image_tower_locked(small_config):
    exp, state, losses = _run(small_config(lit), jax.devices()[:1], steps=3)
    before = exp.init_state()["params"]
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    changed = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        changed[sharding.path_name(path)] = not np.array_equal(value, flat_before[path])
    image = [name for name in changed if name.startswith("image/")]
    assert image and not any(changed[name] for name in image)
    assert changed["text_proj/kernel"] and changed["image_proj/kernel"]


def test_coca_loss_weighs_contrastive_and_caption_losses(small_config):
    weights = {"loss.caption_weight": 2.0, "loss.contrastive_weight": 1.0}
    exp = Experiment(small_config(coca, **weights), devices=jax.devices()[:1])
    state = exp.init_state()
    _, metrics = exp.train_step(state, exp.global_batch(BATCHES[0]))
    m = {k: float(jax.device_get(v)) for k, v in metrics.items()}
    assert m["loss"] == pytest.approx(m["contrastive_loss"] + 2.0 * m["caption_loss"], rel=1e-6)
    # At initialisation the caption head is near uniform over the (rounded-up) 384-id vocabulary.
    assert m["caption_loss"] == pytest.approx(math.log(384), rel=0.05)


def test_config_errors_name_the_key(small_config):
    with pytest.raises(ValueError, match="loss.type='hinge'"):
        Experiment(small_config(clip, **{"loss.type": "hinge"}), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="bias_init"):
        Experiment(small_config(clip, **{"loss.type": "sigmoid"}), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="Set the tokenizer"):
        clip.get_config("B/16")


@pytest.mark.parametrize("module", [clip, siglip, pytest.param(coca, marks=pytest.mark.slow)],
                         ids=["clip", "siglip", "coca"])
def test_a_run_reports_zero_shot_and_retrieval(small_config, module, tmp_path):
    workdir = str(tmp_path / "run")
    loop.train(small_config(module), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    final = {k: v for row in rows if row["step"] == 6 for k, v in row.items()}
    assert 0.0 <= final["eval/zeroshot_heldout/accuracy"] <= 1.0
    assert final["eval/zeroshot_heldout/num_examples"] == 48
    assert 0.0 <= final["eval/retrieval_test/i2t_recall@1"] <= final["eval/retrieval_test/i2t_recall@5"]
    assert np.isfinite(final["train/loss"])
