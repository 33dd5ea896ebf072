"""Zero-shot classification: images against text embeddings of prompted class names (CLIP).

Each class's prompts (`templates` with the class name in "{}") go through the text encoder once
per run, on device; a class's embedding is the mean of its prompts' L2-normalised embeddings,
renormalised (CLIP's prompt ensembling, Radford et al. 2021, Sec. 3.1.4). Each image's
normalised embedding is scored against the replicated (classes, D) matrix on device, and only
the counts of correct top-1 / top-5 predictions over unmasked rows reach the host.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vistax.data import pipeline
from vistax.evals import templates as templates_lib
from vistax.evals.base import Evaluator, encoder, require, require_image_and_label, to_host
from vistax.models.layers import l2_normalize


def _ensemble(embeddings: list[jax.Array], *, num_classes: int, num_templates: int) -> jax.Array:
    """Per-batch prompt embeddings (class-major, padded) -> (classes, D) renormalised means."""
    x = jnp.concatenate([l2_normalize(e) for e in embeddings], axis=0)
    x = x[:num_classes * num_templates].reshape(num_classes, num_templates, -1)
    return l2_normalize(jnp.mean(x, axis=1))


def _sums(totals, image_embedding, classes, label, mask, label_table, *, top5: bool):
    """`totals` (None at first) plus the batch's counts of correct predictions and of counted
    rows."""
    logits = jnp.einsum("bd,cd->bc", l2_normalize(image_embedding), classes,
                        precision=jax.lax.Precision.HIGHEST)
    label = label.astype(jnp.int32)
    if label_table is not None:  # dataset label -> index in class_names, -1: not evaluated
        inside = (label >= 0) & (label < label_table.shape[0])
        label = jnp.where(inside, label_table[jnp.clip(label, 0, label_table.shape[0] - 1)], -1)
    counted = mask & (label >= 0)
    out = {"correct": jnp.sum((jnp.argmax(logits, axis=-1) == label) & counted),
           "count": jnp.sum(counted)}
    if top5:
        best = jax.lax.top_k(logits, 5)[1]
        out["correct_top5"] = jnp.sum(jnp.any(best == label[:, None], axis=-1) & counted)
    return out if totals is None else jax.tree.map(jnp.add, totals, out)


class ZeroShotEvaluator(Evaluator):
    """Top-1 (and top-5 with >= 5 classes) zero-shot accuracy over a whole labelled split.

    Keys: dataset, split, pp (must yield `image` and an integer `label`), batch_size (global;
    also the number of prompts per text-encoder call), every, tokenizer (a spec of
    data/tokenizers.py, as in the training pp), text_length, class_names and templates (a name
    in evals/templates.py or a list; templates hold "{}"), image_encoder and text_encoder (the
    objective's encoders; default 'image_embedding' and 'text_embedding').

    `label` indexes class_names. When the dataset's `label` is a ClassLabel with a different
    number of names that include every one of class_names (e.g. `shapes_heldout` on `shapes`),
    labels are mapped by name and examples of other classes are not counted.
    """

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        require(cfg, name, ("dataset", "split", "pp", "batch_size", "tokenizer", "text_length",
                            "class_names", "templates"))
        self.class_names = templates_lib.class_names(cfg.class_names, f"evals.{name}.class_names")
        self.templates = templates_lib.templates(cfg.templates, f"evals.{name}.templates")
        length = cfg.text_length
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"evals.{name}.text_length={length!r} must be a positive int.")
        image_encoder = encoder(ctx, name, cfg, "image_encoder", "image_embedding")
        text_encoder = encoder(ctx, name, cfg, "text_encoder", "text_embedding")

        prompts = templates_lib.prompts(self.class_names, self.templates)
        from vistax.data import tokenizers  # pylint: disable=import-outside-toplevel
        try:
            tokens = np.asarray(tokenizers.get(cfg.tokenizer).encode(prompts, length))
        except (ValueError, TypeError, OSError, ImportError) as e:
            raise ValueError(f"evals.{name}.tokenizer={cfg.tokenizer!r}: {e}") from e
        if tokens.shape != (len(prompts), length) or tokens.dtype.kind not in "iu":
            raise ValueError(f"evals.{name}.tokenizer={cfg.tokenizer!r} gave {tokens.dtype} "
                             f"{tokens.shape} for {len(prompts)} prompts of length {length}.")
        # Whole text batches, padded with copies of the first prompt; their embeddings are
        # sliced off before averaging.
        padded = math.ceil(len(prompts) / cfg.batch_size) * cfg.batch_size
        self._tokens = np.broadcast_to(tokens[:1], (padded, length)).astype(np.int32)
        self._tokens[:len(prompts)] = tokens
        self._token_batches = None  # global arrays, made on first use and kept

        self._embed_text = ctx.compile(
            lambda model, extra, batch: text_encoder(model, extra, {"text": batch["text"]}),
            outputs="device")
        self._embed_image = ctx.compile(image_encoder, outputs="device")
        self._ensemble = jax.jit(functools.partial(
            _ensemble, num_classes=len(self.class_names), num_templates=len(self.templates)),
            out_shardings=ctx.replicated)
        self._sums = jax.jit(functools.partial(_sums, top5=len(self.class_names) >= 5),
                             out_shardings=ctx.replicated)
        self._label_table = None  # set by check() when labels are mapped by name

    def check(self, example):
        key = f"evals.{self.name}.pp"
        require_image_and_label(key, self.cfg.pp, example)
        batch_size = self.cfg.batch_size
        image = self._embed_image.check(key, example, batch_size)
        text = self._embed_text.check(f"evals.{self.name}.text_length",
                                      {"text": self._tokens[0]}, batch_size)
        if (getattr(image, "ndim", 0) != 2 or getattr(text, "ndim", 0) != 2
                or image.shape[1] != text.shape[1]):
            raise ValueError(
                f"evals.{self.name}: image_encoder gives {getattr(image, 'shape', image)} and "
                f"text_encoder {getattr(text, 'shape', text)} per batch; zero-shot needs "
                "(batch, D) embeddings of one size D.")
        self._label_table = self._map_labels()

    def _map_labels(self) -> np.ndarray | None:
        """dataset label -> index in class_names (-1: left out), or None for labels as they are."""
        info = pipeline.dataset_info(self.cfg.dataset, data_dir=self.ctx.data_dir)
        names = info.class_names
        if names is None or len(names) == len(self.class_names):
            return None
        missing = [n for n in self.class_names if n not in names]
        if missing:
            raise ValueError(
                f"evals.{self.name}.class_names has {len(self.class_names)} names but the "
                f"dataset's label has {len(names)} ({names[:5]}...), and {missing[:5]} are not "
                "among them: give one name per dataset class, or a subset of its names.")
        index = {n: i for i, n in enumerate(self.class_names)}
        return np.asarray([index.get(n, -1) for n in names], np.int32)

    def class_embeddings(self, state) -> jax.Array:
        """(classes, D) ensembled text embeddings, replicated on the mesh."""
        if self._token_batches is None:
            size = self.cfg.batch_size
            self._token_batches = [self.ctx.global_array(self._tokens[i:i + size])
                                   for i in range(0, len(self._tokens), size)]
        return self._ensemble([self._embed_text(state, {"text": tokens})
                               for tokens in self._token_batches])

    def run(self, state):
        classes = self.class_embeddings(state)
        table = self._label_table
        if table is not None:
            table = jax.make_array_from_callback(table.shape, self.ctx.replicated,
                                                 lambda index: table[index])
        totals = None  # stays on device until the end
        for batch in self.ctx.batches(self.cfg):
            totals = self._sums(totals, self._embed_image(state, batch), classes, batch["label"],
                                batch["_mask"], table)
        totals = {k: int(v) for k, v in to_host(totals).items()}
        count = totals["count"]
        if not count:
            raise ValueError(f"evals.{self.name}: no example of {self.cfg.dataset!r} "
                             f"{self.cfg.split!r} has a label among evals.{self.name}.class_names.")
        out = {"accuracy": totals["correct"] / count}
        if "correct_top5" in totals:
            out["top5_accuracy"] = totals["correct_top5"] / count
        out["num_examples"] = float(count)
        return out
