"""The PyTorch equivalents timed by `vistax bench` do the same work as our models: equal
parameter counts, equal forward FLOPs (PyTorch's FLOP counter against our analytic count) and,
with our weights copied across, the same logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.benchmarks import cases
from vistax.models import vit
from vistax.train import objectives

torch = pytest.importorskip("torch")
F = pytest.importorskip("torch.nn.functional")
torch_models = pytest.importorskip("vistax.benchmarks.torch_models")
torch_trainers = pytest.importorskip("vistax.benchmarks.torch_trainers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def jax_params(build) -> int:
    """Parameters of an nnx model built by `build(rngs)`, counted on shapes only."""
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def case_model_config(name):
    """The objective's resolved model config of a bench case (no data needed)."""
    config = cases.CASES[name].build_config()
    return objectives.get(config.objective)(config)


@pytest.mark.parametrize("name", ["vit_tiny", "vit_ti16_224", "vit_s16_112", "vit_b16_224_bf16"])
def test_vit_parameter_count_equals_ours(name):
    cfg = case_model_config(name).vit_config
    ours = jax_params(lambda rngs: vit.ViT(cfg, rngs=rngs))
    with torch.device("meta"):  # shapes only
        assert torch_models.num_params(torch_models.ViT(cfg)) == ours


@pytest.mark.parametrize("name", ["clip_tiny", "siglip_tiny", "clip_b16_224_bf16"])
def test_two_towers_parameter_count_equals_ours(name):
    objective = case_model_config(name)
    ours = jax_params(objective.build_model)
    with torch.device("meta"):
        assert torch_models.num_params(torch_models.TwoTowers(objective.model_config)) == ours


@pytest.mark.parametrize("overrides", [dict(variant="Ti/16", image_size=64, num_classes=1000),
                                       dict(variant="S/16", image_size=48, pool="gap",
                                            num_classes=0, patch_bias=False, pre_norm=True)])
def test_vit_forward_flops_equal_our_analytic_count(overrides):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = vit.ViTConfig.from_dict(overrides)
    model = torch_models.ViT(cfg).eval()
    images = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    # The math backend runs attention as matmuls, which the counter sees (the fused CPU kernel
    # is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        model(images)
    assert count.get_total_flops() == 2 * vit.flops_per_example(cfg)


@pytest.mark.parametrize("overrides", [dict(), dict(pool="gap", patch_bias=False, pre_norm=True,
                                                     activation="quick_gelu")])
def test_vit_logits_match_ours_with_copied_weights(overrides):
    cfg = vit.ViTConfig.from_dict(dict(variant="Ti/8", depth=3, image_size=32, num_classes=7,
                                       head_zero_init=False, **overrides))
    ours = vit.ViT(cfg, rngs=nnx.Rngs(0))
    if ours.cls_token is not None:  # zero-initialised: make it count
        ours.cls_token[...] = ours.cls_token[...] + 0.1
    params = jax.tree.map(np.asarray, nnx.state(ours, nnx.Param).to_pure_dict())
    theirs = torch_models.ViT(cfg).eval()
    torch_models.load_vit_params(theirs, params)
    x = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    graphdef, state = nnx.split(ours)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_logits_under_autocast_match_ours_in_bfloat16():
    """A bfloat16 config's reference runs under autocast: its logits move off the float32 ones
    by bfloat16 rounding, as ours do, and agree with ours to that rounding."""
    cfg = vit.ViTConfig.from_dict(dict(variant="Ti/8", depth=3, image_size=32, num_classes=7,
                                       head_zero_init=False, dtype="bfloat16"))
    ours = vit.ViT(cfg, rngs=nnx.Rngs(0))
    ours.cls_token[...] = ours.cls_token[...] + 0.1
    params = jax.tree.map(np.asarray, nnx.state(ours, nnx.Param).to_pure_dict())
    theirs = torch_models.ViT(cfg).eval()
    torch_models.load_vit_params(theirs, params)
    x = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
    images = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        fp32 = theirs(images).numpy()
        with torch_trainers.compute_context("vit", cfg):
            autocast = theirs(images)
    assert autocast.dtype == torch.bfloat16
    autocast = autocast.float().numpy()
    graphdef, state = nnx.split(ours)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, jnp.asarray(x))
    assert logits.dtype == jnp.bfloat16
    logits = np.asarray(logits.astype(jnp.float32))
    scale = np.abs(fp32).max()
    theirs_off, ours_off = np.abs(autocast - fp32).max(), np.abs(logits - fp32).max()
    assert 1e-3 * scale < theirs_off < 5e-2 * scale  # bfloat16 rounding, not float32's
    assert 1e-3 * scale < ours_off < 5e-2 * scale
    assert np.abs(logits - autocast).max() < 2 * max(theirs_off, ours_off)


def test_compute_context_follows_the_config_dtype():
    fp32 = vit.ViTConfig.from_dict(dict(variant="mu/8", image_size=16))
    bf16 = vit.ViTConfig.from_dict(dict(variant="mu/8", image_size=16, dtype="bfloat16"))
    with torch_trainers.compute_context("vit", fp32):
        assert not torch.is_autocast_enabled("cpu")
    with torch_trainers.compute_context("vit", bf16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    towers = case_model_config("clip_b16_224_bf16").model_config
    assert isinstance(torch_trainers.compute_context("two_towers", towers, "cpu"),
                      torch.autocast)
    mixed = dataclasses.replace(towers, text=dataclasses.replace(towers.text, dtype="float32"))
    with pytest.raises(torch_trainers.Unsupported, match="one dtype"):
        torch_trainers.compute_context("two_towers", mixed)
    half = vit.ViTConfig.from_dict(dict(variant="mu/8", image_size=16, dtype="float16"))
    with pytest.raises(torch_models.Unsupported, match="float16"):
        torch_models.ViT(half)


def test_trainer_steps_lower_the_loss_on_a_fixed_batch():
    objective = case_model_config("clip_tiny")
    config = cases.CASES["clip_tiny"].build_config()
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 259, (8, 32)).astype(np.int32)
    tokens[:, 20] = objective.model_config.text.eos_id
    batch = {"image": rng.randn(8, 48, 48, 3).astype(np.float32), "text": tokens}
    step, model = torch_trainers.make_trainer("two_towers", objective.model_config, config, batch)
    losses = [float(step()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert model.log_temperature.item() <= config.loss.max_log_temperature + 1e-6


def test_features_without_an_equivalent_are_named():
    for overrides, word in ((dict(pool="map"), "pool"), (dict(activation="swiglu"), "swiglu"),
                            (dict(num_registers=4), "num_registers")):
        cfg = vit.ViTConfig.from_dict(dict(variant="mu/8", image_size=16, **overrides))
        with pytest.raises(torch_models.Unsupported, match=word):
            torch_models.ViT(cfg)


def test_a_bfloat16_trainer_steps_under_autocast():
    """The first step's loss is the autocast forward's loss, not the float32 one."""
    config = cases.CASES["vit_tiny"].build_config()
    config.model.dtype = "bfloat16"
    cfg = objectives.get(config.objective)(config).vit_config
    rng = np.random.RandomState(0)
    labels = np.eye(10, dtype=np.float32)[rng.randint(0, 10, 8)]
    batch = {"image": rng.randn(8, 32, 32, 3).astype(np.float32), "labels": labels}
    step, _ = torch_trainers.make_trainer("vit", cfg, config, batch)
    torch.manual_seed(0)  # make_trainer's seed: the same initial weights
    model = torch_trainers.build_model("vit", cfg).train()
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    smoothing = float(config.loss.label_smoothing)
    with torch.no_grad():
        with torch_trainers.compute_context("vit", cfg):
            expected = F.cross_entropy(model(images), torch.from_numpy(labels),
                                       label_smoothing=smoothing)
        fp32 = F.cross_entropy(model(images), torch.from_numpy(labels), label_smoothing=smoothing)
    loss = step()
    assert float(loss) == float(expected) and float(loss) != float(fp32)


@pytest.mark.parametrize("posemb", ["learn", "sincos2d_mae"])
def test_vit_at_another_image_size_matches_ours(posemb):
    """dynamic_image_size: learned positions resampled by our bicubic map, fixed ones rebuilt for
    the smaller grid (DINO's local crops); twice, so the cached table is read too."""
    cfg = vit.ViTConfig.from_dict(dict(variant="Ti/8", depth=2, image_size=32, num_classes=0,
                                       posemb=posemb, dynamic_image_size=True))
    ours = vit.ViT(cfg, rngs=nnx.Rngs(0))
    theirs = torch_models.ViT(cfg).eval()
    torch_models.load_vit_params(theirs, jax.tree.map(np.asarray,
                                                      nnx.state(ours, nnx.Param).to_pure_dict()))
    x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    expected = np.asarray(ours(jnp.asarray(x))[0])
    for _ in range(2):
        with torch.no_grad():
            pooled = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        np.testing.assert_allclose(pooled, expected, atol=1e-4, rtol=1e-4)
