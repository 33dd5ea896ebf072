"""Text transformer towers: causal CLIP-style (pooled at end-of-text) or bidirectional.

CLIP (Radford et al. 2021, Sec. 2.4): a causally masked transformer over BPE tokens framed by
start/end-of-text; the representation is the final-LayerNorm output at the end-of-text token.
Bidirectional towers (LiT, SigLIP's big_vision text tower) attend to every valid token and pool
by mean over valid tokens or take the first token. CoCa's unimodal decoder (Yu et al. 2022,
Sec. 3.2) appends a learned [CLS] token after the text and pools its output (`pool='cls'`,
causal or not; the other positions' outputs feed the multimodal decoder). Valid tokens are those
up to and including the first `eos_id`, so the padding id may coincide with a real token (CLIP
pads with 0 = "!").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vistax.models import layers, vit
from vistax.models.transformer import DTYPES, REMAT_POLICIES, Encoder

POOLS = ("eos", "mean", "first", "cls")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Resolved text-tower hyper-parameters (a ViT-table size name plus explicit overrides)."""
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    vocab_size: int
    eos_id: int
    max_len: int = 77  # CLIP's context length
    causal: bool = True
    pool: str = "eos"
    layernorm_eps: float = 1e-5  # CLIP's (PyTorch's) default
    qkv_bias: bool = True
    activation: str = "gelu"
    dropout: float = 0.0
    drop_path: float = 0.0
    scan: bool = True
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        checks = (("pool", self.pool, POOLS), ("remat", self.remat, tuple(REMAT_POLICIES)),
                  ("dtype", self.dtype, tuple(DTYPES)), ("param_dtype", self.param_dtype,
                                                         tuple(DTYPES)))
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"model.text.{key}={value!r} is not one of {list(allowed)}.")
        layers.check_activation(self.activation, "model.text.activation")
        if self.width % self.num_heads:
            raise ValueError(f"model.text width {self.width} is not divisible by "
                             f"num_heads={self.num_heads}.")
        if self.vocab_size < 2 or not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"model.text.eos_id={self.eos_id} must lie in [0, vocab_size="
                             f"{self.vocab_size}).")
        if self.causal and self.pool not in ("eos", "cls"):
            raise ValueError(f"model.text.pool={self.pool!r} with causal=True: only the "
                             "end-of-text token (or an appended cls) has seen the whole text; use "
                             "pool='eos' or 'cls'.")

    @classmethod
    def from_dict(cls, cfg: dict) -> "TextConfig":
        """From a config dict whose `variant` (a ViT size name, e.g. 'B') explicit keys override."""
        cfg = dict(cfg)
        variant = cfg.pop("variant", None)
        resolved = {}
        if variant:
            resolved = vit.decode_variant(variant)
            if "patch_size" in resolved:
                raise ValueError(f"model.text.variant={variant!r} takes a size only, e.g. 'B'.")
        resolved.update({k: v for k, v in cfg.items() if v is not None})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(resolved) - fields)
        if unknown:
            raise ValueError(f"Unknown text-tower option(s) {unknown} in model.text; known: "
                             f"{sorted(fields)}.")
        missing = sorted({"width", "depth", "mlp_dim", "num_heads", "vocab_size", "eos_id"}
                         - set(resolved))
        if missing:
            raise ValueError(f"model.text lacks {missing} (set model.text.variant for the sizes; "
                             "vocab_size and eos_id come from the tokenizer).")
        return cls(**resolved)


def valid_tokens(tokens: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """(position of the first eos per row, bool mask of positions up to and including it)."""
    eos_pos = jnp.argmax(tokens == eos_id, axis=-1)
    valid = jnp.arange(tokens.shape[-1])[None, :] <= eos_pos[:, None]
    return eos_pos, valid


class TextTransformer(nnx.Module):
    """Token + learned position embeddings -> transformer -> final LN -> pooled (B, width)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype = DTYPES[cfg.param_dtype]
        # CLIP's initialisation: token embeddings N(0, 0.02^2), positions N(0, 0.01^2).
        self.token_embedding = layers.param(rngs, jax.nn.initializers.normal(0.02),
                                            (cfg.vocab_size, cfg.width), ("vocab", "embed"),
                                            param_dtype)
        extra = int(cfg.pool == "cls")
        self.pos_embedding = layers.param(rngs, jax.nn.initializers.normal(0.01),
                                          (cfg.max_len + extra, cfg.width), (None, "embed"),
                                          param_dtype)
        self.cls_token = (layers.param(rngs, jax.nn.initializers.normal(0.02), (1, 1, cfg.width),
                                       (None, None, "embed"), param_dtype) if extra else None)
        self.encoder = Encoder(cfg, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, dict]:
        """(B, L) int tokens -> (pooled (B, width), {'encoded': (B, L, width), ...}).

        With pool='cls', 'encoded' holds the L text positions (the appended cls excluded).
        """
        cfg = self.cfg
        length = tokens.shape[-1]
        if tokens.ndim != 2 or length > cfg.max_len:
            raise ValueError(f"Text tower with max_len={cfg.max_len} got tokens of shape "
                             f"{tokens.shape}; expected (batch, <= {cfg.max_len}).")
        dtype = DTYPES[cfg.dtype]
        x = jnp.take(self.token_embedding[...], tokens, axis=0).astype(dtype)
        eos_pos, valid = valid_tokens(tokens, cfg.eos_id)
        keys_valid = valid
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (x.shape[0], 1, cfg.width))
            x = jnp.concatenate([x, cls], axis=1)
            keys_valid = jnp.pad(valid, ((0, 0), (0, 1)), constant_values=True)
        x = x + self.pos_embedding[:x.shape[1]].astype(dtype)
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        # A causal tower pooled at eos needs no padding mask: positions after eos never reach
        # it. An appended cls sees every position, so the padding is masked out of the keys.
        mask = (None if cfg.causal and cfg.pool == "eos" else keys_valid[:, None, None, :])
        encoded = self.encoder(x, rng, mask=mask, is_causal=cfg.causal)
        if cfg.pool == "cls":
            pooled, encoded = encoded[:, -1], encoded[:, :-1]
        elif cfg.pool == "eos":
            pooled = jnp.take_along_axis(encoded, eos_pos[:, None, None], axis=1)[:, 0]
        elif cfg.pool == "mean":
            weights = valid.astype(encoded.dtype)[..., None]
            pooled = (encoded * weights).sum(1) / weights.sum(1)
        else:
            pooled = encoded[:, 0]
        return pooled, {"encoded": encoded, "valid": valid, "eos_pos": eos_pos}


def flops_per_example(cfg: TextConfig, length: int) -> float:
    """Forward FLOPs of one text of `length` tokens (matmuls and attention, 2 per MAC)."""
    d, m, t = cfg.width, cfg.mlp_dim, length + (cfg.pool == "cls")
    return float(cfg.depth * (2 * t * (4 * d * d + 2 * d * m) + 2 * 2 * t * t * d))
