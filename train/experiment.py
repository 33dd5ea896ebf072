"""Everything built from a config: mesh, objective, model, optimizer, shardings, jitted step.

`Experiment(config)` validates the whole config first (an unknown name, an impossible
combination, a bad duration stops here, before any data is read or anything compiled), then
derives every sharding from an `eval_shape`d state. Both `vistax train` and `vistax eval` use it.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vistax import evals
from vistax.data import pipeline, preprocess
from vistax.train import durations, objectives, optimizer as optimizer_lib, sharding
from vistax.train.step import make_train_step

PROGRESS_MODES = ("auto", "bar", "lines")
PRNG_IMPLS = ("rbg", "unsafe_rbg", "threefry2x32")


def _check_static(config, mesh, process_count: int) -> None:
    """Config checks that need no data: durations, batch divisibility, names."""
    for key in ("duration", "log_every", "schedule.warmup", "checkpoint.every"):
        durations.parse_duration(key, config[key] if "." not in key
                                 else config[key.split(".")[0]][key.split(".")[1]])
    batch = config.input.batch_size
    shards = sharding.num_batch_shards(mesh, config.sharding_rules)
    _check_pp("input.pp", config.input.pp)
    eval_multiple = math.lcm(shards, process_count)
    for name, cfg in config.evals.items():
        durations.parse_duration(f"evals.{name}.every", cfg.get("every", "1 epochs"))
        evals.get(name, cfg.get("type"))
        _check_pp(f"evals.{name}.pp", cfg.get("pp", ""))
        eval_batch = cfg.get("batch_size", 0)
        if eval_batch <= 0 or eval_batch % eval_multiple:
            raise ValueError(f"evals.{name}.batch_size={eval_batch} must be a positive multiple of "
                             f"{eval_multiple} (the mesh's batch shards and the processes).")
    accum = config.grad_accum_steps
    if batch <= 0:
        raise ValueError(f"input.batch_size={batch} must be positive.")
    if accum < 1 or batch % accum:
        raise ValueError(f"grad_accum_steps={accum} must be >= 1 and divide input.batch_size={batch}.")
    if (batch // accum) % shards:
        raise ValueError(f"input.batch_size={batch} / grad_accum_steps={accum} = {batch // accum} "
                         f"is not divisible by the data-parallel size {shards} (mesh {dict(mesh.shape)}"
                         f", batch over {sharding.batch_axes(config.sharding_rules)}).")
    if batch % process_count:
        raise ValueError(f"input.batch_size={batch} is not divisible by the {process_count} processes.")
    if config.prng_impl not in PRNG_IMPLS:
        raise ValueError(f"prng_impl={config.prng_impl!r} is not one of {list(PRNG_IMPLS)}.")
    if config.progress not in PROGRESS_MODES:
        raise ValueError(f"progress={config.progress!r} is not one of {list(PROGRESS_MODES)}.")
    if config.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.keep={config.checkpoint.keep} must be >= 1.")
    if not config.input.dataset:
        raise ValueError("input.dataset is not set: a built-in name (digits, shapes) or the folder "
                         "of a prepared dataset.")


def check_config(config, *, devices=None):
    """Validates everything that needs no data; returns (objective, mesh, graphdef, params).

    `params` is the abstract (shape-only) parameter tree; building it costs no compute.
    """
    objective = objectives.get(config.objective)(config)
    objective.validate()
    rules = tuple(sharding.rules_dict(config.sharding_rules).items())
    mesh = sharding.make_mesh(config.mesh, config.mesh_dcn, devices)
    _check_static(config, mesh, jax.process_count())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract_model = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    optimizer_lib.param_group_trees(config, abstract_params)
    sharding.tree_shardings(abstract_params, mesh, rules)  # every weight divides by its axes
    return objective, mesh, graphdef, abstract_params


def _check_pp(key: str, spec: str) -> None:
    try:
        preprocess.parse(spec)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


class Experiment:
    """Built pieces of one run; see module docstring."""

    def __init__(self, config, *, devices=None):
        self.config = config
        self.objective, self.mesh, self.graphdef, abstract_params = check_config(
            config, devices=devices)
        self.rules = tuple(sharding.rules_dict(config.sharding_rules).items())
        self.batch_axes = sharding.batch_axes(self.rules)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

        self.epoch_size = self._epoch_size()
        batch = config.input.batch_size
        self.total_steps = durations.steps("duration", config.duration, global_batch=batch,
                                           epoch_size=self.epoch_size)
        if self.total_steps < 1:
            raise ValueError(f"duration={config.duration!r} is less than one step.")
        warmup = durations.steps("schedule.warmup", config.schedule.warmup, global_batch=batch,
                                 epoch_size=self.epoch_size)
        self.optimizer = optimizer_lib.make_optimizer(config, abstract_params,
                                                      total_steps=self.total_steps,
                                                      warmup_steps=warmup)
        with self.context():
            abstract = jax.eval_shape(self._init_state, self._key_data(0))
        self.state_shardings = sharding.tree_shardings(abstract, self.mesh, self.rules)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            self.state_shardings)
        step = make_train_step(self.objective, self.graphdef, self.optimizer,
                               accum_steps=config.grad_accum_steps, batch_axes=self.batch_axes,
                               prng_impl=config.prng_impl)
        self._step = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=0)
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.evaluators = {name: evals.get(name, cfg.type)(name, cfg, self._eval_context())
                           for name, cfg in config.evals.items()}

    # -- building --------------------------------------------------------------------------

    def context(self) -> contextlib.ExitStack:
        """Mesh and logical-axis rules active: needed while tracing anything of the model."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nnx.logical_axis_rules(self.rules))
        return stack

    def _split_size(self, key: str, dataset: str, split: str) -> int:
        """Examples in `split` of `dataset`; errors name the config key."""
        info = pipeline.dataset_info(dataset, data_dir=self.config.input.data_dir)
        base = split.split("[")[0]  # tfds slices such as 'train[:90%]'
        if base not in info.num_examples:
            raise ValueError(f"{key}={split!r} is not a split of {dataset!r}; it has "
                             f"{sorted(info.num_examples)}.")
        return info.num_examples[base]

    def _epoch_size(self) -> int:
        for name, cfg in self.config.evals.items():
            self._split_size(f"evals.{name}.split", cfg.dataset, cfg.split)
        inp = self.config.input
        return self._split_size("input.split", inp.dataset, inp.split)

    def _key_data(self, seed: int) -> jax.Array:
        """Raw uint32 key data: what the state stores (checkpointable as a plain array)."""
        return jax.random.key_data(jax.random.key(seed, impl=self.config.prng_impl))

    def _init_state(self, key_data: jax.Array) -> dict:
        key = jax.random.wrap_key_data(key_data, impl=self.config.prng_impl)
        k_params, k_rng = jax.random.split(key)
        model = self.objective.build_model(nnx.Rngs(params=k_params))
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": model_state,
            "opt_state": self.optimizer.tx.init(params),
            "extra": self.objective.init_extra(model),
            "rng": jax.random.key_data(k_rng),
            "first_nonfinite_step": jnp.full((), -1, jnp.int32),
        }

    # -- running ---------------------------------------------------------------------------

    def init_state(self, seed: int | None = None) -> dict:
        """Fresh state, initialised directly in its shards."""
        with self.context():
            return self._init(self._key_data(self.config.seed if seed is None else seed))

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step; `state` is donated (do not reuse it)."""
        with self.context():
            return self._step(state, batch)

    def global_batch(self, local: dict) -> dict:
        return sharding.global_batch(local, self.batch_sharding)

    @property
    def steps_per_epoch(self) -> float | None:
        return self.epoch_size / self.config.input.batch_size if self.epoch_size else None

    @property
    def flops_per_step(self) -> float | None:
        """Model FLOPs of one training step: 3 x forward FLOPs x global batch."""
        per_example = self.objective.flops_per_example()
        return None if per_example is None else 3.0 * per_example * self.config.input.batch_size

    def model(self, state: dict) -> nnx.Module:
        """The objective's model holding `state`'s parameters (for notebooks and tools)."""
        return nnx.merge(self.graphdef, state["params"], state["model_state"])

    def compile_eval(self, fn):
        """jit fn(model, extra, batch) for this mesh; returns call(state, batch) -> numpy tree."""
        sh = self.state_shardings

        def apply(params, model_state, extra, batch):
            return fn(nnx.merge(self.graphdef, params, model_state), extra, batch)

        jitted = jax.jit(apply, in_shardings=(sh["params"], sh["model_state"], sh["extra"],
                                              self.batch_sharding),
                         out_shardings=self.replicated)

        def call(state, batch):
            with self.context():
                out = jitted(state["params"], state["model_state"], state["extra"], batch)
            return evals.base.to_host(out)

        return call

    def _eval_context(self) -> evals.EvalContext:
        return evals.EvalContext(
            compile=self.compile_eval, encoders=self.objective.encoders(),
            global_batch=self.global_batch, data_dir=self.config.input.data_dir,
            process_index=jax.process_index(), process_count=jax.process_count())
