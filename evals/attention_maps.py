"""Attention maps as a picture: the last block's attention from the cls token to the patches, one
overlay per head (DINO, Caron et al. 2021, Fig. 1 and Fig. 3), one row per image.

A row is: the input image | one overlay per head | (mean_head) the mean over heads. Each map is
normalised to [0, 1] per image and head (min to max), upsampled to the image (`upsample`:
'nearest', DINO's choice, or 'bilinear'), coloured with a matplotlib colormap and blended over
the image in grey: (1 - alpha) * grey + alpha * colour. Cells are the image scaled by an integer
to about cell_size px with a 2 px white frame, so a grid is rows x (1 + heads + mean_head)
cells. Images are the first `num_images` of the split plus, optionally, scikit-image photos
through `photo_pp`, as in the reconstruction pictures (evals/pictures.py). Each run writes
`<workdir>/attention/<name>_<step:08d>.png` (process 0; never over an existing file).

Metrics, over the real rows of the split's first batch (all batch_size of them, not only the
drawn ones), and with a `photos_` prefix over the photos:
  entropy            mean over heads and images of the entropy, in nats, of a head's attention
                     over the h*w patches (renormalised to sum to 1): log(h*w) is uniform
                     attention, 0 all on one patch; it falls as heads learn to focus.
  entropy_head<i>    the same for head i.
  patch_attention    mean over heads and images of the cls attention's total on the patches;
                     the rest goes to the cls token itself and the registers (Darcet et al.
                     2024 track how much prefix tokens absorb).

Keys: dataset, split, pp (must yield 'image'), batch_size, num_images (default 8), photos
(default ()), photo_pp, value_range, mean_std, cell_size (see evals/pictures.py), encoder
(default 'cls_attention': (model, extra, batch) -> (B, heads, h, w) attention of the cls token
to each patch, e.g. ViT.cls_attention; needs a cls token), mean_head (default True), upsample
(default 'nearest'), colormap (default 'inferno', whose brightness rises with the value), alpha
(default 0.6), every.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr
from PIL import Image

from vistax.evals import pictures
from vistax.evals.base import encoder

UPSAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def attention_sums(maps: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the rows where `mask` is set of each head's entropy (nats) over the patches,
    of its total attention on the patches, and the row count; `maps` is (B, heads, h, w)."""
    flat = maps.reshape(maps.shape[:2] + (-1,)).astype(jnp.float32)
    total = flat.sum(-1)  # (B, heads): the share on the patches, the rest on prefix tokens
    p = flat / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    entropy = entr(p).sum(-1)  # -sum p log p, with 0 log 0 = 0
    m = mask.astype(jnp.float32)[:, None]
    return {"entropy": jnp.sum(entropy * m, 0), "patch_attention": jnp.sum(total * m, 0),
            "count": jnp.sum(mask.astype(jnp.float32))}


def normalize(attention: np.ndarray) -> np.ndarray:
    """(h, w) map -> [0, 1] by its min and max (a constant map -> zeros)."""
    a = attention.astype(np.float64)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


class AttentionMapsEvaluator(pictures.PictureEvaluator):

    folder = "attention"

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        self.encoder_name = cfg.get("encoder", "cls_attention")
        attention = encoder(ctx, name, cfg, "encoder", "cls_attention")
        self.mean_head = bool(cfg.get("mean_head", True))
        self.upsample = cfg.get("upsample", "nearest")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"evals.{name}.upsample={self.upsample!r} is not one of "
                             f"{sorted(UPSAMPLING)}.")
        self.alpha = float(cfg.get("alpha", 0.6))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"evals.{name}.alpha={self.alpha} must lie in [0, 1].")
        import matplotlib  # only this evaluator needs it
        colormap = cfg.get("colormap", "inferno")
        if colormap not in matplotlib.colormaps:
            raise ValueError(f"evals.{name}.colormap={colormap!r} is not a matplotlib colormap "
                             "(e.g. 'inferno', 'viridis', 'jet').")
        self.colormap = matplotlib.colormaps[colormap]
        rows = self.rows
        where = f"evals.{name}.encoder={self.encoder_name!r}"

        def outputs(model, extra, batch):  # sums over the batch; only drawn rows come back
            maps = attention(model, extra, batch)
            if maps.ndim != 4 or maps.shape[0] != batch["image"].shape[0]:
                raise ValueError(f"{where} gives {maps.shape}; expected attention maps "
                                 "(batch, heads, h, w).")
            maps = maps.astype(jnp.float32)
            return {"image": batch["image"][:rows].astype(jnp.float32), "maps": maps[:rows],
                    "mask": batch["_mask"][:rows], **attention_sums(maps, batch["_mask"])}

        self._outputs = ctx.compile(outputs)

    def check(self, example):
        self._check_images(example)
        self._outputs.check(f"evals.{self.name}.encoder={self.encoder_name!r} on the images "
                            f"of evals.{self.name}.pp", example, self.cfg.batch_size)

    def _overlay(self, image: np.ndarray, attention: np.ndarray) -> np.ndarray:
        """One head's (h, w) map over an image in the pp's space -> a framed cell."""
        pixels = self._display(image).astype(np.float64) / 255
        grey = pixels.mean(-1, keepdims=True) if pixels.shape[-1] == 3 else pixels[..., :1]
        height, width = pixels.shape[:2]
        a = Image.fromarray(normalize(attention).astype(np.float32))  # mode 'F'
        a = np.asarray(a.resize((width, height), UPSAMPLING[self.upsample]), np.float64)
        colour = self.colormap(np.clip(a, 0.0, 1.0))[..., :3]
        blend = (1 - self.alpha) * grey + self.alpha * colour
        return self._frame((np.clip(blend, 0.0, 1.0) * 255).round().astype(np.uint8))

    def _rows(self, out: dict, count: int) -> list[np.ndarray]:
        """Picture rows for the first `count` real images: image | heads | (mean of heads)."""
        real = np.flatnonzero(out["mask"])[:count]
        rows = []
        for image, maps in zip(out["image"][real], out["maps"][real]):
            heads = list(maps) + ([maps.mean(0)] if self.mean_head else [])
            cells = [self._cell(image)] + [self._overlay(image, a) for a in heads]
            rows.append(np.concatenate(cells, axis=1))
        return rows

    @staticmethod
    def _metrics(out: dict, prefix: str) -> dict[str, float]:
        count = float(out["count"])
        entropy = np.asarray(out["entropy"], np.float64) / count
        metrics = {f"{prefix}entropy": float(entropy.mean()),
                   f"{prefix}patch_attention": float(np.mean(out["patch_attention"]) / count)}
        metrics.update({f"{prefix}entropy_head{i}": float(e) for i, e in enumerate(entropy)})
        return metrics

    def run(self, state):
        rows, metrics = [], {}
        if self.num_images:
            out = self._outputs(state, next(iter(self.ctx.batches(self.cfg))))
            rows += self._rows(out, self.num_images)
            metrics.update(self._metrics(out, ""))
        if self.photos:
            out = self._outputs(state, self._photo_batch())
            rows += self._rows(out, len(self.photos))
            metrics.update(self._metrics(out, "photos_"))
        self._write_if_main(rows, state)
        return metrics
