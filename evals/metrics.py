"""Dataset-level ratios of per-example sums over a whole split (e.g. masked-byte accuracy,
bits per byte on held-out text)."""

from __future__ import annotations

import jax.numpy as jnp

from vistax.evals.base import Evaluator, encoder, require


class MetricsEvaluator(Evaluator):
    """Runs the objective's `encoder`, which returns {name: (numerator, denominator)} of
    per-example (B,) arrays, and reports sum(numerator) / sum(denominator) over the split
    (padding rows excluded), so every example weighs by its denominator (e.g. its number of
    masked bytes), not by its batch.

    Keys: dataset, split, pp, batch_size (global), encoder (required), every.
    """

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        require(cfg, name, ("dataset", "split", "pp", "batch_size", "encoder"))
        fn = encoder(ctx, name, cfg, "encoder", "")

        def sums(model, extra, batch):
            mask = batch["_mask"].astype(jnp.float32)
            out = {"_count": jnp.sum(mask)}
            for key, (numerator, denominator) in fn(model, extra, batch).items():
                out[f"{key}/num"] = jnp.sum(numerator.astype(jnp.float32) * mask)
                out[f"{key}/den"] = jnp.sum(denominator.astype(jnp.float32) * mask)
            return out

        self._sums = ctx.compile(sums)

    def check(self, example):
        self._sums.check(f"evals.{self.name}.pp", example, self.cfg.batch_size)

    def run(self, state):
        totals = {}
        for batch in self.ctx.batches(self.cfg):
            for key, value in self._sums(state, batch).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        out = {"num_examples": totals.pop("_count")}
        for key in sorted(k[:-len("/num")] for k in totals if k.endswith("/num")):
            den = totals[f"{key}/den"]
            out[key] = totals[f"{key}/num"] / den if den else float("nan")
        return out
