"""Frozen-feature evaluators for self-supervised pretraining: a linear probe and a weighted k-NN.

Both embed the whole train split with the frozen encoder, batch by batch on device, and stack
the per-batch (B, D) global arrays to (N, B, D) arrays sharded along B like the batches (no
data moves, no host ever holds them: ImageNet's 1.28M x 768 features stay spread over the
devices). The test split then streams through batch by batch against them; only counts and
sums reach the host. Padding rows (`_mask` False) are zeroed when stacked and carry no weight
in any statistic, loss or vote, and are never neighbours.

- `linear_probe`: features go through a BatchNorm without affine parameters that uses the
  train split's per-dimension mean and (biased) variance, eps 1e-6, as MAE's linear probe does
  (He et al. 2021, Appendix A.1), then multinomial logistic regression (a linear layer, softmax
  cross-entropy, L2 weight decay on the weights, not the bias) is fitted full batch on the
  whole train split, on device, in one jitted `while_loop`. The optimiser is optax's L-BFGS
  with its zoom line search: the problem is smooth and convex, so a quasi-Newton method with
  line search converges in tens to hundreds of steps with no learning rate to tune per model or
  dataset (scikit-learn's LogisticRegression uses L-BFGS by default; ours reaches its optimum).
  It stops after `steps` steps, or earlier once the gradient norm is below GRAD_TOL or a step no
  longer lowers the loss by a relative FLOAT_TOL (float32 precision is exhausted). MAE probes
  with no weight decay, but with 90 epochs of LARS (Table 10), which stop short of a minimum;
  run to convergence, a fit without decay has none when the train features separate the
  classes (common for small datasets): the weights grow until the stopping rule and the test
  loss blows up (digits, random ViT: 10.6 at 0, 0.75 at 1e-5). The default DEFAULT_WEIGHT_DECAY
  keeps the minimiser unique, so the result does not depend on when or where the fit stops.
- `knn`: weighted k-NN on L2-normalised features (DINO, Caron et al. 2021, Sec. 4, after Wu et
  al. 2018): the k train examples of highest cosine similarity vote for their labels with
  weight exp(similarity / T); defaults k = 20, T = 0.07. `k` may be a list, e.g. DINO's
  (10, 20, 100, 200) (their eval_knn.py): one search for the top max(k) serves every k, whose
  votes are those of its first k neighbours. A k above the number of train examples is clamped
  to it (all of them vote) and reported. Each device finds the top k of its shard of the train
  features and only those candidates are merged, for chunks of test examples that divide the
  eval batch (any test split size works, however small: padding rows never count), sized so
  that a device holds at most SIMILARITY_BUDGET similarities, or one-hot votes, at a time.

`fewshot_ridge` (evals/fewshot.py) shares this module's frozen-feature machinery.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from vistax.evals.base import (Evaluator, embed_split, encoder, require, require_image_and_label,
                               to_host)
from vistax.models.layers import l2_normalize

HIGHEST = jax.lax.Precision.HIGHEST
BATCHNORM_EPS = 1e-6  # MAE's linear probe BatchNorm (He et al. 2021, Appendix A.1)
GRAD_TOL = 1e-6  # L-BFGS stops once the loss's gradient norm is below this
FLOAT_TOL = 1e-7  # ... or once a step lowers the loss by less than this, relatively
DEFAULT_WEIGHT_DECAY = 1e-5  # of weight_decay / 2 * |w|^2 added to the mean cross-entropy
SIMILARITY_BUDGET = 2 ** 26  # k-NN similarities one device holds at a time (256 MiB float32)
DEFAULT_K = 20  # DINO's headline k (Caron et al. 2021, Sec. 4)
COMMON_KEYS = ("type", "every", "dataset", "train_split", "test_split", "pp", "batch_size",
               "encoder", "num_classes")


# -- features ------------------------------------------------------------------------------

def stack_split(outputs: list[dict], masks: list[jax.Array], *, stacked, normalize: bool
                ) -> tuple[dict, dict]:
    """Per-batch {"features": (B, D), "label": (B,)} and masks -> (N, B, ...) arrays sharded
    along B, padding rows zeroed (L2-normalised features if `normalize`), and the real rows'
    count and smallest and largest label. `stacked(ndim)` shards an ndim array along axis 1."""
    constrain = jax.lax.with_sharding_constraint
    mask = constrain(jnp.stack(masks), stacked(2))
    features = jnp.stack([o["features"] for o in outputs]).astype(jnp.float32)
    features = constrain(jnp.where(mask[..., None], features, 0.0), stacked(3))
    if normalize:
        features = l2_normalize(features)
    label = constrain(jnp.where(mask, jnp.stack([o["label"] for o in outputs]), 0), stacked(2))
    label = label.astype(jnp.int32)
    stats = {"count": jnp.sum(mask),
             "min_label": jnp.min(jnp.where(mask, label, jnp.iinfo(jnp.int32).max)),
             "max_label": jnp.max(jnp.where(mask, label, -1))}
    return {"features": features, "label": label, "mask": mask}, stats


def label_counts(label: jax.Array, mask: jax.Array, num_classes: int) -> dict:
    """Test rows counted, and those among them whose label no class of the fit can match."""
    outside = (label < 0) | (label >= num_classes)
    return {"count": jnp.sum(mask), "outside": jnp.sum(mask & outside)}


def add_sums(totals: dict | None, sums: dict) -> dict:
    return sums if totals is None else jax.tree.map(jnp.add, totals, sums)


# -- linear probe --------------------------------------------------------------------------

def batchnorm_stats(features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-dimension mean and biased variance of the rows of (..., D) features where mask."""
    weight = mask.astype(jnp.float32)[..., None]
    axes = tuple(range(features.ndim - 1))
    count = jnp.sum(weight)
    mean = jnp.sum(features * weight, axis=axes) / count
    var = jnp.sum(jnp.square(features - mean) * weight, axis=axes) / count
    return mean, var


def batchnorm(features: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """BatchNorm without affine parameters (MAE, He et al. 2021, Appendix A.1)."""
    return (features.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BATCHNORM_EPS)


def probe_logits(params: dict, normalized: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dc->...c", normalized, params["w"], precision=HIGHEST) + params["b"]


def _cross_entropy_sum(params, normalized, label, weight):
    nll = optax.softmax_cross_entropy_with_integer_labels(probe_logits(params, normalized), label)
    return jnp.sum(nll * weight)


def fit_probe(features: jax.Array, label: jax.Array, mask: jax.Array, *, num_classes: int,
              steps: int, weight_decay: float) -> dict:
    """The linear probe on (..., D) features of the rows where `mask`, labels in
    [0, num_classes): {"mean", "var"} (the train BatchNorm statistics), {"params": {"w", "b"}}
    minimising mean cross-entropy + weight_decay / 2 * |w|^2 (L-BFGS from zeros), and
    {"steps"} taken. Padding rows must be finite (stack_split zeroes them)."""
    mean, var = batchnorm_stats(features, mask)
    normalized = batchnorm(features, mean, var)
    weight = mask.astype(jnp.float32)
    count = jnp.sum(weight)

    def loss(params):
        data = _cross_entropy_sum(params, normalized, label, weight) / count
        return data + 0.5 * weight_decay * jnp.sum(jnp.square(params["w"]))

    params = {"w": jnp.zeros((features.shape[-1], num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def going_on(carry):  # the state holds the loss and gradient at the current params
        _, state, previous = carry
        taken, value = optax.tree.get(state, "count"), optax.tree.get(state, "value")
        progress = previous - value > FLOAT_TOL * jnp.maximum(jnp.abs(value), 1.0)
        small = optax.tree.norm(optax.tree.get(state, "grad")) <= GRAD_TOL
        return (taken == 0) | ((taken < steps) & progress & ~small)

    def step(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=loss)
        return optax.apply_updates(params, updates), state, value

    params, state, _ = jax.lax.while_loop(
        going_on, step, (params, solver.init(params), jnp.asarray(jnp.inf, jnp.float32)))
    return {"params": params, "mean": mean, "var": var,
            "steps": optax.tree.get(state, "count")}


def probe_sums(probe: dict, features: jax.Array, label: jax.Array, mask: jax.Array) -> dict:
    """Correct predictions, summed cross-entropy and count over the rows where `mask` (labels
    in [0, classes))."""
    normalized = batchnorm(features, probe["mean"], probe["var"])
    weight = mask.astype(jnp.float32)
    predicted = jnp.argmax(probe_logits(probe["params"], normalized), axis=-1)
    return {"correct": jnp.sum((predicted == label) & mask),
            "nll": _cross_entropy_sum(probe["params"], normalized, label, weight),
            "count": jnp.sum(mask)}


def _fit_and_score_train(train, *, num_classes, steps, weight_decay):
    """The fitted probe, and its train-split sums and the L-BFGS steps taken."""
    probe = fit_probe(train["features"], train["label"], train["mask"], num_classes=num_classes,
                      steps=steps, weight_decay=weight_decay)
    sums = probe_sums(probe, train["features"], train["label"], train["mask"])
    return probe, dict(sums, steps=probe["steps"])


def _probe_test_sums(probe, outputs, mask, *, num_classes):
    """A test batch's correct predictions, summed cross-entropy and counts."""
    label = outputs["label"].astype(jnp.int32)
    counts = label_counts(label, mask, num_classes)
    return dict(probe_sums(probe, outputs["features"], label, mask), **counts)


# -- k-NN ----------------------------------------------------------------------------------

def _local_top_k(query, features, label, mask, k):
    """(Q, k') similarities (-inf for padding rows) and labels of the k' = min(k, rows) rows of
    (..., D) features most similar to each query."""
    sim = jnp.einsum("qd,...d->q...", query, features, precision=HIGHEST)
    sim = jnp.where(mask, sim, -jnp.inf).reshape(query.shape[0], -1)
    sims, index = jax.lax.top_k(sim, min(k, sim.shape[1]))
    return sims, label.reshape(-1)[index]


def top_k_neighbours(query, bank, k, *, mesh=None, axes=()):
    """The k bank rows most similar to each query row: (Q, k) similarities, labels.

    bank: (N, B, D) features, (N, B) labels and mask, B sharded over the mesh `axes` (none:
    one device). Each device takes the top k of its shard; only those candidates are merged
    (so rows exactly as similar as each other may be picked differently on other meshes)."""
    args = (query, bank["features"], bank["label"], bank["mask"])
    if not axes:
        return _local_top_k(*args, k)

    def local(*shard):
        sims, labels = _local_top_k(*shard, k)
        return sims[None], labels[None]

    rows = P(None, axes)
    sims, labels = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(None, axes, None), rows, rows),
        out_specs=(P(axes), P(axes)), axis_names=set(axes))(*args)
    sims = jnp.moveaxis(sims, 0, 1).reshape(query.shape[0], -1)  # (Q, shards * k')
    labels = jnp.moveaxis(labels, 0, 1).reshape(query.shape[0], -1)
    sims, index = jax.lax.top_k(sims, min(k, sims.shape[1]))
    return sims, jnp.take_along_axis(labels, index, axis=1)


def knn_votes(sims, labels, *, temperature: float, num_classes: int, ks=None) -> jax.Array:
    """(Q, classes) votes: each neighbour adds exp(sim / T) to its label (DINO, Caron et al.
    2021, Sec. 4). Shifted by the best similarity, which scales a query's votes alike and keeps
    exp finite; padding (-inf) adds 0. `sims` (Q, K) best first, `labels` (Q, K).

    With `ks` (each <= K): (len(ks), Q, classes), the votes of the first k neighbours for each
    k, summed segment by segment between the sorted ks (no neighbour's one-hot is made twice)."""
    weights = jnp.exp((sims - sims[:, :1]) / temperature)

    def votes(lo, hi):  # exact products, float32 sums (no reduced-precision matmul on TPU)
        one_hot = jax.nn.one_hot(labels[:, lo:hi], num_classes)
        return jnp.sum(one_hot * weights[:, lo:hi, None], axis=1)

    if ks is None:
        return votes(0, sims.shape[1])
    by_k, total, lo = {}, 0.0, 0
    for k in sorted(set(ks)):
        total = total + votes(lo, k)
        by_k[k], lo = total, k
    return jnp.stack([by_k[k] for k in ks])


def _chunk_size(batch: int, per_query: int) -> int:
    """The largest divisor of `batch` whose `per_query` floats each fit SIMILARITY_BUDGET."""
    fits = max(1, SIMILARITY_BUDGET // max(per_query, 1))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fits)


def _knn_test_sums(bank, outputs, mask, *, num_classes, ks, temperature, mesh, axes,
                   replicated):
    """A test batch's counts and, per k in `ks` (each at most the bank's real rows), correct
    top-1 (and top-5 with >= 5 classes) as (len(ks),) arrays."""
    query = jax.lax.with_sharding_constraint(l2_normalize(outputs["features"]), replicated)
    batch = query.shape[0]
    shards = math.prod(mesh.shape[a] for a in axes)
    k_max, top = max(ks), min(5, num_classes)
    # a device holds a chunk's similarities to its bank rows, and one-hot votes of k_max
    chunk = _chunk_size(batch, max(bank["mask"].size // shards, k_max * num_classes))

    def ranked(q):  # (chunk, D) -> (len(ks), chunk, top) classes by votes, best first
        sims, labels = top_k_neighbours(q, bank, k_max, mesh=mesh, axes=axes)
        votes = knn_votes(sims, labels, temperature=temperature, num_classes=num_classes, ks=ks)
        return jax.lax.top_k(votes, top)[1]

    classes = jax.lax.map(ranked, query.reshape(batch // chunk, chunk, -1))
    classes = jnp.moveaxis(classes, 1, 0).reshape(len(ks), batch, top)
    label = outputs["label"].astype(jnp.int32)
    hit = classes == label[:, None]
    sums = dict(label_counts(label, mask, num_classes), correct=jnp.sum(hit[..., 0] & mask, 1))
    if top == 5:
        sums["correct_top5"] = jnp.sum(jnp.any(hit, axis=-1) & mask, axis=1)
    return sums


# -- config --------------------------------------------------------------------------------

def int_key(cfg, name: str, key: str, default: int | None, minimum: int) -> int | None:
    value = cfg.get(key, default)
    if value is None and default is None:
        return None
    if not _is_int(value) or value < minimum:
        raise ValueError(f"evals.{name}.{key}={value!r} must be an int >= {minimum}.")
    return int(value)


def int_list_key(cfg, name: str, key: str, default, minimum: int) -> tuple[int, ...]:
    """`evals.<name>.<key>`: an int or a non-empty list/tuple of distinct ints >= minimum."""
    value = cfg.get(key, default)
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if (not values or not all(_is_int(v) and v >= minimum for v in values)
            or len(set(values)) < len(values)):
        raise ValueError(f"evals.{name}.{key}={value!r} must be an int >= {minimum} or a "
                         f"non-empty list of distinct ones.")
    return tuple(int(v) for v in values)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def float_key(cfg, name: str, key: str, default: float, *, positive: bool) -> float:
    value = cfg.get(key, default)
    if (not isinstance(value, (int, float, np.number)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0 or (positive and value == 0)):
        raise ValueError(f"evals.{name}.{key}={value!r} must be a finite number "
                         f"{'> 0' if positive else '>= 0'}.")
    return float(value)


def batch_axes(ctx) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension is split over (none on one device)."""
    spec = ctx.batch_sharding.spec
    axes = spec[0] if len(spec) else None
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


class FrozenFeatureEvaluator(Evaluator):
    """Embeds the train split into sharded device arrays, fits on them, streams the test split.

    Subclasses set OWN_KEYS and NORMALIZE (L2-normalise the stacked train features) and give
    _fit(train, num_classes=) -> (fitted, train sums), _test_sums(fitted, outputs, mask,
    num_classes=) -> a test batch's sums with "count" and "outside" (label_counts), added up on
    device, and _results(train sums, totals) -> metrics; _fit_shape when _fit cannot be
    traced."""

    OWN_KEYS: tuple[str, ...] = ()
    NORMALIZE = False

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        known = COMMON_KEYS + self.OWN_KEYS
        unknown = sorted(set(cfg.keys()) - set(known))
        if unknown:
            raise ValueError(f"evals.{name}: {', '.join(f'evals.{name}.{k}' for k in unknown)} "
                             f"is not a key of type {cfg.get('type')!r}, whose keys are "
                             f"{list(known)}.")
        require(cfg, name, ("dataset", "train_split", "test_split", "pp", "batch_size"))
        self.num_classes = int_key(cfg, name, "num_classes", None, minimum=1)
        features = encoder(ctx, name, cfg, "encoder", "features")

        def embed(model, extra, batch):
            return {"features": features(model, extra, batch), "label": batch["label"]}

        self._embed = ctx.compile(embed, outputs="device")
        stacked = functools.partial(ctx.sharded_along, 1)
        self._stack = jax.jit(
            functools.partial(stack_split, stacked=stacked, normalize=self.NORMALIZE),
            out_shardings=({"features": stacked(3), "label": stacked(2), "mask": stacked(2)},
                           ctx.replicated))

    def _split(self, key: str):
        """What ctx.batches reads, for the split named by `evals.<name>.<key>`."""
        cfg = self.cfg
        return types.SimpleNamespace(dataset=cfg.dataset, split=cfg[key], pp=cfg.pp,
                                     batch_size=cfg.batch_size)

    def check(self, example):
        key = f"evals.{self.name}.pp"
        require_image_and_label(key, self.cfg.pp, example)
        out = self._embed.check(key, example, self.cfg.batch_size)
        if out["features"].ndim != 2:
            raise ValueError(f"evals.{self.name}.encoder={self.cfg.get('encoder', 'features')!r} "
                             f"gives {out['features'].shape} per batch; {self.cfg.get('type')} "
                             "needs (batch, D) features.")
        mask = jax.ShapeDtypeStruct(out["label"].shape, jnp.bool_,
                                    sharding=self.ctx.batch_sharding)
        num_classes = self.num_classes or 2  # the real default needs the train labels
        train, _ = jax.eval_shape(self._stack, [out, out], [mask, mask])
        fitted = self._fit_shape(train, num_classes)
        jax.eval_shape(functools.partial(self._test_sums, num_classes=num_classes),
                       fitted, out, mask)

    def _fit_shape(self, train, num_classes: int):
        """The abstract `fitted` of abstract train arrays."""
        return jax.eval_shape(functools.partial(self._fit, num_classes=num_classes), train)[0]

    def _num_classes(self, stats: dict) -> int:
        """num_classes (default: the largest train label + 1), checked against stack_split's
        stats of the train split."""
        low, high = int(stats["min_label"]), int(stats["max_label"])
        split = f"{self.cfg.dataset!r} {self.cfg.train_split!r}"
        if low < 0:
            raise ValueError(f"evals.{self.name}: {split} has label {low}; labels must be >= 0.")
        if self.num_classes is not None and high >= self.num_classes:
            raise ValueError(f"evals.{self.name}.num_classes={self.num_classes} but {split} "
                             f"has label {high}.")
        return self.num_classes or high + 1

    def run(self, state):
        outputs, masks = embed_split(self.ctx, self._embed, state, self._split("train_split"))
        train, stats = self._stack(outputs, masks)
        del outputs, masks  # the stacked copy is all that stays on device
        stats = to_host(stats)
        num_classes = self._num_classes(stats)
        fitted, train_sums = self._fit(train, num_classes=num_classes)
        totals = None  # stays on device until the end
        for batch in self.ctx.batches(self._split("test_split")):
            totals = add_sums(totals, self._test_sums(fitted, self._embed(state, batch),
                                                      batch["_mask"], num_classes=num_classes))
        totals = to_host(totals)
        self._check_test_labels(int(totals["outside"]), num_classes)
        return {**self._results(to_host(train_sums), totals),
                "num_train": float(stats["count"]), "num_test": float(totals["count"])}

    def _check_test_labels(self, outside: int, num_classes: int) -> None:
        if not outside:
            return
        reason = (f"evals.{self.name}.num_classes={num_classes}" if self.num_classes else
                  f"{num_classes} = the largest label of {self.cfg.train_split!r} + 1; set "
                  f"evals.{self.name}.num_classes")
        raise ValueError(f"evals.{self.name}: {outside} examples of {self.cfg.dataset!r} "
                         f"{self.cfg.test_split!r} have labels outside [0, {num_classes}) "
                         f"({reason}).")

    def _results(self, train_sums: dict, totals: dict) -> dict[str, float]:
        raise NotImplementedError


class LinearProbeEvaluator(FrozenFeatureEvaluator):
    """Linear-probe accuracy of frozen features (see module docstring).

    Keys: dataset, train_split, test_split, pp (must yield `image` and an integer `label`; one
    pp for both splits, so no augmentation), batch_size (global, for feature extraction),
    encoder (default 'features'), every, num_classes (default: the largest train label + 1),
    steps (most L-BFGS steps, default 1000), weight_decay (the loss is the mean cross-entropy
    + weight_decay / 2 * |w|^2; default 1e-5, see the module docstring). L-BFGS takes no
    learning rate. Metrics: accuracy and loss (mean cross-entropy) on the
    test split, train_accuracy, train_loss (mean cross-entropy, without the decay term),
    probe_steps (L-BFGS steps taken), num_train, num_test.
    """

    OWN_KEYS = ("steps", "weight_decay")

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        steps = int_key(cfg, name, "steps", 1000, minimum=1)
        weight_decay = float_key(cfg, name, "weight_decay", DEFAULT_WEIGHT_DECAY, positive=False)
        self._fit = jax.jit(
            functools.partial(_fit_and_score_train, steps=steps, weight_decay=weight_decay),
            static_argnames="num_classes", out_shardings=ctx.replicated)
        self._test_sums = jax.jit(_probe_test_sums, static_argnames="num_classes",
                                  out_shardings=ctx.replicated)

    def _results(self, train_sums, totals):
        count, train_count = int(totals["count"]), int(train_sums["count"])
        return {"accuracy": int(totals["correct"]) / count,
                "loss": float(totals["nll"]) / count,
                "train_accuracy": int(train_sums["correct"]) / train_count,
                "train_loss": float(train_sums["nll"]) / train_count,
                "probe_steps": float(train_sums["steps"])}


class KnnEvaluator(FrozenFeatureEvaluator):
    """Weighted k-NN accuracy of frozen features (see module docstring).

    Keys: dataset, train_split, test_split, pp (must yield `image` and an integer `label`),
    batch_size (global), encoder (default 'features'), every, num_classes (default: the largest
    train label + 1), k (an int or a list of distinct ints, e.g. DINO's (10, 20, 100, 200);
    default 20), temperature (default 0.07; DINO, Caron et al. 2021, Sec. 4).

    Metrics, for each k listed: accuracy_k{k}, top5_accuracy_k{k} (with >= 5 classes), and
    k_used_k{k} = the number of train examples when k exceeds it (k is clamped to it: every
    train example votes); accuracy and top5_accuracy repeat the first k's; num_train, num_test.
    """

    OWN_KEYS = ("k", "temperature")
    NORMALIZE = True

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        self.ks = int_list_key(cfg, name, "k", DEFAULT_K, minimum=1)
        self._ks_used = self.ks  # clamped to the train split by _num_classes
        temperature = float_key(cfg, name, "temperature", 0.07, positive=True)
        self._sums = jax.jit(
            functools.partial(_knn_test_sums, temperature=temperature,
                              mesh=ctx.batch_sharding.mesh, axes=batch_axes(ctx),
                              replicated=ctx.replicated),
            static_argnames=("num_classes", "ks"), out_shardings=ctx.replicated)

    def _num_classes(self, stats):
        """Also clamps each k to the number of train examples."""
        self._ks_used = tuple(min(k, int(stats["count"])) for k in self.ks)
        return super()._num_classes(stats)

    def _fit(self, train, *, num_classes):
        """The (L2-normalised) train features are the bank as they are."""
        del num_classes
        return train, {}

    def _test_sums(self, bank, outputs, mask, *, num_classes):
        return self._sums(bank, outputs, mask, num_classes=num_classes, ks=self._ks_used)

    def _results(self, train_sums, totals):
        del train_sums
        count = int(totals["count"])
        results = {}
        for i, (k, used) in enumerate(zip(self.ks, self._ks_used)):
            results[f"accuracy_k{k}"] = int(totals["correct"][i]) / count
            if "correct_top5" in totals:
                results[f"top5_accuracy_k{k}"] = int(totals["correct_top5"][i]) / count
            if used < k:
                results[f"k_used_k{k}"] = float(used)
        first = self.ks[0]
        results["accuracy"] = results[f"accuracy_k{first}"]
        if "correct_top5" in totals:
            results["top5_accuracy"] = results[f"top5_accuracy_k{first}"]
        return results
