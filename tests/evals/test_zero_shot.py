"""The zero-shot evaluator's accuracies equal a numpy computation of CLIP's prompt ensemble
(mean of normalised prompt embeddings, renormalised: not the same as the plain mean), with a
padded last batch, on 8 devices and on 1; labels map by name to a subset of classes; template
and class-name sets; config and pp errors name the key."""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vistax.data import builtins, tokenizers
from vistax.data.builders import shapes
from vistax.evals import templates
from vistax.evals.zero_shot import ZeroShotEvaluator
from vistax.train.experiment import Experiment
from vistax.train.objectives.classification import Classification


class IdTokenizer:
    """Stand-in tokenizer: a text's token 0 is its index in a fixed list (ids: text -> int)."""

    def __init__(self, ids):
        self.ids = ids

    def encode(self, texts, length):
        out = np.zeros((len(texts), length), np.int32)
        out[:, 0] = [self.ids(t) for t in texts]
        return out


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
TEMPLATES = ["a {}.", "the {} here", "my {}"]


@pytest.fixture
def evaluator(array_context):
    """make(exp, encoders, arrays, **cfg) -> a ZeroShotEvaluator over the arrays."""

    def make(exp, encoders, arrays, **cfg):
        cfg = ml_collections.ConfigDict(dict(dict(
            type="zero_shot", dataset="synthetic", split="test", pp="synthetic", batch_size=16,
            tokenizer="ids", text_length=4, class_names=NAMES, templates=TEMPLATES), **cfg))
        return ZeroShotEvaluator("zs", cfg, array_context(exp, encoders, arrays))

    return make


def accuracies(images, labels, classes):
    logits = images.astype(np.float64) @ classes.T
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    return np.mean(logits.argmax(-1) == labels), np.mean((top5 == labels[:, None]).any(-1))


def test_accuracy_equals_the_numpy_ensemble(experiment, evaluator, monkeypatch):
    exp, state = experiment
    prompts = templates.prompts(NAMES, TEMPLATES)
    monkeypatch.setattr(tokenizers, "get", lambda spec: IdTokenizer(prompts.index))
    rng = np.random.default_rng(0)
    classes, per_class, dim, n = len(NAMES), len(TEMPLATES), 12, 203  # 13 batches, 5 padding
    centre = normalize(rng.normal(size=(classes, dim)))
    # Classes whose prompts scatter more get a shorter plain mean; renormalising undoes that.
    spread = np.array([0.1, 2.0, 0.3, 1.5, 0.2, 1.0, 0.6])[:, None, None]
    prompt_embeddings = normalize(centre[:, None] + spread * rng.normal(size=(classes, per_class,
                                                                              dim)))
    labels = rng.integers(classes, size=n).astype(np.int32)
    images = normalize(centre[labels] + 0.9 * rng.normal(size=(n, dim))).astype(np.float32)
    table = jnp.asarray(prompt_embeddings.reshape(-1, dim), jnp.float32)  # prompt order
    encoders = {"image_embedding": lambda model, extra, batch: batch["image"],
                "text_embedding": lambda model, extra, batch: table[batch["text"][:, 0]]}
    ev = evaluator(exp, encoders, {"image": images, "label": labels})
    result = ev.run(state)

    ensemble = normalize(prompt_embeddings.mean(1))
    top1, top5 = accuracies(images, labels, ensemble)
    assert result == {"accuracy": top1, "top5_accuracy": top5, "num_examples": n}
    plain_mean = accuracies(images, labels, prompt_embeddings.mean(1))
    assert plain_mean != (top1, top5)  # the data tell the two ensembles apart
    np.testing.assert_allclose(np.asarray(ev.class_embeddings(state)), ensemble, atol=1e-6)
    assert 0.2 < top1 < 1.0


def test_fewer_than_five_classes_have_no_top5(experiment, evaluator, monkeypatch):
    exp, state = experiment
    names = NAMES[:3]
    prompts = templates.prompts(names, ["{}"])
    monkeypatch.setattr(tokenizers, "get", lambda spec: IdTokenizer(prompts.index))
    eye = jnp.eye(3, dtype=jnp.float32)
    encoders = {"image_embedding": lambda model, extra, batch: batch["image"],
                "text_embedding": lambda model, extra, batch: eye[batch["text"][:, 0]]}
    labels = np.array([0, 1, 2, 2, 1], np.int32)
    images = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 0]]  # the last two are wrong
    ev = evaluator(exp, encoders, {"image": images, "label": labels}, class_names=names,
                   templates="plain")
    assert ev.run(state) == {"accuracy": 0.6, "num_examples": 5.0}


def test_template_and_class_name_sets():
    clip = templates.TEMPLATES["clip_imagenet"]
    assert len(clip) == len(set(clip)) == 80
    assert all(t.count("{}") == 1 for t in clip)
    assert clip[0] == "a bad photo of a {}." and clip[-1] == "a tattoo of the {}."
    assert set(templates.TEMPLATES["clip_imagenet_7"]) < set(clip)
    assert templates.templates("photo") == ("a photo of a {}.",)
    assert templates.templates("plain") == ("{}",)
    assert "a {} in the center" in templates.templates("shapes")
    assert templates.class_names("shapes") == shapes.CLASS_NAMES
    assert set(templates.class_names("shapes_heldout")) < set(shapes.CLASS_NAMES)
    assert templates.prompts(["red circle", "blue star"], ["a {}", "{}!"]) == [
        "a red circle", "red circle!", "a blue star", "blue star!"]
    with pytest.raises(ValueError, match=r"evals\.z\.templates: .*exactly once.*'a photo'"):
        templates.templates(["a {} photo", "a photo"], "evals.z.templates")
    with pytest.raises(ValueError, match=r"evals\.z\.class_names='imagenet' is not a named set"):
        templates.class_names("imagenet", "evals.z.class_names")
    with pytest.raises(ValueError, match=r"names a class twice: \['cat'\]"):
        templates.class_names(["cat", "dog", "cat"])


def test_checks_name_the_key(experiment, evaluator, monkeypatch):
    exp, _ = experiment
    prompts = templates.prompts(NAMES, TEMPLATES)
    monkeypatch.setattr(tokenizers, "get", lambda spec: IdTokenizer(prompts.index))
    table = jnp.zeros((len(prompts), 6))
    encoders = {"image_embedding": lambda model, extra, batch: batch["image"],
                "text_embedding": lambda model, extra, batch: table[batch["text"][:, 0]]}
    with pytest.raises(ValueError, match=r"evals\.zs lacks evals\.zs\.tokenizer"):
        evaluator(exp, encoders, {}, tokenizer=None)
    with pytest.raises(ValueError, match=r"evals\.zs\.text_length=0"):
        evaluator(exp, encoders, {}, text_length=0)
    with pytest.raises(ValueError, match=r"evals\.zs\.templates"):
        evaluator(exp, encoders, {}, templates=["a photo"])
    with pytest.raises(ValueError, match=r"evals\.zs\.class_names='birds'"):
        evaluator(exp, encoders, {}, class_names="birds")
    with pytest.raises(ValueError, match=r"evals\.zs\.image_encoder='features'"):
        evaluator(exp, encoders, {}, image_encoder="features")
    monkeypatch.setattr(tokenizers, "get", lambda spec: (_ for _ in ()).throw(
        ValueError(f"unknown tokenizer scheme in {spec!r}")))
    with pytest.raises(ValueError, match=r"evals\.zs\.tokenizer='wordpiece': unknown"):
        evaluator(exp, encoders, {}, tokenizer="wordpiece")
    monkeypatch.setattr(tokenizers, "get", lambda spec: IdTokenizer(prompts.index))
    ev = evaluator(exp, encoders, {})
    image = np.zeros((6,), np.float32)
    with pytest.raises(ValueError, match=r"evals\.zs\.pp=.*integer scalar 'label'"):
        ev.check({"image": image, "label": np.float32(1), "_mask": True})
    with pytest.raises(ValueError, match=r"evals\.zs\.pp=.*'label'"):
        ev.check({"image": image, "_mask": True})
    with pytest.raises(ValueError, match=r"evals\.zs: image_encoder gives .*\(16, 5\)"):
        ev.check({"image": np.zeros((5,), np.float32), "label": np.int64(1), "_mask": True})


@pytest.fixture
def shapes_experiment(small_vit_config, monkeypatch):
    """make(**eval_cfg) -> an Experiment whose one evaluator `zs` is zero-shot on the small
    `shapes`, with oracle encoders: an image is the one-hot of its label over all 30 names, a
    prompt the one-hot of the class name in it."""
    data_dir = small_vit_config().input.data_dir
    shapes_dir = builtins.prepare_builtin("shapes", data_dir, num_train=240, num_test=48,
                                          num_heldout=48)
    names = shapes.CLASS_NAMES

    def class_of(prompt):
        return next((i for i, name in enumerate(names) if f" {name}" in f" {prompt}"), 0)

    def encoders(self):
        del self
        return {"image_embedding": lambda model, extra, batch: jax.nn.one_hot(batch["label"], 30),
                "text_embedding": lambda model, extra, batch: jax.nn.one_hot(
                    batch["text"][:, 0], 30)}

    monkeypatch.setattr(Classification, "encoders", encoders)
    monkeypatch.setattr(tokenizers, "get", lambda spec: IdTokenizer(class_of))

    def make(**cfg):
        config = small_vit_config()
        config.evals = ml_collections.ConfigDict({"zs": dict(dict(
            type="zero_shot", dataset=shapes_dir, split="heldout",
            pp="decode|keep('image', 'label')", batch_size=40, tokenizer="ids", text_length=2,
            class_names="shapes", templates="shapes"), **cfg)})
        return Experiment(config)

    return make


def test_labels_map_by_name_to_a_subset_of_classes(shapes_experiment):
    """On `heldout`, with only the 5 held-out names, dataset labels (indices into all 30 names)
    are mapped to indices into those 5: an oracle scores 1; with all 30 names, too."""
    for class_names, top5 in (("shapes_heldout", 1.0), ("shapes", 1.0)):
        exp = shapes_experiment(class_names=class_names)
        result = exp.evaluators["zs"].run(exp.init_state(seed=0))
        assert result == {"accuracy": 1.0, "top5_accuracy": top5, "num_examples": 48.0}
    # `test` holds no held-out combination as its first object: nothing to count.
    exp = shapes_experiment(class_names="shapes_heldout", split="test")
    with pytest.raises(ValueError, match=r"evals\.zs: no example .* has a label among"):
        exp.evaluators["zs"].run(exp.init_state(seed=0))


def test_class_names_must_fit_the_dataset_labels(shapes_experiment):
    with pytest.raises(ValueError, match=r"evals\.zs\.class_names has 2 names but the dataset's "
                                         r"label has 30.*\['red dot'\]"):
        shapes_experiment(class_names=["red circle", "red dot"])
