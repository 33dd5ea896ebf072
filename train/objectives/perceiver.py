"""Perceiver / Perceiver IO training: the decoder's kind picks the task (models/perceiver.py).

- `classification` / `mean`: softmax cross-entropy on `label` (or one-hot `labels`), with
  label smoothing (config.loss.label_smoothing), from raw pixels or any other inputs.
- `mlm`: masked byte modelling on the bytes input named by model.decoder.modality (Perceiver IO
  Sec. 4.1, BERT's recipe, Devlin et al. 2019 Sec. 3.1): loss.mask_rate (15%) of the content
  bytes are chosen; of those 80% become [MASK], 10% a random byte, 10% stay; cross-entropy on the
  chosen positions only. Other inputs (an image) are context the bytes may be predicted from.
- `dense`: autoencoding through the latent bottleneck, one query per token of an array input,
  mean squared error against its patch values.

And Perceiver AR (models/perceiver_ar.py): next-byte prediction on the last num_latents
positions of each max_length + 1 window of `text`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vistax.models import convert, perceiver, perceiver_ar
from vistax.train.objectives.base import Objective
from vistax.train.objectives.classification import class_targets

# Fixed key of the masks the evaluation encoder draws: every evaluation scores the same bytes.
EVAL_MASK_SEED = 0


def mask_bytes(ids: jax.Array, rng: jax.Array, *, rate: float, first_content_id: int,
               vocab_size: int, mask_id: int) -> tuple[jax.Array, jax.Array]:
    """BERT corruption of (B, L) ids: (corrupted ids, chosen (B, L) bool).

    Only content ids (>= first_content_id: not pad/bos/eos) are chosen, each with probability
    `rate`; chosen ids become `mask_id` (80%), a random content id (10%) or stay (10%)."""
    k_choose, k_kind, k_random = jax.random.split(rng, 3)
    content = ids >= first_content_id
    chosen = content & jax.random.bernoulli(k_choose, rate, ids.shape)
    kind = jax.random.uniform(k_kind, ids.shape)
    random_ids = jax.random.randint(k_random, ids.shape, first_content_id, vocab_size)
    corrupted = jnp.where(kind < 0.8, mask_id, jnp.where(kind < 0.9, random_ids, ids))
    return jnp.where(chosen, corrupted, ids).astype(ids.dtype), chosen


class Perceiver(Objective):
    """Perceiver / Perceiver IO on the modalities of `config.model.inputs`."""

    @property
    def perceiver_config(self) -> perceiver.PerceiverConfig:
        return perceiver.PerceiverConfig.from_dict(self.config.model.to_dict())

    def validate(self) -> None:
        cfg = self.perceiver_config
        smoothing = self._loss_cfg("label_smoothing", 0.0)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing={smoothing} must lie in [0, 1).")
        rate = self._loss_cfg("mask_rate", 0.15)
        if cfg.decoder.kind == "mlm" and not 0.0 < rate < 1.0:
            raise ValueError(f"loss.mask_rate={rate} must lie in (0, 1).")

    def _loss_cfg(self, key, default):
        loss = self.config.get("loss") or {}
        return loss.get(key, default)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return perceiver.Perceiver(self.perceiver_config, rngs=rngs)

    def _mlm(self, model, batch, rng, *, train_rng):
        """(per-example nll sums, correct counts, chosen counts) of masked byte modelling."""
        dec = model.cfg.decoder
        spec = model.cfg.modality(dec.modality)
        ids = batch[dec.modality]
        k_mask, k_model = jax.random.split(rng)
        corrupted, chosen = mask_bytes(
            ids, k_mask, rate=self._loss_cfg("mask_rate", 0.15),
            first_content_id=self._loss_cfg("first_content_id", 3),
            vocab_size=spec.vocab_size, mask_id=spec.vocab_size)
        logits, _ = model({**batch, dec.modality: corrupted},
                          rng=k_model if train_rng else None)
        logits = logits.astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
        weights = chosen.astype(jnp.float32)
        correct = (logits.argmax(-1) == ids).astype(jnp.float32)
        return (nll * weights).sum(-1), (correct * weights).sum(-1), weights.sum(-1)

    def loss(self, model, extra, batch, rng, step):
        del extra, step
        kind = model.cfg.decoder.kind
        if kind == "mlm":
            nll, correct, count = self._mlm(model, batch, rng, train_rng=True)
            total = jnp.maximum(count.sum(), 1.0)
            return nll.sum() / total, {"masked_accuracy": correct.sum() / total,
                                       "masked_per_example": count.mean()}, {}
        out, _ = model(batch, rng=rng)
        out = out.astype(jnp.float32)
        if kind == "dense":
            name = model.cfg.decoder.modality
            target = model.inputs[name].tokens(batch[name]).astype(jnp.float32)
            return jnp.mean(jnp.square(out - target)), {}, {}
        targets = class_targets(batch, model.cfg.decoder.num_classes)
        smoothed = optax.smooth_labels(targets, self._loss_cfg("label_smoothing", 0.0))
        loss = optax.softmax_cross_entropy(out, smoothed).mean()
        return loss, {"accuracy": (out.argmax(-1) == targets.argmax(-1)).mean()}, {}

    def import_weights(self, state_dict: dict) -> dict:
        """transformers' PyTorch Perceiver (image classification with Fourier features, masked
        language modelling) -> this model's parameters."""
        return convert.perceiver_from_hf(state_dict, self.perceiver_config)

    def encoders(self):
        def logits(model, extra, batch):
            del extra
            return model(batch)[0]

        def features(model, extra, batch):  # (B, D): the decoder's query output or mean latents
            del extra
            return model(batch)[1]["features"]

        def masked_bytes(model, extra, batch):
            """Per-example sums for the `metrics` evaluator, masks from a fixed key."""
            del extra
            nll, correct, count = self._mlm(model, batch, jax.random.key(EVAL_MASK_SEED),
                                            train_rng=False)
            return {"masked_accuracy": (correct, count), "masked_loss": (nll, count)}

        kind = self.perceiver_config.decoder.kind
        if kind == "mlm":
            return {"masked_bytes": masked_bytes, "features": features}
        if kind == "dense":
            return {"features": features}
        return {"logits": logits, "features": features}

    def flops_per_example(self) -> float:
        return perceiver.flops_per_example(self.perceiver_config)


def right_align(tokens: jax.Array, pad_id: int) -> jax.Array:
    """Rows of [content, pad...] -> [pad..., content]: short texts end at the window's end, where
    Perceiver AR's latents are (padding is masked out of its attention)."""
    length = tokens.shape[1]
    shift = jnp.sum(tokens == pad_id, axis=1, keepdims=True)
    index = (jnp.arange(length)[None, :] - shift) % length
    return jnp.take_along_axis(tokens, index, axis=1)


class PerceiverAR(Objective):
    """Next-token prediction with Perceiver AR on `batch[loss.key]` (default 'text'), rows of
    max_length + 1 ids (inputs and the targets shifted by one)."""

    @property
    def ar_config(self) -> perceiver_ar.PerceiverARConfig:
        return perceiver_ar.PerceiverARConfig.from_dict(self.config.model.to_dict())

    def validate(self) -> None:
        self.ar_config  # pylint: disable=pointless-statement

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return perceiver_ar.PerceiverAR(self.ar_config, rngs=rngs)

    def _key(self) -> str:
        loss = self.config.get("loss") or {}
        return loss.get("key", "text")

    def _sums(self, model, batch, rng):
        cfg = model.cfg
        key = self._key()
        if key not in batch:
            raise KeyError(f"Perceiver AR reads batch[{key!r}] (loss.key); the batch has "
                           f"{sorted(batch)}.")
        tokens = batch[key]
        if tokens.shape[1] != cfg.max_length + 1:
            raise ValueError(f"Perceiver AR with model.max_length={cfg.max_length} needs rows of "
                             f"{cfg.max_length + 1} ids in batch[{key!r}] (inputs plus the last "
                             f"target); got {tokens.shape}.")
        tokens = right_align(tokens, cfg.pad_id)
        logits = model(tokens[:, :-1], rng=rng).astype(jnp.float32)
        targets = tokens[:, cfg.max_length - cfg.num_latents + 1:]
        weights = (targets != cfg.pad_id).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (logits.argmax(-1) == targets).astype(jnp.float32)
        return (nll * weights).sum(-1), (correct * weights).sum(-1), weights.sum(-1)

    def loss(self, model, extra, batch, rng, step):
        del extra, step
        nll, correct, count = self._sums(model, batch, rng)
        total = jnp.maximum(count.sum(), 1.0)
        loss = nll.sum() / total
        return loss, {"accuracy": correct.sum() / total,
                      "bits_per_byte": loss / np.log(2.0)}, {}

    def encoders(self):
        def next_token(model, extra, batch):
            del extra
            nll, correct, count = self._sums(model, batch, None)
            return {"accuracy": (correct, count), "loss": (nll, count),
                    "bits_per_byte": (nll / np.log(2.0), count)}

        return {"next_token": next_token}

    def flops_per_example(self) -> float:
        return perceiver_ar.flops_per_example(self.ar_config)
