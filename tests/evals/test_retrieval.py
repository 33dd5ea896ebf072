"""The retrieval evaluator's recalls equal a brute-force numpy computation (argsort of the whole
similarity matrix), with K captions per image and a padded last batch, on 8 devices and on 1;
padding is never a query nor retrieved; a collapsed model scores 0; pp and keys are checked."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vistax.data import builtins, pipeline
from vistax.evals import EvalContext
from vistax.evals.retrieval import RetrievalEvaluator
from vistax.train.experiment import Experiment
from vistax.train.objectives.classification import Classification


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(images, texts, owner, ks):
    """Recalls from the full (images x texts) matrix: top-k by argsort."""
    sim = images.astype(np.float64) @ texts.astype(np.float64).T
    out = {}
    for k in ks:
        i2t = [np.any(owner[np.argsort(-sim[i])[:k]] == i) for i in range(len(images))]
        t2i = [owner[j] in np.argsort(-sim[:, j])[:k] for j in range(len(texts))]
        out[f"i2t_recall@{k}"] = np.mean(i2t)
        out[f"t2i_recall@{k}"] = np.mean(t2i)
    return out


def table_encoders(text_table):
    """Image embeddings come in the batch; a caption's embedding is looked up by its id."""
    return {"image_embedding": lambda model, extra, batch: batch["image"],
            "text_embedding": lambda model, extra, batch: text_table[batch["text"][:, 0]]}


@pytest.fixture
def evaluator(array_context):
    """make(exp, encoders, arrays, **cfg) -> a RetrievalEvaluator over the arrays."""

    def make(exp, encoders, arrays, **cfg):
        cfg = ml_collections.ConfigDict(dict(dict(type="retrieval", dataset="synthetic",
                                                  split="test", pp="synthetic", batch_size=16),
                                             **cfg))
        return RetrievalEvaluator("ret", cfg, array_context(exp, encoders, arrays))

    return make


@pytest.mark.parametrize("captions", [3, 1])
def test_recalls_equal_brute_force(experiment, evaluator, captions):
    exp, state = experiment
    rng = np.random.default_rng(captions)
    n, dim, length = 45, 8, 4  # 45 images in batches of 16: the last one holds 3 padding rows
    images = normalize(rng.normal(size=(n, dim))).astype(np.float32)
    owner = np.repeat(np.arange(n), captions)
    texts = normalize(images[owner] + 1.2 * rng.normal(size=(n * captions, dim))).astype(np.float32)
    tokens = np.zeros((n, captions, length), np.int32)
    tokens[:, :, 0] = np.arange(n * captions).reshape(n, captions)  # caption id
    if captions == 1:
        tokens = tokens[:, 0]  # (L,) per example: one caption
    ks = (1, 5, 10)
    ev = evaluator(exp, table_encoders(jnp.asarray(texts)), {"image": images, "text": tokens})
    ev.check({"image": images[0], "text": tokens[0], "_mask": np.bool_(True)})
    result = ev.run(state)

    expected = brute_force(images, texts, owner, ks)
    assert result == pytest.approx({**expected, "num_images": n, "num_texts": n * captions},
                                   abs=1e-12)
    assert 0 < result["i2t_recall@1"] < result["i2t_recall@10"] < 1  # not degenerate
    assert 0 < result["t2i_recall@1"] < result["t2i_recall@10"] < 1


def test_collapsed_model_scores_zero(experiment, evaluator):
    """Every similarity equal: ties count against the true match, so no recall is reached."""
    exp, state = experiment
    n, captions = 20, 2
    images = np.ones((n, 4), np.float32) / 2
    tokens = np.zeros((n, captions, 3), np.int32)
    ev = evaluator(exp, table_encoders(jnp.full((1, 4), 0.5)), {"image": images, "text": tokens},
                   ks=[1, 10])
    result = ev.run(state)
    assert result == {"i2t_recall@1": 0.0, "i2t_recall@10": 0.0, "t2i_recall@1": 0.0,
                      "t2i_recall@10": 0.0, "num_images": 20.0, "num_texts": 40.0}


def test_padding_is_never_retrieved(experiment, evaluator):
    """A padded batch repeats real rows; were they candidates, they would tie with (and rank
    before) the real ones. Here 9 images: every recall@1 is exact, so the repeats are out."""
    exp, state = experiment
    n = 9
    images = np.eye(n, 16, dtype=np.float32)
    tokens = np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 2), np.int32)
    ev = evaluator(exp, table_encoders(jnp.asarray(images)), {"image": images, "text": tokens},
                   ks=[1])
    result = ev.run(state)
    assert result == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0, "num_images": 9.0,
                      "num_texts": 9.0}


def test_similarity_blocks_are_sharded():
    """The recall program's per-device temporaries (similarity blocks of one batch of queries
    against all candidates) shrink with the devices that share the rows: 8 devices need under
    a quarter of what 1 device needs for the same 1024 images and 4096 captions."""
    def temp_bytes(devices):
        mesh = Mesh(np.asarray(devices).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
        batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        ctx = EvalContext(compile=lambda fn, **kw: None, encoders=table_encoders(None),
                          global_batch=None, data_dir=None, process_index=0, process_count=1,
                          batch_sharding=batch_sharding)
        ev = RetrievalEvaluator("ret", ml_collections.ConfigDict(dict(
            type="retrieval", dataset="synthetic", split="test", pp="synthetic",
            batch_size=512)), ctx)
        put = functools.partial(jax.device_put, device=batch_sharding)
        images = [put(np.zeros((512, 8), np.float32)) for _ in range(2)]
        texts = [put(np.zeros((512, 4, 8), np.float32)) for _ in range(2)]
        masks = [put(np.ones((512,), bool)) for _ in range(2)]
        memory = ev._recalls.lower(images, texts, masks).compile().memory_analysis()
        if memory is None:
            pytest.skip("no memory analysis on this backend")
        return memory.temp_size_in_bytes

    one, eight = temp_bytes(jax.devices()[:1]), temp_bytes(jax.devices()[:8])
    assert eight * 4 < one
    assert eight < 1024 * 4096 * 4  # under one full (images x texts) float32 matrix


def test_checks_name_the_key(experiment, evaluator):
    exp, _ = experiment
    encoders = table_encoders(jnp.zeros((4, 8)))
    arrays = {}
    with pytest.raises(ValueError, match=r"evals\.ret\.ks"):
        evaluator(exp, encoders, arrays, ks=[0, 5])
    with pytest.raises(ValueError, match=r"evals\.ret\.text_encoder='captions'.*image_embedding"):
        evaluator(exp, encoders, arrays, text_encoder="captions")
    with pytest.raises(ValueError, match=r"evals\.ret lacks evals\.ret\.pp"):
        evaluator(exp, encoders, arrays, pp=None)
    ev = evaluator(exp, encoders, arrays)
    image = np.zeros((8,), np.float32)
    with pytest.raises(ValueError, match=r"evals\.ret\.pp=.*integer 'text'"):
        ev.check({"image": image, "caption": np.zeros((4,), np.int32), "_mask": True})
    with pytest.raises(ValueError, match=r"evals\.ret\.pp=.*integer 'text'"):
        ev.check({"image": image, "text": np.zeros((4,), np.float32), "_mask": True})
    with pytest.raises(ValueError, match=r"evals\.ret: image_encoder gives \(16, 3\)"):
        ev.check({"image": np.zeros((3,), np.float32), "text": np.zeros((4,), np.int32),
                  "_mask": True})


def test_end_to_end_on_shapes_captions(small_vit_config, monkeypatch):
    """Built by the Experiment from a config (pre-flight check on the real pp), over the real
    padded eval pipeline with byte-tokenized captions: equal to brute force on the same data."""
    data_dir = small_vit_config().input.data_dir
    shapes_dir = builtins.prepare_builtin("shapes", data_dir, num_train=240, num_test=48,
                                          num_heldout=48)
    rng = np.random.default_rng(0)
    image_proj = rng.normal(size=(64 * 64 * 3, 16)).astype(np.float32) / 100
    byte_proj = rng.normal(size=(259, 16)).astype(np.float32)

    def embed_images(images):
        return images.reshape(len(images), -1).astype(np.float32) @ image_proj

    def embed_texts(tokens):
        return np.eye(259, dtype=np.float32)[tokens].sum(1) @ byte_proj

    def encoders(self):
        del self
        return {"image_embedding": lambda model, extra, batch: (
                    batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32)
                    @ jnp.asarray(image_proj)),
                "text_embedding": lambda model, extra, batch: (
                    jax.nn.one_hot(batch["text"], 259).sum(1) @ jnp.asarray(byte_proj))}

    monkeypatch.setattr(Classification, "encoders", encoders)
    pp = "decode|tokenize('bytes', 40, key='caption', out='text')|keep('image', 'text')"
    config = small_vit_config()
    config.evals = ml_collections.ConfigDict({"ret": dict(
        type="retrieval", dataset=shapes_dir, split="test", pp=pp, batch_size=40, ks=[1, 5, 10])})
    exp = Experiment(config)
    result = exp.evaluators["ret"].run(exp.init_state(seed=0))

    split = next(iter(pipeline.eval_iterator(dataset=shapes_dir, split="test", pp=pp,
                                             global_batch_size=48, process_index=0,
                                             process_count=1)))
    assert split["_mask"].all()
    images = normalize(embed_images(split["image"]))
    texts = normalize(embed_texts(split["text"]))
    expected = brute_force(images, texts, np.arange(48), (1, 5, 10))
    assert result == pytest.approx({**expected, "num_images": 48, "num_texts": 48}, abs=1e-12)
    assert result["i2t_recall@10"] > 0 and result["t2i_recall@10"] > 0
