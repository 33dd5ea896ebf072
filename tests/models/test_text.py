"""Text tower and two-tower model: pooling, masking, normalisation, config errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.models import text, two_towers

EOS = 2


def tower(**overrides):
    cfg = dict(width=32, depth=2, mlp_dim=64, num_heads=4, vocab_size=40, eos_id=EOS, max_len=10)
    cfg.update(overrides)
    return text.TextTransformer(text.TextConfig.from_dict(cfg), rngs=nnx.Rngs(0))


TOKENS = jnp.array([[1, 7, 9, EOS, 0, 0, 0, 0],
                    [1, 5, EOS, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (False, "eos"), (False, "mean")])
def test_tokens_after_end_of_text_do_not_change_the_output(causal, pool):
    model = tower(causal=causal, pool=pool)
    pooled, _ = model(TOKENS)
    after = TOKENS.at[:, 5:].set(33)  # garbage after eos (CLIP pads with 0, a real token)
    np.testing.assert_allclose(model(after)[0], pooled, atol=1e-6)
    before = TOKENS.at[:, 1].set(11)
    assert not np.allclose(model(before)[0], pooled, atol=1e-4)


def test_causal_tower_pools_the_end_of_text_token():
    model = tower()
    pooled, out = model(TOKENS)
    np.testing.assert_array_equal(out["eos_pos"], [3, 2])
    np.testing.assert_allclose(pooled, out["encoded"][jnp.arange(2), jnp.array([3, 2])])
    # Causality: the output at position 1 ignores what follows it.
    changed = TOKENS.at[0, 2].set(20)
    np.testing.assert_allclose(model(changed)[1]["encoded"][0, 1], out["encoded"][0, 1], atol=1e-6)


def test_text_config_errors_name_the_key():
    with pytest.raises(ValueError, match="pool='mean' with causal=True"):
        tower(pool="mean")
    with pytest.raises(ValueError, match="model.text lacks"):
        text.TextConfig.from_dict(dict(variant="Ti"))
    with pytest.raises(ValueError, match="takes a size only"):
        text.TextConfig.from_dict(dict(variant="B/16", vocab_size=9, eos_id=1))
    with pytest.raises(ValueError, match="model.text.activation"):
        tower(activation="relu")
    with pytest.raises(ValueError, match="exceeds|max_len=10"):
        tower()(jnp.zeros((1, 12), jnp.int32))


def test_two_towers_embed_to_unit_vectors_with_the_papers_initial_temperatures():
    cfg = dict(embed_dim=16, image=dict(variant="mu/8", image_size=16),
               text=dict(variant="mu", vocab_size=40, eos_id=EOS, max_len=10))
    clip = two_towers.TwoTowers(two_towers.TwoTowersConfig.from_dict(cfg), rngs=nnx.Rngs(0))
    zimg, ztxt = clip(jnp.ones((2, 16, 16, 3)), TOKENS)
    np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-6)
    assert zimg.shape == ztxt.shape == (2, 16)
    np.testing.assert_allclose(jnp.exp(clip.log_temperature[...]), 1 / 0.07, rtol=1e-6)
    assert clip.bias is None and clip.image_proj.bias is None
    siglip = two_towers.TwoTowers(two_towers.TwoTowersConfig.from_dict(dict(
        cfg, log_temperature_init=two_towers.SIGLIP_LOG_TEMPERATURE,
        bias_init=two_towers.SIGLIP_BIAS, proj_bias=True)), rngs=nnx.Rngs(0))
    assert float(siglip.log_temperature[...]) == pytest.approx(math.log(10))
    assert float(siglip.bias[...]) == -10.0
    with pytest.raises(ValueError, match="num_classes"):
        two_towers.TwoTowersConfig.from_dict(dict(cfg, image=dict(cfg["image"], num_classes=3)))
