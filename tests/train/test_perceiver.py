"""Perceiver objectives through the trainer: BERT masking statistics, the tiny presets' runs
with their held-out metrics, and sharded steps equal to one device."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vistax.configs import perceiver as perceiver_configs
from vistax.launch import generate
from vistax.train import loop
from vistax.train.objectives.perceiver import mask_bytes


def test_bert_masking_statistics():
    ids = np.full((400, 250), 100, np.int32)
    ids[:, 0], ids[:, -1], ids[:, 200:-1] = 1, 2, 0  # bos, eos, padding
    corrupted, chosen = mask_bytes(jnp.asarray(ids), jax.random.key(0), rate=0.15,
                                   first_content_id=3, vocab_size=259, mask_id=259)
    corrupted, chosen = np.asarray(corrupted), np.asarray(chosen)
    content = ids >= 3
    assert not chosen[~content].any()  # never bos, eos or padding
    np.testing.assert_array_equal(corrupted[~chosen], ids[~chosen])
    assert abs(chosen[content].mean() - 0.15) < 0.005
    picked = corrupted[chosen]
    masked, kept = (picked == 259).mean(), (picked == 100).mean()
    random = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(random - 0.1 * 255 / 256) < 0.01
    assert ((picked >= 3) & (picked <= 259)).all()


def shrink(c, data_dir, steps=4):
    c.input.data_dir = data_dir
    c.input.batch_size = 16
    c.duration = f"{steps} steps"
    c.schedule.warmup = "1 steps"
    c.log_every = "2 steps"
    c.checkpoint.every = f"{steps} steps"
    c.peak_flops_per_device = 1e11
    for ev in c.evals.values():
        ev.update(every=f"{steps} steps", batch_size=16)
    return c


def eval_metrics(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {k: v for line in lines for k, v in line.items() if k.startswith("eval/")}


@pytest.mark.parametrize("preset, metric", [("tiny", "eval/test/accuracy"),
                                            ("mlm_tiny", "eval/val/masked_accuracy"),
                                            ("ar_tiny", "eval/val/bits_per_byte")])
def test_presets_train_and_score_the_held_out_split(preset, metric, data_dir, tmp_path):
    """Raw-pixel classification on digits, and the `docs` windows, the byte models and the
    `metrics` evaluator end to end; every held-out example is scored once."""
    c = shrink(perceiver_configs.get_config(preset), data_dir)
    if preset == "ar_tiny":  # a shorter context keeps the test fast
        c.model.update(max_length=128, num_latents=16)
        c.input.pp = c.evals.val.pp = perceiver_configs.bytes_pp(127)
    loop.train(c, str(tmp_path))
    metrics = eval_metrics(str(tmp_path))
    if preset == "tiny":
        assert metrics["eval/test/num_examples"] == 359  # the digits test split
        assert 0.0 <= metrics[metric] <= 1.0
        return
    assert metrics["eval/val/num_examples"] == 106  # the docs test split
    assert np.isfinite(metrics[metric])
    if preset == "ar_tiny":  # ~ uniform over 259 ids at the start
        assert 6.0 < metrics[metric] < 9.0
        model = generate.load_model(c, str(tmp_path))  # the trained weights, by name
        text = generate.generate_text(model, "The ", 12, temperature=1.0)
        assert isinstance(text, str) and len(text) <= 12  # up to 12 bytes, cut at eos
        again = generate.generate_text(model, "The ", 12, temperature=1.0)
        assert text == again  # seeded
    else:
        assert 0.0 <= metrics[metric] <= 1.0


RNG = np.random.RandomState(0)


def multimodal_batch():
    text = RNG.randint(3, 259, (16, 96)).astype(np.int32)
    text[:, 60:] = 0
    return {"image": RNG.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32), "text": text}


@pytest.mark.parametrize("preset", [pytest.param("multimodal_tiny", marks=pytest.mark.slow),
                                    "ar_tiny"])
def test_sharded_perceiver_matches_one_device(preset, data_dir, step_losses):
    """Data, FSDP and tensor parallelism (dp2 x fsdp2 x tp2) give the 1-device losses."""
    def config(**mesh):
        c = shrink(perceiver_configs.get_config(preset), data_dir)
        c.evals = {}
        c.mesh.update(mesh)
        if preset == "ar_tiny":
            c.model.update(max_length=64, num_latents=16, width=32, mlp_dim=64)
            c.input.pp = perceiver_configs.bytes_pp(63)
        else:  # the preset's structure (image patches + caption bytes, mlm) at a smaller width
            c.model.update(num_latents=16, latent_dim=32, qk_channels=32, layers_per_block=2)
            c.model.inputs.image.shape = (32, 32)
            c.model.inputs.text.width = 32
            c.model.decoder.qk_channels = 32
            c.input.pp = c.input.pp.replace("decode|", "decode|resize(32)|")
        return c

    if preset == "ar_tiny":
        batch = {"text": RNG.randint(3, 259, (16, 65)).astype(np.int32)}
    else:
        batch = multimodal_batch()
    batches = [batch] * 3
    single = step_losses(config(data=1), jax.devices()[:1], batches)
    sharded = step_losses(config(data=2, fsdp=2, tensor=2), jax.devices(), batches)
    assert abs(single[-1] - single[0]) > 1e-3  # the updates moved the model
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
