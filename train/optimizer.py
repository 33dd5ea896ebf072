"""Optimizer factory from config: adamw / lamb / lars / sgd, warmup + decay, parameter groups.

Chains are built from optax transforms so that every optimizer shares the same handling of
weight decay (per-parameter rate = weight_decay x mask x wd multiplier), per-group
learning-rate multipliers, freezing (no update, no optimizer state) and global-norm clipping
over the trainable parameters.

Weight decay adds rate x param to the update before the learning rate is applied, as optax
and PyTorch do: for adamw that is decoupled decay scaled by the learning rate (PyTorch's AdamW,
used by DeiT); for lamb it enters the trust ratio (You et al. 2020); for sgd and lars it is an
L2 term that passes through momentum (PyTorch SGD, and LARS as in You et al. 2017). With
`optimizer.weight_decay_end` set, the rate follows a cosine from `weight_decay` to it over the
run (DINO: 0.04 -> 0.4, Caron et al. 2021, App. "Implementation details").

Self-distillation adds two more per-parameter controls: `grad_clip_per_param` rescales each
parameter's gradient to at most that L2 norm (DINO's clipping at 3.0; the leaves of stacked
blocks are clipped layer by layer, as the reference's separate per-layer tensors), and
`param_groups.hold` keeps parameters fixed for the first part of the run (DINO's last layer
during the first epoch): their gradients are zeroed before the optimizer and their updates
after it, so neither moments nor weight decay move them, as PyTorch skips a parameter whose
gradient is None. (Adam's bias correction then counts the held steps, which PyTorch's
per-parameter step count does not: the first updates after the hold are a little smaller.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vistax.train import durations, param_groups

OPTIMIZERS = ("adamw", "lamb", "lars", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg, *, total_steps: int, warmup_steps: int, batch_size: int) -> optax.Schedule:
    """Linear warmup from `warmup_start_lr`, then cosine / linear decay to `end_lr`, or constant.

    With `reference_batch_size` set, the peak is `base_lr * batch_size / reference_batch_size`
    (the linear scaling rule of Goyal et al. 2017, used by DeiT with 512 and MAE with 256).
    """
    if cfg.name not in SCHEDULES:
        raise ValueError(f"schedule.name={cfg.name!r} is not one of {list(SCHEDULES)}.")
    peak = float(cfg.base_lr)
    if cfg.get("reference_batch_size"):
        peak *= batch_size / cfg.reference_batch_size
    if warmup_steps > total_steps:
        raise ValueError(f"schedule.warmup={cfg.warmup!r} ({warmup_steps} steps) is longer than the "
                         f"run ({total_steps} steps).")
    decay_steps = max(total_steps - warmup_steps, 1)
    if cfg.name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr / peak if peak else 0)
    elif cfg.name == "linear":
        main = optax.linear_schedule(peak, cfg.end_lr, decay_steps)
    else:
        main = optax.constant_schedule(peak)
    if not warmup_steps:
        return main
    warmup = optax.linear_schedule(cfg.warmup_start_lr, peak, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _is_one(scale) -> bool:
    return isinstance(scale, float) and scale == 1.0


def _per_leaf_scale(scales) -> optax.GradientTransformation:
    """Multiplies each update leaf by a fixed Python number, or a numpy array broadcasting
    against it (per-layer factors of stacked blocks); skipped where the number is 1."""

    def update(updates, state, params=None):
        del params
        # Inside the `trainable` branch of multi_transform, frozen leaves are MaskedNodes.
        return jax.tree.map(lambda u, s: u if _is_one(s) or _is_masked(u) else
                            (u * s).astype(u.dtype), updates, scales, is_leaf=_is_masked), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _decoupled_weight_decay(rates, factor: optax.Schedule | None = None
                            ) -> optax.GradientTransformation:
    """Adds rate x factor(step) x param to each update, before the learning rate (see module
    docstring); factor 1 when not given."""

    def update(updates, state, params):
        scale = 1.0 if factor is None else factor(state.count)
        updates = jax.tree.map(
            lambda u, p, r: u if r == 0.0 or _is_masked(u) else u + (r * scale) * p,
            updates, params, rates, is_leaf=_is_masked)
        if factor is None:
            return updates, state
        return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    def init(_):  # a step count only where the rate follows a schedule
        return (optax.EmptyState() if factor is None else
                optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)))

    return optax.GradientTransformation(init, update)


def _hold(hold_steps) -> optax.GradientTransformation:
    """Zeroes the leaves whose `hold_steps` (a tree of ints, 0 = never) exceed the step count."""

    def update(updates, state, params=None):
        del params
        updates = jax.tree.map(
            lambda u, n: u if n == 0 or _is_masked(u) else jnp.where(state.count < n, 0, u
                                                                     ).astype(u.dtype),
            updates, hold_steps, is_leaf=_is_masked)
        return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(
        lambda _: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update)


PER_PARAM_CLIP_EPS = 1e-6  # DINO's clip_gradients: scale = clip / (norm + 1e-6)


def _clip_per_param(max_norm: float, stacked) -> optax.GradientTransformation:
    """Rescales each parameter's gradient to L2 norm <= max_norm; leaves marked `stacked` (a
    bool tree) hold one parameter per index of their leading (layer) axis."""

    def clip(g, is_stacked):
        if _is_masked(g):
            return g
        axes = tuple(range(1, g.ndim)) if is_stacked else None
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
        scale = jnp.minimum(1.0, max_norm / (norm + PER_PARAM_CLIP_EPS))
        return (g * scale).astype(g.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(clip, updates, stacked, is_leaf=_is_masked), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


@dataclasses.dataclass
class Optimizer:
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    trainable: object  # bool tree like the params


@dataclasses.dataclass
class ParamGroups:
    """Per-parameter settings resolved from config.param_groups (bool/float trees like params)."""
    trainable: object
    decays: object  # bool: decoupled weight decay (and LARS trust ratio) applies
    wd_rates: object  # float: weight_decay x wd multiplier, 0 where not decayed
    lr_mults: object  # float, or a numpy array of per-layer factors for stacked blocks
    stacked: object  # bool: a stack of per-layer parameters along the leading axis


def param_group_trees(config, params) -> ParamGroups:
    """Resolves the regex groups against `params`; a regex matching nothing is an error."""
    opt, groups = config.optimizer, config.param_groups
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={opt.name!r} is not one of {list(OPTIMIZERS)}.")
    if config.schedule.name not in SCHEDULES:
        raise ValueError(f"schedule.name={config.schedule.name!r} is not one of {list(SCHEDULES)}.")
    frozen = param_groups.mask(params, "param_groups.freeze", tuple(groups.freeze))
    decays = (param_groups.mask(params, "param_groups.wd_mask", (groups.wd_mask,))
              if groups.wd_mask else jax.tree.map(lambda _: False, params))
    wd_mults = param_groups.assign(
        params, "param_groups.wd_mults",
        param_groups.as_pairs("param_groups.wd_mults", groups.wd_mults), 1.0)
    lr_mults = param_groups.assign(
        params, "param_groups.lr_mults",
        param_groups.as_pairs("param_groups.lr_mults", groups.lr_mults), 1.0)
    if groups.get("layer_decay", 1.0) != 1.0:
        lr_mults = jax.tree.map(lambda a, b: a * b, lr_mults,
                                layer_decay_mults(params, groups))
    return ParamGroups(
        trainable=jax.tree.map(lambda f: not f, frozen), decays=decays,
        wd_rates=jax.tree.map(lambda d, m: float(opt.weight_decay) * m if d else 0.0, decays,
                              wd_mults),
        lr_mults=lr_mults,
        stacked=param_groups.mask(params, "param_groups.stacked", (groups.stacked,),
                                  required=False))  # a model may have no stacked blocks


def hold_steps(config, params, *, epoch_size: int | None):
    """Tree like `params` of the steps each parameter is held fixed (param_groups.hold)."""
    hold = config.param_groups.get("hold", ())
    rules = []
    for i, entry in enumerate(hold or ()):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and isinstance(entry[0], str)):
            raise ValueError(f"param_groups.hold: expected ((regex, duration), ...), got entry "
                             f"{entry!r}.")
        rules.append((entry[0], durations.steps(f"param_groups.hold[{i}]", entry[1],
                                                global_batch=config.input.batch_size,
                                                epoch_size=epoch_size)))
    return param_groups.assign(params, "param_groups.hold", rules, 0)


def weight_decay_factor(config, total_steps: int) -> optax.Schedule | None:
    """Cosine from 1 to weight_decay_end / weight_decay over the run, or None (constant)."""
    opt = config.optimizer
    end = opt.get("weight_decay_end")
    if end is None:
        return None
    if end < 0 or not opt.weight_decay:
        raise ValueError(f"optimizer.weight_decay_end={end} needs optimizer.weight_decay > 0 "
                         f"(got {opt.weight_decay}) and must be >= 0.")
    return optax.cosine_decay_schedule(1.0, max(total_steps, 1), alpha=end / opt.weight_decay)


def layer_decay_mults(params, groups):
    """Tree like `params` of layer-wise lr factors (see configs/common.py, `layer_decay`).

    Leaves of stacked blocks get a numpy array of shape (depth, 1, ..., 1): one factor per
    layer along their leading axis."""
    rate = float(groups.layer_decay)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"param_groups.layer_decay={groups.layer_decay} must lie in (0, 1].")
    blocks = param_groups.mask(params, "param_groups.layer_decay_blocks",
                               (groups.layer_decay_blocks,))
    embed = param_groups.mask(params, "param_groups.layer_decay_embed",
                              (groups.layer_decay_embed,))
    depths = {p.shape[0] for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(blocks)) if b}
    if len(depths) != 1:
        raise ValueError(f"param_groups.layer_decay_blocks={groups.layer_decay_blocks!r} matches "
                         f"stacked leaves of different depths {sorted(depths)}; match one stack.")
    depth = depths.pop()

    def factor(param, is_block, is_embed):
        if is_block:
            per_layer = rate ** (depth - np.arange(depth, dtype=np.float64))
            return per_layer.reshape((depth,) + (1,) * (param.ndim - 1)).astype(np.float32)
        return rate ** (depth + 1) if is_embed else 1.0

    return jax.tree.map(factor, params, blocks, embed)


def make_optimizer(config, params, *, total_steps: int, warmup_steps: int,
                   epoch_size: int | None = None) -> Optimizer:
    """Builds the optimizer for `params` (an abstract or concrete parameter tree);
    `epoch_size` converts durations in epochs (param_groups.hold)."""
    opt = config.optimizer
    clip = config.get("grad_clip_per_param")
    if clip is not None and not clip > 0:
        raise ValueError(f"grad_clip_per_param={clip} must be > 0 (or None: off).")
    groups = param_group_trees(config, params)
    schedule = make_schedule(config.schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                             batch_size=config.input.batch_size)
    held = hold_steps(config, params, epoch_size=epoch_size)
    holding = any(jax.tree.leaves(held))
    chain = [_hold(held)] if holding else []
    if clip is not None:
        chain.append(_clip_per_param(float(clip), groups.stacked))
    if config.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if opt.name in ("adamw", "lamb"):
        chain.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    chain.append(_decoupled_weight_decay(groups.wd_rates, weight_decay_factor(config, total_steps)))
    if opt.name == "lamb":  # You et al. 2020, Alg. 2: layer-wise trust ratio on every tensor
        chain.append(optax.scale_by_trust_ratio())
    if opt.name == "lars":  # You et al. 2017; biases and norms are exempt, like weight decay
        chain.append(optax.masked(
            optax.scale_by_trust_ratio(trust_coefficient=opt.trust_coefficient, eps=opt.eps),
            groups.decays))
    if opt.name in ("lars", "sgd") and opt.momentum:
        chain.append(optax.trace(decay=opt.momentum, nesterov=opt.nesterov))
    chain.append(optax.scale_by_learning_rate(schedule))
    if not all(_is_one(m) for m in jax.tree.leaves(groups.lr_mults)):
        chain.append(_per_leaf_scale(groups.lr_mults))
    if holding:
        chain.append(_hold(held))
    tx = optax.chain(*chain)
    if not all(jax.tree.leaves(groups.trainable)):
        labels = jax.tree.map(lambda t: "trainable" if t else "frozen", groups.trainable)
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    return Optimizer(tx=tx, schedule=schedule, trainable=groups.trainable)


def trainable_global_norm(grads, trainable) -> jax.Array:
    """Global L2 norm of the gradients of trainable parameters."""
    sq = [jnp.sum(jnp.square(g.astype(jnp.float32)))
          for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(trainable)) if t]
    return jnp.sqrt(sum(sq)) if sq else jnp.zeros((), jnp.float32)
