"""Image-text contrastive losses: softmax (CLIP) and sigmoid (SigLIP), dense and sharded.

All take L2-normalised image and text embeddings `zimg`, `ztxt` of shape (N, D) where row i of
each is a positive pair, and return the mean loss over the *global* batch.

- Softmax (CLIP, Radford et al. 2021, Fig. 3): logits = t * zimg ztxt^T; the mean of the
  image->text and text->image cross-entropies with the diagonal as targets.
- Sigmoid (SigLIP, Zhai et al. 2023, Algorithm 1): logits = t * zimg ztxt^T + b, labels +1 on
  the diagonal and -1 elsewhere, loss = -sum(log sigmoid(labels * logits)) / N.

The sharded forms run under `shard_map` over the mesh axes the batch is split on and give the
dense loss and its gradients exactly (up to float summation order):
- `softmax_sharded`: each device all-gathers both embedding sets and scores only its own rows
  (b x N logits per device instead of N x N).
- `sigmoid_ring` (SigLIP Sec. 3.3, "chunked"): text embeddings travel around the devices with
  collective permutes; each device holds one b x b block of logits at a time, and the scan body
  is rematerialised so the backward pass keeps no blocks either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P


def softmax_dense(zimg: jax.Array, ztxt: jax.Array, temperature: jax.Array) -> jax.Array:
    logits = temperature * zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return 0.5 * (i2t.mean() + t2i.mean())


def sigmoid_dense(zimg: jax.Array, ztxt: jax.Array, temperature: jax.Array,
                  bias: jax.Array) -> jax.Array:
    logits = temperature * zimg.astype(jnp.float32) @ ztxt.astype(jnp.float32).T + bias
    labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def batch_mesh_axes() -> tuple[str, ...]:
    """Mesh axes of the current mesh that the logical `batch` axis is split over (size > 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return ()
    spec = flax_spmd.apply_rules(P("batch"), None)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return tuple(a for a in axes if mesh.shape[a] > 1)


def _sharded(fn, axes, zimg, ztxt, *scalars):
    """Runs fn(local zimg, local ztxt, *scalars) per device, rows split over `axes`."""
    rows = P(axes, None)
    mapped = jax.shard_map(fn, in_specs=(rows, rows) + (P(),) * len(scalars), out_specs=P(),
                           axis_names=set(axes))
    return mapped(zimg.astype(jnp.float32), ztxt.astype(jnp.float32), *scalars)


def softmax_sharded(zimg, ztxt, temperature, axes: tuple[str, ...] | None = None) -> jax.Array:
    """`softmax_dense` computed row-block by row-block on the devices of `axes`."""
    axes = batch_mesh_axes() if axes is None else tuple(axes)
    if not axes:
        return softmax_dense(zimg, ztxt, temperature)
    n = zimg.shape[0]

    def local(zi, zt, t):
        b = zi.shape[0]
        labels = jax.lax.axis_index(axes) * b + jnp.arange(b)
        zi_all = jax.lax.all_gather(zi, axes, tiled=True)
        zt_all = jax.lax.all_gather(zt, axes, tiled=True)
        i2t = optax.softmax_cross_entropy_with_integer_labels(t * zi @ zt_all.T, labels)
        t2i = optax.softmax_cross_entropy_with_integer_labels(t * zt @ zi_all.T, labels)
        return jax.lax.psum(i2t.sum() + t2i.sum(), axes) / (2 * n)

    return _sharded(local, axes, zimg, ztxt, temperature)


def sigmoid_ring(zimg, ztxt, temperature, bias, axes: tuple[str, ...] | None = None
                 ) -> jax.Array:
    """`sigmoid_dense` with text blocks passed around the ring of devices of `axes`."""
    axes = batch_mesh_axes() if axes is None else tuple(axes)
    if not axes:
        return sigmoid_dense(zimg, ztxt, temperature, bias)
    n = zimg.shape[0]

    def local(zi, zt, t, b):
        size = jax.lax.psum(1, axes)
        eye = 2.0 * jnp.eye(zi.shape[0]) - 1.0
        perm = [(j, (j + 1) % size) for j in range(size)]

        @jax.checkpoint
        def block(zt_block, positive):
            logits = t * zi @ zt_block.T + b
            labels = jnp.where(positive, eye, -1.0)
            return -jnp.sum(jax.nn.log_sigmoid(labels * logits))

        def body(carry, k):
            zt_block, total = carry
            total = total + block(zt_block, k == 0)
            return (jax.lax.ppermute(zt_block, axes, perm), total), None

        # size - 1 steps that pass the block on, then the last block without a final permute.
        zero = jax.lax.pcast(jnp.zeros((), jnp.float32), axes, to="varying")
        (zt_block, total), _ = jax.lax.scan(body, (zt, zero), jnp.arange(size - 1))
        total = total + block(zt_block, size == 1)
        return jax.lax.psum(total, axes) / n

    return _sharded(local, axes, zimg, ztxt, temperature, bias)
