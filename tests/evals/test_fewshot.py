"""The few-shot ridge evaluator: draws take n rows of each class, deterministically per seed and
nested across n; the sharded fit equals scikit-learn's closed-form Ridge on big_vision's
standardised, bias-augmented features with {-1, +1} targets (fewer shots than dimensions
included) on 8 devices and on 1; the evaluator's accuracies equal a numpy reference with
garbage padding rows; too few examples of a class and bad keys are errors naming the key."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from vistax.evals import fewshot
from vistax.evals.fewshot import FewshotRidgeEvaluator
from vistax.evals.linear_probe import batch_axes

IDENTITY = {"features": lambda model, extra, batch: batch["image"]}


def evaluator_config(**cfg):
    return ml_collections.ConfigDict(dict(dict(
        type="fewshot_ridge", dataset="synthetic", train_split="train", test_split="test",
        pp="synthetic", batch_size=16), **cfg))


def blobs(rng, n, centres, scale=1.0, offset=0.0):
    """n rows of uniformly drawn classes around their centres (+ offset), and the labels."""
    label = rng.integers(len(centres), size=n).astype(np.int32)
    noise = scale * rng.normal(size=(n, centres.shape[1]))
    return (offset + centres[label] + noise).astype(np.float32), label


def reference_fit(x, y, rows, *, num_classes, l2_reg):
    """big_vision's protocol in float64 with scikit-learn: (W (D + 1, C), mean, std)."""
    x = x[rows].astype(np.float64)
    mean, std = x.mean(0), x.std(0) + fewshot.STD_EPS
    z = np.concatenate([(x - mean) / std, np.full((len(x), 1), fewshot.BIAS_FEATURE)], 1)
    targets = 2.0 * np.eye(num_classes)[y[rows]] - 1.0
    ridge = Ridge(alpha=l2_reg, fit_intercept=False, solver="cholesky").fit(z, targets)
    return ridge.coef_.T, mean, std


def reference_predict(fit, x):
    w, mean, std = fit
    z = (x.astype(np.float64) - mean) / std
    return np.argmax(z @ w[:-1] + fewshot.BIAS_FEATURE * w[-1], axis=1)


# -- draws -----------------------------------------------------------------------------------

def test_draws_are_per_class_nested_and_seeded():
    rng = np.random.default_rng(0)
    label = rng.integers(3, size=(6, 10)).astype(np.int32)  # (N, B) as stacked
    label[0, :4] = 3  # class 3 has 4 rows, fewer than 5 shots
    mask = np.ones((6, 10), bool)
    mask[5, 6:] = False  # padding rows, never drawn
    shots, seeds = (1, 2, 5), 3
    selection = fewshot.draw_shots(label, mask, shots=shots, seeds=seeds, num_classes=4)
    assert selection.shape == (9, 6, 10) and not selection[:, 5, 6:].any()
    for fit in range(9):
        n = shots[fit % 3]
        counts = np.bincount(label[selection[fit]], minlength=4)
        np.testing.assert_array_equal(counts, [n, n, n, min(n, 4)])  # all 4 when n = 5
    by_seed = selection.reshape(seeds, len(shots), -1)
    assert np.all(by_seed[:, 0] <= by_seed[:, 1]) and np.all(by_seed[:, 1] <= by_seed[:, 2])
    assert not np.array_equal(by_seed[0, 1], by_seed[1, 1])  # seeds differ
    again = fewshot.draw_shots(label, mask, shots=shots, seeds=seeds, num_classes=4)
    np.testing.assert_array_equal(selection, again)  # a seed always draws the same rows
    one_seed = fewshot.draw_shots(label, mask, shots=(2,), seeds=1, num_classes=4)
    np.testing.assert_array_equal(one_seed[0], selection[1])  # and not per shot list


# -- the sharded fit -----------------------------------------------------------------------

@pytest.mark.parametrize("l2_reg", [fewshot.DEFAULT_L2_REG, 0.5], ids=["2^10", "0.5"])
def test_fit_equals_sklearn_ridge(experiment, l2_reg):
    """30 features around an offset of 30 (float32 Gram sums would lose the centred ones
    without the shift), 4 classes: 1 and 3 shots (4 and 12 rows, fewer than 30 dimensions)
    and 20 (80 rows); 8 padding rows of huge garbage must not count."""
    exp, _ = experiment
    ctx = exp.eval_context
    rng = np.random.default_rng(1)
    classes, dim, batch = 4, 30, 16
    x, y = blobs(rng, 152, 2.0 * rng.normal(size=(classes, dim)), offset=30.0)
    features = np.concatenate([x, 1e4 * rng.normal(size=(8, dim)).astype(np.float32)])
    label = np.concatenate([y, np.zeros(8, np.int32)])
    mask = np.arange(160) < 152
    shape = (10, batch)
    selection = fewshot.draw_shots(label.reshape(shape), mask.reshape(shape), shots=(1, 3, 20),
                                   seeds=2, num_classes=classes)

    def put(array, axis):  # a global array whose `axis` is split like a batch
        return jax.device_put(array, ctx.sharded_along(axis, array.ndim))

    fit = jax.jit(functools.partial(fewshot.fit_ridge, num_classes=classes, l2_reg=l2_reg,
                                    mesh=ctx.batch_sharding.mesh, axes=batch_axes(ctx)))
    fitted = fit(put(features.reshape(shape + (dim,)), 1), put(label.reshape(shape), 1),
                 put(mask.reshape(shape), 1), put(selection, 2))
    fitted = jax.tree.map(np.asarray, fitted)

    x_test, _ = blobs(rng, 200, 2.0 * rng.normal(size=(classes, dim)), offset=30.0)
    scores = np.asarray(fewshot.ridge_scores(fitted, x_test))
    for f in range(6):
        rows = np.flatnonzero(selection[f].reshape(-1))
        assert len(rows) == classes * (1, 3, 20)[f % 3]
        w, mean, std = reference_fit(features, label, rows, num_classes=classes, l2_reg=l2_reg)
        scale = np.abs(w).max()
        np.testing.assert_allclose(fitted["w"][f], w, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(fitted["mean"][f], mean, rtol=1e-6)
        np.testing.assert_allclose(fitted["std"][f], std, rtol=1e-4)
        np.testing.assert_array_equal(np.argmax(scores[f], 1),
                                      reference_predict((w, mean, std), x_test))


# -- the evaluator -------------------------------------------------------------------------

def test_evaluator_equals_reference(experiment, split_array_context):
    """Accuracy per shot count = the mean over seeds of the reference fits' test accuracies.
    Padding rows (the last batches' tails) are garbage that must never be drawn or counted."""
    exp, state = experiment
    rng = np.random.default_rng(2)
    classes, dim = 5, 12
    centres = rng.normal(size=(classes, dim))
    x, y = blobs(rng, 150, centres, 1.5)
    x_test, y_test = blobs(rng, 83, centres, 1.5)
    padding = {"image": (1e3 * rng.normal(size=(5, dim))).astype(np.float32),
               "label": np.arange(5, dtype=np.int32)}
    ctx = split_array_context(exp, IDENTITY, {"train": {"image": x, "label": y},
                                              "test": {"image": x_test, "label": y_test}},
                              padding=padding)
    shots, seeds, l2_reg = (1, 4, 16), 2, 8.0
    cfg = evaluator_config(shots=list(shots), seeds=seeds, l2_reg=l2_reg)
    result = FewshotRidgeEvaluator("fs", cfg, ctx).run(state)

    # padding is stacked after the real rows, so the draws over the real rows are the same
    selection = fewshot.draw_shots(y, np.ones(150, bool), shots=shots, seeds=seeds,
                                   num_classes=classes).reshape(seeds, len(shots), 150)
    expected = {"num_train": 150.0, "num_test": 83.0}
    for j, n in enumerate(shots):
        accuracies = []
        for seed in range(seeds):
            rows = np.flatnonzero(selection[seed, j])
            fit = reference_fit(x, y, rows, num_classes=classes, l2_reg=l2_reg)
            accuracies.append(np.mean(reference_predict(fit, x_test) == y_test))
        expected[f"accuracy_{n}shot"] = float(np.mean(accuracies))
    assert result == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected["accuracy_1shot"] < expected["accuracy_16shot"] < 0.98


def test_errors_name_the_key(experiment, split_array_context):
    exp, state = experiment
    label = np.array([0] * 6 + [1] * 6 + [2] * 3, np.int32)  # class 2: 3 examples
    ctx = split_array_context(exp, IDENTITY, {
        "train": {"image": np.eye(15, 4, dtype=np.float32), "label": label},
        "test": {"image": np.ones((5, 4), np.float32), "label": np.zeros(5, np.int32)}})
    bad = [
        (dict(shots=[]), r"evals\.e\.shots=\[\] must be an int >= 1 or a non-empty list"),
        (dict(shots=(1, 5, 1)), r"evals\.e\.shots=\(1, 5, 1\) must be an int >= 1 or"),
        (dict(seeds=0), r"evals\.e\.seeds=0 must be an int >= 1"),
        (dict(l2_reg=0.0), r"evals\.e\.l2_reg=0\.0 must be a finite number > 0"),
        (dict(k=20), r"evals\.e\.k is not a key of type 'fewshot_ridge'"),
    ]
    for cfg, message in bad:
        with pytest.raises(ValueError, match=message):
            FewshotRidgeEvaluator("e", evaluator_config(**cfg), ctx)
    with pytest.raises(ValueError, match=r"evals\.e\.shots=\(1, 5\) needs 5 train examples of "
                                         r"each of 3 classes; 'synthetic' 'train' has 3 of "
                                         r"class 2\.$"):
        FewshotRidgeEvaluator("e", evaluator_config(shots=(1, 5)), ctx).run(state)
    with pytest.raises(ValueError, match=r"has 3 of class 2 \(and too few of 2 more\)"):
        FewshotRidgeEvaluator("e", evaluator_config(shots=4, num_classes=5), ctx).run(state)
    result = FewshotRidgeEvaluator("e", evaluator_config(shots=3), ctx).run(state)
    assert set(result) == {"accuracy_3shot", "num_train", "num_test"}

    ev = FewshotRidgeEvaluator("e", evaluator_config(), ctx)
    ev.check({"image": np.zeros(4, np.float32), "label": np.int64(1), "_mask": True})
    with pytest.raises(ValueError, match=r"evals\.e\.encoder='features' gives \(16, 2, 2\)"):
        ev.check({"image": np.zeros((2, 2), np.float32), "label": np.int64(1), "_mask": True})
