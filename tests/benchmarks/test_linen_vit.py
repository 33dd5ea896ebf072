"""The big_vision-style reference ViT: the same parameter count as vistax's ViT for the bench's
configs, a training step that learns, and a clear refusal of what it does not model."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vistax.benchmarks import linen_vit
from vistax.models import vit


def _config(**overrides):
    kw = dict(variant="Ti/8", image_size=32, depth=3, num_classes=10)
    kw.update(overrides)
    return vit.ViTConfig.from_dict(kw)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_parameter_count_equals_vistax_vit(pool):
    cfg = _config(pool=pool)
    ours = vit.ViT(cfg, rngs=nnx.Rngs(0))
    ours_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    params = linen_vit.ViT(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3)))["params"]
    assert linen_vit.num_params(params) == ours_count
    blocks = [k for k in params if k.startswith("encoderblock_")]
    assert len(blocks) == 3  # unrolled, one module per layer as big_vision names them


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    cfg = _config()
    config = ml_collections.ConfigDict({
        "optimizer": {"name": "adamw", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                      "weight_decay": 0.05},
        "schedule": {"base_lr": 1e-3}, "loss": {"label_smoothing": 0.1},
        "param_groups": {"wd_mask": r".*/kernel$"},
        "grad_clip_norm": 1.0})
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
             "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]}
    (step, sync), count = linen_vit.make_trainer(cfg, config, batch)
    losses = [float(sync(step())) for _ in range(8)]
    assert count > 0 and np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.1, losses


def test_unsupported_options_are_named():
    with pytest.raises(linen_vit.Unsupported, match="drop_path=0.1"):
        linen_vit.check(_config(drop_path=0.1))
    with pytest.raises(linen_vit.Unsupported, match="posemb='sincos2d'"):
        linen_vit.check(_config(posemb="sincos2d"))
