"""Image and text towers with projection heads into one embedding space (CLIP, SigLIP, LiT).

Each tower's pooled output goes through a linear projection and is L2-normalised. The model also
holds the learnable log-temperature and, for the sigmoid loss, the logit bias: CLIP initialises
the temperature to 1/0.07, i.e. log t = ln(1/0.07) (Radford et al. 2021, Sec. 2.5); SigLIP
initialises log t = ln 10 and the bias to -10 (Zhai et al. 2023, Sec. 3.3 and Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vistax.models import layers, text, vit
from vistax.models.transformer import DTYPES

CLIP_LOG_TEMPERATURE = math.log(1 / 0.07)
SIGLIP_LOG_TEMPERATURE = math.log(10.0)
SIGLIP_BIAS = -10.0


@dataclasses.dataclass(frozen=True)
class TwoTowersConfig:
    image: vit.ViTConfig
    text: text.TextConfig
    embed_dim: int
    proj_bias: bool = False  # CLIP: no bias; SigLIP (big_vision heads): bias
    log_temperature_init: float = CLIP_LOG_TEMPERATURE
    bias_init: float | None = None  # a learned logit bias (sigmoid loss) if set

    @classmethod
    def from_dict(cls, cfg: dict) -> "TwoTowersConfig":
        cfg = dict(cfg)
        reject_unknown_options(cls, cfg)
        if not cfg.get("embed_dim") or cfg["embed_dim"] < 1:
            raise ValueError(f"model.embed_dim={cfg.get('embed_dim')!r} must be a positive int.")
        image = vit.ViTConfig.from_dict(dict(cfg.pop("image")))
        if image.num_classes:
            raise ValueError(f"model.image.num_classes={image.num_classes}: the image tower of a "
                             "two-tower model ends at its pooled output (set 0).")
        if image.pool == "none":
            raise ValueError("model.image.pool='none' gives no single image vector; use "
                             "cls, gap or map.")
        return cls(image=image, text=text.TextConfig.from_dict(dict(cfg.pop("text"))), **cfg)


def reject_unknown_options(config_class, cfg: dict) -> None:
    """Raises naming the keys of `cfg` that are not fields of the dataclass `config_class`."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"Unknown model option(s) {unknown}; known: {sorted(known)}.")


def add_heads(module: nnx.Module, cfg, *, rngs: nnx.Rngs) -> None:
    """Sets `image_proj`, `text_proj`, `log_temperature` and `bias` (None without bias_init) on
    `module`; `cfg` has image, text, embed_dim, proj_bias, log_temperature_init, bias_init."""
    # CLIP initialises projections N(0, width^-1/2); bias-free unless configured.
    for name, tower in (("image_proj", cfg.image), ("text_proj", cfg.text)):
        init = jax.nn.initializers.normal(stddev=tower.width ** -0.5)
        setattr(module, name, layers.Dense(
            tower.width, cfg.embed_dim, ("embed", "proj"), rngs=rngs, use_bias=cfg.proj_bias,
            kernel_init=init, dtype=DTYPES[tower.dtype], param_dtype=DTYPES[tower.param_dtype]))
    module.log_temperature = nnx.Param(jnp.asarray(cfg.log_temperature_init, jnp.float32),
                                       out_sharding=())
    module.bias = (nnx.Param(jnp.asarray(cfg.bias_init, jnp.float32), out_sharding=())
                   if cfg.bias_init is not None else None)


class TwoTowers(nnx.Module):
    """`image` (ViT) and `text` (TextTransformer) towers, `image_proj`, `text_proj`,
    `log_temperature` and optionally `bias`."""

    def __init__(self, cfg: TwoTowersConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image = vit.ViT(cfg.image, rngs=rngs)
        self.text = text.TextTransformer(cfg.text, rngs=rngs)
        add_heads(self, cfg, rngs=rngs)

    def encode_image(self, images: jax.Array, *, rng: jax.Array | None = None
                     ) -> tuple[jax.Array, dict]:
        """(B, H, W, C) -> (L2-normalised (B, embed_dim) float32, intermediates)."""
        pooled, out = self.image(images, rng=rng)
        return layers.l2_normalize(self.image_proj(pooled)), out

    def encode_text(self, tokens: jax.Array, *, rng: jax.Array | None = None
                    ) -> tuple[jax.Array, dict]:
        """(B, L) tokens -> (L2-normalised (B, embed_dim) float32, intermediates)."""
        pooled, out = self.text(tokens, rng=rng)
        return layers.l2_normalize(self.text_proj(pooled)), out

    def __call__(self, images: jax.Array, tokens: jax.Array, *, rng: jax.Array | None = None):
        """(image embeddings, text embeddings), both (B, embed_dim) and L2-normalised."""
        k_img, k_txt = jax.random.split(rng) if rng is not None else (None, None)
        zimg, _ = self.encode_image(images, rng=k_img)
        ztxt, _ = self.encode_text(tokens, rng=k_txt)
        return zimg, ztxt


def flops_per_example(cfg: TwoTowersConfig, text_length: int) -> float:
    """Forward FLOPs of one image-text pair (towers and projections; the loss is excluded)."""
    return (vit.flops_per_example(cfg.image) + text.flops_per_example(cfg.text, text_length)
            + 2 * cfg.embed_dim * (cfg.image.width + cfg.text.width))
