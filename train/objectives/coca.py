"""CoCa objective: contrastive loss on the pooled embeddings plus the captioning loss.

L = contrastive_weight * L_con + caption_weight * L_cap, with the paper's weights 1 and 2
(Yu et al. 2022, Eq. 4 and Sec. 4.1: lambda_Con = 1, lambda_Cap = 2). The contrastive part is
any of the contrastive objective's losses (`loss.type`, `loss.impl`: softmax as in the paper, or
sigmoid), computed sharded like CLIP's; the captioning loss is a per-token cross-entropy averaged
over the global batch's caption tokens.
"""

from __future__ import annotations

from flax import nnx

from vistax.models import coca
from vistax.train.objectives.contrastive import Contrastive, tower_config


class CoCa(Contrastive):
    """Contrastive captioner; evaluators see the same encoders as CLIP's."""

    def validate(self) -> None:
        super().validate()
        for key in ("caption_weight", "contrastive_weight"):
            value = self.config.loss.get(key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"loss.{key}={value!r} must be a number >= 0.")

    @property
    def model_config(self) -> coca.CoCaConfig:
        return coca.CoCaConfig.from_dict(tower_config(self.config))

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return coca.CoCa(self.model_config, rngs=rngs)

    def loss(self, model, extra, batch, rng, step):
        del extra, step
        cfg = self.config.loss
        zimg, ztxt, logits = model(batch["image"], batch["text"], rng=rng)
        contrastive, metrics = self.contrastive_loss(model, zimg, ztxt)
        caption, accuracy = coca.caption_loss(logits, batch["text"], model.cfg.text.eos_id)
        loss = cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
        return loss, dict(metrics, contrastive_loss=contrastive, caption_loss=caption,
                          caption_accuracy=accuracy), {}

    def import_weights(self, state_dict: dict) -> dict:
        """Not CLIP's: a CoCa checkpoint has decoders a CLIP state dict lacks."""
        raise ValueError("objective 'coca' cannot import foreign weight files (CLIP weights load "
                         "with objective 'contrastive').")

    def encoders(self):
        encoders = super().encoders()

        def features(model, extra, batch):
            del extra
            return model.encode_image(batch["image"])[1]["pooled"]

        return dict(encoders, features=features)

    def flops_per_example(self) -> float:
        cfg = self.model_config
        return coca.flops_per_example(cfg, self.config.get("text_length") or cfg.text.max_len)
