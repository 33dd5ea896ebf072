"""big_vision's ViT, as that codebase writes it, timed beside vistax's step on the same batch.

The issue's second anchor is big_vision's ViT under `jax.jit`. big_vision is not a package
that installs here, so this is its architecture written in Flax linen the way big_vision's
`vit.py` builds it (our code, from its structure): a `nn.Conv` patch embedding, learned position
embeddings on the patch tokens (normal, std 1/sqrt(width)) and a zero cls token in front, pre-LN
`Encoder1DBlock`s with `nn.MultiHeadDotProductAttention` (separate q/k/v projections, xavier
kernels) and an `MlpBlock`, layers unrolled in a Python loop (big_vision's default
`scan=False`), a final LayerNorm and a zero-initialised head. The training step is optax AdamW
with the config's learning rate, betas, eps and weight decay on the parameters
`param_groups.wd_mask` selects (kernels), global-norm clipping where the config clips, and
label-smoothed softmax cross-entropy on vistax's class targets, jitted with donated state.

The math is the vistax step's: the config's activation (exact GELU for the ImageNet presets;
big_vision's `nn.gelu` default is the tanh approximation, a little cheaper), fp32, no dropout
or stochastic depth. Parameter counts equal vistax's (the test). The activations are flax's
own (`nn.gelu(x, approximate=False)` for exact GELU, computed with erfc), as a big_vision user
gets them, not vistax's faster erf form (`layers.gelu`); QuickGELU, which flax lacks, is ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from vistax.models import layers as vistax_layers
from vistax.train import param_groups
from vistax.train.objectives.classification import class_targets


class Unsupported(ValueError):
    """The config uses a feature this reference does not have."""


def check(cfg) -> None:
    unsupported = {
        "pool": cfg.pool not in ("cls", "gap"), "posemb": cfg.posemb != "learn",
        "num_registers": cfg.num_registers, "representation_size": cfg.representation_size,
        "head_norm": cfg.head_norm != "none", "layer_scale": cfg.layer_scale,
        "mask_token": cfg.mask_token, "drop_path": cfg.drop_path, "dropout": cfg.dropout,
        "dtype": cfg.dtype != "float32", "pre_norm": cfg.pre_norm,
        "activation": cfg.activation not in ACTIVATIONS,
        "qkv_bias": not cfg.qkv_bias,
    }
    found = [f"{k}={getattr(cfg, k)!r}" for k, bad in unsupported.items() if bad]
    if found:
        raise Unsupported(f"the big_vision-style ViT has no {', '.join(found)}")


# The config's activation as flax computes it.
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": vistax_layers.quick_gelu,
}


class MlpBlock(nn.Module):
    mlp_dim: int
    activation: str

    @nn.compact
    def __call__(self, x):
        init = dict(kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(stddev=1e-6))
        h = nn.Dense(self.mlp_dim, **init)(x)
        h = ACTIVATIONS[self.activation](h)
        return nn.Dense(x.shape[-1], **init)(h)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    activation: str
    eps: float

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=self.eps)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                            kernel_init=nn.initializers.xavier_uniform(),
                                            deterministic=True)(y, y)
        x = x + y
        y = nn.LayerNorm(epsilon=self.eps)(x)
        return x + MlpBlock(self.mlp_dim, self.activation)(y)


class ViT(nn.Module):
    """NHWC images -> logits (or the pooled vector when num_classes is 0)."""

    cfg: object

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        x = nn.Conv(cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                    padding="VALID", use_bias=cfg.patch_bias, name="embedding")(images)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        x = x + self.param("pos_embedding", nn.initializers.normal(stddev=c ** -0.5),
                           (1, h * w, c))
        if cfg.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        for i in range(cfg.depth):
            x = Encoder1DBlock(cfg.mlp_dim, cfg.num_heads, cfg.activation, cfg.layernorm_eps,
                               name=f"encoderblock_{i}")(x)
        x = nn.LayerNorm(epsilon=cfg.layernorm_eps, name="encoder_norm")(x)
        x = x[:, 0] if cfg.pool == "cls" else x.mean(axis=1)
        if cfg.num_classes:
            x = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
        return x


def num_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def make_trainer(model_config, config, batch: dict, *, device=None, seed: int = 0):
    """((step, sync), params count): `step()` trains one step on `batch` (numpy, as the vistax
    step gets it, placed on `device` once) and returns the loss; `sync` waits for it."""
    check(model_config)
    opt = config.optimizer
    if opt.name != "adamw":
        raise Unsupported(f"optimizer.name={opt.name!r}: the big_vision-style step uses AdamW")
    device = device or jax.local_devices()[0]
    model = ViT(model_config)
    images = jax.device_put(np.asarray(batch["image"], np.float32), device)
    targets = jax.device_put(class_targets(batch, model_config.num_classes), device)
    smoothing = float(config.loss.label_smoothing)
    with jax.default_device(device):
        params = jax.jit(model.init)(jax.random.key(seed), images[:1])["params"]
    # The decay set of vistax's optimizer (configs/common.py: kernels only).
    wd_mask = config.param_groups.wd_mask
    decay = (param_groups.mask(params, "param_groups.wd_mask", (wd_mask,)) if wd_mask
             else jax.tree.map(lambda _: False, params))
    tx = optax.adamw(float(config.schedule.base_lr), b1=float(opt.b1), b2=float(opt.b2),
                     eps=float(opt.eps), weight_decay=float(opt.weight_decay), mask=decay)
    clip = config.get("grad_clip_norm")
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)

    def loss_fn(params):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, smoothing)).mean()

    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    state = [params, tx.init(params)]

    def step():
        state[0], state[1], loss = train_step(state[0], state[1])
        return loss

    return (step, jax.block_until_ready), num_params(params)
