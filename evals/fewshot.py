"""Few-shot linear regression on frozen features (`fewshot_ridge`), big_vision's few-shot metric.

The ViT paper's few-shot accuracy (Dosovitskiy et al. 2021, Sec. 4.1): a regularised
least-squares regression maps the frozen representations of a few train images per class to
{-1, +1}^C targets. Our protocol follows big_vision's evaluator (evaluators/fewshot_lsr.py) and
its shared settings (configs/common_fewshot.py: shots 1, 5, 10, 25; l2_reg 2^10; 3 seeds):

- For each seed s in 0 .. seeds - 1, a numpy Generator(s) permutes the train rows of each class;
  the first n of each class are its n-shot sample (so, within a seed, the samples of smaller n
  are subsets of those of larger n, as in big_vision). Rows are in the order the train split is
  stacked: its stored order on one process (several processes interleave it differently,
  which changes the draws, not their distribution). A class with fewer than max(shots) train
  examples is an error naming `evals.<name>.shots` (big_vision would silently use fewer).
- The M = n * C sampled features are standardised per dimension with their own mean and
  (biased) standard deviation + STD_EPS, not L2-normalised; a constant feature BIAS_FEATURE =
  100 is appended, a bias the ridge barely shrinks; targets are 2 * one_hot - 1. The weights
  minimise |Z W - Y|^2 + l2_reg |W|^2 (the bias feature's weight included). A test example,
  standardised with the same statistics, takes the class of its largest score.

Sharding: the train features stay where the frozen-feature evaluators stack them, sharded
along the batch (evals/linear_probe.py); a draw is a 0/1 weight per row, so the (D+1) x (D+1)
Gram matrix and the (D+1) x C right-hand side of every fit are sums over the sharded rows
(each device sums its rows, relative to the train split's mean for float32 accuracy; one
psum). The system is always solved in the primal, by Cholesky in float32: the ridge keeps it
positive definite even when M < D (the dual's M x M kernel system gives the same W, by the
push-through identity), and its cost does not grow with M or the split. Each fit reads every
train row once (2 N D^2 FLOPs), small next to embedding the split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vistax.evals.linear_probe import (HIGHEST, FrozenFeatureEvaluator, batch_axes, float_key,
                                       int_key, int_list_key, label_counts)
from vistax.evals.base import to_host

BIAS_FEATURE = 100.0  # big_vision's constant bias feature
STD_EPS = 1e-5  # added to each dimension's standard deviation (big_vision)
DEFAULT_SHOTS = (1, 5, 10, 25)  # big_vision's configs/common_fewshot.py
DEFAULT_SEEDS = 3  # ... its num_seeds
DEFAULT_L2_REG = 2.0 ** 10  # ... its l2_reg


def draw_shots(label: np.ndarray, mask: np.ndarray, *, shots, seeds: int,
               num_classes: int) -> np.ndarray:
    """(seeds * len(shots), *label.shape) bool: fit s * len(shots) + j selects shots[j] rows
    of each class where `mask`, the first of a Generator(s) permutation of the class's rows
    (all of them if fewer)."""
    shape = np.shape(mask)
    label, mask = np.asarray(label).reshape(-1), np.asarray(mask).reshape(-1)
    rows = [np.flatnonzero(mask & (label == c)) for c in range(num_classes)]
    selection = np.zeros((seeds, len(shots), label.size), bool)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        order = [rng.permutation(r) for r in rows]
        for j, n in enumerate(shots):
            for r in order:
                selection[seed, j, r[:n]] = True
    return selection.reshape((seeds * len(shots),) + shape)


def _local_moments(features, label, mask, selection, centre, *, num_classes):
    """Per fit, sums over these rows of the selected ones (features relative to `centre`):
    count, sum (D,), gram (D, D), class_count (C,), class_sum (C, D)."""
    dim = features.shape[-1]
    x = jnp.where(mask[..., None], features - centre, 0.0).reshape(-1, dim)
    label, mask = label.reshape(-1), mask.reshape(-1)

    def one(selected):
        weight = (selected.reshape(-1) & mask).astype(jnp.float32)
        xw = x * weight[:, None]
        return {"count": jnp.sum(weight), "sum": jnp.sum(xw, axis=0),
                "gram": jnp.einsum("nd,ne->de", xw, x, precision=HIGHEST),
                "class_count": jax.ops.segment_sum(weight, label, num_classes),
                "class_sum": jax.ops.segment_sum(xw, label, num_classes)}

    return jax.lax.map(one, selection)


def _solve(moments, centre, *, l2_reg: float) -> dict:
    """One fit's ridge weights (D + 1, C) and standardisation from its moments."""
    count = moments["count"]
    mu = moments["sum"] / count  # relative to centre
    scatter = moments["gram"] - count * jnp.outer(mu, mu)  # sum of (x - mean)(x - mean)^T
    std = jnp.sqrt(jnp.maximum(jnp.diag(scatter) / count, 0.0)) + STD_EPS
    gram_z = scatter / jnp.outer(std, std)
    sum_z = (moments["sum"] - count * mu) / std  # 0 up to rounding: z is centred
    class_z = (moments["class_sum"] - moments["class_count"][:, None] * mu) / std  # (C, D)
    rhs = jnp.concatenate([2.0 * class_z.T - sum_z[:, None],  # targets 2 one_hot - 1
                           BIAS_FEATURE * (2.0 * moments["class_count"] - count)[None]])
    bias_column = BIAS_FEATURE * sum_z[:, None]
    gram = jnp.block([[gram_z, bias_column],
                      [bias_column.T, (BIAS_FEATURE ** 2 * count)[None, None]]])
    factor = jax.scipy.linalg.cho_factor(gram + l2_reg * jnp.eye(gram.shape[0]), lower=True)
    return {"w": jax.scipy.linalg.cho_solve(factor, rhs), "mean": centre + mu, "std": std}


def fit_ridge(features, label, mask, selection, *, num_classes: int, l2_reg: float,
              mesh=None, axes=()) -> dict:
    """Few-shot ridge fits (module docstring) on (N, B, D) features, (N, B) labels and mask,
    B sharded over the mesh `axes` (none: one device), of the rows of each (F, N, B) bool
    `selection`: {"w": (F, D + 1, C), "mean": (F, D), "std": (F, D)}, replicated."""
    features = features.astype(jnp.float32)
    centre = jnp.sum(jnp.where(mask[..., None], features, 0.0), axis=(0, 1)) / jnp.sum(mask)
    local = functools.partial(_local_moments, num_classes=num_classes)
    args = (features, label, mask, selection, centre)
    moments = local
    if axes:
        moments = jax.shard_map(
            lambda *shard: jax.lax.psum(local(*shard), axes), mesh=mesh,
            in_specs=(P(None, axes, None), P(None, axes), P(None, axes), P(None, None, axes),
                      P()),
            out_specs=P(), axis_names=set(axes))
    return jax.vmap(functools.partial(_solve, l2_reg=l2_reg), in_axes=(0, None))(
        moments(*args), centre)


def ridge_scores(fitted: dict, features: jax.Array) -> jax.Array:
    """(F, Q, C) scores of (Q, D) features under each fit."""
    z = (features.astype(jnp.float32) - fitted["mean"][:, None]) / fitted["std"][:, None]
    w = fitted["w"]
    return (jnp.einsum("fqd,fdc->fqc", z, w[:, :-1], precision=HIGHEST)
            + BIAS_FEATURE * w[:, -1:])


def _fewshot_test_sums(fitted, outputs, mask, *, num_classes):
    """A test batch's counts and correct predictions per fit, (F,)."""
    label = outputs["label"].astype(jnp.int32)
    predicted = jnp.argmax(ridge_scores(fitted, outputs["features"]), axis=-1)
    return dict(label_counts(label, mask, num_classes),
                correct=jnp.sum((predicted == label) & mask, axis=1))


class FewshotRidgeEvaluator(FrozenFeatureEvaluator):
    """Few-shot ridge-regression accuracy of frozen features (see module docstring).

    Keys: dataset, train_split (the pool the shots are drawn from), test_split, pp (must yield
    `image` and an integer `label`), batch_size (global), encoder (default 'features'), every,
    num_classes (default: the largest train label + 1), shots (an int or a list of distinct
    ints; default (1, 5, 10, 25)), seeds (draws per shot count, seeds 0 .. seeds - 1; default
    3), l2_reg (default 2^10). Defaults: big_vision's configs/common_fewshot.py.
    Metrics: accuracy_{n}shot (mean over seeds) for each n in shots, num_train, num_test.
    """

    OWN_KEYS = ("shots", "seeds", "l2_reg")

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        self.shots = int_list_key(cfg, name, "shots", DEFAULT_SHOTS, minimum=1)
        self.seeds = int_key(cfg, name, "seeds", DEFAULT_SEEDS, minimum=1)
        l2_reg = float_key(cfg, name, "l2_reg", DEFAULT_L2_REG, positive=True)
        self._labels = jax.jit(lambda train: (train["label"], train["mask"]),
                               out_shardings=ctx.replicated)
        self._fit_ridge = jax.jit(
            lambda train, selection, num_classes: fit_ridge(
                train["features"], train["label"], train["mask"], selection,
                num_classes=num_classes, l2_reg=l2_reg, mesh=ctx.batch_sharding.mesh,
                axes=batch_axes(ctx)),
            static_argnames="num_classes", out_shardings=ctx.replicated)
        self._test_sums = jax.jit(_fewshot_test_sums, static_argnames="num_classes",
                                  out_shardings=ctx.replicated)

    def _selection_sharding(self):
        return self.ctx.sharded_along(2, 3)

    def _fit_shape(self, train, num_classes):
        selection = jax.ShapeDtypeStruct((self.seeds * len(self.shots),) + train["mask"].shape,
                                         jnp.bool_, sharding=self._selection_sharding())
        return jax.eval_shape(functools.partial(self._fit_ridge, num_classes=num_classes),
                              train, selection)

    def _fit(self, train, *, num_classes):
        """Draws the shots on the host (from the train labels only) and fits on device."""
        label, mask = to_host(self._labels(train))
        have = np.bincount(label[mask], minlength=num_classes)
        short = np.flatnonzero(have < max(self.shots))
        if short.size:
            raise ValueError(
                f"evals.{self.name}.shots={self.cfg.get('shots', DEFAULT_SHOTS)!r} needs "
                f"{max(self.shots)} train examples of each of {num_classes} classes; "
                f"{self.cfg.dataset!r} "
                f"{self.cfg.train_split!r} has {have[short[0]]} of class {short[0]}"
                f"{f' (and too few of {short.size - 1} more)' if short.size > 1 else ''}.")
        selection = draw_shots(label, mask, shots=self.shots, seeds=self.seeds,
                               num_classes=num_classes)
        selection = jax.make_array_from_callback(selection.shape, self._selection_sharding(),
                                                 lambda index: selection[index])
        return self._fit_ridge(train, selection, num_classes=num_classes), {}

    def _results(self, train_sums, totals):
        del train_sums
        accuracy = np.asarray(totals["correct"]).reshape(self.seeds, len(self.shots))
        accuracy = accuracy / int(totals["count"])
        return {f"accuracy_{n}shot": float(np.mean(accuracy[:, j]))
                for j, n in enumerate(self.shots)}
