"""The CPU fast paths keep the math: attention in the (batch, heads, length, head_dim) layout with
stacked q/k/v kernels equals `jax.nn.dot_product_attention` on separate projections (values and
gradients, masks, causal, bfloat16), `contract_rows` is the plain contraction whose weight
gradient compiles without transposing copies, and the unrolled stack's layer boundary is the
identity (bitwise, forward and backward) that keeps XLA's fusions from growing with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.models import layers, transformer
from vistax.models import vit as vit_lib


def _qkv(shape=(2, 7, 3, 8), kv_len=None, dtype=jnp.float32, seed=0):
    b, t, h, d = shape
    s = t if kv_len is None else kv_len
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, h, d), jnp.float32).astype(dtype)
    return q, k, v


def _bhtd(x):
    return jnp.swapaxes(x, 1, 2)


@pytest.mark.parametrize("case", ["plain", "mask", "causal", "causal_and_mask", "cross"])
def test_attention_bhtd_equals_dot_product_attention(case):
    q, k, v = _qkv(kv_len=5 if case == "cross" else None)
    mask = None
    if "mask" in case:  # per-example key padding, broadcast over heads and queries
        mask = jnp.array([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], bool)[:, None, None, :]
    causal = "causal" in case
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    got = _bhtd(layers.attention_bhtd(_bhtd(q), _bhtd(k), _bhtd(v), mask=mask,
                                      is_causal=causal))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    ref = jax.grad(lambda *a: loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal), *a), argnums=(0, 1, 2))(q, k, v)
    new = jax.grad(lambda *a: loss(lambda q, k, v: _bhtd(layers.attention_bhtd(
        _bhtd(q), _bhtd(k), _bhtd(v), mask=mask, is_causal=causal)), *a),
        argnums=(0, 1, 2))(q, k, v)
    for r, n in zip(ref, new):
        np.testing.assert_allclose(n, r, rtol=1e-5, atol=1e-6)


def test_attention_bhtd_in_bfloat16_keeps_float32_softmax():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    got = _bhtd(layers.attention_bhtd(_bhtd(q), _bhtd(k), _bhtd(v), is_causal=True))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)


def _reference_attention(attn, x, kv=None, mask=None, is_causal=False):
    """The formulation before the fast path: separate projections in (B, T, heads, head_dim),
    jax.nn.dot_product_attention, then the output Dense."""
    kv = x if kv is None else kv
    y = jax.nn.dot_product_attention(attn.query(x), attn.key(kv), attn.value(kv), mask=mask,
                                     is_causal=is_causal)
    return attn.out(y)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_multi_head_attention_equals_separate_projections(cross, qkv_bias):
    attn = layers.MultiHeadAttention(24, 3, rngs=nnx.Rngs(0), qkv_bias=qkv_bias,
                                     kv_dim=16 if cross else None)
    if qkv_bias:  # non-zero biases, so their placement is checked
        for dense in (attn.query, attn.key, attn.value, attn.out):
            dense.bias[...] = jax.random.normal(jax.random.key(1), dense.bias.shape)
    x = jax.random.normal(jax.random.key(2), (2, 6, 24))
    kv = jax.random.normal(jax.random.key(3), (2, 4, 16)) if cross else None
    mask = None if cross else jnp.tril(jnp.ones((6, 6), bool))[None, None]
    np.testing.assert_allclose(attn(x, kv, mask=mask), _reference_attention(attn, x, kv, mask),
                               rtol=1e-5, atol=1e-6)

    graphdef, params = nnx.split(attn, nnx.Param)

    def loss(params, fn):
        return jnp.sum(jnp.cos(fn(nnx.merge(graphdef, params), x, kv, mask)))

    got = jax.grad(loss)(params, lambda a, *args: a(args[0], args[1], mask=args[2]))
    want = jax.grad(loss)(params, _reference_attention)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


def test_materialize_is_the_identity_forward_and_backward():
    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    out, vjp = jax.vjp(transformer.materialize, x)
    (grad,) = vjp(2.0 * x + 1.0)
    assert np.array_equal(np.asarray(out), np.asarray(x))
    assert np.array_equal(np.asarray(grad), np.asarray(2.0 * x + 1.0))
    assert np.array_equal(np.asarray(jax.jit(transformer.materialize)(x)), np.asarray(x))


def test_unstack_layers_gradient_is_one_concatenate():
    stacked = {"w": jnp.arange(24.0).reshape(4, 2, 3), "b": jnp.ones((4, 3))}
    per_layer = transformer.unstack_layers(stacked, 4)
    assert len(per_layer) == 4 and per_layer[2]["w"].shape == (2, 3)
    np.testing.assert_array_equal(per_layer[2]["w"], stacked["w"][2])
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: sum(
        jnp.sum(layer["w"] ** 2) + jnp.sum(layer["b"])
        for layer in transformer.unstack_layers(s, 4))))(stacked))
    assert "concatenate" in jaxpr and "pad" not in jaxpr


@pytest.mark.parametrize("n_in", [1, 2])
def test_contract_rows_is_the_plain_contraction(n_in):
    keys = jax.random.split(jax.random.key(0), 3)
    in_shape = (6,) if n_in == 1 else (2, 3)
    x = jax.random.normal(keys[0], (4, 5) + in_shape)
    kernel = jax.random.normal(keys[1], in_shape + (7,))
    g = jax.random.normal(keys[2], (4, 5, 7))
    axes = "ij"[:n_in]

    def loss(x, kernel):
        return jnp.sum(layers.contract_rows(x, kernel, n_in) * g)

    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers.contract_rows(x, kernel, n_in),
                               np.einsum(f"bt{axes},{axes}o->bto", x, kernel), **tol)
    np.testing.assert_allclose(layers.contract_rows(x[0, 0], kernel, n_in),
                               np.einsum(f"{axes},{axes}o->o", x[0, 0], kernel), **tol)
    dx, dkernel = jax.grad(loss, (0, 1))(x, kernel)
    np.testing.assert_allclose(dkernel, np.einsum(f"bt{axes},bto->{axes}o", x, g), **tol)
    np.testing.assert_allclose(dx, np.einsum(f"{axes}o,bto->bt{axes}", kernel, g), **tol)


def test_mlp_weight_gradients_compile_without_transposes(monkeypatch):
    """With one row dim XLA's CPU weight-gradient dots read (rows, features) operands in place;
    contracting (batch, tokens) as two dims compiles to a transposing copy per Dense."""
    mlp = layers.MLP(64, 256, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 50, 64))

    def transposes():
        def loss(params):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        return sum(" transpose(" in line for line in hlo.splitlines())

    assert transposes() == 0

    def two_dims(x, kernel, n_in):
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))

    monkeypatch.setattr(layers, "contract_rows", two_dims)
    assert transposes() == 2


def _fused_instructions(hlo: str) -> int:
    count, inside = 0, False
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            inside = "fus" in line.split()[0]
        elif inside:
            count += 1
    return count


def test_unrolled_stack_fusions_grow_linearly_with_depth():
    """XLA's CPU fusion recomputed the residual-stream (and residual-gradient) updates of every
    block above inside each consumer when the stack was unrolled, so the compiled train step
    grew quadratically with depth (a 12-block ViT-S/16 step had ~900-instruction fusions and
    ran 2.2x slower). With `materialize` at each block boundary every added block adds the same
    work. Without it the instructions per block from 4 to 8 blocks were 1.58x those from 2 to
    4; with it, 1.05x."""

    def fused(depth):
        cfg = vit_lib.ViTConfig.from_dict(dict(variant="Ti/4", width=32, depth=depth,
                                               mlp_dim=64, num_heads=2, image_size=16,
                                               num_classes=5, scan=False))
        graphdef, params = nnx.split(vit_lib.ViT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        images = jnp.ones((4, 16, 16, 3))

        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(images)
            return jnp.mean(logits ** 2)

        return _fused_instructions(jax.jit(jax.grad(loss)).lower(params).compile().as_text())

    two, four, eight = fused(2), fused(4), fused(8)
    per_block_low, per_block_high = (four - two) / 2, (eight - four) / 4
    assert per_block_high <= 1.15 * per_block_low, (two, four, eight)


def test_gpu_path_through_dot_product_attention_gives_the_same_outputs(monkeypatch):
    """On GPUs attention goes through jax.nn.dot_product_attention (cuDNN where it applies) in
    (B, T, heads, head_dim); forced here on the CPU, it equals the (B, heads, T, head_dim)
    path."""
    attn = layers.MultiHeadAttention(24, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 24))
    kv = jax.random.normal(jax.random.key(3), (2, 4, 24))
    cpu_self, cpu_cross = attn(x, is_causal=True), attn(x, kv)
    monkeypatch.setattr(layers, "fused_attention_backend", lambda: True)
    np.testing.assert_allclose(attn(x, is_causal=True), cpu_self, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attn(x, kv), cpu_cross, rtol=1e-5, atol=1e-6)


def test_gelu_is_the_exact_gelu_through_erf():
    """`layers.gelu` is x * Phi(x) (values and derivative against float64) and compiles to
    erf's polynomial, without the exponential and selects of `jax.nn.gelu`'s erfc form."""
    import math

    x = np.linspace(-10.0, 10.0, 20001, dtype=np.float32)
    x64 = x.astype(np.float64)
    phi = 0.5 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
    density = np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi)
    got = np.asarray(jax.jit(layers.gelu)(x), np.float64)
    np.testing.assert_allclose(got, x64 * phi, rtol=0, atol=1.5e-6)
    near = x > -1  # away from the negative tail, where 1 + erf cancels
    np.testing.assert_allclose(got[near], (x64 * phi)[near], rtol=2e-6, atol=1e-7)
    grad = np.asarray(jax.jit(jax.vmap(jax.grad(layers.gelu)))(x), np.float64)
    np.testing.assert_allclose(grad, phi + x64 * density, rtol=0, atol=3e-7)
    np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(x, approximate=False)), atol=1.5e-6)
    assert layers.ACTIVATIONS["gelu"] is layers.gelu
    compiled = jax.jit(layers.gelu).lower(jnp.ones((4, 8))).compile().as_text()
    assert "exponential" not in compiled and "select" not in compiled
