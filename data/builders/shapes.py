"""`shapes`: generated 64x64 captioned images of coloured shapes, with held-out combinations.

Each image holds 1-3 shapes (SHAPES x COLOURS) on a black background, each in its own cell of
a 3x3 grid (POSITIONS), so they never overlap. The first object is the largest (radius 80-100%
of the cell's half-width, the others 45-70%); it gives the class `label`, named
"<colour> <shape>" (e.g. "red circle"), over all len(COLOURS) * len(SHAPES) = 30 combinations.
The caption names every object in order: "a red circle at the top left and a blue square at the
bottom". Per-object sequences `objects/{shape,colour,position,size}` give the ground truth.

Splits: `train` and `test` come from the same distribution, in which no object (first or
not) is one of the HELDOUT combinations; in `heldout` the first object is always a HELDOUT
combination (the others are not), for zero-shot tests on unseen colour-shape pairs. Every
shape and colour still appears in train, only the pairings are new. Sizes come from the
builder config (default train 10000, test 1000, heldout 1000); generation is seeded per split,
so preparing twice writes identical bytes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from vistax.data.builders import base

IMAGE_SIZE = 64
GRID = 3
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (230, 30, 30),
    "green": (40, 190, 50),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 50, 200),
    "cyan": (40, 220, 230),
}
# Row-major 3x3 grid cells and how captions say them.
POSITIONS = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# One combination per shape, each with a different colour, never shown during training.
HELDOUT = ("red triangle", "green star", "blue cross", "yellow circle", "purple square")
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
SPLIT_SEEDS = {"train": 0, "test": 1, "heldout": 2}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Number of examples per split."""

    num_train: int = 10000
    num_test: int = 1000
    num_heldout: int = 1000


def shapes_config(num_train: int = 10000, num_test: int = 1000,
                  num_heldout: int = 1000) -> ShapesConfig:
    """Config named after its sizes ("default" for the defaults), so each size has its own dir."""
    sizes = (num_train, num_test, num_heldout)
    if min(sizes) < 1:
        raise ValueError(f"shapes split sizes must be >= 1, got train/test/heldout={sizes}")
    name = "default" if sizes == (10000, 1000, 1000) else "train{}_test{}_heldout{}".format(*sizes)
    return ShapesConfig(name=name, num_train=num_train, num_test=num_test,
                        num_heldout=num_heldout)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius r centred on (cx, cy)."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
    if shape == "cross":
        t = r * 0.35  # half the arm thickness
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw(objects: list[dict]) -> np.ndarray:
    """Renders objects (dicts with shape, colour, x, y, size in pixels) to a 64x64x3 uint8 image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    canvas = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLOURS[obj["colour"]]
        x, y, r = obj["x"], obj["y"], obj["size"]
        if obj["shape"] == "circle":
            canvas.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            canvas.polygon(_polygon(obj["shape"], x, y, r), fill=fill)
    return np.asarray(image)


def caption(objects: list[dict]) -> str:
    """'a red circle at the top left and a blue square at the bottom' (objects in order)."""
    phrases = [f"a {o['colour']} {o['shape']} {POSITIONS[o['position']]}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def sample_objects(rng: np.random.Generator, split: str) -> list[dict]:
    """1-3 objects in distinct grid cells, largest first; first combination drawn per split."""
    allowed = [c for c in CLASS_NAMES if c not in HELDOUT]
    first_choices = list(HELDOUT) if split == "heldout" else allowed
    cell = IMAGE_SIZE / GRID
    max_radius = cell / 2 - 1
    count = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    objects = []
    for i, cell_index in enumerate(cells):
        choices = first_choices if i == 0 else allowed
        colour, shape = choices[int(rng.integers(len(choices)))].split(" ")
        size = max_radius * (rng.uniform(0.8, 1.0) if i == 0 else rng.uniform(0.45, 0.7))
        slack = max_radius - size  # jitter that keeps the shape inside its cell
        row, col = divmod(int(cell_index), GRID)
        objects.append({
            "shape": shape, "colour": colour, "position": list(POSITIONS)[int(cell_index)],
            "size": float(size),
            "x": (col + 0.5) * cell + rng.uniform(-slack, slack),
            "y": (row + 0.5) * cell + rng.uniform(-slack, slack),
        })
    return objects


class Shapes(base.ArrayRecordBuilder, skip_registration=True):
    """tfds builder of the `shapes` dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "64x64, 1-3 shapes on a 3x3 grid, 5 held-out combinations."}
    BUILDER_CONFIGS = [shapes_config()]

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "objects": tfds.features.Sequence({
                "shape": tfds.features.Text(),
                "colour": tfds.features.Text(),
                "position": tfds.features.Text(),
                "size": tfds.features.Scalar(np.float32, doc="Radius in pixels."),
            }),
            "id": tfds.features.Scalar(np.int64, doc="Index within the split."),
        })
        return base.make_info(self, features, __doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated, nothing to download.
        sizes = {"train": self.builder_config.num_train, "test": self.builder_config.num_test,
                 "heldout": self.builder_config.num_heldout}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        rng = np.random.default_rng(SPLIT_SEEDS[split])
        for index in range(num_examples):
            objects = sample_objects(rng, split)
            yield index, {
                "image": base.encode_png(draw(objects)),
                "caption": caption(objects),
                "label": CLASS_NAMES.index(f"{objects[0]['colour']} {objects[0]['shape']}"),
                "objects": {key: [o[key] for o in objects]
                            for key in ("shape", "colour", "position", "size")},
                "id": index,
            }
