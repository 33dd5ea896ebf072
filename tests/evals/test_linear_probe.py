"""The frozen-feature evaluators. Linear probe: separable classes are all right, the fit agrees
with scikit-learn's LogisticRegression (same objective, same optimum), masked garbage rows change
nothing, and on 8 devices the evaluator equals the fit on the unpadded split and normalises test
features with the train split's statistics only. k-NN: equals a brute-force numpy k-NN (DINO's
exp(sim / T) votes) on 8 devices and on 1, in chunks or not, for one k or DINO's list of k
(one clamped to the train split) on a test split smaller than one batch, and padding rows (made
the most similar rows there are) are never neighbours. Both run end to end on `digits` with a
small ViT, beside few-shot ridge; config and pp errors name the key."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from vistax.data import pipeline
from vistax.evals import linear_probe
from vistax.evals.linear_probe import KnnEvaluator, LinearProbeEvaluator
from vistax.train.experiment import Experiment

IDENTITY = {"features": lambda model, extra, batch: batch["image"]}
DIM, CLASSES = 12, 4  # every probe problem here: one compile per number of train rows


@functools.partial(jax.jit, static_argnames="num_classes")
def fit(features, label, mask, weight_decay, *, num_classes=CLASSES):
    return linear_probe.fit_probe(features, label, mask, num_classes=num_classes, steps=1000,
                                  weight_decay=weight_decay)


def predict(probe, features):
    """The fitted probe's classes for (n, D) features, in numpy."""
    probe = jax.tree.map(np.asarray, probe)
    normalized = (features - probe["mean"]) / np.sqrt(probe["var"] + 1e-6)
    return np.argmax(normalized @ probe["params"]["w"] + probe["params"]["b"], axis=-1)


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def standardize(x, train):
    """MAE's affine-free BatchNorm with the train rows' statistics, in numpy."""
    return (x - train.mean(0)) / np.sqrt(train.var(0) + 1e-6)


def blobs(rng, n, centres, scale=1.0):
    label = rng.integers(len(centres), size=n).astype(np.int32)
    noise = scale * rng.normal(size=(n, centres.shape[1]))
    return (centres[label] + noise).astype(np.float32), label


# -- the probe on features directly ----------------------------------------------------------

def test_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = 5.0 * rng.normal(size=(CLASSES, DIM))
    x, y = blobs(rng, 200, centres)
    x_test, y_test = blobs(rng, 240, centres)
    assert np.all(np.argmin(((x[:, None] - centres) ** 2).sum(-1), 1) == y)  # separable
    probe = fit(x, y, np.ones(200, bool), 0.0)
    assert np.all(predict(probe, x_test) == y_test)


def test_probe_agrees_with_sklearn():
    """Mean cross-entropy + wd / 2 |w|^2 is LogisticRegression's C * summed cross-entropy +
    |w|^2 / 2 with C = 1 / (wd n): the same minimiser, so the same weights and accuracy."""
    rng = np.random.default_rng(1)
    centres = 0.6 * rng.normal(size=(CLASSES, DIM))  # overlapping classes
    x, y = blobs(rng, 240, centres)
    x_test, y_test = blobs(rng, 2000, centres)
    weight_decay = 1e-2
    probe = fit(x, y, np.ones(240, bool), weight_decay)
    sk = LogisticRegression(C=1 / (weight_decay * 240), max_iter=5000, tol=1e-10)
    sk.fit(standardize(x, x), y)
    sk_accuracy = sk.score(standardize(x_test, x), y_test)
    assert 0.5 < sk_accuracy < 0.9
    assert abs(np.mean(predict(probe, x_test) == y_test) - sk_accuracy) <= 0.005
    np.testing.assert_allclose(np.asarray(probe["params"]["w"]), sk.coef_.T, atol=1e-3)
    np.testing.assert_allclose(np.asarray(probe["mean"]), x.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(probe["var"]), x.var(0), rtol=1e-5)
    assert 0 < int(probe["steps"]) < 1000  # converged before the step limit


def test_masked_garbage_rows_change_nothing():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(CLASSES, DIM))
    x, y = blobs(rng, 200, centres)
    garbage = (1e3 * rng.normal(size=(40, DIM))).astype(np.float32)
    padded = np.concatenate([x[:70], garbage, x[70:]])
    padded_y = np.concatenate([y[:70], rng.integers(CLASSES, size=40).astype(np.int32), y[70:]])
    mask = np.ones(240, bool)
    mask[70:110] = False
    clean = fit(x, y, np.ones(200, bool), 1e-2)
    dirty = fit(padded, padded_y, mask, 1e-2)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    x_test, _ = blobs(rng, 240, centres)
    np.testing.assert_array_equal(predict(clean, x_test), predict(dirty, x_test))


# -- the evaluators on in-memory splits, 8 devices and 1 -------------------------------------

def evaluator_config(type_name, **cfg):
    return ml_collections.ConfigDict(dict(dict(
        type=type_name, dataset="synthetic", train_split="train", test_split="test",
        pp="synthetic", batch_size=16), **cfg))


@pytest.mark.parametrize("experiment", [8], indirect=True, ids=["8dev"])  # L-BFGS compiles slowly
def test_probe_normalises_with_train_statistics(experiment, split_array_context):
    """Test features drawn like the train ones, then scaled and shifted towards class 0:
    normalised with the train statistics (as the probe must) most land in class 0; with their
    own they would be classified well. Padding rows are garbage that must not count."""
    exp, state = experiment
    rng = np.random.default_rng(3)
    centres = 2.0 * rng.normal(size=(CLASSES, DIM))
    x, y = blobs(rng, 200, centres)  # 13 batches of 16, the last with 8 padding rows
    x_test, y_test = blobs(rng, 101, centres)
    x_test = 2.0 * x_test + 2.0 * (centres[0] - centres[1])
    padding = {"image": (1e4 * rng.normal(size=(7, DIM))).astype(np.float32),
               "label": np.full(7, 2, np.int32)}
    ctx = split_array_context(exp, IDENTITY, {"train": {"image": x, "label": y},
                                              "test": {"image": x_test, "label": y_test}},
                              padding=padding)
    result = LinearProbeEvaluator("p", evaluator_config("linear_probe", weight_decay=1e-3),
                                  ctx).run(state)

    probe = fit(x, y, np.ones(200, bool), 1e-3)
    accuracy = np.mean(predict(probe, x_test) == y_test)
    own_statistics = standardize(x_test, x_test) * x.std(0) + x.mean(0)
    assert np.mean(predict(probe, own_statistics) == y_test) > accuracy + 0.3
    assert result["accuracy"] == accuracy
    assert result["train_accuracy"] == np.mean(predict(probe, x) == y)
    assert result["num_train"] == 200 and result["num_test"] == 101
    assert 0 < result["probe_steps"] < 1000
    assert 0 < result["train_loss"] < result["loss"]


def brute_force_knn(train, train_label, test, *, k, temperature, num_classes):
    """(test, 5) classes ranked by DINO's weighted votes, from the whole similarity matrix."""
    sim = normalize(test.astype(np.float64)) @ normalize(train.astype(np.float64)).T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    votes = np.zeros((len(test), num_classes))
    np.add.at(votes, (np.arange(len(test))[:, None], train_label[nearest]), weights)
    return np.argsort(-votes, axis=1, kind="stable")[:, :5]


DINO_KS = (10, 20, 100, 200)  # Caron et al. 2021, Sec. 4 / their eval_knn.py


@pytest.mark.parametrize("k, temperature, budget, sizes, batch_size", [
    (20, 0.07, linear_probe.SIMILARITY_BUDGET, (203, 77), 16),
    (5, 0.07, 300, (203, 77), 16),
    (DINO_KS, 0.5, 150 * 6 * 16, (150, 37), 64),
], ids=["defaults", "k5-chunked", "dino-ks-small-test"])
def test_knn_equals_brute_force(experiment, split_array_context, monkeypatch, k, temperature,
                                budget, sizes, batch_size):
    """Padding rows are copies of test examples (similarity 1) under wrong labels: chosen as
    neighbours, or counted as test examples, they would change the result. Budget 300: chunks
    of 1 test row; dino-ks: 37 test examples (fewer than DINO's 100 chunks, and than one batch
    of 64) in chunks of 16 (one chunk all padding), k = 200 clamped to the 150 train examples
    and every k served by one top-150 search (T = 0.5, so that far neighbours count and the
    ks disagree)."""
    exp, state = experiment
    monkeypatch.setattr(linear_probe, "SIMILARITY_BUDGET", budget)
    ks = k if isinstance(k, tuple) else (k,)
    rng = np.random.default_rng(ks[0])
    classes, dim = 6, 10
    centres = rng.normal(size=(classes, dim))
    (n_train, n_test) = sizes
    x, y = blobs(rng, n_train, centres, 1.2)
    x_test, y_test = blobs(rng, n_test, centres, 1.2)
    padding = {"image": x_test[:11], "label": (y_test[:11] + 1) % classes}
    ctx = split_array_context(exp, IDENTITY, {"train": {"image": x, "label": y},
                                              "test": {"image": x_test, "label": y_test}},
                              padding=padding)
    cfg = evaluator_config("knn", k=k, temperature=temperature, batch_size=batch_size)
    result = KnnEvaluator("knn", cfg, ctx).run(state)

    expected = {"num_train": float(n_train), "num_test": float(n_test)}
    for each in ks:
        ranked = brute_force_knn(x, y, x_test, k=min(each, n_train), temperature=temperature,
                                 num_classes=classes)
        expected[f"accuracy_k{each}"] = np.mean(ranked[:, 0] == y_test)
        expected[f"top5_accuracy_k{each}"] = np.mean((ranked == y_test[:, None]).any(1))
        assert 0.3 < expected[f"accuracy_k{each}"] < 0.95
    if n_train < max(ks):
        expected[f"k_used_k{max(ks)}"] = float(n_train)
    expected["accuracy"] = expected[f"accuracy_k{ks[0]}"]
    expected["top5_accuracy"] = expected[f"top5_accuracy_k{ks[0]}"]
    assert result == expected
    if len(ks) > 1:  # the ks disagree somewhere, so each k's votes are its own
        assert len({expected[f"accuracy_k{each}"] for each in ks}) > 1


def test_knn_votes_equal_brute_force_per_example():
    rng = np.random.default_rng(3)
    bank = normalize(rng.normal(size=(2, 40, 6))).astype(np.float32)  # (N, B, D)
    label = rng.integers(4, size=(2, 40)).astype(np.int32)
    mask = np.ones((2, 40), bool)
    mask[1, 33:] = False
    query = normalize(rng.normal(size=(9, 6))).astype(np.float32)
    sims, labels = linear_probe.top_k_neighbours(
        jnp.asarray(query), {"features": bank, "label": label, "mask": mask}, 7)
    votes = linear_probe.knn_votes(sims, labels, temperature=0.1, num_classes=4)
    real = mask.reshape(-1)
    ranked = brute_force_knn(bank.reshape(-1, 6)[real], label.reshape(-1)[real], query, k=7,
                             temperature=0.1, num_classes=4)
    votes = np.asarray(votes)
    np.testing.assert_array_equal(np.argsort(-votes, axis=1, kind="stable")[:, :4],
                                  ranked[:, :4])
    assert np.all(votes.sum(1) >= 1.0)  # the nearest neighbour's weight is exp(0) = 1


# -- checks ------------------------------------------------------------------------------------

def test_checks_name_the_key(experiment, split_array_context):
    exp, state = experiment
    ctx = split_array_context(exp, IDENTITY, {
        "train": {"image": np.zeros((12, 4), np.float32), "label": np.arange(12, dtype=np.int32)},
        "test": {"image": np.zeros((5, 4), np.float32), "label": np.zeros(5, np.int32)}})
    bad = [
        ("linear_probe", dict(learning_rate=0.1), r"evals\.e\.learning_rate is not a key of type "
                                                  r"'linear_probe'"),
        ("linear_probe", dict(train_split=None), r"evals\.e lacks evals\.e\.train_split"),
        ("linear_probe", dict(steps=0), r"evals\.e\.steps=0 must be an int >= 1"),
        ("linear_probe", dict(weight_decay=-1.0), r"evals\.e\.weight_decay=-1\.0 must be"),
        ("linear_probe", dict(encoder="logits"), r"evals\.e\.encoder='logits': the objective "
                                                 r"offers \['features'\]"),
        ("knn", dict(k=0), r"evals\.e\.k=0 must be an int >= 1"),
        ("knn", dict(k=[]), r"evals\.e\.k=\[\] must be an int >= 1 or a non-empty list of "
                            r"distinct ones"),
        ("knn", dict(k=(10, 20, 10)), r"evals\.e\.k=\(10, 20, 10\) must be an int >= 1 or"),
        ("knn", dict(k=(10, 2.5)), r"evals\.e\.k=\(10, 2\.5\) must be an int >= 1 or"),
        ("knn", dict(temperature=0.0), r"evals\.e\.temperature=0\.0 must be a finite number > 0"),
        ("knn", dict(num_classes=2.5), r"evals\.e\.num_classes=2\.5 must be an int >= 1"),
        ("knn", dict(steps=10), r"evals\.e\.steps is not a key of type 'knn'"),
    ]
    types = {"linear_probe": LinearProbeEvaluator, "knn": KnnEvaluator}
    for type_name, cfg, message in bad:
        with pytest.raises(ValueError, match=message):
            types[type_name]("e", evaluator_config(type_name, **cfg), ctx)

    with pytest.raises(ValueError, match=r"evals\.e\.num_classes=10 but 'synthetic' 'train' "
                                         r"has label 11"):
        LinearProbeEvaluator("e", evaluator_config("linear_probe", num_classes=10), ctx).run(state)
    clamped = KnnEvaluator("e", evaluator_config("knn", k=(20, 3)), ctx).run(state)
    assert clamped["k_used_k20"] == 12.0 and "k_used_k3" not in clamped  # k <= 12 examples
    ctx.splits["test"]["label"] = np.array([0, 3, 12, 15, 1], np.int32)
    for type_name, cfg in (("linear_probe", {}), ("knn", {"k": 3})):
        with pytest.raises(ValueError, match=r"evals\.e: 2 examples of 'synthetic' 'test' have "
                                             r"labels outside \[0, 12\) \(12 = the largest "
                                             r"label of 'train' \+ 1; set evals\.e\.num_classes"):
            types[type_name]("e", evaluator_config(type_name, **cfg), ctx).run(state)

    for type_name, cls in types.items():
        ev = cls("e", evaluator_config(type_name), ctx)
        ev.check({"image": np.zeros(4, np.float32), "label": np.int64(1), "_mask": True})
        with pytest.raises(ValueError, match=r"evals\.e\.pp=.*integer scalar 'label'"):
            ev.check({"image": np.zeros(4, np.float32), "label": np.float32(1), "_mask": True})
        with pytest.raises(ValueError, match=r"evals\.e\.encoder='features' gives \(16, 2, 2\)"):
            ev.check({"image": np.zeros((2, 2), np.float32), "label": np.int64(1), "_mask": True})


# -- end to end --------------------------------------------------------------------------------

def test_end_to_end_on_digits(small_vit_config):
    """The frozen-feature evaluators through an Experiment (pre-flight, real pipeline) on a
    random small ViT, on one device (the tests above shard): k-NN with DINO's list of k and
    few-shot ridge with big_vision's defaults (tests/evals/test_fewshot.py) beside the probe.
    Every example of each split counted once, and well above chance (10%) on its features."""
    config = small_vit_config()
    test = config.evals.test
    common = dict(dataset="digits", train_split="train", test_split="test", pp=test.pp,
                  batch_size=64, every="6 steps")
    config.evals = ml_collections.ConfigDict({
        "probe": dict(common, type="linear_probe"),
        "knn": dict(common, type="knn", k=list(DINO_KS)),
        "fewshot": dict(common, type="fewshot_ridge")})
    exp = Experiment(config, devices=jax.devices()[:1])
    state = exp.init_state(seed=0)
    sizes = {split: pipeline.split_size("digits", split, data_dir=config.input.data_dir)
             for split in ("train", "test")}
    results = {name: evaluator.run(state) for name, evaluator in exp.evaluators.items()}
    probe, knn, few = results["probe"], results["knn"], results["fewshot"]
    assert set(probe) == {"accuracy", "loss", "train_accuracy", "train_loss", "probe_steps",
                          "num_train", "num_test"}
    assert set(knn) == {"accuracy", "top5_accuracy", "num_train", "num_test",
                        *(f"{m}_k{k}" for k in DINO_KS for m in ("accuracy", "top5_accuracy"))}
    assert set(few) == {"accuracy_1shot", "accuracy_5shot", "accuracy_10shot",
                        "accuracy_25shot", "num_train", "num_test"}
    for result in results.values():
        assert (result["num_train"], result["num_test"]) == (sizes["train"], sizes["test"])
    assert probe["accuracy"] > 0.7 and knn["accuracy"] > 0.4  # 0.86, 0.68 (k = 10) at seed 0
    assert probe["train_accuracy"] >= probe["accuracy"] and probe["loss"] < 1.0
    assert knn["top5_accuracy"] > knn["accuracy"] == knn["accuracy_k10"]
    assert few["accuracy_1shot"] > 0.2 and few["accuracy_25shot"] > few["accuracy_1shot"] + 0.1
    # 0.24, 0.40, 0.51, 0.58 at 1, 5, 10, 25 shots at seed 0 (l2_reg 2^10 for D = 64)
