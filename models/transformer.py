"""The pre-LN transformer encoder every tower shares (ViT, text, decoders).

Block parameters are stacked along a leading `layers` axis, so the same checkpoint runs
unrolled or under `jax.lax.scan` (`scan=True`: compile time independent of depth), with
optional remat. Configs are duck-typed: any dataclass with the fields `Block` reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vistax.models import layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def check_compute_options(cfg) -> None:
    """Errors naming model.remat / dtype / param_dtype / activation when not a known value."""
    for key, allowed in (("remat", REMAT_POLICIES), ("dtype", DTYPES), ("param_dtype", DTYPES)):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not one of {list(allowed)}.")
    layers.check_activation(cfg.activation)


class Block(nnx.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention (decoders), MLP.

    Stochastic depth and dropout act on every residual branch.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs, cross_attention: bool = False):
        kw = dict(rngs=rngs, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
        self.norm1 = layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, **kw)
        self.attn = layers.MultiHeadAttention(cfg.width, cfg.num_heads, qkv_bias=cfg.qkv_bias, **kw)
        if cross_attention:
            self.norm_cross = layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, **kw)
            self.cross_attn = layers.MultiHeadAttention(cfg.width, cfg.num_heads,
                                                        qkv_bias=cfg.qkv_bias, **kw)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, **kw)
        self.mlp = layers.MLP(cfg.width, cfg.mlp_dim, dropout_rate=cfg.dropout,
                              activation=cfg.activation, **kw)
        self.dropout_rate = cfg.dropout
        # LayerScale on the self-attention and MLP branches when the config asks for it (ViT's
        # `layer_scale`; towers without the field have none).
        scale = getattr(cfg, "layer_scale", 0.0)
        if scale:
            self.ls1 = layers.LayerScale(cfg.width, scale, param_dtype=DTYPES[cfg.param_dtype])
            self.ls2 = layers.LayerScale(cfg.width, scale, param_dtype=DTYPES[cfg.param_dtype])
        else:
            self.ls1 = self.ls2 = None

    def _residual(self, x, y, drop_path_rate, keys, scale=None):
        if scale is not None:
            y = scale(y)
        y = layers.dropout(y, self.dropout_rate, keys[0])
        x = x + layers.drop_path(y, drop_path_rate, keys[1])
        return layers.constrain(x, ("batch", "length", "act_embed"))

    def __call__(self, x: jax.Array, drop_path_rate: jax.Array, rng: jax.Array | None, *,
                 mask: jax.Array | None = None, is_causal: bool = False,
                 context: jax.Array | None = None) -> jax.Array:
        keys = jax.random.split(rng, 7) if rng is not None else [None] * 7
        y = self.attn(self.norm1(x), mask=mask, is_causal=is_causal)
        x = self._residual(x, y, drop_path_rate, keys[0:2], self.ls1)
        if self.cross_attn is not None:
            y = self.cross_attn(self.norm_cross(x), context)
            x = self._residual(x, y, drop_path_rate, keys[2:4])
        y = self.mlp(self.norm2(x), keys[4])
        return self._residual(x, y, drop_path_rate, keys[5:7], self.ls2)


def unstack_layers(tree, depth: int) -> list:
    """The `depth` per-layer trees of a tree of stacked (leading `layers` axis) leaves, by one
    `lax.split` per leaf. Its gradient is one concatenate per leaf; indexing `leaf[i]` per layer
    would instead pad every layer's gradient to the full depth and add them up."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[jnp.squeeze(p, 0) for p in jax.lax.split(leaf, [1] * depth, axis=0)]
             for leaf in leaves]
    return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(depth)]


def _store(x: jax.Array) -> jax.Array:
    # x with its first element written back in place: a scatter, which XLA never fuses into
    # its consumers (XLA's CPU compiler drops optimization barriers before fusing).
    first = (0,) * x.ndim
    return x.at[first].set(x[first])


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
    """The identity, with `x` (and, in the backward pass, its gradient) kept in memory.

    Between the blocks of an unrolled stack: without it, XLA's CPU fusion recomputes the whole
    chain of elementwise residual-stream (and residual-gradient) updates from the last
    materialised value inside every consumer, one more block each layer down: the fusions of
    a 12-block ViT-S/16 step grew to ~900 instructions and the step took about twice as long
    as with this boundary (README, Benchmarks). Exact: only a copy of the value moves.
    """
    return _store(x)


materialize.defvjp(lambda x: (_store(x), None), lambda _, g: (_store(g),))


class Encoder(nnx.Module):
    """`depth` blocks whose parameters are stacked on a leading `layers` axis, then a final LN
    (`final_norm=False` leaves it out, for a stack another stack continues)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, depth: int | None = None,
                 cross_attention: bool = False, final_norm: bool = True):
        depth = cfg.depth if depth is None else depth

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs, cross_attention=cross_attention)

        self.blocks = make_blocks(rngs)
        self.norm = (layers.LayerNorm(cfg.width, eps=cfg.layernorm_eps, rngs=rngs,
                                      dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
                     if final_norm else None)
        self.depth = depth
        self.scan = cfg.scan
        self.remat = cfg.remat
        # Linear stochastic-depth schedule: 0 at the first block, drop_path at the last (DeiT).
        self.drop_path_rates = tuple(np.linspace(0.0, cfg.drop_path, depth).tolist())

    def __call__(self, x: jax.Array, rng: jax.Array | None = None, *,
                 mask: jax.Array | None = None, is_causal: bool = False,
                 context: jax.Array | None = None) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)
        # Without stochastic depth the rate is a Python 0.0, so no per-sample masks are drawn.
        rates = (jnp.asarray(self.drop_path_rates, jnp.float32) if any(self.drop_path_rates)
                 else None)

        def apply_block(h, block_state, rate, key):
            return nnx.merge(graphdef, block_state)(h, 0.0 if rate is None else rate, key,
                                                    mask=mask, is_causal=is_causal,
                                                    context=context)

        if self.remat != "none":
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[self.remat])
        keys = jax.random.split(rng, self.depth) if rng is not None else None
        if self.scan:
            def body(h, xs):
                block_state, rate, key = xs
                return apply_block(h, block_state, rate, key), None
            x, _ = jax.lax.scan(body, x, (stacked, rates, keys))
        else:
            for i, block_state in enumerate(unstack_layers(stacked, self.depth)):
                x = apply_block(x, block_state, None if rates is None else rates[i],
                                None if keys is None else keys[i])
                x = materialize(x)
        return x if self.norm is None else self.norm(x)

    def last_attention(self, x: jax.Array) -> jax.Array:
        """Self-attention probabilities of the last block, (B, heads, T, T), for tokens `x`
        (evaluation: no dropout or drop path); the blocks before it run as in `__call__`."""
        graphdef, stacked = nnx.split(self.blocks)
        below = jax.tree.map(lambda p: p[:-1], stacked)
        last = nnx.merge(graphdef, jax.tree.map(lambda p: p[-1], stacked))
        rate = jnp.zeros((), jnp.float32)

        def body(h, block_state):
            return nnx.merge(graphdef, block_state)(h, rate, None), None

        if self.depth > 1:
            x, _ = jax.lax.scan(body, x, below)
        return last.attn.weights(last.norm1(x))
