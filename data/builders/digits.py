"""`digits`: scikit-learn's handwritten digits (UCI optdigits test set), upscaled to 32x32.

1797 greyscale 8x8 images with 17 grey levels (0..16), ten classes '0'..'9'. Pixels are mapped
to 0..255 (round(v * 255 / 16)) and upscaled 4x with PIL bilinear resampling (half-pixel
centres), then stored as 1-channel PNG; the `decode` pp op returns HxWx3 uint8 from them.

Splits (stratified, fixed): within each class, a permutation drawn from
`np.random.default_rng(0)` (classes visited in order 0..9) puts round(0.2 * class size) examples
in `test`, the rest in `train`: train 1438, test 359. Each split is written in ascending order of
`id`, the example's index in `sklearn.datasets.load_digits()`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vistax.data.builders import base

IMAGE_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0
CLASS_NAMES = tuple(str(d) for d in range(10))


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted indices of each split given all labels (stratified 80/20, seed 0)."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for label in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.extend(members[: round(TEST_FRACTION * len(members))])
    test = np.sort(np.asarray(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


def upscale(image: np.ndarray) -> np.ndarray:
    """8x8 float image with values 0..16 -> IMAGE_SIZE x IMAGE_SIZE uint8 (PIL bilinear)."""
    grey = np.rint(image * (255.0 / 16.0)).astype(np.uint8)
    resized = Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized)


class Digits(base.ArrayRecordBuilder, skip_registration=True):
    """tfds builder of the `digits` dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32 bilinear upscale, stratified 80/20 split with seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "id": tfds.features.Scalar(np.int64, doc="Index in sklearn's load_digits()."),
        })
        return base.make_info(self, features, __doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        from sklearn import datasets  # pylint: disable=import-outside-toplevel  (slow import)

        digits = datasets.load_digits()
        return {name: self._generate_examples(digits, indices)
                for name, indices in split_indices(digits.target).items()}

    def _generate_examples(self, digits, indices: np.ndarray):
        for index in indices:
            yield int(index), {
                "image": base.encode_png(upscale(digits.images[index])),
                "label": int(digits.target[index]),
                "id": int(index),
            }
