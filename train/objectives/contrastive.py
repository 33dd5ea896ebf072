"""Image-text contrastive pretraining: CLIP (softmax loss), SigLIP (sigmoid loss), LiT.

Config keys: `model` (models/two_towers.py: `image` ViT keys, `text` text-tower keys,
`embed_dim`, `proj_bias`, `log_temperature_init`, `bias_init`), `tokenizer` (spec; fills
`model.text.vocab_size`/`eos_id` when unset), `loss.type` (softmax | sigmoid), `loss.impl`
(dense | sharded: all-gather for softmax, ring of collective permutes for sigmoid) and
`loss.max_log_temperature` (CLIP clips the temperature at 100, i.e. log t <= ln 100, after every
step: Radford et al. 2021, Sec. 2.5; None for no clip). LiT (Zhai et al. 2022) is this objective
with a tower locked through `param_groups.freeze`.

The batch holds `image` (B, H, W, C) and `text` (B, L) token ids, row i of each a pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vistax.models import convert, two_towers
from vistax.train.objectives import contrastive_loss
from vistax.train.objectives.base import Objective

LOSSES = ("softmax", "sigmoid")
IMPLS = ("dense", "sharded")
VOCAB_MULTIPLE = 128


def tower_config(config) -> dict:
    """config.model as a dict, text vocab_size/eos_id filled in from `config.tokenizer`."""
    model = config.model.to_dict()
    spec = config.get("tokenizer")
    if spec:
        from vistax.data import tokenizers  # regex/ftfy/sentencepiece only for text objectives
        tok = tokenizers.get(spec)
        text = model["text"]
        if text.get("vocab_size") is None:
            # Rounded up so the embedding table splits over tensor-parallel devices (unused rows
            # are never looked up); CLIP's 49408 and 32k SentencePiece vocabularies already are.
            text["vocab_size"] = -(-tok.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        elif text["vocab_size"] < tok.vocab_size:
            raise ValueError(f"model.text.vocab_size={text['vocab_size']} is smaller than the "
                             f"vocabulary of tokenizer={spec!r} ({tok.vocab_size}).")
        if text.get("eos_id") is None:
            text["eos_id"] = tok.eos_id
        elif text["eos_id"] != tok.eos_id:
            raise ValueError(f"model.text.eos_id={text['eos_id']} differs from the end-of-text "
                             f"id {tok.eos_id} of tokenizer={spec!r}.")
    return model


def clamp_log_temperature(params, maximum: float | None):
    """params with `log_temperature` clipped at `maximum` (a new State; None: unchanged)."""
    if maximum is None:
        return params

    def clip(path, value):
        top = path[0]
        if getattr(top, "key", getattr(top, "name", None)) == "log_temperature":
            return jnp.minimum(value, maximum)
        return value

    return jax.tree_util.tree_map_with_path(clip, params)


class Contrastive(Objective):
    """Two towers trained so that matching image-text pairs score above all others."""

    def validate(self) -> None:
        loss = self.config.loss
        if loss.type not in LOSSES:
            raise ValueError(f"loss.type={loss.type!r} is not one of {LOSSES}.")
        if loss.impl not in IMPLS:
            raise ValueError(f"loss.impl={loss.impl!r} is not one of {IMPLS}.")
        cfg = self.model_config
        if (loss.type == "sigmoid") != (cfg.bias_init is not None):
            raise ValueError(f"loss.type={loss.type!r} with model.bias_init={cfg.bias_init}: the "
                             "sigmoid loss needs a learned bias (SigLIP: -10), softmax has none.")

    @property
    def model_config(self) -> two_towers.TwoTowersConfig:
        return two_towers.TwoTowersConfig.from_dict(tower_config(self.config))

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return two_towers.TwoTowers(self.model_config, rngs=rngs)

    def contrastive_loss(self, model, zimg: jax.Array, ztxt: jax.Array):
        """(loss, metrics) of embeddings under the configured loss."""
        cfg = self.config.loss
        temperature = jnp.exp(model.log_temperature[...])
        metrics = {"temperature": temperature,
                   "positive_similarity": jnp.mean(jnp.sum(zimg * ztxt, axis=-1))}
        if cfg.type == "softmax":
            fn = (contrastive_loss.softmax_sharded if cfg.impl == "sharded"
                  else contrastive_loss.softmax_dense)
            return fn(zimg, ztxt, temperature), metrics
        bias = model.bias[...]
        fn = contrastive_loss.sigmoid_ring if cfg.impl == "sharded" else contrastive_loss.sigmoid_dense
        return fn(zimg, ztxt, temperature, bias), dict(metrics, bias=bias)

    def loss(self, model, extra, batch, rng, step):
        del extra, step
        zimg, ztxt = model(batch["image"], batch["text"], rng=rng)
        loss, metrics = self.contrastive_loss(model, zimg, ztxt)
        return loss, metrics, {}

    def after_update(self, params, extra, stats, step):
        del stats, step
        return clamp_log_temperature(params, self.config.loss.get("max_log_temperature")), extra

    def import_weights(self, state_dict: dict) -> dict:
        """CLIP weights: a Hugging Face `CLIPModel` or an open_clip / OpenAI CLIP state dict
        (format told by the key names; models/convert.py)."""
        return convert.clip_from_state_dict(state_dict, self.model_config)

    def encoders(self):
        def image_embedding(model, extra, batch):
            del extra
            return model.encode_image(batch["image"])[0]

        def text_embedding(model, extra, batch):
            del extra
            return model.encode_text(batch["text"])[0]

        def features(model, extra, batch):
            del extra
            return model.image(batch["image"])[0]

        return {"image_embedding": image_embedding, "text_embedding": text_embedding,
                "features": features}

    def flops_per_example(self) -> float:
        cfg = self.model_config
        return two_towers.flops_per_example(cfg, self.config.get("text_length") or cfg.text.max_len)
