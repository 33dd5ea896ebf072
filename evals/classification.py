"""Classification accuracy (top-1, top-5) and cross-entropy over a whole labelled split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vistax.evals.base import Evaluator, require


class ClassificationEvaluator(Evaluator):
    """Counts every example of the split exactly once (padding rows are masked out).

    Keys: dataset, split, pp (must yield `image` and `label`), batch_size (global), encoder
    (the objective's encoder giving logits; default 'logits'), every.
    """

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        require(cfg, name, ("dataset", "split", "pp", "batch_size"))
        encoder_name = cfg.get("encoder", "logits")
        if encoder_name not in ctx.encoders:
            raise ValueError(f"evals.{name}.encoder={encoder_name!r}: the objective offers "
                             f"{sorted(ctx.encoders)}.")
        encoder = ctx.encoders[encoder_name]

        def sums(model, extra, batch):
            logits = encoder(model, extra, batch).astype(jnp.float32)
            label = batch["label"]
            mask = batch["_mask"].astype(jnp.float32)
            top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, label)
            return {
                "correct": jnp.sum((logits.argmax(-1) == label) * mask),
                "correct_top5": jnp.sum(jnp.any(top5 == label[:, None], axis=-1) * mask),
                "nll": jnp.sum(nll * mask),
                "count": jnp.sum(mask),
            }

        self._sums = ctx.compile(sums)

    def check(self, example):
        key = f"evals.{self.name}.pp"
        if "label" not in example or np.asarray(example["label"]).dtype.kind not in "iu":
            raise ValueError(f"{key}={self.cfg.pp!r} must yield an integer 'label'; it gives "
                             f"{sorted(example)}.")
        self._sums.check(key, example, self.cfg.batch_size)

    def run(self, state):
        totals = {}
        for batch in self.ctx.batches(self.cfg):
            for key, value in self._sums(state, batch).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = totals["count"]  # > 0: the trainer refuses empty splits
        return {"accuracy": totals["correct"] / count, "top5_accuracy": totals["correct_top5"] / count,
                "loss": totals["nll"] / count, "num_examples": totals["count"]}
