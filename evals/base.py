"""What evaluators receive from the trainer, and the evaluator protocol.

Evaluators never import train/: the loop hands them an `EvalContext` that can compile a
function of (model, extra state, batch) for the current mesh and assemble global batches.
Metrics are reduced on device (sums over masked rows) and only scalars reach the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np

from vistax.data import pipeline


DEFAULT_EVERY = "1 epochs"


@dataclasses.dataclass
class EvalContext:
    """Trainer facilities an evaluator may use."""
    # compile(fn) -> compiled, with compiled(state, global_batch) -> pytree of numpy values and
    # compiled.check(key, example, batch_size) tracing it on abstract batches. fn(model, extra,
    # batch) runs inside jit on the mesh and must return small (replicated) arrays: sums, top-k.
    compile: Callable[[Callable], object]
    encoders: Mapping[str, Callable]  # the objective's named encoders
    global_batch: Callable[[dict], dict]  # process-local numpy -> global jax.Arrays
    data_dir: str | None
    process_index: int
    process_count: int

    def batches(self, cfg) -> Iterator[dict]:
        """Global batches of an evaluator's (dataset, split, pp, batch_size), padded + `_mask`.

        The trainer has checked that batch_size divides by the mesh's batch shards."""
        local = pipeline.eval_iterator(
            dataset=cfg.dataset, split=cfg.split, pp=cfg.pp, global_batch_size=cfg.batch_size,
            data_dir=self.data_dir, process_index=self.process_index,
            process_count=self.process_count)
        for batch in local:
            yield self.global_batch(batch)


class Evaluator:
    """Configured by `config.evals.<name>` with at least `type` and `every` (a duration)."""

    def __init__(self, name: str, cfg, ctx: EvalContext):
        self.name = name
        self.cfg = cfg
        self.ctx = ctx

    def check(self, example: dict) -> None:
        """Validates one preprocessed example before any work (keys, and that it traces)."""

    def run(self, state: dict) -> dict[str, float]:
        raise NotImplementedError


def require(cfg, name: str, keys: tuple[str, ...]) -> None:
    """Errors naming `evals.<name>.<key>` for each missing or empty key."""
    missing = [k for k in keys if cfg.get(k) in (None, "")]
    if missing:
        raise ValueError(f"evals.{name} lacks {', '.join(f'evals.{name}.{k}' for k in missing)}.")


def to_host(tree) -> object:
    """Replicated jax arrays -> numpy, read from this process's first local copy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
