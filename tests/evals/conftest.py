"""Shared by the evaluator tests: an experiment on 8 devices and on 1, and evaluation contexts
whose batches come from in-memory arrays."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from vistax.evals import EvalContext
from vistax.train.experiment import Experiment


@dataclasses.dataclass
class ArrayContext(EvalContext):
    """An experiment's context whose batches come from in-memory arrays, padded with repeats of
    real rows and masked as `pipeline.eval_iterator` pads them."""
    arrays: dict = dataclasses.field(default_factory=dict)

    def batches(self, cfg):
        n = len(next(iter(self.arrays.values())))
        size = cfg.batch_size
        for start in range(0, math.ceil(n / size) * size, size):
            index = np.arange(start, start + size)
            batch = {k: v[index % n] for k, v in self.arrays.items()}
            batch["_mask"] = index < n
            yield self.global_batch(batch)


@pytest.fixture
def array_context():
    """make(exp, encoders, arrays) -> exp's EvalContext with these encoders, batching arrays."""

    def make(exp, encoders, arrays) -> ArrayContext:
        fields = {f.name: getattr(exp.eval_context, f.name)
                  for f in dataclasses.fields(EvalContext)}
        return ArrayContext(**{**fields, "encoders": encoders, "arrays": arrays})

    return make


@pytest.fixture(scope="module", params=[8, 1], ids=["8dev", "1dev"])
def experiment(request, small_vit_config):
    exp = Experiment(small_vit_config(), devices=jax.devices()[:request.param])
    assert exp.mesh.size == request.param
    return exp, exp.init_state(seed=0)


@dataclasses.dataclass
class SplitArrayContext(EvalContext):
    """An experiment's context whose batches of `cfg.split` come from in-memory arrays
    `splits[cfg.split]`. Padding rows repeat real rows, as `pipeline.eval_iterator` pads, or
    are rows of `padding` (cycled) when given: garbage that must never count."""
    splits: dict = dataclasses.field(default_factory=dict)
    padding: dict | None = None

    def batches(self, cfg):
        arrays = self.splits[cfg.split]
        n = len(next(iter(arrays.values())))
        size = cfg.batch_size
        for start in range(0, math.ceil(n / size) * size, size):
            index = np.arange(start, start + size)
            real = index < n
            batch = {}
            for key, value in arrays.items():
                rows = value[index % n]
                if self.padding is not None:
                    pad = self.padding[key][index % len(self.padding[key])]
                    rows = np.where(real.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, pad)
                batch[key] = rows
            batch["_mask"] = real
            yield self.global_batch(batch)


@pytest.fixture
def split_array_context():
    """make(exp, encoders, splits, padding=None) -> exp's EvalContext with these encoders,
    batching splits[cfg.split] (see SplitArrayContext)."""

    def make(exp, encoders, splits, padding=None) -> SplitArrayContext:
        fields = {f.name: getattr(exp.eval_context, f.name)
                  for f in dataclasses.fields(EvalContext)}
        return SplitArrayContext(**{**fields, "encoders": encoders, "splits": splits,
                                    "padding": padding})

    return make
