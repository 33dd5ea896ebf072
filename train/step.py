"""The one train step: a pure function (state, batch) -> (state, metrics), jitted by the caller.

State is a dict of pytrees: `step`, `params`, `model_state` (non-parameter model variables),
`opt_state`, `extra` (objective state such as an EMA teacher), `rng` (raw data of a base key
of `config.prng_impl`; step t uses `fold_in(key, t)`, so a resumed run draws the same
randomness) and `first_nonfinite_step` (-1 until a loss or gradient norm is NaN/Inf, then the
first such step; the loop checks it before every log, evaluation and checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from vistax.train.objectives.base import Objective
from vistax.train.optimizer import Optimizer, trainable_global_norm


def split_microbatches(batch: dict, n: int, batch_axes) -> dict:
    """(B, ...) -> (n, B/n, ...) taking every n-th row, so each device keeps its share of every
    microbatch (a contiguous split would leave whole microbatches on a few devices)."""

    def split(x):
        mb = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        if jax.sharding.get_abstract_mesh().empty:
            return mb
        return jax.lax.with_sharding_constraint(mb, PartitionSpec(None, batch_axes))

    return jax.tree.map(split, batch)


def make_train_step(objective: Objective, graphdef, optimizer: Optimizer, *, accum_steps: int,
                    batch_axes, prng_impl: str):
    """Builds step(state, batch) for `objective` with gradient accumulation over `accum_steps`."""

    def loss_fn(params, model_state, extra, batch, rng, step):
        # Frozen parameters (param_groups.freeze) are constants to the gradient: the backward
        # pass that only they need is never built (XLA would also drop it as dead code, since
        # their gradients feed nothing), so a frozen backbone under a probe costs its forward.
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                              optimizer.trainable)
        # copy=True: fresh Variables of this trace, so BatchNorm statistics can be updated here.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        loss, metrics, stats = objective.loss(model, extra, batch, rng, step)
        new_model_state = nnx.state(model, nnx.Not(nnx.Param))
        return loss, ((metrics, stats), new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, model_state, extra, batch, rng, step):
        """(loss, (metrics, stats), model_state, grads), averaged over microbatches."""
        if accum_steps == 1:
            (loss, (aux, model_state)), grads = grad_fn(params, model_state, extra, batch, rng,
                                                        step)
            return loss, aux, model_state, grads

        def body(carry, xs):
            grads_sum, loss_sum, aux_sum, mstate = carry
            index, microbatch = xs
            (loss, (aux, mstate)), grads = grad_fn(params, mstate, extra, microbatch,
                                                   jax.random.fold_in(rng, index), step)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
            return (grads_sum, loss_sum + loss, aux_sum, mstate), None

        microbatches = split_microbatches(batch, accum_steps, batch_axes)
        first = jax.tree.map(lambda x: x[0], microbatches)
        aux_shape = jax.eval_shape(lambda: grad_fn(params, model_state, extra, first, rng, step)[0][1][0])
        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape), model_state)
        (grads, loss, aux, model_state), _ = jax.lax.scan(
            body, zeros, (jnp.arange(accum_steps), microbatches))
        scale = 1.0 / accum_steps
        return (loss * scale, jax.tree.map(lambda m: m * scale, aux), model_state,
                jax.tree.map(lambda g: g * scale, grads))

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.wrap_key_data(state["rng"], impl=prng_impl)
        rng = jax.random.fold_in(key, state["step"])
        params = state["params"]
        loss, (metrics, stats), model_state, grads = gradients(
            params, state["model_state"], state["extra"], batch, rng, state["step"])
        grad_norm = trainable_global_norm(grads, optimizer.trainable)
        updates, opt_state = optimizer.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        params, extra = objective.after_update(params, state["extra"], stats, state["step"])
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        first_bad = state["first_nonfinite_step"]
        first_bad = jnp.where((first_bad < 0) & ~finite, state["step"], first_bad)
        new_state = dict(state, step=state["step"] + 1, params=params, model_state=model_state,
                         opt_state=opt_state, extra=extra, first_nonfinite_step=first_bad)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                       learning_rate=optimizer.schedule(state["step"]))
        return new_state, metrics

    return step
