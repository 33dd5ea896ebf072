"""Everything built from a config: mesh, objective, model, optimizer, shardings, jitted step.

`Experiment(config)` validates the whole config before any work: names, durations and batch
divisibility first (`check_config`, no data needed), then the datasets and splits, then a
pre-flight that traces the train step and every evaluator on the shapes the pp strings
produce, so a pp that does not fit the model fails here with the key at fault. Every sharding
comes from an `eval_shape`d state. Both `vistax train` and `vistax eval` use it.

`TrainProgram` is the part that needs no data (mesh, model, optimizer, state shardings, the
jitted step), built for a given epoch size: `Experiment` is a TrainProgram whose epoch size is
read from the dataset, plus evaluators and the pre-flight; `vistax plan` (train/plan.py) compiles
a TrainProgram's step for a TPU topology.
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
from vistax.train import compile_options, durations, objectives, sharding
from vistax.train import optimizer as optimizer_lib
from vistax.train.step import make_train_step

PROGRESS_MODES = ("auto", "bar", "lines")
PRNG_IMPLS = ("rbg", "threefry2x32")


def _check_pp(key: str, spec: str) -> None:
    try:
        preprocess.parse(spec)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _check_period(key: str, text) -> None:
    if durations.parse_duration(key, text).value <= 0:
        raise ValueError(f"{key}={text!r} must be positive.")


def _check_static(config, mesh, process_count: int) -> None:
    """Config checks that need no data: durations, batch divisibility, names."""
    durations.parse_duration("duration", config.duration)
    durations.parse_duration("schedule.warmup", config.schedule.warmup)
    _check_period("log_every", config.log_every)
    _check_period("checkpoint.every", config.checkpoint.every)
    batch = config.input.batch_size
    shards = sharding.num_batch_shards(mesh, config.sharding_rules)
    _check_pp("input.pp", config.input.pp)
    eval_multiple = math.lcm(shards, process_count)
    for name, cfg in config.evals.items():
        _check_period(f"evals.{name}.every", cfg.get("every", evals.DEFAULT_EVERY))
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
        raise ValueError("input.dataset is not set: a built-in name (digits, shapes), the name of a "
                         "dataset prepared in input.data_dir, or a dataset folder.")


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


def batch_spec(key: str, example: dict, batch_size: int, batch_sharding) -> dict:
    """Abstract global batch of `batch_size` copies of one preprocessed example."""
    spec = {}
    for name, value in example.items():
        value = sharding.numeric_field(name, value, where=f"{key}: the batch")
        spec[name] = jax.ShapeDtypeStruct((batch_size,) + value.shape, value.dtype,
                                          sharding=batch_sharding)
    return spec


class CompiledEval:
    """An evaluator's function of (model, extra, batch), jitted for the experiment's mesh.

    outputs="host": fn returns small replicated arrays (sums, counts), returned as numpy.
    outputs="device": fn returns per-example arrays (leading batch dimension), which stay on
    device as global jax.Arrays sharded like the batch (see evals.EvalContext).
    """

    def __init__(self, exp: "Experiment", fn, outputs: str = "host"):
        if outputs not in ("host", "device"):
            raise ValueError(f"outputs={outputs!r} is not 'host' or 'device'.")
        self._exp = exp
        self._on_device = outputs == "device"

        def apply(params, model_state, extra, batch):
            return fn(nnx.merge(exp.graphdef, params, model_state), extra, batch)

        sh = exp.state_shardings
        self._jitted = jax.jit(apply, in_shardings=(sh["params"], sh["model_state"], sh["extra"],
                                                    exp.batch_sharding),
                               out_shardings=exp.batch_sharding if self._on_device
                               else exp.replicated, compiler_options=exp.compiler_options)

    def __call__(self, state: dict, batch: dict):
        """Runs on a global batch; returns the outputs as numpy, or as device arrays."""
        with self._exp.context():
            out = self._jitted(state["params"], state["model_state"], state["extra"], batch)
        return out if self._on_device else evals.base.to_host(out)

    def check(self, key: str, example: dict, batch_size: int):
        """Traces on abstract batches shaped like `example`; errors name config key `key`.

        Returns the abstract outputs (jax.ShapeDtypeStructs)."""
        abstract = self._exp.abstract_state
        spec = batch_spec(key, example, batch_size, self._exp.batch_sharding)
        try:
            with self._exp.context():
                return jax.eval_shape(self._jitted, abstract["params"], abstract["model_state"],
                                      abstract["extra"], spec)
        except Exception as e:  # any tracing failure: say which pp produced the batch
            raise ValueError(f"{key}: batches {_shapes(spec)} do not fit the model: "
                             f"{type(e).__name__}: {e}") from e


def eval_splits(name: str, cfg) -> dict[str, str]:
    """The splits an evaluator reads: its `split` and any `<role>_split` keys (a linear probe's
    train_split and test_split); there must be at least one."""
    splits = {k: v for k, v in cfg.items() if (k == "split" or k.endswith("_split")) and v}
    if not splits:
        raise ValueError(f"evals.{name} names no split: set evals.{name}.split (or its "
                         "train_split / test_split).")
    return splits


def _shapes(spec: dict) -> dict:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in spec.items()}


class TrainProgram:
    """Mesh, objective, model, optimizer, state shardings and the jitted train step of a config.

    Needs no data: `epoch_size` (examples per epoch) only converts durations given in epochs
    into steps (the run's length, warmup and other schedule constants). `Experiment` reads it
    from the dataset; see module docstring.
    """

    def __init__(self, config, *, devices=None, epoch_size: int | None = None):
        self.config = config
        self.objective, self.mesh, self.graphdef, abstract_params = check_config(
            config, devices=devices)
        self.rules = tuple(sharding.rules_dict(config.sharding_rules).items())
        self.batch_axes = sharding.batch_axes(self.rules)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.compiler_options = compile_options.compiler_options(
            config, self.mesh.devices.flat[0].platform)

        inp = config.input
        self.epoch_size = self._read_epoch_size() if epoch_size is None else epoch_size
        if self.epoch_size < 1:
            raise ValueError(f"epoch_size={self.epoch_size} must be positive.")

        def steps(key: str, text) -> int:
            return durations.steps(key, text, global_batch=inp.batch_size,
                                   epoch_size=self.epoch_size)

        self.total_steps = steps("duration", config.duration)
        if self.total_steps < 1:
            raise ValueError(f"duration={config.duration!r} is less than one step.")
        warmup = steps("schedule.warmup", config.schedule.warmup)
        self.objective.configure_run(total_steps=self.total_steps, steps=steps)
        self.optimizer = optimizer_lib.make_optimizer(config, abstract_params,
                                                      total_steps=self.total_steps,
                                                      warmup_steps=warmup,
                                                      epoch_size=self.epoch_size)
        # The key is made outside the mesh: its devices may be compile-only (vistax plan).
        key_data = self._key_data(0)
        with self.context():
            abstract = jax.eval_shape(self._init_state, key_data)
        self.state_shardings = sharding.tree_shardings(abstract, self.mesh, self.rules)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            self.state_shardings)
        step = make_train_step(self.objective, self.graphdef, self.optimizer,
                               accum_steps=config.grad_accum_steps, batch_axes=self.batch_axes,
                               prng_impl=config.prng_impl)
        self._step = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=0, compiler_options=self.compiler_options)
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings,
                             compiler_options=self.compiler_options)

    # -- building --------------------------------------------------------------------------

    def context(self) -> contextlib.ExitStack:
        """Mesh and logical-axis rules active: needed while tracing anything of the model."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nnx.logical_axis_rules(self.rules))
        return stack

    def _read_epoch_size(self) -> int:
        raise ValueError("TrainProgram needs epoch_size (Experiment reads it from the dataset).")

    def train_batch_spec(self, example: dict) -> dict:
        """The abstract global training batch of `example`s (one preprocessed example), checked
        by tracing the step on it: a batch that does not fit the model is an error naming
        input.pp."""
        spec = batch_spec("input.pp", example, self.config.input.batch_size, self.batch_sharding)
        try:
            with self.context():
                jax.eval_shape(self._step, self.abstract_state, spec)
        except Exception as e:  # any tracing failure: say which pp produced the batch
            raise ValueError(f"input.pp: batches {_shapes(spec)} do not fit objective "
                             f"{self.config.objective!r} and its model: {type(e).__name__}: "
                             f"{e}") from e
        return spec

    def lower_step(self, batch: dict) -> jax.stages.Lowered:
        """The jitted train step lowered for the abstract state and `batch` (e.g. from
        `train_batch_spec`): `.compile()` it ahead of time on the mesh's devices."""
        with self.context():
            return self._step.lower(self.abstract_state, batch)

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
    def steps_per_epoch(self) -> float:
        return self.epoch_size / self.config.input.batch_size

    @property
    def flops_per_step(self) -> float | None:
        """Model FLOPs of one training step: 3 x forward FLOPs x global batch."""
        per_example = self.objective.flops_per_example()
        return None if per_example is None else 3.0 * per_example * self.config.input.batch_size

    def model(self, state: dict) -> nnx.Module:
        """The objective's model holding `state`'s parameters (for notebooks and tools)."""
        return nnx.merge(self.graphdef, state["params"], state["model_state"])


class Experiment(TrainProgram):
    """Built pieces of one run: a TrainProgram for the dataset's epoch size, the evaluators,
    and a pre-flight of both on the shapes the pp strings produce; see module docstring."""

    def __init__(self, config, *, devices=None, workdir: str | None = None):
        super().__init__(config, devices=devices)
        self.eval_context = evals.EvalContext(
            compile=lambda fn, **kw: CompiledEval(self, fn, **kw),
            encoders=self.objective.encoders(), global_batch=self.global_batch,
            data_dir=config.input.data_dir, process_index=jax.process_index(),
            process_count=jax.process_count(), batch_sharding=self.batch_sharding,
            workdir=workdir)
        self.evaluators = {name: evals.get(name, cfg.type)(name, cfg, self.eval_context)
                           for name, cfg in config.evals.items()}
        self._preflight()

    def _read_epoch_size(self) -> int:
        """Checks every split the config reads; returns the size of the training split."""
        inp = self.config.input
        for name, cfg in self.config.evals.items():
            for key, split in eval_splits(name, cfg).items():
                self._split_size(f"evals.{name}.{key}", cfg.dataset, split)
        return self._split_size("input.split", inp.dataset, inp.split)

    def _split_size(self, key: str, dataset: str, split: str) -> int:
        """Examples in `split` (tfds slices counted exactly); errors name the config key."""
        try:
            size = pipeline.split_size(dataset, split, data_dir=self.config.input.data_dir)
        except ValueError as e:
            raise ValueError(f"{key}={split!r}: {e}") from None
        if size < 1:
            raise ValueError(f"{key}={split!r} of {dataset!r} holds no examples.")
        return size

    def _preflight(self) -> None:
        """Traces the step and the evaluators on abstract batches shaped by the pp strings."""
        inp = self.config.input
        self.train_batch_spec(pipeline.example_spec(dataset=inp.dataset, split=inp.split,
                                                    pp=inp.pp, data_dir=inp.data_dir))
        for name, evaluator in self.evaluators.items():
            cfg = self.config.evals[name]
            split = next(iter(eval_splits(name, cfg).values()))
            evaluator.check(pipeline.example_spec(dataset=cfg.dataset, split=split, pp=cfg.pp,
                                                  data_dir=inp.data_dir, eval_mode=True))
