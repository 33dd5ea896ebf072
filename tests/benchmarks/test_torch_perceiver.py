"""The PyTorch Perceiver timed by `vistax bench` does our Perceiver's work: equal parameter
counts, the same parameters decayed, forward FLOPs equal to our analytic count and, with our
weights copied across, the same logits and loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.benchmarks import cases
from vistax.configs import perceiver as perceiver_configs
from vistax.models import perceiver
from vistax.train import objectives, param_groups

torch = pytest.importorskip("torch")
torch_perceiver = pytest.importorskip("vistax.benchmarks.torch_perceiver")
torch_trainers = pytest.importorskip("vistax.benchmarks.torch_trainers")
torch_models = pytest.importorskip("vistax.benchmarks.torch_models")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Options of the reference beyond the tiny preset. `query`: patches (2-D), a projection, unequal
# query-key and value widths (the non-square attention), several heads, widening, unshared
# blocks of two layers, three cross-attends (the repeat weights used twice), no query residuals,
# a decoder query of its own width, the tanh GELU and a large LayerNorm eps (which a wrong eps
# would show). `mean`: audio (no channel axis), learned positions, the mean-of-latents head.
# `video`: 3-D patches without positions.
VARIANTS = {
    "tiny": ({}, {}, {}),
    "query": (
        dict(image=perceiver_configs.image_input(8, 3, bands=3, patch=2, project=12)),
        dict(num_latents=16, latent_dim=48, num_blocks=3, layers_per_block=2, cross_attends=3,
             share_blocks=False, cross_heads=2, self_heads=4, qk_channels=32, v_channels=48,
             cross_widening=2, self_widening=3, cross_query_residual=False, layernorm_eps=1e-2,
             activation="gelu_tanh"),
        dict(num_classes=7, heads=2, qk_channels=24, v_channels=16, widening=2,
             query_residual=False, query_dim=40)),
    "mean": (
        dict(audio=dict(kind="audio", shape=(64,), patch=4, position="learned")),
        dict(num_latents=8, latent_dim=32, self_heads=2, layers_per_block=2, cross_attends=1),
        dict(kind="mean", num_classes=5)),
    "video": (
        dict(video=dict(kind="video", shape=(4, 8, 8), channels=2, patch=(2, 4, 4),
                        position="none")),
        dict(num_latents=8, latent_dim=32, self_heads=2, cross_heads=4),
        dict(num_classes=3, heads=4)),
}


def objective(variant: str = "tiny"):
    inputs, model, decoder = VARIANTS[variant]
    config = perceiver_configs.get_config("tiny")
    if inputs:
        config.model.inputs = inputs
    config.model.update(model)
    config.model.decoder.update(decoder)
    return config, objectives.get("perceiver")(config)


def random_batch(cfg: perceiver.PerceiverConfig, n: int, *, seed: int = 0,
                 one_hot: bool = False) -> dict:
    rng = np.random.RandomState(seed)
    batch = {}
    for spec in cfg.inputs:
        shape = spec.shape + ((spec.channels,) if perceiver.ARRAY_KINDS[spec.kind][1] else ())
        batch[spec.name] = rng.uniform(-1, 1, (n,) + shape).astype(np.float32)
    labels = rng.randint(0, cfg.decoder.num_classes, n)
    if one_hot:
        batch["labels"] = np.eye(cfg.decoder.num_classes, dtype=np.float32)[labels]
    else:
        batch["label"] = labels
    return batch


@pytest.mark.parametrize("name", ["perceiver_tiny", "perceiver_shapes"])
def test_parameter_count_equals_ours(name, count_params):
    config = cases.CASES[name].build_config()
    objective_ = objectives.get(config.objective)(config)
    cfg = torch_trainers.REFERENCES["perceiver"].model_config(objective_, 1)
    with torch.device("meta"):
        theirs = torch_models.num_params(torch_perceiver.Perceiver(cfg))
    assert theirs == count_params(objective_)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decays_the_parameters_our_wd_mask_decays(variant):
    """make_trainer decays `*weight`s of ndim >= 2: as many values as our kernels."""
    config, objective_ = objective(variant)
    model = nnx.eval_shape(lambda: objective_.build_model(nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    decays = param_groups.mask(params, "wd_mask", (config.param_groups.wd_mask,))
    ours = {flag: 0 for flag in (True, False)}
    for x, flag in zip(jax.tree.leaves(params), jax.tree.leaves(decays)):
        ours[flag] += int(np.prod(x.shape))
    theirs = {flag: 0 for flag in (True, False)}
    with torch.device("meta"):
        for name, p in torch_perceiver.Perceiver(objective_.perceiver_config).named_parameters():
            theirs[name.endswith("weight") and p.ndim >= 2] += p.numel()
    assert theirs == ours and ours[True] > 0 and ours[False] > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_flops_equal_our_analytic_count(variant):
    """Exact: both count the matmuls and attention products only. The Fourier features (a
    constant concatenated), positions, LayerNorms, activations, softmax, residual adds and the
    latents' mean are no matmul work in FlopCounterMode either."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    _, objective_ = objective(variant)
    cfg = objective_.perceiver_config
    model = torch_perceiver.Perceiver(cfg).eval()
    batch = random_batch(cfg, 2)
    inputs = {spec.name: torch.from_numpy(batch[spec.name]) for spec in cfg.inputs}
    # With autograd on (the forward alone is counted): under no_grad the broadcast latents and
    # query, views of parameters, require grad without a grad_fn, which FlopCounterMode's module
    # tracker refuses.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        model(inputs)
    assert count.get_total_flops() == 2 * perceiver.flops_per_example(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_loss_match_ours_with_copied_weights(variant):
    config, objective_ = objective(variant)
    cfg = objective_.perceiver_config
    ours = objective_.build_model(nnx.Rngs(0))
    # Every parameter moved off its init (zero biases, unit LayerNorm scales, the mean head's
    # zero kernel), so that a misplaced or missing one shows.
    rng = np.random.RandomState(1)
    nnx.update(ours, jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(
        x.dtype), nnx.state(ours, nnx.Param)))
    params = jax.tree.map(np.asarray, nnx.state(ours, nnx.Param).to_pure_dict())
    theirs = torch_perceiver.Perceiver(cfg)
    torch_perceiver.load_perceiver_params(theirs, params)
    batch = random_batch(cfg, 3, one_hot=variant == "mean")
    jax_batch = jax.tree.map(jnp.asarray, batch)
    graphdef, state = nnx.split(ours)
    logits, loss = jax.jit(lambda s, b: (
        nnx.merge(graphdef, s)(b)[0],
        objective_.loss(nnx.merge(graphdef, s), None, b, None, 0)[0]))(state, jax_batch)
    inputs = {spec.name: torch.from_numpy(batch[spec.name]) for spec in cfg.inputs}
    with torch.no_grad():
        their_logits = theirs(inputs)
        their_loss = torch_perceiver.loss(theirs, batch, config, "cpu")()
    assert float(np.abs(np.asarray(logits)).std()) > 0.1  # logits that differ between classes
    np.testing.assert_allclose(their_logits.numpy(), np.asarray(logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(their_loss), float(loss), rtol=1e-5)


@pytest.mark.parametrize("config_name, key", [
    ("mlm_tiny", "model.decoder.kind='mlm'"),
    ("multimodal_tiny", "model.inputs"),
])
def test_unsupported_configs_name_the_key(config_name, key):
    cfg = objectives.get("perceiver")(perceiver_configs.get_config(config_name)).perceiver_config
    with pytest.raises(torch_models.Unsupported, match=key.replace("(", r"\(")):
        torch_perceiver.Perceiver(cfg)


def test_unsupported_dropout_names_the_key():
    _, objective_ = objective("tiny")
    cfg = objective_.perceiver_config
    with pytest.raises(torch_models.Unsupported, match="model.dropout=0.1"):
        torch_perceiver.Perceiver(dataclasses.replace(cfg, dropout=0.1))


def test_trainer_lowers_the_loss():
    config = cases.CASES["perceiver_tiny"].build_config()
    objective_ = objectives.get(config.objective)(config)
    cfg = torch_trainers.REFERENCES["perceiver"].model_config(objective_, 1)
    batch = random_batch(cfg, 16)
    # An lr early in the preset's warmup: at its base lr without warmup, the first AdamW steps
    # raise the loss on both sides (ours too) before it falls.
    config.schedule.base_lr = 1e-4
    step, model = torch_trainers.make_trainer("perceiver", cfg, config, batch)
    loss = torch_perceiver.loss(model, batch, config, "cpu")
    with torch.no_grad():
        before = float(loss())
    for _ in range(8):
        step()
    with torch.no_grad():
        assert float(loss()) < before
