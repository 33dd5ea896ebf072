"""Self-distillation models: DINO (Caron et al. 2021) with DINOv2's options (Oquab et al. 2024).

- `DINOHead` (DINO, Sec. 3.1 and App. "Projection head"): a 3-layer MLP (hidden 2048, GELU) to a
  256-d bottleneck, L2 normalisation, then a weight-normalised linear layer without bias to K
  = 65536 prototypes. With `norm_last_layer` the weight-norm gain is fixed at 1, so the layer
  is a cosine against K unit prototypes (the paper's stable default); otherwise the gain is a
  trained parameter, initialised at 1.
- `DINO`: a ViT backbone (`vit`, named like MAE's encoder so fine-tuning configs load both the
  same way), the head, and for iBOT (Zhou et al. 2022) optionally a separate patch head. The
  teacher is not a module here: it is the same graph run on EMA parameters the objective keeps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vistax.models import layers, vit
from vistax.models.transformer import DTYPES


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    out_dim: int = 65536  # K prototypes (Sec. 3.1; Table 9 ablates 4096 ... 65536)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True  # weight-norm gain frozen at 1 (App. "Projection head")

    def check(self, key: str) -> None:
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}.{name}={value!r} must be a positive int.")


HEAD_KEYS = tuple(f.name for f in dataclasses.fields(HeadConfig))


def mlp_axes(i: int, num_layers: int) -> tuple:
    """Logical axes of the head's layer i: the first reads the backbone's `embed` width, the
    hidden outputs are `mlp` (the inputs of later layers replicated), the bottleneck is
    replicated."""
    return ("embed" if i == 0 else None, "mlp" if i < num_layers - 1 else None)


class DINOHead(nnx.Module):
    """MLP -> L2 norm -> weight-normalised prototypes; (..., in_dim) -> (..., K) float32 logits."""

    def __init__(self, in_dim: int, cfg: HeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        init = jax.nn.initializers.truncated_normal(0.02)  # trunc_normal(std=.02), biases 0
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=init)
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.num_layers - 1) + [cfg.bottleneck_dim]
        self.mlp = nnx.List([layers.Dense(a, b, mlp_axes(i, cfg.num_layers), **kw)
                             for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.last_layer = Prototypes(cfg.bottleneck_dim, cfg.out_dim, rngs=rngs,
                                     trained_gain=not cfg.norm_last_layer,
                                     param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = (None,) * (x.ndim - 2)
        for i, dense in enumerate(self.mlp):
            x = dense(x)
            if i < len(self.mlp) - 1:
                x = layers.constrain(layers.gelu(x),
                                     ("batch",) + lead + ("act_mlp",))
        return self.last_layer(layers.l2_normalize(x))


class Prototypes(nnx.Module):
    """Weight-normalised linear layer without bias (Salimans & Kingma 2016): column k of
    `kernel` normalised to unit length, times `gain[k]` (fixed at 1 without `trained_gain`)."""

    def __init__(self, dim: int, num: int, *, rngs: nnx.Rngs, trained_gain: bool,
                 param_dtype=jnp.float32):
        self.kernel = layers.param(rngs, jax.nn.initializers.truncated_normal(0.02), (dim, num),
                                   (None, "vocab"), param_dtype)
        self.gain = (nnx.Param(jnp.ones((num,), param_dtype), out_sharding=("vocab",))
                     if trained_gain else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.kernel[...].astype(jnp.float32)
        w = v * jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True))
        if self.gain is not None:
            w = w * self.gain[...].astype(jnp.float32)
        return x.astype(jnp.float32) @ w


def dino_backbone(model: dict) -> vit.ViTConfig:
    """The backbone's ViTConfig from the config's `model` keys, checked for self-distillation:
    no classification head, a cls token (the DINO head reads it), any input size."""
    cfg = vit.ViTConfig.from_dict(dict(model))
    if cfg.num_classes or cfg.pool != "cls" or cfg.representation_size or cfg.head_norm != "none":
        raise ValueError(f"model: the DINO backbone pools with its cls token and has no head: "
                         f"set pool='cls' (got {cfg.pool!r}), num_classes=0 (got "
                         f"{cfg.num_classes}), representation_size=0, head_norm='none'.")
    return dataclasses.replace(cfg, dynamic_image_size=True)


class DINO(nnx.Module):
    """Backbone + DINO head (+ a separate iBOT patch head); one student or teacher network."""

    def __init__(self, backbone: vit.ViTConfig, head: HeadConfig, *, rngs: nnx.Rngs,
                 patch_head: HeadConfig | None = None):
        self.vit = vit.ViT(backbone, rngs=rngs)
        kw = dict(rngs=rngs, dtype=DTYPES[backbone.dtype], param_dtype=DTYPES[backbone.param_dtype])
        self.head = DINOHead(backbone.width, head, **kw)
        self.patch_head = DINOHead(backbone.width, patch_head, **kw) if patch_head else None

    def __call__(self, images: jax.Array, *, rng: jax.Array | None = None,
                 token_mask: jax.Array | None = None, patches: bool = False) -> dict:
        """`cls`: the backbone's cls output (B, D); `logits`: the head on it (B, K); with
        `patches`, also `patch_tokens` (B, N, D) (the head is applied to them by the caller,
        which picks the masked ones first)."""
        pooled, out = self.vit(images, rng=rng, token_mask=token_mask)
        result = {"cls": pooled, "logits": self.head(pooled)}
        if patches:
            result["patch_tokens"] = out["patch_tokens"]
        return result

    def patch_logits(self, tokens: jax.Array) -> jax.Array:
        """iBOT's head on patch tokens: the separate one if built, else the DINO head."""
        return (self.patch_head or self.head)(tokens)
