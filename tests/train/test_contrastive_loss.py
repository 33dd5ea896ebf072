"""Contrastive losses: closed forms, and the sharded forms equal the dense loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vistax.train.objectives import contrastive_loss as cl


def unit_rows(key, n, d):
    x = jax.random.normal(key, (n, d))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_identical_features_give_log_n_and_the_sigmoid_closed_form():
    n, t, b = 16, 7.0, -3.0
    z = jnp.tile(unit_rows(jax.random.key(0), 1, 8), (n, 1))
    # Every logit equal: each softmax row is uniform over n candidates.
    np.testing.assert_allclose(cl.softmax_dense(z, z, t), np.log(n), rtol=1e-6)
    # One positive and n - 1 negatives per row, all with logit t + b (SigLIP Algorithm 1).
    expected = -(np.log(1 / (1 + np.exp(-(t + b)))) + (n - 1) * np.log(1 / (1 + np.exp(t + b))))
    np.testing.assert_allclose(cl.sigmoid_dense(z, z, t, b), expected, rtol=1e-6)


def test_orthonormal_pairs_have_the_closed_form_softmax_loss():
    n, t = 8, 5.0
    z = jnp.eye(n)
    # Diagonal logit t, the rest 0: -log(e^t / (e^t + n - 1)) in both directions.
    # (float32 log-sum-exp of [t, 0, ...] minus t loses a few ulps of t: rtol 1e-5.)
    np.testing.assert_allclose(cl.softmax_dense(z, z, t), np.log1p((n - 1) * np.exp(-t)),
                               rtol=1e-5)


MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data4_tensor2": (4, 1, 2)}


@pytest.mark.parametrize("mesh_shape", MESHES.values(), ids=MESHES.keys())
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_loss_and_gradients_equal_the_dense_loss(mesh_shape, kind):
    n, d = 32, 16
    k1, k2 = jax.random.split(jax.random.key(1))
    zimg, ztxt = unit_rows(k1, n, d), unit_rows(k2, n, d)
    scalars = (jnp.float32(9.0),) if kind == "softmax" else (jnp.float32(9.0), jnp.float32(-4.0))
    dense, sharded = ((cl.softmax_dense, cl.softmax_sharded) if kind == "softmax"
                      else (cl.sigmoid_dense, cl.sigmoid_ring))
    argnums = tuple(range(2 + len(scalars)))
    want, want_grads = jax.value_and_grad(dense, argnums=argnums)(zimg, ztxt, *scalars)
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P(axes, None))
        args = (jax.device_put(zimg, rows), jax.device_put(ztxt, rows)) + scalars
        got, got_grads = jax.jit(jax.value_and_grad(
            lambda *a: sharded(*a, axes=axes), argnums=argnums))(*args)
    # float32 sums in another order: agreement to a few ulps of the loss and gradients.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_sigmoid_ring_holds_one_block_of_logits_at_a_time():
    n, d, devices = 64, 8, 8
    b = n // devices
    mesh = jax.make_mesh((devices, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)
    z = unit_rows(jax.random.key(2), n, d)

    def shapes_in(fn, *scalars):
        with jax.set_mesh(mesh):
            rows = jax.device_put(z, NamedSharding(mesh, P("data", None)))
            grad = jax.jit(jax.grad(lambda a, c: fn(a, c, *scalars, axes=("data",))))
            return grad.lower(rows, rows).compile().as_text()

    ring = shapes_in(cl.sigmoid_ring, 10.0, -10.0)
    assert f"f32[{b},{b}]" in ring  # the per-device block of logits
    assert f"f32[{b},{n}]" not in ring and f"f32[{n},{n}]" not in ring
    gathered = shapes_in(cl.softmax_sharded, 10.0)
    assert f"f32[{b},{n}]" in gathered and f"f32[{n},{n}]" not in gathered


def test_without_a_batch_axis_the_sharded_forms_are_the_dense_ones():
    z = unit_rows(jax.random.key(3), 4, 8)
    assert cl.batch_mesh_axes() == ()
    np.testing.assert_allclose(cl.softmax_sharded(z, z[::-1], 3.0), cl.softmax_dense(z, z[::-1], 3.0))
    np.testing.assert_allclose(cl.sigmoid_ring(z, z, 3.0, -1.0), cl.sigmoid_dense(z, z, 3.0, -1.0))
