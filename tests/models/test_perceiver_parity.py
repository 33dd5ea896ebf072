"""Perceiver weight import: the transformers library's PyTorch
`PerceiverForImageClassificationFourier` and `PerceiverForMaskedLM`, loaded with
`convert.perceiver_from_hf` into the vistax Perceiver built from
`convert.perceiver_config_from_hf`, give the same outputs (fp32, PyTorch on the CPU as the
reference) and have the same number of parameters.

The references are small and randomly initialised with weights large enough for the outputs to
depend clearly on the inputs, and every vector parameter is perturbed, so LayerNorm scales and
biases, which initialise to constants, carry information too.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from vistax.models import convert  # noqa: E402
from vistax.models import perceiver as P  # noqa: E402

# Small enough to run in seconds, shaped to exercise every mapping: two self-attention layers in
# a block applied twice, several heads, a self-attention MLP wider than its input, a 261-channel
# image cross-attention (3 pixel values + 2 x (2 x 64) + 2 Fourier features).
COMMON = dict(num_latents=16, d_latents=64, num_blocks=2, num_self_attends_per_block=2,
              num_self_attention_heads=2, self_attention_widening_factor=2)
IMAGE, NUM_LABELS = 16, 10
TEXT_LEN = 32


def randomize(module, seed: int) -> None:
    """Matrices (Linear weights, embeddings, latents, queries) drawn N(0, 1 / width), so that
    the outputs depend clearly on the inputs (transformers' std 0.02 init leaves them nearly
    constant); N(0, 0.1^2) added to every vector (LayerNorm scales and zero biases too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def max_relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def assert_matches(ours, ref) -> None:
    ref = np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hf_num_params(model) -> int:
    # The MLM head reads the input byte embedding (no second table), as ours does.
    return sum(p.numel() for p in model.parameters())


def vistax_model(cfg_dict: dict, sd: dict) -> P.Perceiver:
    """Every parameter comes from `sd`: the model is built abstractly (a random init costs
    seconds of eager ops on the CPU) and then filled."""
    cfg = P.PerceiverConfig.from_dict(cfg_dict)
    model = nnx.eval_shape(lambda: P.Perceiver(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(jnp.asarray, convert.perceiver_from_hf(sd, cfg))
    convert.load_into(model, params)
    return model


@nnx.jit
def _forward(model, batch):
    return model(batch)[0]


@pytest.fixture(scope="module")
def image_models():
    hf_cfg = transformers.PerceiverConfig(**COMMON, num_cross_attention_heads=1,
                                          num_labels=NUM_LABELS)
    torch.manual_seed(0)
    ref = transformers.PerceiverForImageClassificationFourier(hf_cfg).eval()
    randomize(ref, seed=1)
    cfg_dict = convert.perceiver_config_from_hf(hf_cfg, "image_fourier", image_size=IMAGE)
    return ref, cfg_dict, vistax_model(cfg_dict, state_dict(ref))


@pytest.fixture(scope="module")
def mlm_models():
    hf_cfg = transformers.PerceiverConfig(**COMMON, d_model=48, num_cross_attention_heads=2,
                                          max_position_embeddings=TEXT_LEN)
    torch.manual_seed(0)
    ref = transformers.PerceiverForMaskedLM(hf_cfg).eval()
    randomize(ref, seed=2)
    cfg_dict = convert.perceiver_config_from_hf(hf_cfg, "mlm")
    return ref, cfg_dict, vistax_model(cfg_dict, state_dict(ref))


def test_image_classification_fourier_matches(image_models):
    ref, _, model = image_models
    # Noise plus a colour per image: the latents average over pixels, so pure noise images
    # would move the logits by under 1 %.
    rng = np.random.default_rng(0)
    images = (rng.standard_normal((3, 3, IMAGE, IMAGE))
              + 2 * rng.standard_normal((3, 3, 1, 1))).astype(np.float32)
    with torch.no_grad():
        want = ref(inputs=torch.from_numpy(images)).logits.numpy()
    got = np.asarray(_forward(model, {"image": jnp.asarray(images.transpose(0, 2, 3, 1))}))
    assert_matches(got, want)
    # The part of the logits that depends on the image is large and matches on its own scale.
    want_dep, got_dep = want - want.mean(0), got - got.mean(0)
    assert np.abs(want_dep).max() > 0.05 * np.abs(want).max()
    assert_matches(got_dep, want_dep)
    assert P.num_params(model) == hf_num_params(ref)


def test_masked_lm_matches_with_padding(mlm_models):
    ref, _, model = mlm_models
    rng = np.random.default_rng(0)
    ids = rng.integers(6, 262, size=(3, TEXT_LEN))
    ids[:, 3] = 3  # [MASK] of the transformers tokenizer
    mask = np.ones_like(ids)
    mask[1, 20:] = 0  # padding at the end of two rows
    mask[2, 5:] = 0
    ids[mask == 0] = 0  # our padding is pad_id=0 in the ids
    with torch.no_grad():
        want = ref(inputs=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(mask)).logits.numpy()
        unmasked = ref(inputs=torch.from_numpy(ids)).logits.numpy()
    assert max_relative_error(unmasked[1:], want[1:]) > 0.1  # the padding mask matters here
    got = np.asarray(_forward(model, {"text": jnp.asarray(ids, jnp.int32)}))
    assert got.shape == (3, TEXT_LEN, 262)
    assert_matches(got, want)
    assert P.num_params(model) == hf_num_params(ref)


def test_masked_lm_config(mlm_models):
    _, cfg_dict, model = mlm_models
    text = model.cfg.modality("text")
    assert (text.vocab_size, text.width, text.shape) == (261, 48, (TEXT_LEN,))
    dec = model.cfg.decoder
    assert (dec.heads, dec.qk_channels, dec.query_residual) == (8, 256, False)
    # A vistax model with shorter inputs takes the first positions of both position tables.
    short = dict(cfg_dict, inputs={"text": dict(cfg_dict["inputs"]["text"], shape=(8,))})
    params = convert.perceiver_from_hf(state_dict(mlm_models[0]),
                                       P.PerceiverConfig.from_dict(short))
    assert params["inputs"]["text"]["pos_embedding"].shape == (8, 48)
    assert params["decoder"]["queries"].shape == (8, 48)


def test_unshared_blocks_copy_the_block(image_models):
    """share_blocks=False: the one transformers block is copied to each block's stack."""
    ref, cfg_dict, model = image_models
    cfg = P.PerceiverConfig.from_dict(dict(cfg_dict, share_blocks=False))
    params = convert.perceiver_from_hf(state_dict(ref), cfg)
    kernel = params["self_attends"]["attn"]["query"]["kernel"]
    assert kernel.shape == (4, 64, 2, 32)
    np.testing.assert_array_equal(kernel[:2], kernel[2:])


def test_missing_and_unexpected_keys_are_named(image_models):
    ref, _, model = image_models
    sd = state_dict(ref)
    missing = dict(sd)
    del missing["perceiver.encoder.self_attends.1.mlp.dense2.bias"]
    with pytest.raises(ValueError, match=r"self_attends\.1\.mlp\.dense2\.bias.*not found"):
        convert.perceiver_from_hf(missing, model.cfg)
    extra = dict(sd, **{"perceiver.decoder.decoder.positions_projection.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"unexpected keys.*positions_projection\.weight"):
        convert.perceiver_from_hf(extra, model.cfg)
    deeper = dict(sd, **{k.replace("self_attends.1.", "self_attends.2."): v
                         for k, v in sd.items() if "self_attends.1." in k})
    with pytest.raises(ValueError, match=r"hold 3 self-attention layers.*layers_per_block=2"):
        convert.perceiver_from_hf(deeper, model.cfg)
    wrong = P.PerceiverConfig.from_dict(dict(
        convert.perceiver_config_from_hf(ref.config, "image_fourier", image_size=IMAGE),
        num_latents=8))
    with pytest.raises(ValueError, match=r"embeddings\.latents.*num_latents=8"):
        convert.perceiver_from_hf(sd, wrong)


def test_unsupported_configs_are_errors(image_models):
    _, cfg_dict, _ = image_models
    learned = dict(cfg_dict, inputs={"image": dict(cfg_dict["inputs"]["image"],
                                                   position="learned")})
    with pytest.raises(ValueError, match=r"raw pixels with Fourier features"):
        convert.perceiver_from_hf({}, P.PerceiverConfig.from_dict(learned))
    with pytest.raises(ValueError, match=r"kind='flow'"):
        convert.perceiver_config_from_hf(transformers.PerceiverConfig(), "flow")
