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
from jax.sharding import NamedSharding, PartitionSpec

from vistax.data import pipeline


DEFAULT_EVERY = "1 epochs"


@dataclasses.dataclass
class EvalContext:
    """Trainer facilities an evaluator may use."""
    # compile(fn, outputs="host") -> compiled: fn(model, extra, batch) jitted on the mesh, with
    # compiled(state, global_batch) and compiled.check(key, example, batch_size) tracing it on
    # abstract batches (returning the abstract outputs). outputs="host": fn returns small
    # replicated arrays (sums, counts), which come back as numpy. outputs="device": fn returns
    # per-example arrays (leading batch dimension, e.g. embeddings), which stay on device as
    # global jax.Arrays sharded like the batch, for a later reduction on device.
    compile: Callable[..., object]
    encoders: Mapping[str, Callable]  # the objective's named encoders
    global_batch: Callable[[dict], dict]  # process-local numpy -> global jax.Arrays
    data_dir: str | None
    process_index: int
    process_count: int
    batch_sharding: NamedSharding  # of global batches: leading dimension over the batch axes
    workdir: str | None = None  # where evaluators may write files (pictures); None: nowhere

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.batch_sharding.mesh, PartitionSpec())

    def sharded_along(self, axis: int, ndim: int) -> NamedSharding:
        """Sharding of an `ndim`-array whose dimension `axis` is split like a batch's leading
        one (e.g. axis 1 of per-batch outputs stacked along a new axis 0), the rest whole."""
        spec = self.batch_sharding.spec
        dims = [None] * ndim
        dims[axis] = spec[0] if len(spec) else None
        return NamedSharding(self.batch_sharding.mesh, PartitionSpec(*dims))

    def global_array(self, full: np.ndarray) -> jax.Array:
        """A host array that every process holds in full -> a global array sharded like a batch,
        rows in order (unlike `global_batch`, whose row order does not matter)."""
        full = np.asarray(full)
        return jax.make_array_from_callback(full.shape, self.batch_sharding,
                                            lambda index: full[index])

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


def require_image_and_label(key: str, pp: str, example: dict) -> None:
    """Errors naming `key` unless the pp's example has `image` and an integer scalar `label`."""
    label = np.asarray(example.get("label", ""))
    if "image" not in example or label.dtype.kind not in "iu" or label.ndim:
        raise ValueError(f"{key}={pp!r} must yield 'image' and an integer scalar 'label'; it "
                         f"gives {sorted(example)}.")


def encoder(ctx: EvalContext, name: str, cfg, key: str, default: str) -> Callable:
    """The objective's encoder named by `evals.<name>.<key>` (default `default`)."""
    encoder_name = cfg.get(key, default)
    if encoder_name not in ctx.encoders:
        raise ValueError(f"evals.{name}.{key}={encoder_name!r}: the objective offers "
                         f"{sorted(ctx.encoders)}.")
    return ctx.encoders[encoder_name]


def embed_split(ctx: EvalContext, embed, state: dict, cfg) -> tuple[list, list[jax.Array]]:
    """`embed` (compiled with outputs="device") on every batch of cfg's split: the per-batch
    outputs and `_mask`s, global arrays sharded like the batches (nothing reaches the host)."""
    outputs, masks = [], []
    for batch in ctx.batches(cfg):
        outputs.append(embed(state, batch))
        masks.append(batch["_mask"])
    return outputs, masks


def to_host(tree) -> object:
    """Replicated jax arrays -> numpy, read from this process's first local copy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
