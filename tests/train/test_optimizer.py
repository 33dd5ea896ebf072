"""Optimizer factory: schedules in closed form, parameter groups (weight-decay mask, lr/wd
multipliers, freezing), parity of adamw / lamb / sgd with optax and of lars with its update rule,
clipping over trainable parameters, and errors that name the config key."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vistax.configs import common
from vistax.models import vit
from vistax.train import optimizer as optimizer_lib
from vistax.train import param_groups


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
    """nnx.State of a 1-block ViT's parameters, every leaf random (none zero, as trained)."""
    cfg = vit.ViTConfig.from_dict(dict(variant="mu/8", image_size=16, num_classes=3, depth=1))
    state = nnx.state(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return random_like(state, seed=1000)


def make_config(name="sgd", lr=0.5, **overrides):
    """Base config with a constant schedule, no momentum, no weight decay; overrides use '__'
    for '.' (optimizer__weight_decay=0.1)."""
    c = common.base_config()
    c.input.batch_size = 8
    c.optimizer.name = name
    c.optimizer.momentum = 0.0
    c.optimizer.weight_decay = 0.0
    c.schedule.name = "constant"
    c.schedule.base_lr = lr
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c


def flat(tree) -> dict[str, np.ndarray]:
    return {n: np.asarray(x) for n, x in zip(param_groups.names(tree), jax.tree.leaves(tree))}


def random_like(tree, seed):
    """A tree like `tree` of float32 standard normals (numpy: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
                                        for x in leaves])


def random_grads(params, seed):
    return random_like(params, seed)


def run(tx, params, grads_list):
    """Applies `tx` for each gradient tree; returns (updates per step, final params, opt state)."""
    state = tx.init(params)
    all_updates = []
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return all_updates, params, state


def build(config, params, total_steps=10, warmup_steps=0):
    return optimizer_lib.make_optimizer(config, params, total_steps=total_steps,
                                        warmup_steps=warmup_steps)


def is_kernel(name):
    return name.endswith("/kernel")


def kernel_mask(params):
    return jax.tree.unflatten(jax.tree.structure(params),
                              [is_kernel(n) for n in param_groups.names(params)])


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-7):
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys()
    for name in a:
        np.testing.assert_allclose(a[name], e[name], rtol=rtol, atol=atol, err_msg=name)


# -- parameter names -------------------------------------------------------------------------


def test_parameter_names_are_slash_paths(params):
    names = param_groups.names(params)
    for expected in ("encoder/blocks/attn/query/kernel", "encoder/blocks/attn/key/bias",
                     "encoder/blocks/attn/value/kernel", "encoder/blocks/attn/out/kernel",
                     "encoder/blocks/mlp/fc1/kernel", "encoder/blocks/norm1/scale",
                     "encoder/norm/scale", "head/kernel", "head/bias", "patch_embed/kernel",
                     "pos_embedding", "cls_token"):
        assert expected in names
    assert len(set(names)) == len(names) == len(jax.tree.leaves(params))
    # Plain nested dicts are named the same way.
    assert param_groups.names({"a": {"kernel": 1, "bias": 2}, "b": 3}) == ["a/bias", "a/kernel", "b"]


def test_plain_dict_params_work(params):
    tree = {"dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)}}
    opt = build(make_config("sgd", lr=0.5, optimizer__weight_decay=0.1), tree)
    (updates,), _, _ = run(opt.tx, tree, [jax.tree.map(jnp.zeros_like, tree)])
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


# -- schedules -------------------------------------------------------------------------------


def schedule_cfg(**kw):
    c = common.base_config().schedule
    c.update(kw)
    return c


def test_warmup_is_linear_from_start_lr_to_peak():
    sched = optimizer_lib.make_schedule(
        schedule_cfg(name="cosine", base_lr=1.0, warmup="10 steps", warmup_start_lr=0.2,
                     end_lr=0.1), total_steps=110, warmup_steps=10, batch_size=8)
    np.testing.assert_allclose(sched(0), 0.2, rtol=1e-6)
    np.testing.assert_allclose(sched(5), 0.6, rtol=1e-6)
    np.testing.assert_allclose(sched(2), 0.2 + 0.8 * 2 / 10, rtol=1e-6)
    np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)


def test_cosine_decays_to_end_lr():
    peak, end = 1.0, 0.1
    sched = optimizer_lib.make_schedule(
        schedule_cfg(name="cosine", base_lr=peak, warmup="10 steps", end_lr=end),
        total_steps=110, warmup_steps=10, batch_size=8)
    for t in (10, 35, 60, 85, 110):
        expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
        np.testing.assert_allclose(sched(t), expected, rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(sched(60), (peak + end) / 2, rtol=1e-6)
    np.testing.assert_allclose(sched(110), end, rtol=1e-5)


def test_linear_decay():
    sched = optimizer_lib.make_schedule(
        schedule_cfg(name="linear", base_lr=2.0, warmup="0 steps", end_lr=0.5),
        total_steps=100, warmup_steps=0, batch_size=8)
    np.testing.assert_allclose(sched(0), 2.0, rtol=1e-6)
    np.testing.assert_allclose(sched(50), 1.25, rtol=1e-6)
    np.testing.assert_allclose(sched(25), 2.0 - 1.5 * 0.25, rtol=1e-6)
    np.testing.assert_allclose(sched(100), 0.5, rtol=1e-6)


def test_constant_after_warmup():
    sched = optimizer_lib.make_schedule(
        schedule_cfg(name="constant", base_lr=0.3, warmup="4 steps", end_lr=0.0),
        total_steps=20, warmup_steps=4, batch_size=8)
    np.testing.assert_allclose([sched(t) for t in (0, 2)], [0.0, 0.15], rtol=1e-6)
    np.testing.assert_allclose([sched(t) for t in (4, 5, 12, 20)], 0.3, rtol=1e-6)


def test_reference_batch_size_scales_peak_linearly():
    cfg = schedule_cfg(name="cosine", base_lr=5e-4, reference_batch_size=512, warmup="5 steps",
                       warmup_start_lr=1e-6, end_lr=1e-5)
    sched = optimizer_lib.make_schedule(cfg, total_steps=100, warmup_steps=5, batch_size=1024)
    np.testing.assert_allclose(sched(0), 1e-6, rtol=1e-5)
    np.testing.assert_allclose(sched(5), 5e-4 * 1024 / 512, rtol=1e-6)
    np.testing.assert_allclose(sched(100), 1e-5, rtol=1e-4)  # end_lr is not scaled
    sched = optimizer_lib.make_schedule(cfg, total_steps=100, warmup_steps=5, batch_size=128)
    np.testing.assert_allclose(sched(5), 5e-4 / 4, rtol=1e-6)
    # Unset: no scaling whatever the batch.
    cfg.reference_batch_size = None
    sched = optimizer_lib.make_schedule(cfg, total_steps=100, warmup_steps=5, batch_size=1024)
    np.testing.assert_allclose(sched(5), 5e-4, rtol=1e-6)


def test_warmup_longer_than_run_is_an_error():
    with pytest.raises(ValueError, match=r"schedule\.warmup='3 epochs' \(34 steps\).*\(20 steps\)"):
        optimizer_lib.make_schedule(schedule_cfg(warmup="3 epochs"), total_steps=20,
                                    warmup_steps=34, batch_size=8)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match=r"schedule\.name='step'"):
        optimizer_lib.make_schedule(schedule_cfg(name="step"), total_steps=20, warmup_steps=0,
                                    batch_size=8)


# -- weight decay, multipliers ---------------------------------------------------------------


def test_sgd_weight_decay_shrinks_only_kernels(params):
    lr, wd = 0.5, 0.1
    opt = build(make_config("sgd", lr=lr, optimizer__weight_decay=wd), params)
    (updates,), _, _ = run(opt.tx, params, [jax.tree.map(jnp.zeros_like, params)])
    p, u = flat(params), flat(updates)
    kernels = [n for n in p if is_kernel(n)]
    assert len(kernels) >= 8
    for name in p:
        if is_kernel(name):
            np.testing.assert_allclose(u[name], -lr * wd * p[name], rtol=1e-6, err_msg=name)
        else:  # biases, norm scales, pos_embedding, cls_token
            np.testing.assert_array_equal(u[name], 0.0, err_msg=name)


def test_empty_wd_mask_decays_nothing(params):
    opt = build(make_config("sgd", optimizer__weight_decay=0.1, param_groups__wd_mask=""), params)
    (updates,), _, _ = run(opt.tx, params, [jax.tree.map(jnp.zeros_like, params)])
    for name, u in flat(updates).items():
        np.testing.assert_array_equal(u, 0.0, err_msg=name)


def test_lr_mults_scale_matching_updates_first_match_wins(params):
    cfg = make_config("sgd", lr=0.5,
                      param_groups__lr_mults=((r"head/kernel", 2.0), (r"head/.*", 3.0)))
    opt = build(cfg, params)
    (updates,), _, _ = run(opt.tx, params, [jax.tree.map(jnp.ones_like, params)])
    u = flat(updates)
    np.testing.assert_array_equal(u["head/kernel"], 2 * -0.5)
    np.testing.assert_array_equal(u["head/bias"], 3 * -0.5)
    for name in u:
        if not name.startswith("head/"):
            np.testing.assert_array_equal(u[name], -0.5, err_msg=name)


def test_layer_decay_scales_each_stacked_block_and_the_embeddings():
    """BEiT / MAE fine-tuning: block i of L gets rate**(L - i), patch embedding, position
    embedding and cls token rate**(L + 1), the final norm and head 1 (times lr_mults)."""
    depth, rate, lr = 3, 0.5, 0.5
    cfg_vit = vit.ViTConfig.from_dict(dict(variant="mu/8", image_size=16, num_classes=3,
                                           depth=depth))
    deep = random_like(nnx.state(nnx.eval_shape(lambda: vit.ViT(cfg_vit, rngs=nnx.Rngs(0))),
                                 nnx.Param), seed=7)
    cfg = make_config("sgd", lr=lr, param_groups__layer_decay=rate,
                      param_groups__lr_mults=((r"head/kernel", 2.0),))
    opt = build(cfg, deep)
    (updates,), _, _ = run(opt.tx, deep, [jax.tree.map(jnp.ones_like, deep)])
    u = flat(updates)
    per_layer = rate ** (depth - np.arange(depth))  # [rate^3, rate^2, rate^1]
    for name, value in u.items():
        if name.startswith("encoder/blocks/"):
            assert value.shape[0] == depth
            expected = -lr * per_layer.reshape((depth,) + (1,) * (value.ndim - 1))
            np.testing.assert_allclose(value, np.broadcast_to(expected, value.shape), rtol=1e-6,
                                       err_msg=name)
        elif name.split("/")[0] in ("patch_embed", "pos_embedding", "cls_token"):
            np.testing.assert_allclose(value, -lr * rate ** (depth + 1), rtol=1e-6, err_msg=name)
        elif name == "head/kernel":
            np.testing.assert_allclose(value, -lr * 2.0, rtol=1e-6)
        else:  # final norm, head bias
            np.testing.assert_allclose(value, -lr, rtol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match=r"param_groups\.layer_decay=1\.5 must lie in"):
        build(make_config("sgd", param_groups__layer_decay=1.5), deep)


def test_wd_mults_apply_on_top_of_mask(params):
    lr, wd = 0.5, 0.1
    cfg = make_config("sgd", lr=lr, optimizer__weight_decay=wd,
                      param_groups__wd_mults=((r"head/.*", 10.0), (r"pos_embedding", 5.0)))
    opt = build(cfg, params)
    (updates,), _, _ = run(opt.tx, params, [jax.tree.map(jnp.zeros_like, params)])
    p, u = flat(params), flat(updates)
    np.testing.assert_allclose(u["head/kernel"], -lr * wd * 10 * p["head/kernel"], rtol=1e-6)
    # Not in the decay mask: a multiplier does not make it decay.
    np.testing.assert_array_equal(u["head/bias"], 0.0)
    np.testing.assert_array_equal(u["pos_embedding"], 0.0)
    np.testing.assert_allclose(u["patch_embed/kernel"], -lr * wd * p["patch_embed/kernel"],
                               rtol=1e-6)


# -- freezing --------------------------------------------------------------------------------


def test_freeze_adamw_no_update_no_state(params):
    cfg = make_config("adamw", lr=0.01, optimizer__weight_decay=0.05,
                      param_groups__freeze=(r"encoder/.*", r"pos_embedding"))
    opt = build(cfg, params)
    names = param_groups.names(params)
    frozen = {n for n in names if n.startswith("encoder/") or n == "pos_embedding"}
    assert dict(zip(names, jax.tree.leaves(opt.trainable))) == {n: n not in frozen for n in names}
    grads = [random_grads(params, s) for s in range(3)]
    all_updates, final, state = run(opt.tx, params, grads)
    for updates in all_updates:
        for name, u in flat(updates).items():
            if name in frozen:
                np.testing.assert_array_equal(u, 0.0, err_msg=name)
            else:
                assert np.all(u != 0.0), name
    p0, p1 = flat(params), flat(final)
    for name in names:
        assert np.array_equal(p0[name], p1[name]) == (name in frozen), name
    # Adam moments exist only for the trainable parameters.
    mu = optax.tree_utils.tree_get(state, "mu")
    nu = optax.tree_utils.tree_get(state, "nu")
    assert sorted(param_groups.names(mu)) == sorted(set(names) - frozen)
    assert sorted(param_groups.names(nu)) == sorted(set(names) - frozen)
    trainable_size = sum(x.size for n, x in p0.items() if n not in frozen)
    # mu + nu over trainable leaves, plus the adam and schedule step counters.
    assert sum(np.size(x) for x in jax.tree.leaves(state)) == 2 * trainable_size + 2


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb"])
def test_freeze_with_decay_momentum_and_lr_mults(params, name):
    """Every per-leaf transform (decay, lr multipliers, trust-ratio mask) under freezing."""
    cfg = make_config(name, lr=0.1, optimizer__weight_decay=0.1, optimizer__momentum=0.9,
                      param_groups__freeze=(r"encoder/blocks/.*",),
                      param_groups__lr_mults=((r"head/.*", 2.0),),
                      param_groups__wd_mults=((r"patch_embed/.*", 3.0),))
    opt = build(cfg, params)
    all_updates, _, _ = run(opt.tx, params, [random_grads(params, s) for s in range(3)])
    for updates in all_updates:
        for n, u in flat(updates).items():
            if n.startswith("encoder/blocks/"):
                np.testing.assert_array_equal(u, 0.0, err_msg=n)
            else:
                assert np.all(np.isfinite(u)) and np.any(u != 0.0), n
    # The trainable part moves exactly as the same optimizer on the unfrozen tree would
    # (frozen leaves do not enter any per-tensor statistic).
    free = build(make_config(name, lr=0.1, optimizer__weight_decay=0.1, optimizer__momentum=0.9,
                             param_groups__lr_mults=((r"head/.*", 2.0),),
                             param_groups__wd_mults=((r"patch_embed/.*", 3.0),)), params)
    free_updates, _, _ = run(free.tx, params, [random_grads(params, s) for s in range(3)])
    for a, b in zip(all_updates, free_updates):
        fa, fb = flat(a), flat(b)
        for n in fa:
            if not n.startswith("encoder/blocks/"):
                np.testing.assert_allclose(fa[n], fb[n], rtol=1e-6, err_msg=n)


# -- parity with optax / the update rule -----------------------------------------------------


@pytest.mark.parametrize("name, reference, rtol", [("adamw", optax.adamw, 1e-6),
                                                    ("lamb", optax.lamb, 1e-5)])
def test_adaptive_optimizers_match_optax(params, name, reference, rtol):
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-6, 0.1
    cfg = make_config(name, lr=lr, optimizer__b1=b1, optimizer__b2=b2, optimizer__eps=eps,
                      optimizer__weight_decay=wd)
    grads = [random_grads(params, s) for s in range(4)]
    ours, _, _ = run(build(cfg, params).tx, params, grads)
    ref, _, _ = run(reference(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                              mask=kernel_mask(params)), params, grads)
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, rtol=rtol)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_optax(params, momentum, nesterov):
    lr, wd = 0.1, 0.01
    cfg = make_config("sgd", lr=lr, optimizer__momentum=momentum, optimizer__nesterov=nesterov,
                      optimizer__weight_decay=wd)
    grads = [random_grads(params, s) for s in range(3)]
    ours, _, _ = run(build(cfg, params).tx, params, grads)
    ref_tx = optax.chain(optax.add_decayed_weights(wd, kernel_mask(params)),
                         optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    ref, _, _ = run(ref_tx, params, grads)
    for a, b in zip(ours, ref):
        assert_trees_close(a, b, rtol=1e-6)


def test_lars_matches_update_rule(params):
    """decay (masked) -> trust ratio tc*|p|/(|u|+eps) on masked params -> momentum -> lr."""
    lr, wd, tc, eps, momentum = 0.1, 0.01, 0.002, 1e-3, 0.9
    cfg = make_config("lars", lr=lr, optimizer__weight_decay=wd, optimizer__trust_coefficient=tc,
                      optimizer__eps=eps, optimizer__momentum=momentum)
    grads = [random_grads(params, s) for s in range(3)]
    ours, _, _ = run(build(cfg, params).tx, params, grads)

    p = {n: x.astype(np.float64) for n, x in flat(params).items()}
    trace = {n: np.zeros_like(x) for n, x in p.items()}
    for step, g_tree in enumerate(grads):
        g = {n: x.astype(np.float64) for n, x in flat(g_tree).items()}
        expected = {}
        for n in p:
            u = g[n] + (wd * p[n] if is_kernel(n) else 0.0)
            if is_kernel(n):
                pn, un = np.linalg.norm(p[n]), np.linalg.norm(u)
                u = u * (tc * pn / (un + eps) if pn > 0 and un > 0 else 1.0)
            trace[n] = u + momentum * trace[n]
            expected[n] = -lr * trace[n]
            p[n] = p[n] + expected[n]
        got = flat(ours[step])
        for n in p:
            np.testing.assert_allclose(got[n], expected[n], rtol=2e-5, atol=1e-7,
                                       err_msg=f"step {step} {n}")
    # Non-kernels get plain momentum SGD on the gradient: check the rule really differs there.
    assert not np.allclose(flat(ours[0])["head/kernel"], -lr * np.asarray(flat(grads[0])["head/kernel"]))


def test_grad_clip_norm_bounds_update(params):
    lr = 0.5
    g = random_grads(params, 0)
    norm = float(optax.tree.norm(g))
    g = jax.tree.map(lambda x: x * (10.0 / norm), g)
    np.testing.assert_allclose(optax.tree.norm(g), 10.0, rtol=1e-5)
    opt = build(make_config("sgd", lr=lr, grad_clip_norm=1.0), params)
    (updates,), _, _ = run(opt.tx, params, [g])
    np.testing.assert_allclose(optax.tree.norm(updates), lr * 1.0, rtol=1e-5)
    assert_trees_close(updates, jax.tree.map(lambda x: -lr * x / 10.0, g), rtol=1e-5)
    # Below the threshold nothing changes.
    opt = build(make_config("sgd", lr=lr, grad_clip_norm=100.0), params)
    (updates,), _, _ = run(opt.tx, params, [g])
    assert_trees_close(updates, jax.tree.map(lambda x: -lr * x, g), rtol=1e-6)


def test_grad_clip_ignores_frozen_gradients(params):
    """Frozen gradients (here huge) take no part in the clipping norm."""
    lr = 0.5
    names = param_groups.names(params)
    g = random_grads(params, 0)
    trainable_norm = math.sqrt(sum(float(jnp.sum(x ** 2)) for n, x in zip(names, jax.tree.leaves(g))
                                   if not n.startswith("encoder/")))
    g = jax.tree.unflatten(jax.tree.structure(g), [
        x * 1e4 if n.startswith("encoder/") else x * (10.0 / trainable_norm)
        for n, x in zip(names, jax.tree.leaves(g))])
    opt = build(make_config("sgd", lr=lr, grad_clip_norm=1.0,
                            param_groups__freeze=(r"encoder/.*",)), params)
    np.testing.assert_allclose(optimizer_lib.trainable_global_norm(g, opt.trainable), 10.0,
                               rtol=1e-5)
    (updates,), _, _ = run(opt.tx, params, [g])
    np.testing.assert_allclose(optax.tree.norm(updates), lr * 1.0, rtol=1e-5)


def test_trainable_global_norm_ignores_frozen_leaves():
    grads = {"a": jnp.full((4,), 3.0), "b": jnp.full((2, 2), 100.0), "c": jnp.array([4.0])}
    trainable = {"a": True, "b": False, "c": True}
    np.testing.assert_allclose(optimizer_lib.trainable_global_norm(grads, trainable),
                               math.sqrt(4 * 9 + 16), rtol=1e-6)
    everything = {"a": True, "b": True, "c": True}
    np.testing.assert_allclose(optimizer_lib.trainable_global_norm(grads, everything),
                               math.sqrt(4 * 9 + 16 + 4 * 100 ** 2), rtol=1e-6)
    nothing = {"a": False, "b": False, "c": False}
    assert float(optimizer_lib.trainable_global_norm(grads, nothing)) == 0.0


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("param_groups__freeze", (r"encoder/blocks/atn/.*",),
     r"param_groups\.freeze: pattern 'encoder/blocks/atn/\.\*' matches no parameter"),
    ("param_groups__lr_mults", ((r"heads/.*", 2.0),),
     r"param_groups\.lr_mults: pattern 'heads/\.\*' matches no parameter"),
    ("param_groups__wd_mults", ((r"nope", 2.0),),
     r"param_groups\.wd_mults: pattern 'nope' matches no parameter"),
    ("param_groups__wd_mask", r"kernel",  # fullmatch: a bare name matches no path
     r"param_groups\.wd_mask: pattern 'kernel' matches no parameter"),
    ("param_groups__freeze", (r"encoder/(",), r"param_groups\.freeze: invalid regex 'encoder/\('"),
    ("param_groups__lr_mults", ((r"head/[", 2.0),),
     r"param_groups\.lr_mults: invalid regex 'head/\['"),
    ("param_groups__lr_mults", ((r"head/.*",),),
     r"param_groups\.lr_mults: expected \(\(regex, number\), \.\.\.\), got entry \('head/\.\*',\)"),
    ("param_groups__lr_mults", ((r"head/.*", "2"),), r"param_groups\.lr_mults: expected"),
    ("param_groups__wd_mults", (r"head/.*", 2.0), r"param_groups\.wd_mults: expected"),
    ("optimizer__name", "adam", r"optimizer\.name='adam' is not one of"),
    ("schedule__name", "poly", r"schedule\.name='poly' is not one of"),
])
def test_bad_param_groups_name_key_and_pattern(params, key, value, message):
    cfg = make_config("sgd")
    *parents, leaf = key.split("__")
    node = cfg
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        build(cfg, params)
    with pytest.raises(ValueError, match=message):
        optimizer_lib.param_group_trees(cfg, params)


def test_error_lists_example_names(params):
    with pytest.raises(ValueError, match=r"names look like: cls_token, encoder/"):
        build(make_config("sgd", param_groups__freeze=("x",)), params)


def test_config_dict_is_not_needed_for_schedule():
    """make_schedule reads only attributes: a plain ConfigDict built by hand works."""
    cfg = ml_collections.ConfigDict(dict(name="linear", base_lr=1.0, end_lr=0.0,
                                         warmup_start_lr=0.0, warmup="0 steps"))
    sched = optimizer_lib.make_schedule(cfg, total_steps=4, warmup_steps=0, batch_size=1)
    np.testing.assert_allclose([sched(t) for t in range(5)], [1.0, 0.75, 0.5, 0.25, 0.0],
                               rtol=1e-6)


# -- self-distillation controls: weight-decay schedule, per-parameter clipping, hold ----------


def test_weight_decay_follows_a_cosine_from_start_to_end():
    """DINO's weight decay 0.04 -> 0.4: sgd with zero gradients updates by -lr x wd(t) x p."""
    tree = {"dense": {"kernel": jnp.ones((2, 2))}}
    total = 8
    opt = build(make_config("sgd", lr=1.0, optimizer__weight_decay=0.04,
                            optimizer__weight_decay_end=0.4), tree, total_steps=total)
    state = opt.tx.init(tree)
    rates = []
    for _ in range(total + 1):
        updates, state = opt.tx.update(jax.tree.map(jnp.zeros_like, tree), state, tree)
        rates.append(-float(updates["dense"]["kernel"][0, 0]))
    expected = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * t / total)) / 2
                for t in range(total)] + [0.4]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_per_parameter_clipping_bounds_each_tensor_and_each_stacked_layer(params):
    grads = random_grads(params, 7)
    opt = build(make_config("sgd", lr=1.0, grad_clip_per_param=0.5), params)
    (updates,), _, _ = run(opt.tx, params, [grads])
    for name, g in flat(grads).items():
        u = -flat(updates)[name]
        if "/blocks/" in name:  # one parameter per layer along the leading axis
            axes = tuple(range(1, g.ndim))
            norms = np.sqrt((g ** 2).sum(axis=axes, keepdims=True))
        else:
            norms = np.sqrt((g ** 2).sum())
        expected = g * np.minimum(1.0, 0.5 / (norms + optimizer_lib.PER_PARAM_CLIP_EPS))
        np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-8, err_msg=name)
        rows = u.reshape(u.shape[0], -1) if "/blocks/" in name else u.reshape(1, -1)
        assert np.all(np.sqrt((rows ** 2).sum(-1)) <= 0.5 + 1e-5), name


def test_hold_keeps_parameters_moments_and_decay_still_then_releases(params):
    """A held parameter moves neither by its gradient, Adam's moments nor weight decay for the
    first `hold` steps; afterwards it trains; other parameters train throughout."""
    config = make_config("adamw", lr=0.1, optimizer__weight_decay=0.1,
                         param_groups__hold=((r"head/.*", "2 steps"),))
    opt = build(config, params)
    grads = [random_grads(params, s) for s in range(3)]
    all_updates, _, state = run(opt.tx, params, grads[:2])
    for updates in all_updates:
        for name, u in flat(updates).items():
            assert (np.all(u == 0) if name.startswith("head/") else np.any(u != 0)), name
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
    assert np.all(np.asarray(adam.mu["head"]["kernel"]) == 0)
    updates, _ = opt.tx.update(grads[2], state, params)
    assert np.all(np.asarray(updates["head"]["kernel"]) != 0)


def test_hold_in_epochs_and_bad_entries():
    tree = {"head": {"kernel": jnp.ones((2, 2))}, "body": {"kernel": jnp.ones((2, 2))}}
    config = make_config(param_groups__hold=((r"head/.*", "1 epochs"),))
    steps = optimizer_lib.hold_steps(config, tree, epoch_size=20)  # batch 8: 2.5 -> 3 steps
    assert steps == {"head": {"kernel": 3}, "body": {"kernel": 0}}
    with pytest.raises(ValueError, match=r"param_groups.hold\[0\]='1 weeks'"):
        optimizer_lib.hold_steps(make_config(param_groups__hold=((r"head/.*", "1 weeks"),)),
                                 tree, epoch_size=20)
    with pytest.raises(ValueError, match=r"param_groups.hold: pattern 'nothing/.*' matches no"):
        optimizer_lib.hold_steps(make_config(param_groups__hold=((r"nothing/.*", "1 steps"),)),
                                 tree, epoch_size=20)
    with pytest.raises(ValueError, match="grad_clip_per_param=-1.0 must be > 0"):
        build(make_config(grad_clip_per_param=-1.0), tree)
    with pytest.raises(ValueError, match="weight_decay_end=0.4 needs optimizer.weight_decay > 0"):
        build(make_config(optimizer__weight_decay_end=0.4), tree)
