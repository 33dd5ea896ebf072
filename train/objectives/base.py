"""What an objective supplies to the shared trainer loop; the loop knows no method.

An objective, for one family of methods, says how to build its model from the config, its loss
as a pure function of (model, extra state, batch, rng), how its extra state moves after each
step (EMA teachers, centers, temperature clamps), and which encoders it exposes to evaluators.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

# encoder(model, extra, batch) -> array, e.g. logits or an image embedding for evaluators.
Encoder = Callable[[nnx.Module, object, dict], jax.Array]


class Objective:
    """Base class; subclasses override `build_model`, `loss` and usually `encoders`."""

    def __init__(self, config):
        self.config = config

    def validate(self) -> None:
        """Checks this objective's config keys before any work; raises ValueError naming them."""

    def configure_run(self, *, total_steps: int, steps) -> None:
        """Told the run's length before the step is built, for schedules the objective keeps
        (e.g. DINO's teacher momentum); `steps(key, duration)` converts a config duration."""
        del total_steps, steps

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def init_extra(self, model: nnx.Module):
        """State the optimizer does not touch (e.g. an EMA teacher); a pytree of arrays."""
        del model
        return {}

    def loss(self, model: nnx.Module, extra, batch: dict, rng: jax.Array, step: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array], object]:
        """(scalar loss, scalar metrics, stats) for one (micro)batch; pure, traced inside jit.

        `step` is the index (from 0) of the optimizer step being taken, for schedules inside
        the loss (e.g. DINO's teacher temperature). `stats` is any pytree of batch statistics
        the extra state needs (e.g. the mean teacher output for DINO's center); it is averaged
        over microbatches and given to `after_update`. Return {} when there are none.
        """
        raise NotImplementedError

    def after_update(self, params, extra, stats, step: jax.Array):
        """Moves (params, extra) after the optimizer step; identity by default."""
        del stats, step
        return params, extra

    def import_weights(self, state_dict: dict) -> dict:
        """Another codebase's state dict -> nested params like the model's (for init_from)."""
        raise ValueError(f"objective {type(self).__name__} cannot import foreign weight files.")

    def encoders(self) -> dict[str, Encoder]:
        """Named functions evaluators call, e.g. {'logits': ..., 'features': ...}; frozen-feature
        evaluators (k-NN, probes) read `features`, a (batch, D) image representation."""
        return {}

    def flops_per_example(self) -> float | None:
        """Forward FLOPs per training example, for MFU; None if unknown."""
        return None
