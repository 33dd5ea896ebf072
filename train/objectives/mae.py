"""Masked autoencoder pretraining (He et al. 2021): `config.model` holds the encoder's ViT keys
(as configs/vit.py, so fine-tuning configs load the encoder by name), `config.mae` the masking,
the decoder and the target (models/mae.py: MAEConfig)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vistax.models import mae
from vistax.train.objectives.base import Objective

# Fixed key of the masks the `reconstruction` encoder draws: the same patches are hidden at
# every evaluation, so pictures of successive checkpoints compare like with like.
RECONSTRUCTION_SEED = 0


class MAE(Objective):
    """Reconstructs masked patches of `image`; exposes `features` (the encoder's pooled output on
    the whole image) and `reconstruction` (for pictures) to evaluators."""

    @property
    def mae_config(self) -> mae.MAEConfig:
        return mae.MAEConfig.from_config(self.config.model.to_dict(), self.config.mae.to_dict())

    def validate(self) -> None:
        mae.MAEConfig.from_config(self.config.model.to_dict(), self.config.mae.to_dict())

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return mae.MAE(self.mae_config, rngs=rngs)

    def loss(self, model, extra, batch, rng, step):
        del extra, step
        loss, _, _, mask = model.loss(batch["image"], rng)
        return loss, {"mask_fraction": mask.mean()}, {}

    def encoders(self):
        def features(model, extra, batch):
            del extra
            return model.vit(batch["image"])[0]

        def reconstruction(model, extra, batch):
            """Pixels predicted for every patch, in image space, and the mask (1 = hidden).

            With normalised-pixel targets the prediction is mapped back with each patch's own
            mean and variance, which the model never saw for hidden patches: that is how such
            pictures are usually drawn, and only the hidden patches' shape is predicted."""
            del extra
            images = batch["image"]
            key = jax.random.key(RECONSTRUCTION_SEED)
            pred, mask = model(images, key, train=False)
            if model.cfg.norm_pix_loss:
                mean, var = mae.patch_statistics(mae.patchify(images, model.cfg.encoder.patch_size))
                pred = pred * jnp.sqrt(var + mae.NORM_PIX_EPS) + mean
            return {"pred": pred.astype(jnp.float32), "mask": mask}

        return {"features": features, "reconstruction": reconstruction}

    def flops_per_example(self) -> float:
        return mae.flops_per_example(self.mae_config)
