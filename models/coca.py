"""CoCa: a contrastive captioner (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text
Foundation Models").

- Image encoder: a ViT whose output tokens feed two attentional poolers (Sec. 3.2): one query
  for the contrastive image embedding, `caption_queries` (256) at the text width for the
  decoder's cross-attention.
- Unimodal text decoder: a causal transformer with a learned [CLS] token appended after the
  text (`model.text.pool='cls'`); the CLS output is the text embedding.
- Multimodal text decoder: `decoder_depth` causal blocks with cross-attention to the captioning
  pooler's tokens, over the unimodal decoder's outputs; a linear head gives next-token logits.

Embeddings go through linear projections and are L2-normalised as in CLIP, so the zero-shot and
retrieval evaluators and the contrastive losses take them unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vistax.models import layers, text, two_towers, vit
from vistax.models.transformer import DTYPES, Encoder


@dataclasses.dataclass(frozen=True)
class CoCaConfig:
    image: vit.ViTConfig
    text: text.TextConfig
    decoder_depth: int  # multimodal layers (Table 1: as many as the unimodal ones)
    embed_dim: int
    caption_queries: int = 256  # Sec. 3.2
    proj_bias: bool = False
    log_temperature_init: float = two_towers.CLIP_LOG_TEMPERATURE
    bias_init: float | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "CoCaConfig":
        cfg = dict(cfg)
        two_towers.reject_unknown_options(cls, cfg)
        for key in ("embed_dim", "decoder_depth", "caption_queries"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise ValueError(f"model.{key}={cfg.get(key)!r} must be a positive int.")
        image = vit.ViTConfig.from_dict(dict(cfg.pop("image")))
        if image.num_classes or image.pool != "none":
            raise ValueError(f"model.image.pool={image.pool!r}, num_classes={image.num_classes}: "
                             "CoCa pools the image tokens with its own attentional poolers; set "
                             "pool='none' and num_classes=0.")
        text_cfg = text.TextConfig.from_dict(dict(cfg.pop("text")))
        if not text_cfg.causal or text_cfg.pool != "cls":
            raise ValueError(f"model.text.causal={text_cfg.causal}, pool={text_cfg.pool!r}: CoCa's "
                             "unimodal decoder is causal with an appended cls token (causal=True, "
                             "pool='cls').")
        return cls(image=image, text=text_cfg, **cfg)


class CoCa(nnx.Module):
    """`image`, `contrastive_pool`, `caption_pool`, `text` (unimodal), `decoder` (multimodal),
    `caption_head`, `image_proj`, `text_proj`, `log_temperature` and optionally `bias`."""

    def __init__(self, cfg: CoCaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        img, txt = cfg.image, cfg.text
        self.image = vit.ViT(img, rngs=rngs)
        self.contrastive_pool = layers.AttentionalPooler(
            img.width, img.width, 1, img.num_heads, rngs=rngs, eps=img.layernorm_eps,
            dtype=DTYPES[img.dtype], param_dtype=DTYPES[img.param_dtype])
        self.caption_pool = layers.AttentionalPooler(
            txt.width, img.width, cfg.caption_queries, txt.num_heads, rngs=rngs,
            eps=txt.layernorm_eps, dtype=DTYPES[txt.dtype], param_dtype=DTYPES[txt.param_dtype])
        self.text = text.TextTransformer(txt, rngs=rngs)
        self.decoder = Encoder(txt, rngs=rngs, depth=cfg.decoder_depth, cross_attention=True)
        kw = dict(rngs=rngs, dtype=DTYPES[txt.dtype], param_dtype=DTYPES[txt.param_dtype])
        self.caption_head = layers.Dense(txt.width, txt.vocab_size, ("embed", "vocab"), **kw)
        two_towers.add_heads(self, cfg, rngs=rngs)

    def encode_image(self, images: jax.Array, *, rng: jax.Array | None = None
                     ) -> tuple[jax.Array, dict]:
        """(B, H, W, C) -> (L2-normalised (B, embed_dim), {'tokens', 'pooled', ...})."""
        tokens, out = self.image(images, rng=rng)
        pooled = self.contrastive_pool(tokens)[:, 0]
        return layers.l2_normalize(self.image_proj(pooled)), dict(out, tokens=tokens,
                                                                        pooled=pooled)

    def encode_text(self, tokens: jax.Array, *, rng: jax.Array | None = None
                    ) -> tuple[jax.Array, dict]:
        """(B, L) tokens -> (L2-normalised (B, embed_dim), {'encoded': (B, L, width), ...})."""
        pooled, out = self.text(tokens, rng=rng)
        return layers.l2_normalize(self.text_proj(pooled)), out

    def caption_logits(self, image_tokens: jax.Array, text_encoded: jax.Array, *,
                       rng: jax.Array | None = None) -> jax.Array:
        """Next-token logits (B, L, vocab): position i predicts token i + 1."""
        context = self.caption_pool(image_tokens)
        hidden = self.decoder(text_encoded, rng, is_causal=True, context=context)
        return self.caption_head(hidden)

    def __call__(self, images: jax.Array, tokens: jax.Array, *, rng: jax.Array | None = None):
        """(image embeddings, text embeddings, caption logits (B, L, vocab))."""
        keys = jax.random.split(rng, 3) if rng is not None else (None,) * 3
        zimg, img_out = self.encode_image(images, rng=keys[0])
        ztxt, txt_out = self.encode_text(tokens, rng=keys[1])
        return zimg, ztxt, self.caption_logits(img_out["tokens"], txt_out["encoded"],
                                               rng=keys[2])


def caption_loss(logits: jax.Array, tokens: jax.Array, eos_id: int
                 ) -> tuple[jax.Array, jax.Array]:
    """(mean next-token cross-entropy, next-token accuracy) over the batch's caption tokens.

    Targets are tokens[:, 1:] up to and including the first eos; logits[:, :-1] predict them
    (Yu et al. 2022, Eq. 3: the autoregressive captioning loss). Averaged over all target
    tokens of the (global) batch, so a long caption weighs more than a short one.
    """
    _, valid = text.valid_tokens(tokens, eos_id)
    targets, weights = tokens[:, 1:], valid[:, 1:].astype(jnp.float32)
    logits = logits[:, :-1].astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(weights.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (nll * weights).sum() / count, (correct * weights).sum() / count


def flops_per_example(cfg: CoCaConfig, text_length: int) -> float:
    """Forward FLOPs of one image-caption pair: towers, poolers, decoder and caption head."""
    img, txt = cfg.image, cfg.text
    n_img = img.grid[0] * img.grid[1] + img.num_registers  # pool='none': no cls token
    t, d, q = text_length, txt.width, cfg.caption_queries

    def pooler(n_queries, dim, kv_dim, tokens):
        return 2 * (2 * n_queries * dim * dim + 2 * tokens * kv_dim * dim
                    + 2 * n_queries * tokens * dim)

    decoder = cfg.decoder_depth * (2 * t * (4 * d * d + 2 * d * txt.mlp_dim) + 4 * t * t * d
                                   + 2 * (2 * t * d * d + 2 * q * d * d + 2 * t * q * d))
    return (vit.flops_per_example(img) + text.flops_per_example(txt, t)
            + pooler(1, img.width, img.width, n_img) + pooler(q, d, img.width, n_img)
            + decoder + 2 * t * d * txt.vocab_size
            + 2 * cfg.embed_dim * (img.width + d))
