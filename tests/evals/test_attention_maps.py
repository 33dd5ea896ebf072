"""DINO-style attention maps (Caron et al. 2021, Fig. 1/3): ViT.cls_attention against a numpy
forward pass, the overlay of a focused head, the entropy metric and the written grid."""

import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy.special import erf

from vistax.evals import attention_maps
from vistax.train.experiment import Experiment

PP = "decode|value_range(-1, 1)|keep('image')"
PHOTO_PP = "decode|resize_small(32)|center_crop(32)|value_range(-1, 1)|keep('image')"


def make(encoders=None, **keys):
    """An evaluator on a stub context: `_outputs.fn` is the uncompiled function."""
    cfg = ml_collections.ConfigDict(dict(dict(
        type="attention_maps", dataset="digits", split="test", pp=PP, batch_size=8,
        num_images=2, cell_size=32), **keys))
    ctx = types.SimpleNamespace(compile=lambda fn, **kw: types.SimpleNamespace(fn=fn),
                                encoders=encoders or {"cls_attention": None})
    return attention_maps.AttentionMapsEvaluator("att", cfg, ctx)


def entropy_per_head(maps, mask):
    """Mean over the masked rows of each head's entropy (nats) over the patches, in numpy."""
    flat = np.asarray(maps, np.float64).reshape(maps.shape[:2] + (-1,))[np.asarray(mask)]
    p = flat / flat.sum(-1, keepdims=True)
    return -np.sum(p * np.log(p), -1).mean(0)


def test_attention_sums_are_entropies_and_patch_shares():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 3, 2 + 16)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    maps = probs[..., 2:].reshape(6, 3, 4, 4)  # two prefix tokens take the rest
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    sums = jax.jit(attention_maps.attention_sums)(jnp.asarray(maps, jnp.float32), mask)
    metrics = make()._metrics(jax.tree.map(np.asarray, sums), "photos_")
    want = entropy_per_head(maps, mask)
    assert metrics["photos_entropy"] == pytest.approx(want.mean(), rel=1e-5)
    for i in range(3):
        assert metrics[f"photos_entropy_head{i}"] == pytest.approx(want[i], rel=1e-5)
    share = maps.sum((2, 3))[mask].mean()
    assert metrics["photos_patch_attention"] == pytest.approx(share, rel=1e-5)
    one_hot = np.zeros((1, 1, 4, 4), np.float32)
    one_hot[0, 0, 1, 2] = 0.5  # all patch attention on one patch: entropy 0
    focused = jax.jit(attention_maps.attention_sums)(one_hot, np.ones(1, bool))
    assert float(focused["entropy"][0]) == 0.0


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_a_focused_heads_overlay_is_brightest_at_its_patch(upsample):
    """Each head puts 90% of its attention on one patch (0, 5, 14) of a 4x4 grid; a random
    image under the overlay must not move the brightest spot off that patch."""
    heads, grid, size = 3, 4, 16
    maps = np.full((1, heads, grid * grid), 0.1 / 15, np.float32)
    for k, patch in enumerate((0, 5, 14)):
        maps[0, k, patch] = 0.9
    image = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    out = {"image": image, "maps": maps.reshape(1, heads, grid, grid), "mask": np.ones(1, bool)}
    (row,) = make(upsample=upsample)._rows(out, 1)
    cell = 2 * size + 4  # scale 32 // 16, a 2 px frame
    assert row.shape == (cell, (1 + heads + 1) * cell, 3)  # image | 3 heads | mean
    cells = np.split(row, 1 + heads + 1, axis=1)
    for k, patch in enumerate((0, 5, 14)):
        luma = cells[1 + k][2:-2, 2:-2] @ np.array([0.299, 0.587, 0.114])
        y, x = np.unravel_index(np.argmax(luma), luma.shape)
        cell_px = 2 * size // grid
        assert (y // cell_px) * grid + x // cell_px == patch


@pytest.fixture(scope="module")
def attention_run(small_vit_config, tmp_path_factory):
    """One Experiment on 8 devices (a 2-block ViT with a cls token and a register) and one run
    on 3 digits and 2 photos: (exp, state, metrics, workdir)."""
    config = small_vit_config(**{"model.num_registers": 1})
    config.evals = ml_collections.ConfigDict(dict(att=dict(
        type="attention_maps", dataset="digits", split="test", pp=PP, batch_size=16,
        num_images=3, photos=("astronaut", "chelsea"), photo_pp=PHOTO_PP, every="6 steps")))
    workdir = str(tmp_path_factory.mktemp("attention"))
    exp = Experiment(config, workdir=workdir)
    state = exp.init_state(seed=0)
    return exp, state, exp.evaluators["att"].run(state), workdir


def test_cls_attention_is_the_last_blocks_softmax_of_queries_and_keys(attention_run):
    """The ViT's forward pass in numpy: softmax(q k^T / sqrt(d)) of the second (last) block,
    the cls token's row, the patches' columns (after the cls token and the register)."""
    exp, state, _, _ = attention_run
    model = exp.model(state)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    got, tokens = nnx.jit(lambda m, x: (m.cls_attention(x), m.tokens(x)))(model, images)
    got = np.asarray(got)
    assert got.shape == (2, 4, 4, 4)  # 4 heads over a 4x4 grid of 8 px patches

    b = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.encoder.blocks)))
    x = np.asarray(tokens, np.float64)  # [cls, register, 16 patches]
    assert x.shape[1] == 18

    def norm(x, p, i):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        return x * p["scale"][i] + p["bias"][i]

    def dense(x, p, i, n_in=1):  # contracts x's last n_in dims with the kernel's first
        return np.tensordot(x, p["kernel"][i], axes=n_in) + p["bias"][i]

    def probs(h, i):
        a = b["attn"]
        q, k = dense(h, a["query"], i), dense(h, a["key"], i)  # (B, T, heads, head_dim)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    h = norm(x, b["norm1"], 0)  # block 1, in full
    attn = np.einsum("bhqk,bkhd->bqhd", probs(h, 0), dense(h, b["attn"]["value"], 0))
    x = x + dense(attn, b["attn"]["out"], 0, n_in=2)
    h = dense(norm(x, b["norm2"], 0), b["mlp"]["fc1"], 0)
    x = x + dense(0.5 * h * (1 + erf(h / np.sqrt(2))), b["mlp"]["fc2"], 0)
    want = probs(norm(x, b["norm1"], 1), 1)[:, :, 0, 2:].reshape(2, 4, 4, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got.sum((2, 3)) < 1)  # the cls token and the register take the rest


def test_run_draws_digits_and_photos_and_reports_the_entropy(attention_run):
    """The grid is (3 digits + 2 photos) x (image, 4 heads, mean) cells of 3 x 32 + 4 px, and
    the metrics equal numpy on the ViT's own cls attention."""
    exp, state, metrics, workdir = attention_run
    picture = Image.open(os.path.join(workdir, "attention", "att_00000000.png"))
    cell = 3 * 32 + 4
    assert picture.size == (6 * cell, 5 * cell) and picture.mode == "RGB"

    batch = next(iter(exp.eval_context.batches(exp.config.evals.att)))
    mask = np.asarray(batch["_mask"])
    photos = np.stack([p["image"] for p in exp.evaluators["att"]._photos()])
    images = jnp.asarray(np.concatenate([np.asarray(batch["image"]), photos]))
    all_maps = np.asarray(nnx.jit(lambda m, x: m.cls_attention(x))(exp.model(state), images))
    maps, photo_maps = all_maps[:16], all_maps[16:]
    want = entropy_per_head(maps, mask)
    np.testing.assert_allclose([metrics[f"entropy_head{i}"] for i in range(4)], want, rtol=1e-5)
    assert metrics["entropy"] == pytest.approx(want.mean(), rel=1e-5)
    assert 0 < metrics["entropy"] < np.log(16)
    assert metrics["patch_attention"] == pytest.approx(maps.sum((2, 3))[mask].mean(), rel=1e-5)
    assert metrics["photos_entropy"] == pytest.approx(
        entropy_per_head(photo_maps, np.ones(2, bool)).mean(), rel=1e-5)
    assert metrics["photos_patch_attention"] == pytest.approx(
        photo_maps.sum((2, 3)).mean(), rel=1e-5)


def test_a_model_without_cls_token_fails_naming_the_encoder_key(small_vit_config):
    config = small_vit_config(**{"model.pool": "gap"})
    config.evals = ml_collections.ConfigDict(dict(att=dict(
        type="attention_maps", dataset="digits", split="test", pp=PP, batch_size=16,
        num_images=2, every="6 steps")))
    with pytest.raises(ValueError, match=r"evals\.att\.encoder='cls_attention'.*model\.pool='cls'"):
        Experiment(config)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"evals\.att\.upsample='cubic' is not one of"):
        make(upsample="cubic")
    with pytest.raises(ValueError, match=r"evals\.att\.colormap='nope' is not a matplotlib"):
        make(colormap="nope")
    with pytest.raises(ValueError, match=r"evals\.att\.alpha=2\.0 must lie in \[0, 1\]"):
        make(alpha=2.0)
    with pytest.raises(ValueError, match=r"evals\.att\.encoder='features': the objective offers"):
        make(encoder="features")
    with pytest.raises(ValueError, match=r"evals\.att\.batch_size=8 must be at least"):
        make(num_images=9)
    features = make({"features": lambda model, extra, batch: batch["image"].mean((1, 2))},
                    encoder="features")
    batch = {"image": jnp.zeros((8, 16, 16, 3)), "_mask": jnp.ones(8, bool)}
    with pytest.raises(ValueError, match=r"evals\.att\.encoder='features' gives \(8, 3\); "
                                         r"expected attention maps"):
        features._outputs.fn(None, None, batch)
