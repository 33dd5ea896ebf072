"""ViT: variant table, every pooling, scan/remat equivalence, dtypes, position embeddings,
analytic FLOPs against XLA's count, and parity with Hugging Face's PyTorch ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.models import layers, vit


def make(**overrides):
    kw = dict(variant="Ti/8", image_size=32, depth=2, num_classes=5)
    kw.update(overrides)
    cfg = vit.ViTConfig.from_dict(kw)
    return vit.ViT(cfg, rngs=nnx.Rngs(0)), cfg


def images(batch=2, size=32, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def test_variant_table_decodes_sizes_and_patch():
    assert vit.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                              patch_size=16)
    assert vit.decode_variant("So400m/14")["width"] == 1152
    assert vit.decode_variant("L")["depth"] == 24
    with pytest.raises(ValueError, match="'Q/16'"):
        vit.decode_variant("Q/16")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="model.pool='avg'"):
        vit.ViTConfig.from_dict(dict(variant="Ti/16", pool="avg"))
    with pytest.raises(ValueError, match="image_size=30"):
        vit.ViTConfig.from_dict(dict(variant="Ti/16", image_size=30))
    with pytest.raises(ValueError, match="colour"):
        vit.ViTConfig.from_dict(dict(variant="Ti/16", colour=1))


@pytest.mark.parametrize("pool", ["cls", "gap", "map", "none"])
def test_every_pooling_gives_logits(pool):
    model, cfg = make(pool=pool, num_registers=2)
    logits, out = model(images())
    tokens = 16 + (pool == "cls") + 2
    assert out["encoded"].shape == (2, tokens, 192)
    assert out["patch_tokens"].shape == (2, 16, 192)  # registers and cls dropped
    expected = (2, 5) if pool != "none" else (2, tokens, 5)
    assert logits.shape == expected


def test_zero_init_head_gives_uniform_logits():
    model, _ = make()
    logits, _ = model(images())
    np.testing.assert_array_equal(logits, 0.0)


def test_scan_and_unrolled_share_parameters_and_outputs():
    scanned, _ = make(scan=True, head_zero_init=False)
    unrolled, _ = make(scan=False, head_zero_init=False)
    a = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_allclose(scanned(images())[0], unrolled(images())[0], rtol=1e-5, atol=1e-6)


def test_remat_changes_memory_not_gradients():
    def grads(remat):
        model, _ = make(remat=remat, head_zero_init=False)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p)(images())[0] ** 2)
        return jax.grad(loss)(params)

    def close(x, y):
        # Recomputed blocks fuse erf (layers.gelu) into other kernels, which round it a few
        # ulps apart; the absolute slack is relative to the leaf's scale (the cls token's
        # gradient reaches ~1500), so float32 rounding passes and a wrong recomputation not.
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(y).max())))

    ref = grads("none")
    for policy in ("full", "dots", "dots_no_batch"):
        jax.tree.map(close, ref, grads(policy))


def test_bfloat16_compute_keeps_float32_parameters():
    model16, _ = make(dtype="bfloat16", head_zero_init=False)
    model32, _ = make(head_zero_init=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    y16, _ = model16(images())
    y32, _ = model32(images())
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.05)


def test_rng_only_matters_with_dropout_or_drop_path():
    model, _ = make(head_zero_init=False)
    np.testing.assert_array_equal(model(images())[0], model(images(), rng=jax.random.PRNGKey(3))[0])
    noisy, _ = make(head_zero_init=False, drop_path=0.5)
    a = noisy(images(), rng=jax.random.PRNGKey(1))[0]
    b = noisy(images(), rng=jax.random.PRNGKey(2))[0]
    assert not np.allclose(a, b)


def test_drop_path_drops_whole_samples_and_rescales():
    x = jnp.ones((20000, 3, 4))
    y = layers.drop_path(x, 0.25, jax.random.PRNGKey(0))
    per_sample = np.asarray(y).reshape(20000, -1)
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
    assert np.all(per_sample.min(1) == per_sample.max(1))  # a sample is kept or dropped whole
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.01


def test_sincos_posemb_closed_form():
    pe = layers.sincos_posemb_2d(2, 3, 8)  # omega = [1, 1e-4] per quarter
    assert pe.shape == (1, 6, 8)
    row, col = 1, 2  # token index 5
    omega = np.array([1.0, 1e-4])
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(pe[0, 5], expected, rtol=1e-6)


def test_sincos_model_runs_at_any_resolution():
    model, _ = make(posemb="sincos2d", pool="gap")
    assert model(images(size=48))[0].shape == (2, 5)


def test_resample_posemb_keeps_smooth_fields():
    side, dim = 4, 2
    rows, cols = np.mgrid[:side, :side]
    field = np.stack([np.full_like(rows, 3.0), rows * 0 + 1.5], -1).reshape(1, side * side, dim)
    out = layers.resample_posemb(field.astype(np.float32), (6, 6))
    assert out.shape == (1, 36, 2)
    np.testing.assert_allclose(out[..., 0], 3.0, rtol=1e-6)  # constants stay constant
    np.testing.assert_array_equal(layers.resample_posemb(field, (4, 4)), field)
    with pytest.raises(ValueError, match="square"):
        layers.resample_posemb(np.zeros((1, 12, 2)), (4, 4))


@pytest.mark.parametrize("overrides", [dict(variant="S/16", image_size=64, num_classes=10),
                                       dict(variant="Ti/8", image_size=64, pool="map")])
def test_analytic_flops_match_xla_cost_analysis(overrides):
    model, cfg = make(scan=False, **overrides)  # XLA counts a scanned loop body only once
    graphdef, state = nnx.split(model)
    x = jnp.zeros((1, 64, 64, 3))
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    analytic = vit.flops_per_example(cfg)
    # XLA also counts elementwise work (norms, GELU, softmax), a few percent at these widths.
    assert analytic <= xla_flops * 1.001
    assert analytic >= xla_flops * 0.93, (analytic, xla_flops)


def test_parity_with_hugging_face_vit():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vistax.models import convert

    hf_cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8,
                                    num_labels=7, layer_norm_eps=1e-12, hidden_act="gelu")
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits cls/classifier biases; randomise to test them too
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = vit.ViTConfig(width=64, depth=3, mlp_dim=128, num_heads=4, patch_size=8, image_size=32,
                        num_classes=7, layernorm_eps=1e-12)
    model = vit.ViT(cfg, rngs=nnx.Rngs(0))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    convert.load_into(model, convert.vit_from_hf(sd, cfg))
    x = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        expected = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(model(jnp.asarray(x))[0], expected, atol=2e-5, rtol=1e-4)

    # The hub's legacy key names load to the same parameters.
    legacy = {}
    for key, value in sd.items():
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"),
                         ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            key = key.replace(new, old)
        legacy[key.replace("vit.layers.", "vit.encoder.layer.")] = value
    jax.tree.map(np.testing.assert_array_equal, convert.vit_from_hf(sd, cfg),
                 convert.vit_from_hf(legacy, cfg))
