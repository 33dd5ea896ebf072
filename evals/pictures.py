"""What picture evaluators share: their images (the first rows of a split, photos that ship with
scikit-image), cells of pixels, and PNG grids under the workdir.

Keys read here: dataset, split, pp, batch_size (global; the pictured images are the first rows
of the split's first batch), num_images (default 8), photos (default (): scikit-image photo
names, e.g. ("astronaut", "coffee", "chelsea")), photo_pp (default: pp; it must resize and crop
the photos to the model's size), value_range (the pp's output range, default (-1, 1)), mean_std
(optional ((mean...), (std...)) to undo a `normalize` op for display; it replaces
value_range), cell_size (default 96 px).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from vistax.data import preprocess
from vistax.evals.base import Evaluator, require


def photo_bytes(name: str) -> bytes:
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


class PictureEvaluator(Evaluator):
    """An evaluator that draws rows of cells into `<workdir>/<folder>/<name>_<step:08d>.png`.

    Subclasses compile a function returning (at least) the first `self.rows` images of a batch
    and draw one row of cells per image; this class parses the shared keys, builds the photo
    batch and writes the grid (process 0, never over an existing file).
    """

    folder = "pictures"  # under the workdir

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
        self.rows = max(self.num_images, len(self.photos))  # images a batch's outputs carry
        self._photo_examples = None

    def _check_images(self, example: dict) -> None:
        """Errors naming pp / photo_pp unless both yield `image`s of the same shape."""
        if "image" not in example:
            raise ValueError(f"evals.{self.name}.pp={self.cfg.pp!r} must yield 'image'; it gives "
                             f"{sorted(example)}.")
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
                {"image": np.asarray(self.photo_pp({"image": photo_bytes(n)}, rng)["image"])}
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

    def _cell(self, image: np.ndarray) -> np.ndarray:
        """An image in the pp's space -> a framed cell of RGB pixels."""
        return self._frame(self._display(image))

    def _frame(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 1 or 3) -> RGB scaled by an integer to about cell_size, framed by 2 px
        of white: every cell of an image's size has the same shape."""
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        scale = max(1, self.cell_size // max(pixels.shape[:2]))
        pixels = np.repeat(np.repeat(pixels, scale, 0), scale, 1)
        return np.pad(pixels, ((2, 2), (2, 2), (0, 0)), constant_values=255)

    def _write(self, rows: list[np.ndarray], step: int) -> str:
        """Stacks the rows (right-padded with white) into one PNG; returns its path."""
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                for r in rows]
        folder = os.path.join(self.ctx.workdir, self.folder)
        os.makedirs(folder, exist_ok=True)
        path, n = os.path.join(folder, f"{self.name}_{step:08d}.png"), 1
        while os.path.exists(path):  # e.g. `vistax eval` on a step the run already drew
            path, n = os.path.join(folder, f"{self.name}_{step:08d}_{n}.png"), n + 1
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
        return path

    def _write_if_main(self, rows: list[np.ndarray], state: dict) -> None:
        """Writes on process 0 when the context has a workdir."""
        if rows and self.ctx.process_index == 0 and self.ctx.workdir:
            self._write(rows, int(np.asarray(state["step"].addressable_data(0))))
