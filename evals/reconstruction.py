"""Masked-image reconstructions as a picture: original | masked | reconstruction | reconstruction
with the visible patches pasted back (MAE, He et al. 2021, Fig. 2-4), one row per image.

Images are the first `num_images` of a split plus, optionally, photos that ship with
scikit-image (`photos`, e.g. ("astronaut", "coffee", "chelsea")), which go through `photo_pp`
(default: `pp`; it must resize them to the model's size). Each run writes
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

import io
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from vistax.data import preprocess
from vistax.evals.base import Evaluator, encoder, require
from vistax.models.mae import unpatchify


def _photo_bytes(name: str) -> bytes:
    """PNG bytes of scikit-image's bundled photo `name` (no download)."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise ImportError("evals.*.photos needs scikit-image (pip install scikit-image)") from None
    loader = getattr(skdata, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"photo {name!r} is not a scikit-image data image (e.g. 'astronaut', "
                         "'coffee', 'chelsea', 'rocket').")
    image = np.asarray(loader())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(image[..., :3].astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class ReconstructionEvaluator(Evaluator):

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        require(cfg, name, ("dataset", "split", "pp", "batch_size"))
        self.num_images = int(cfg.get("num_images", 8))
        self.photos = tuple(cfg.get("photos", ()))
        if self.num_images < 0 or self.num_images + len(self.photos) < 1:
            raise ValueError(f"evals.{name}.num_images={self.num_images} with photos="
                             f"{self.photos}: draw at least one image.")
        if self.num_images > cfg.batch_size or len(self.photos) > cfg.batch_size:
            raise ValueError(f"evals.{name}.batch_size={cfg.batch_size} must be at least "
                             f"num_images={self.num_images} and the number of photos "
                             f"({len(self.photos)}).")
        self.value_range = tuple(cfg.get("value_range", (-1.0, 1.0)))
        if len(self.value_range) != 2 or not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"evals.{name}.value_range={self.value_range}: expected (low, high).")
        self.mean_std = cfg.get("mean_std", None)
        self.photo_pp = preprocess.parse(cfg.get("photo_pp") or cfg.pp)
        self.cell_size = int(cfg.get("cell_size", 96))
        reconstruct = encoder(ctx, name, cfg, "encoder", "reconstruction")

        rows = max(self.num_images, len(self.photos))

        def outputs(model, extra, batch):  # only the rows drawn come back to the host
            out = reconstruct(model, extra, batch)
            return {"image": batch["image"][:rows].astype(jnp.float32),
                    "pred": out["pred"][:rows], "mask": out["mask"][:rows]}

        self._outputs = ctx.compile(outputs)
        self._photo_examples = None

    def check(self, example):
        key = f"evals.{self.name}.pp"
        if "image" not in example:
            raise ValueError(f"{key}={self.cfg.pp!r} must yield 'image'; it gives "
                             f"{sorted(example)}.")
        self._outputs.check(key, example, self.cfg.batch_size)
        if self.photos:
            photo = self._photos()[0]
            if photo["image"].shape != np.asarray(example["image"]).shape:
                raise ValueError(f"evals.{self.name}.photo_pp turns the photos into images of "
                                 f"shape {photo['image'].shape}, but the model reads "
                                 f"{np.asarray(example['image']).shape}: resize and crop them.")

    def _photos(self) -> list[dict]:
        if self._photo_examples is None:
            rng = np.random.default_rng(0)
            self._photo_examples = [
                {"image": np.asarray(self.photo_pp({"image": _photo_bytes(n)}, rng)["image"])}
                for n in self.photos]
        return self._photo_examples

    def _photo_batch(self) -> dict:
        """The photos as a global batch, zero-padded to batch_size (every process holds all)."""
        images = np.stack([p["image"] for p in self._photos()])
        padded = np.zeros((self.cfg.batch_size,) + images.shape[1:], images.dtype)
        padded[:len(images)] = images
        mask = np.arange(self.cfg.batch_size) < len(images)
        return {"image": self.ctx.global_array(padded), "_mask": self.ctx.global_array(mask)}

    def _display(self, images: np.ndarray) -> np.ndarray:
        """Values in the pp's space -> uint8 pixels."""
        x = images.astype(np.float64)
        if self.mean_std is not None:
            mean, std = (np.asarray(v, np.float64) for v in self.mean_std)
            x = x * std + mean
        else:
            lo, hi = self.value_range
            x = (x - lo) / (hi - lo)
        return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)

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

    def _cell(self, image: np.ndarray) -> np.ndarray:
        pixels = self._display(image)
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        scale = max(1, self.cell_size // max(pixels.shape[:2]))
        pixels = np.repeat(np.repeat(pixels, scale, 0), scale, 1)
        return np.pad(pixels, ((2, 2), (2, 2), (0, 0)), constant_values=255)

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
        if self.ctx.process_index == 0 and self.ctx.workdir:
            self._write(rows, int(np.asarray(state["step"].addressable_data(0))))
        return metrics

    def _write(self, rows: list[np.ndarray], step: int) -> None:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                for r in rows]
        folder = os.path.join(self.ctx.workdir, "reconstructions")
        os.makedirs(folder, exist_ok=True)
        path, n = os.path.join(folder, f"{self.name}_{step:08d}.png"), 1
        while os.path.exists(path):  # e.g. `vistax eval` on a step the run already drew
            path, n = os.path.join(folder, f"{self.name}_{step:08d}_{n}.png"), n + 1
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
