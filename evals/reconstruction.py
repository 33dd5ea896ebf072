"""Masked-image reconstructions as a picture: original | masked | reconstruction | reconstruction
with the visible patches pasted back (MAE, He et al. 2021, Fig. 2-4), one row per image.

Images are the first `num_images` of a split plus, optionally, photos that ship with
scikit-image (`photos`, e.g. ("astronaut", "coffee", "chelsea")), which go through `photo_pp`
(default: `pp`; it must resize them to the model's size; see evals/pictures.py). Each run writes
`<workdir>/reconstructions/<name>_<step>.png` (process 0; never over an existing file) and
reports the mean squared error over hidden pixels, in the value space of the pp. With
normalised-pixel targets the objective maps predictions back with each hidden patch's true mean
and variance, so that error is not comparable with a raw-pixel model's (see
train/objectives/mae.py); the training loss is the comparable figure.

Keys: dataset, split, pp, batch_size (global; the images are taken from the first batch),
num_images (default 8), photos (default ()), photo_pp, value_range (the pp's output range,
default (-1, 1); `normalize(mean, std)` outputs are shown with `mean_std`), mean_std (optional
((mean...), (std...)) to undo a normalize op for display), cell_size (default 96 px), encoder
(default 'reconstruction': (model, extra, batch) -> {'pred': (B, L, p*p*C), 'mask': (B, L)}),
every.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vistax.evals import pictures
from vistax.evals.base import encoder
from vistax.models.mae import unpatchify


class ReconstructionEvaluator(pictures.PictureEvaluator):

    folder = "reconstructions"

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        reconstruct = encoder(ctx, name, cfg, "encoder", "reconstruction")
        rows = self.rows

        def outputs(model, extra, batch):  # only the rows drawn come back to the host
            out = reconstruct(model, extra, batch)
            return {"image": batch["image"][:rows].astype(jnp.float32),
                    "pred": out["pred"][:rows], "mask": out["mask"][:rows]}

        self._outputs = ctx.compile(outputs)

    def check(self, example):
        self._check_images(example)
        self._outputs.check(f"evals.{self.name}.pp", example, self.cfg.batch_size)

    def _rows(self, out: dict, count: int) -> tuple[list[np.ndarray], float]:
        """Picture rows for the first `count` images, and the MSE over their hidden pixels."""
        images, pred, mask = out["image"][:count], out["pred"][:count], out["mask"][:count]
        _, h, w, c = images.shape
        p = int(np.sqrt(pred.shape[-1] // c))
        if p * p * c != pred.shape[-1] or (h // p) * (w // p) != mask.shape[1]:
            raise ValueError(f"evals.{self.name}: predictions {pred.shape} do not tile images "
                             f"{images.shape[1:]} into square patches.")
        recon = np.asarray(unpatchify(pred, p, (h // p, w // p)))
        hidden = np.repeat(np.repeat(mask.reshape(count, h // p, w // p), p, 1), p, 2)[..., None]
        # Hidden patches show the middle grey of the display range (the mean after `normalize`).
        fill = 0.0 if self.mean_std is not None else sum(self.value_range) / 2
        masked = np.where(hidden > 0, np.asarray(fill, np.float32), images)
        pasted = np.where(hidden > 0, recon, images)
        mse = float(np.sum(np.square(recon - images) * hidden) / max(np.sum(hidden) * c, 1))
        rows = [np.concatenate([self._cell(x) for x in columns], axis=1)
                for columns in zip(images, masked, recon, pasted)]
        return rows, mse

    def run(self, state):
        rows, metrics = [], {}
        if self.num_images:
            out = self._outputs(state, next(iter(self.ctx.batches(self.cfg))))
            count = min(self.num_images, int(out["mask"].shape[0]))
            data_rows, metrics["masked_mse"] = self._rows(out, count)
            rows += data_rows
        if self.photos:
            out = self._outputs(state, self._photo_batch())
            photo_rows, metrics["photos_masked_mse"] = self._rows(out, len(self.photos))
            rows += photo_rows
        self._write_if_main(rows, state)
        return metrics
