"""CoCa model: the captioning loss in closed form and against numpy, the appended-cls text
embedding ignores padding, the multimodal decoder is causal, and config errors name the key."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.models import coca

EOS = 2
VOCAB = 40
LENGTH = 8


def _config(**overrides):
    tower = dict(width=32, depth=1, mlp_dim=64, num_heads=4, scan=False)
    cfg = dict(image=dict(image_size=16, patch_size=8, pool="none", **tower),
               text=dict(vocab_size=VOCAB, eos_id=EOS, max_len=LENGTH, causal=True, pool="cls",
                         **tower),
               decoder_depth=2, caption_queries=3, embed_dim=16)
    cfg.update(overrides)
    return coca.CoCaConfig.from_dict(cfg)


@pytest.fixture(scope="module")
def model():
    return coca.CoCa(_config(), rngs=nnx.Rngs(0))


def _tokens(rows):
    """Rows of content ids -> (B, LENGTH) with bos 1, eos, and padding 0."""
    out = np.zeros((len(rows), LENGTH), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row) + 2] = [1] + list(row) + [EOS]
    return jnp.asarray(out)


def test_caption_loss_closed_forms_and_numpy():
    tokens = _tokens([[5, 6, 7], [9]])
    # Uniform logits: every target costs ln V; 4 + 2 targets (content and eos, not bos or pad).
    loss, _ = coca.caption_loss(jnp.zeros((2, LENGTH, VOCAB)), tokens, EOS)
    assert float(loss) == pytest.approx(math.log(VOCAB), rel=1e-6)
    # Logits that put all mass on the next token: zero loss, accuracy 1.
    nxt = np.roll(np.asarray(tokens), -1, axis=1)
    loss, acc = coca.caption_loss(20.0 * jax.nn.one_hot(nxt, VOCAB) - 10.0, tokens, EOS)
    assert float(loss) < 1e-6 and float(acc) == 1.0
    # Random logits against a direct numpy sum over the valid targets only.
    logits = np.random.RandomState(0).normal(size=(2, LENGTH, VOCAB)).astype(np.float32)
    loss, _ = coca.caption_loss(jnp.asarray(logits), tokens, EOS)
    terms = []
    for b, n_targets in ((0, 4), (1, 2)):
        for i in range(n_targets):
            row = logits[b, i].astype(np.float64)
            log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
            terms.append(log_z - row[int(tokens[b, i + 1])])
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)


def test_text_embedding_ignores_padding_and_decoder_is_causal(model):
    tokens = _tokens([[5, 6, 7], [5, 6, 7]])
    garbage = tokens.at[1, 6:].set(33)  # after eos: must not matter
    emb, out = model.encode_text(jnp.concatenate([tokens[:1], garbage[1:]]))
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)
    changed = tokens.at[1, 2].set(11)  # before eos: must matter
    emb2, _ = model.encode_text(changed)
    assert np.abs(emb2[0] - emb2[1]).max() > 1e-4

    images = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    _, _, logits = model(images[:1].repeat(2, 0), changed)
    # Rows differ from position 2 on; every earlier position's prediction is unchanged.
    np.testing.assert_allclose(logits[0, :2], logits[1, :2], atol=1e-5)
    assert np.abs(logits[0, 2:5] - logits[1, 2:5]).max() > 1e-4
    # The image reaches the captions through cross-attention.
    _, _, other = model(images, jnp.concatenate([tokens[:1], tokens[:1]]))
    assert np.abs(other[0] - other[1]).max() > 1e-4


@pytest.mark.parametrize("override,match", [
    (dict(image=dict(image_size=16, patch_size=8, pool="gap", width=32, depth=1, mlp_dim=64,
                     num_heads=4)), "pool='gap'"),
    (dict(decoder_depth=0), "decoder_depth=0"),
])
def test_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        _config(**override)


def test_text_config_cls_rules():
    with pytest.raises(ValueError, match="causal=True, pool='eos'"):
        _config(text=dict(width=32, depth=1, mlp_dim=64, num_heads=4, vocab_size=VOCAB,
                          eos_id=EOS, max_len=LENGTH, causal=True, pool="eos"))
