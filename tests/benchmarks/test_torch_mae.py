"""The PyTorch MAE timed by `vistax bench` does our MAE's work: equal parameter counts, forward
FLOPs equal to our analytic count and, with our weights and our mask noise, the same
prediction, mask and loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.benchmarks import cases
from vistax.models import mae
from vistax.train import objectives

torch = pytest.importorskip("torch")
torch_mae = pytest.importorskip("vistax.benchmarks.torch_mae")
torch_trainers = pytest.importorskip("vistax.benchmarks.torch_trainers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**encoder) -> mae.MAEConfig:
    model = {**dict(variant="Ti/8", depth=2, image_size=32, num_classes=0, pool="cls",
                    posemb="sincos2d_mae"), **encoder}
    return mae.MAEConfig.from_config(model, dict(decoder_width=64, decoder_depth=2,
                                                 decoder_heads=4, decoder_mlp_dim=128))


@pytest.mark.parametrize("name", ["mae_tiny", "mae_s16_112"])
def test_parameter_count_equals_ours(name, count_params):
    config = cases.CASES[name].build_config()
    objective = objectives.get(config.objective)(config)
    cfg = torch_trainers.REFERENCES["mae"].model_config(objective, 1)
    with torch.device("meta"):
        assert sum(p.numel() for p in torch_mae.MAE(cfg).parameters()) == count_params(objective)


def test_forward_flops_equal_our_analytic_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small_config()
    model = torch_mae.MAE(cfg).eval()
    images = torch.zeros(2, 3, 32, 32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        model(images, torch.rand(2, cfg.num_patches))
    assert count.get_total_flops() == 2 * mae.flops_per_example(cfg)


@pytest.mark.parametrize("encoder", [dict(), dict(pool="gap", posemb="learn", patch_bias=False)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_ours_with_copied_weights_and_noise(encoder, norm_pix):
    cfg = dataclasses.replace(small_config(**encoder), norm_pix_loss=norm_pix)
    ours = mae.MAE(cfg, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.state(ours, nnx.Param).to_pure_dict())
    theirs = torch_mae.MAE(cfg)
    torch_mae.load_mae_params(theirs, params)
    images = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
    rng = jax.random.key(5)
    graphdef, state = nnx.split(ours)
    loss, pred, _, mask = jax.jit(lambda s, x: nnx.merge(graphdef, s).loss(x, rng))(
        state, jnp.asarray(images))
    # The noise our `encode` draws its mask from (its first key), handed to the torch side.
    noise = torch.from_numpy(np.array(jax.random.uniform(jax.random.split(rng)[0],
                                                         (3, cfg.num_patches))))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        their_pred, their_mask = theirs(x, noise)
        their_loss = theirs.loss(x, noise)
    np.testing.assert_array_equal(their_mask.numpy(), np.asarray(mask))
    assert 0 < mask.mean() < 1
    np.testing.assert_allclose(their_pred.numpy(), np.asarray(pred), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(float(their_loss), float(loss), rtol=1e-5)


def test_trainer_draws_fresh_masks_and_lowers_the_loss():
    config = cases.CASES["mae_tiny"].build_config()
    objective = objectives.get(config.objective)(config)
    cfg = torch_trainers.REFERENCES["mae"].model_config(objective, 1)
    batch = {"image": np.random.RandomState(0).randn(16, 32, 32, 3).astype(np.float32)}
    step, model = torch_trainers.make_trainer("mae", cfg, config, batch)
    loss = torch_mae.loss(model, batch, config, "cpu")
    with torch.no_grad():
        assert float(loss()) != float(loss())  # a new mask each call
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    noise = torch.rand(16, cfg.num_patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = float(model.loss(images, noise))
    for _ in range(8):
        step()
    with torch.no_grad():
        assert float(model.loss(images, noise)) < before
