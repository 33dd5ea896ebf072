"""Perceiver AR (Hawthorne et al. 2022): autoregressive modelling of long byte sequences.

The last `num_latents` positions of a `max_length` context are the latents: each one
cross-attends (causally: to inputs at its own position and before) to the whole context, then
causal self-attention layers run over the latents only, so the cost is linear in the context
length and quadratic only in the number of latents. Latent position p predicts token p + 1
through the tied byte embedding.

Generation (`generate`) caches the cross-attention keys/values of the context and the
self-attention keys/values of the latents: a window places the last max_length - num_latents
+ 1 tokens so that the newest is the first latent, then produces num_latents tokens one at a
time, each costing one latent's work; after num_latents tokens the window moves on and the
context is encoded again (strided generation). Every step equals the full forward pass on its
window (tested), because each latent sees only its own position and before.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vistax.models import layers
from vistax.models.transformer import DTYPES, Encoder, check_compute_options

EMBED_INIT = jax.nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class PerceiverARConfig:
    """Perceiver AR hyper-parameters (config `model`); `width`/`depth`/... are also the
    fields `transformer.Block` reads for the latent self-attention stack."""
    vocab_size: int = 259  # the `bytes` tokenizer: 256 bytes + pad/bos/eos
    max_length: int = 8192  # context length (inputs to the cross-attention)
    num_latents: int = 1024
    width: int = 1024
    depth: int = 12  # causal self-attention layers over the latents
    num_heads: int = 16
    cross_heads: int = 16
    mlp_dim: int = 4096
    dropout: float = 0.0
    drop_path: float = 0.0
    pad_id: int = 0
    # The embedding table gets rows up to a multiple of this (Megatron's default 128), so the
    # vocabulary splits over tensor-parallel devices; the extra ids get -inf logits.
    vocab_multiple: int = 128
    layernorm_eps: float = 1e-6
    qkv_bias: bool = True
    activation: str = "gelu"
    scan: bool = True
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_compute_options(self)
        if not 1 <= self.num_latents <= self.max_length:
            raise ValueError(f"model.num_latents={self.num_latents} must lie in [1, "
                             f"max_length={self.max_length}].")
        for key in ("num_heads", "cross_heads"):
            if self.width % getattr(self, key):
                raise ValueError(f"model.width={self.width} is not divisible by model.{key}="
                                 f"{getattr(self, key)}.")
        if self.vocab_multiple < 1:
            raise ValueError(f"model.vocab_multiple={self.vocab_multiple} must be >= 1.")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"model.pad_id={self.pad_id} must lie in [0, vocab_size="
                             f"{self.vocab_size}).")

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @classmethod
    def from_dict(cls, cfg: dict) -> "PerceiverARConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"Unknown Perceiver AR option(s) {unknown}; known: {sorted(fields)}.")
        return cls(**{k: v for k, v in cfg.items() if v is not None})


class PerceiverAR(nnx.Module):
    """(B, T) tokens, T <= max_length -> logits (B, min(T, num_latents), padded_vocab)
    predicting the token after each of the last positions."""

    def __init__(self, cfg: PerceiverARConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embedding = layers.param(rngs, EMBED_INIT, (cfg.padded_vocab, cfg.width),
                                      ("vocab", "embed"), param_dtype)
        self.pos_embedding = layers.param(rngs, EMBED_INIT, (cfg.max_length, cfg.width),
                                          (None, "embed"), param_dtype)
        self.norm_q = layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, **kw)
        self.norm_kv = layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, **kw)
        self.cross_attn = layers.MultiHeadAttention(cfg.width, cfg.cross_heads,
                                                    qkv_bias=cfg.qkv_bias, **kw)
        self.norm_mlp = layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, **kw)
        self.mlp = layers.MLP(cfg.width, cfg.mlp_dim, dropout_rate=cfg.dropout,
                              activation=cfg.activation, **kw)
        self.latent_stack = Encoder(cfg, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((cfg.padded_vocab,), param_dtype), out_sharding=("vocab",))

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        dtype = DTYPES[self.cfg.dtype]
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)
        return x + jnp.take(self.pos_embedding[...], positions, axis=0).astype(dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(h.dtype)
        logits = jnp.einsum("bld,vd->blv", h, table) + self.bias[...].astype(h.dtype)
        if self.cfg.padded_vocab == self.cfg.vocab_size:
            return logits
        real = jnp.arange(self.cfg.padded_vocab) < self.cfg.vocab_size
        return jnp.where(real, logits, jnp.finfo(logits.dtype).min)

    def _cross_mlp(self, x_q, attended, keys):
        h = x_q + layers.dropout(attended, self.cfg.dropout, keys[0])
        return h + layers.dropout(self.mlp(self.norm_mlp(h), keys[1]), self.cfg.dropout, keys[2])

    def __call__(self, tokens: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        b, t = tokens.shape
        if t > cfg.max_length:
            raise ValueError(f"Perceiver AR with max_length={cfg.max_length} got {t} tokens.")
        n = min(cfg.num_latents, t)
        keys = jax.random.split(rng, 4) if rng is not None else [None] * 4
        x = layers.constrain(self.embed(tokens, jnp.arange(t)), ("batch", "length", "act_embed"))
        valid = tokens != cfg.pad_id
        # Latent i sits at position t - n + i and reads inputs at that position and before.
        causal = jnp.arange(t)[None, :] <= (t - n + jnp.arange(n))[:, None]  # (n, t)
        mask = causal[None, None] & valid[:, None, None, :]
        x_q = x[:, t - n:]
        h = self._cross_mlp(x_q, self.cross_attn(self.norm_q(x_q), self.norm_kv(x), mask=mask),
                            keys[:3])
        h = self.latent_stack(h, keys[3], mask=valid[:, None, None, t - n:], is_causal=True)
        return self.logits(h)

    # -- cached generation ----------------------------------------------------------------

    def start(self, window: jax.Array) -> tuple[jax.Array, dict]:
        """A (B, max_length) window whose last token sits at position L - N (the first latent),
        pad after it -> (logits of that latent, cache)."""
        cfg = self.cfg
        x = self.embed(window, jnp.arange(cfg.max_length))
        kv = self.norm_kv(x)
        b = window.shape[0]
        heads, hd = cfg.num_heads, cfg.width // cfg.num_heads
        shape = (cfg.depth, b, cfg.num_latents, heads, hd)
        cache = {"tokens": window, "cross_k": self.cross_attn.key(kv),
                 "cross_v": self.cross_attn.value(kv),
                 "self_k": jnp.zeros(shape, x.dtype), "self_v": jnp.zeros(shape, x.dtype)}
        first = cfg.max_length - cfg.num_latents
        return self.step(cache, window[:, first], jnp.asarray(0, jnp.int32))

    def step(self, cache: dict, token: jax.Array, slot: jax.Array) -> tuple[jax.Array, dict]:
        """Latent `slot` (position L - N + slot) now holds `token` (B,): its logits and the
        updated cache. Costs one latent's cross-attention and layers."""
        cfg = self.cfg
        pos = cfg.max_length - cfg.num_latents + slot
        x_q = self.embed(token[:, None], pos[None])  # (B, 1, D)
        tokens = jax.lax.dynamic_update_slice(cache["tokens"], token[:, None], (0, pos))
        kv = self.norm_kv(x_q)
        cross_k = jax.lax.dynamic_update_slice(cache["cross_k"], self.cross_attn.key(kv),
                                               (0, pos, 0, 0))
        cross_v = jax.lax.dynamic_update_slice(cache["cross_v"], self.cross_attn.value(kv),
                                               (0, pos, 0, 0))
        mask = ((jnp.arange(cfg.max_length) <= pos)[None, :] & (tokens != cfg.pad_id))
        q = self.cross_attn.query(self.norm_q(x_q))
        y = jax.nn.dot_product_attention(q, cross_k, cross_v, mask=mask[:, None, None, :])
        h = self._cross_mlp(x_q, self.cross_attn.out(y), [None] * 3)

        graphdef, stacked = nnx.split(self.latent_stack.blocks)
        slots_mask = (jnp.arange(cfg.num_latents) <= slot)[None, None, None, :]

        def layer(h, xs):
            state, k_cache, v_cache = xs
            block = nnx.merge(graphdef, state)
            a = block.norm1(h)
            k_cache = jax.lax.dynamic_update_slice(k_cache, block.attn.key(a), (0, slot, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, block.attn.value(a), (0, slot, 0, 0))
            att = jax.nn.dot_product_attention(block.attn.query(a), k_cache, v_cache,
                                               mask=slots_mask)
            h = h + _scaled(block.ls1, block.attn.out(att))
            h = h + _scaled(block.ls2, block.mlp(block.norm2(h)))
            return h, (k_cache, v_cache)

        h, (self_k, self_v) = jax.lax.scan(layer, h, (stacked, cache["self_k"], cache["self_v"]))
        h = self.latent_stack.norm(h)
        cache = {"tokens": tokens, "cross_k": cross_k, "cross_v": cross_v,
                 "self_k": self_k, "self_v": self_v}
        return self.logits(h)[:, 0], cache


def _scaled(scale, y):
    return y if scale is None else scale(y)


def window_for(context: np.ndarray, cfg: PerceiverARConfig) -> np.ndarray:
    """(B, T) context -> the (B, max_length) window whose position L - N holds the newest
    token, the L - N tokens before it in front (left padding if fewer), pad after it."""
    context = np.asarray(context)
    first = cfg.max_length - cfg.num_latents
    keep = min(context.shape[1], first + 1)
    window = np.full((context.shape[0], cfg.max_length), cfg.pad_id, np.int32)
    window[:, first + 1 - keep:first + 1] = context[:, context.shape[1] - keep:]
    return window


@nnx.jit
def _start(model: PerceiverAR, window):
    return model.start(window)


@nnx.jit
def _step(model: PerceiverAR, cache, token, slot):
    return model.step(cache, token, slot)


def generate(model: PerceiverAR, prompt, num_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0) -> np.ndarray:
    """Continues (B, P) prompts (P >= 1, no padding) by `num_tokens` tokens: greedy when
    temperature is 0, else sampled from softmax(logits / temperature). Returns (B, num_tokens).
    """
    cfg = model.cfg
    context = np.asarray(prompt, np.int32)
    if context.ndim != 2 or context.shape[1] < 1:
        raise ValueError(f"generate takes (batch, length >= 1) prompts; got {context.shape}.")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng.")
    out = []
    while len(out) < num_tokens:
        logits, cache = _start(model, jnp.asarray(window_for(context, cfg)))
        for slot in range(1, cfg.num_latents + 1):
            if temperature > 0:
                rng, key = jax.random.split(rng)
                token = jax.random.categorical(key, logits.astype(jnp.float32) / temperature)
            else:
                token = jnp.argmax(logits, axis=-1)
            token = token.astype(jnp.int32)
            out.append(np.asarray(token))
            if len(out) == num_tokens or slot == cfg.num_latents:
                break
            logits, cache = _step(model, cache, token, jnp.asarray(slot, jnp.int32))
        context = np.concatenate([context, np.stack(out[-slot:], axis=1)], axis=1)
    return np.stack(out, axis=1)


def flops_per_example(cfg: PerceiverARConfig) -> float:
    """Forward FLOPs of one max_length context (2 per multiply-add): the cross-attention is
    linear in the context length L, the latent stack quadratic only in N."""
    length, n, d, m = cfg.max_length, cfg.num_latents, cfg.width, cfg.mlp_dim
    cross = 2 * (n * d * d + 2 * length * d * d + n * d * d) + 2 * 2 * n * length * d
    cross += 2 * 2 * n * d * m
    stack = cfg.depth * (2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d)
    return float(cross + stack + 2 * n * d * cfg.padded_vocab)
