"""Transformer building blocks shared by every tower: dense, attention, MLP, drop path, poolers.

Every parameter names its logical axes (`embed`, `mlp`, `heads`, `kv`, ...) and activations are
constrained with `constrain`; the config's rule table maps those names to mesh axes. Randomness
(dropout, drop path) comes from an explicit `rng` argument, so a step is a pure function of its
inputs and a resumed run draws the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

Shape = Sequence[int]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pins activation `x` to the mesh axes its logical `axes` map to; a no-op without a mesh."""
    rules = flax_spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, flax_spmd.apply_rules(PartitionSpec(*axes), None))


def param(rngs: nnx.Rngs, init, shape: Shape, axes: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter initialised by `init` with logical axis names attached."""
    if len(axes) != len(shape):
        raise ValueError(f"Parameter of shape {tuple(shape)} got {len(axes)} axis names {axes}.")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


class Dense(nnx.Module):
    """y = x W + b, contracting the trailing `in_shape` dims of x into `out_shape` dims."""

    def __init__(self, in_shape: int | Shape, out_shape: int | Shape, axes: Sequence[str | None], *,
                 rngs: nnx.Rngs, use_bias: bool = True, kernel_init=None,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        n_in = len(in_shape)
        if kernel_init is None:
            kernel_init = jax.nn.initializers.xavier_uniform(
                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out_shape))))
        self.n_in = n_in
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, in_shape + out_shape, axes, param_dtype)
        self.bias = (param(rngs, jax.nn.initializers.zeros, out_shape, axes[n_in:], param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = contract_rows(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def contract_rows(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x's trailing `n_in` dims contracted with kernel's leading ones, the other dims of x
    flattened to one row dim for the matmul (x[..., in] @ kernel[in, out] -> [..., out]).

    The flattening is free (a bitcast) and the math is the same, but it shapes the backward
    pass: the weight gradient contracts that one row dim (rows^T @ grad), which XLA's CPU dots
    read in place. Contracting (batch, tokens) as two dims made XLA copy an operand of most
    weight gradients transposed first (a ViT-S/16 step compiles to 172 transposes instead of
    197). On 2 CPU cores, side by side in one process (30 steps each, median): ViT-S/16 at 112 px
    3613 -> 3484 ms, ViT-Ti/16 at 224 px 2415 -> 2265 ms (0-2% and even in other such runs).
    """
    lead = x.shape[:x.ndim - n_in]
    if len(lead) > 1:
        x = x.reshape((-1,) + x.shape[len(lead):])
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    return y.reshape(lead + y.shape[x.ndim - n_in:])


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32 whatever the compute dtype."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32, axis: str | None = "embed"):
        del rngs  # deterministic init; kept for a uniform constructor signature
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate: jax.Array | float, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): drops a residual branch per sample.

    `rate` may be traced (a per-layer value scanned over depth); identity when `rng` is None
    or `rate` is a Python 0.
    """
    if rng is None or (isinstance(rate, (int, float)) and rate == 0):
        return x
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob.astype(x.dtype), 0).astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP models were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt(2))) (Hendrycks & Gimpel 2016, Eq. 1).

    Written with erf, as PyTorch's `F.gelu` computes it, rather than `jax.nn.gelu`'s
    x/2 * erfc(-x / sqrt(2)): XLA's float32 erf is one rational polynomial, its erfc an
    exponential and piecewise polynomials with selects. On 2 CPU cores, forward + backward of
    a (64, 50, 1536) activation take 1.9 + 3.6 ms instead of 4.9 + 8.2 ms, and of a whole MLP
    block (fc1, GELU, fc2) 154 instead of 160 ms at ViT-S/16's shapes (64 x 50 tokens, 384 ->
    1536), 86 instead of 98 ms at ViT-Ti/16's (32 x 197, 192 -> 768). The cost is
    the negative tail, where 1 + erf cancels: over [-10, 10] the values are within 1.1e-6 of
    the float64 function (erfc: 3.9e-7) and the derivative within 2e-7 (1.2e-7).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / np.sqrt(2.0), x.dtype)))


# Exact GELU (ViT, open_clip's default), its tanh approximation (big_vision's default), QuickGELU.
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}

# Gated feed-forwards (Shazeer 2020, "GLU Variants Improve Transformer"): the first layer makes
# two projections x W1 and x W2, the hidden units are act(x W1) * (x W2). SwiGLU (act = SiLU) is
# DINOv2's ViT-g feed-forward (Oquab et al. 2024; `SwiGLUFFNFused` in their layers/swiglu_ffn.py).
GATED_ACTIVATIONS = {
    "swiglu": jax.nn.silu,
}


def is_gated(name: str) -> bool:
    """Whether activation `name` is a gated (three-matrix) feed-forward."""
    return name in GATED_ACTIVATIONS


def check_activation(name: str, key: str = "model.activation", *, gated: bool = False) -> None:
    """Errors naming `key` unless `name` is an activation (or, with `gated`, a gated one: the
    towers whose FLOPs count a gated MLP)."""
    allowed = sorted(ACTIVATIONS) + (sorted(GATED_ACTIVATIONS) if gated else [])
    if name not in allowed:
        raise ValueError(f"{key}={name!r} is not one of {allowed}.")


class MLP(nnx.Module):
    """Transformer feed-forward block: Dense -> activation -> dropout -> Dense.

    A gated `activation` ("swiglu") makes the first Dense one (dim, 2, hidden) kernel, W12 of
    DINOv2's SwiGLUFFN, so both projections are one matmul; the hidden units are then
    act(h[..., 0, :]) * h[..., 1, :] (DINOv2's `x1, x2 = w12(x).chunk(2)`: x1 is gated).
    Sharding: the hidden axis is last and is the `mlp` one (tensor parallelism), so every shard
    holds matching columns of both halves and the gating is local to the shard; the `2` axis is
    never split, `embed` (FSDP) is the input side as for any kernel. A fused (dim, 2 * hidden)
    kernel would not be local: split n ways along its 2 * hidden axis, half of the shards would
    hold x1 only and the others x2 only, and the product would need a collective (XLA inserts
    collective-permutes). One tensor also keeps DINOv2's per-parameter gradient clipping, which
    treats W12 as one parameter.
    """

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.0,
                 activation: str = "gelu", dtype=jnp.float32, param_dtype=jnp.float32):
        check_activation(activation, gated=True)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gated = is_gated(activation)
        if self.gated:
            self.fc1 = Dense(dim, (2, hidden), ("embed", None, "mlp"), **kw)
        else:
            self.fc1 = Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, dim, ("mlp", "embed"), **kw)
        self.dropout_rate = dropout_rate
        self.activation = activation

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        h = self.fc1(x)
        if self.gated:
            h = constrain(h, ("batch", "length", None, "act_mlp"))
            h = GATED_ACTIVATIONS[self.activation](h[..., 0, :]) * h[..., 1, :]
        else:
            h = ACTIVATIONS[self.activation](h)
        h = constrain(h, ("batch", "length", "act_mlp"))
        h = dropout(h, self.dropout_rate, rng)
        return self.fc2(h)


def fused_attention_backend() -> bool:
    """Whether attention goes through `jax.nn.dot_product_attention` (GPUs, where it can pick
    cuDNN's flash attention), rather than `attention_bhtd`."""
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def attention_bhtd(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                   is_causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v on (batch, heads, length, head_dim) operands.

    The math of `jax.nn.dot_product_attention`'s XLA implementation (logits and softmax in at
    least float32, masked logits set to -0.7 x the dtype's max), with heads ahead of length:
    both products are then batched over leading axes, which XLA's CPU dots take without
    transposing. `mask` broadcasts to (B, heads, T, S), True where attention is allowed.
    """
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), logits_dtype)
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        large_negative = -0.7 * min(float(jnp.finfo(logits_dtype).max),
                                    float(jnp.finfo(jnp.float32).max))
        logits = jnp.where(mask, logits, jnp.asarray(large_negative, logits_dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, v)


class MultiHeadAttention(nnx.Module):
    """Multi-head dot-product attention with q/k/v projections (B, T, D) -> (B, T, D).

    The three projections are separate parameters (the layout of every checkpoint converter)
    but one matmul: their kernels are stacked when called. On GPUs attention is
    `jax.nn.dot_product_attention` (cuDNN's fused kernel where it applies); elsewhere the
    projections write (B, heads, T, head_dim) directly and `attention_bhtd` follows, the
    layout XLA's CPU dots need (on 2 CPU cores, the ViT-Ti/16 attention block's
    forward + backward took 67 ms this way against 87 ms through dot_product_attention).
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
                 kv_dim: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
        """`kv_dim`: width of the tokens attended to in cross-attention (default `dim`)."""
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by num_heads={num_heads}.")
        head_dim = dim // num_heads
        kv_dim = dim if kv_dim is None else kv_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=qkv_bias)
        self.query = Dense(dim, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.key = Dense(kv_dim, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.value = Dense(kv_dim, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.out = Dense((num_heads, head_dim), dim, ("heads", "kv", "embed"), rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype

    def _project(self, x: jax.Array, denses: Sequence[Dense], heads_first: bool) -> jax.Array:
        """(len(denses), B, heads, T, head_dim) if heads_first else (n, B, T, heads, head_dim):
        x through the stacked kernels of `denses` in one matmul, plus their biases."""
        kernel = jnp.stack([d.kernel[...].astype(self.dtype) for d in denses], axis=1)
        y = contract_rows(x.astype(self.dtype), kernel, 1)  # (B, T, n, heads, head_dim)
        y = y.transpose((2, 0, 3, 1, 4) if heads_first else (2, 0, 1, 3, 4))
        if denses[0].bias is not None:
            bias = jnp.stack([d.bias[...].astype(self.dtype) for d in denses])
            y = y + (bias[:, None, :, None, :] if heads_first else bias[:, None, None])
        return y

    def __call__(self, x: jax.Array, kv: jax.Array | None = None, *,
                 mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        """Self-attention over `x`, or cross-attention from `x` to `kv`.

        `mask`: boolean, broadcastable to (B, heads, T, S), True where attention is allowed.
        `is_causal`: each query attends to keys at its position and before.
        """
        fused = fused_attention_backend()
        if kv is None:
            q, k, v = self._project(x, (self.query, self.key, self.value), not fused)
        else:
            (q,) = self._project(x, (self.query,), not fused)
            k, v = self._project(kv, (self.key, self.value), not fused)
        if fused:
            heads = ("batch", "length", "act_heads", None)
            q, k, v = (constrain(t, heads) for t in (q, k, v))
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
            return self.out(constrain(y, heads))
        heads = ("batch", "act_heads", "length", None)
        q, k, v = (constrain(t, heads) for t in (q, k, v))
        y = constrain(attention_bhtd(q, k, v, mask=mask, is_causal=is_causal), heads)
        # The output projection contracts (heads, head_dim) of (B*T) rows: XLA makes this
        # (B, T, heads, head_dim) copy for its dot either way.
        y = contract_rows(y.transpose(0, 2, 1, 3), self.out.kernel[...].astype(self.dtype), 2)
        if self.out.bias is not None:
            y = y + self.out.bias[...].astype(self.dtype)
        return y

    def weights(self, x: jax.Array) -> jax.Array:
        """Self-attention probabilities softmax(q k^T / sqrt(head_dim)), (B, heads, T, T) in
        float32: what `__call__` computes inside its fused kernel (for attention maps)."""
        q, k = self.query(x).astype(jnp.float32), self.key(x).astype(jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        return jax.nn.softmax(logits, axis=-1)


class LayerScale(nnx.Module):
    """Per-channel learned residual-branch scale (CaiT, Touvron et al. 2021; DINOv2 uses it
    with init 1e-5)."""

    def __init__(self, dim: int, init: float, *, param_dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.full((dim,), init, param_dtype), out_sharding=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class MAPHead(nnx.Module):
    """Multihead attention pooling (Lee et al. 2019; big_vision's `map` pooling).

    A learned probe attends over the tokens; an MLP with residual refines the pooled vector.
    """

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, *, rngs: nnx.Rngs, eps: float,
                 activation: str = "gelu", dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.probe = param(rngs, jax.nn.initializers.xavier_uniform(), (1, 1, dim),
                           (None, None, "embed"), param_dtype)
        self.attn = MultiHeadAttention(dim, num_heads, **kw)
        self.norm = LayerNorm(dim, eps=eps, **kw)
        self.mlp = MLP(dim, mlp_dim, activation=activation, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class AttentionalPooler(nnx.Module):
    """`num_queries` learned queries attend over LayerNormed tokens: (B, T, kv_dim) ->
    (B, num_queries, dim) (CoCa's attentional pooler, Yu et al. 2022, Sec. 3.2: a single
    multi-head attention layer; 1 query for the contrastive embedding, 256 for captioning)."""

    def __init__(self, dim: int, kv_dim: int, num_queries: int, num_heads: int, *,
                 rngs: nnx.Rngs, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.queries = param(rngs, jax.nn.initializers.normal(dim ** -0.5),
                             (num_queries, dim), (None, "embed"), param_dtype)
        self.norm_queries = LayerNorm(dim, eps=eps, **kw)
        self.norm_tokens = LayerNorm(kv_dim, eps=eps, **kw)
        self.attn = MultiHeadAttention(dim, num_heads, kv_dim=kv_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        queries = self.norm_queries(self.queries[...].astype(x.dtype))
        queries = jnp.broadcast_to(queries, (x.shape[0],) + queries.shape)
        return self.attn(queries, self.norm_tokens(x))


SINCOS_STYLES = ("mocov3", "mae")


def sincos_posemb_2d(height: int, width: int, dim: int, temperature: float = 10_000.0,
                     style: str = "mocov3") -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, shape (1, h*w, dim), rows in raster order.

    A quarter of the channels each for [sin(x), cos(x), sin(y), cos(y)], x the column and y the
    row, at frequencies 1 / temperature**(k / n), k = 0..n-1 over a quarter of n = dim/4
    channels. `style` picks the one detail the two references differ in: "mocov3" (Chen et al.
    2021, big_vision) divides k by n - 1, so the last frequency is 1/temperature; "mae" (He et
    al. 2021, their `get_2d_sincos_pos_embed`) divides by n.
    """
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {dim}.")
    if style not in SINCOS_STYLES:
        raise ValueError(f"sincos position embedding style {style!r} is not one of "
                         f"{list(SINCOS_STYLES)}.")
    n = dim // 4
    denominator = n if style == "mae" else (n - 1 if n > 1 else 1)
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / temperature ** (np.arange(n, dtype=np.float64) / denominator)
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)


def resample_posemb(posemb: jax.Array | np.ndarray, grid: tuple[int, int]) -> jax.Array:
    """Bilinearly resizes a learned (1, h*w, D) patch position embedding to `grid` = (h', w').

    Used when a checkpoint trained at one image size or patch grid initialises another (ViT
    paper, Sec. 3.2: 2-D interpolation of the pre-trained position embeddings).
    """
    n, dim = posemb.shape[1], posemb.shape[2]
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"Cannot resample a position embedding of {n} tokens: not a square grid.")
    if (side, side) == tuple(grid):
        return jnp.asarray(posemb)
    img = jnp.asarray(posemb, jnp.float32).reshape(1, side, side, dim)
    img = jax.image.resize(img, (1, grid[0], grid[1], dim), method="bilinear")
    return img.reshape(1, grid[0] * grid[1], dim).astype(posemb.dtype)
