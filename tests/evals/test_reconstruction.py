"""MAE reconstruction pictures: the hidden-pixel error, the pasted column and the photos."""

import io
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vistax.evals import pictures, reconstruction
from vistax.models import mae


def make(**keys):
    cfg = ml_collections.ConfigDict(dict(dict(
        type="reconstruction", dataset="digits", split="test", pp="decode", batch_size=8,
        num_images=2, cell_size=32), **keys))
    ctx = types.SimpleNamespace(compile=lambda fn, **kw: None,
                                encoders={"reconstruction": None})
    return reconstruction.ReconstructionEvaluator("pictures", cfg, ctx)


def test_rows_report_the_error_on_hidden_pixels_and_paste_visible_ones():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 4), np.float32)
    mask[0, [0, 3]] = 1
    mask[1, 1] = 1
    pred = np.asarray(mae.patchify(jnp.asarray(images), 8)) + 0.5  # off by 0.5 everywhere
    rows, mse = make()._rows({"image": images, "pred": pred, "mask": mask}, 2)
    assert mse == pytest.approx(0.25)  # only hidden pixels count
    cell = 2 * 16 + 4  # scale 32 // 16, a 2 px frame
    assert [r.shape for r in rows] == [(cell, 4 * cell, 3)] * 2
    original, masked, _, pasted = np.split(rows[1], 4, axis=1)
    np.testing.assert_array_equal(original[2:-2, 2:-2][:16, :16],
                                  pasted[2:-2, 2:-2][:16, :16])  # patch 0 of image 1 is visible
    assert (masked[2:-2, 2:-2][:16, 16:] == 128).all()  # patch 1 hidden: mid-grey of (-1, 1)


def test_photos_come_from_scikit_image_and_bad_names_are_named():
    photo = Image.open(io.BytesIO(pictures.photo_bytes("astronaut")))
    assert photo.size == (512, 512) and photo.mode == "RGB"
    with pytest.raises(ValueError, match="photo 'astronut' is not a scikit-image data image"):
        pictures.photo_bytes("astronut")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"evals\.pictures\.batch_size=8 must be at least"):
        make(num_images=9)
    with pytest.raises(ValueError, match=r"evals\.pictures\.value_range"):
        make(value_range=(1.0, -1.0))


def test_normalized_images_are_shown_in_pixel_space():
    """With `mean_std` (after a normalize op), hidden patches show the mean colour and pixels
    are un-normalised for display."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    evaluator = make(mean_std=(mean, std))
    images = np.zeros((1, 16, 16, 3), np.float32)  # normalised zeros = the mean colour
    mask = np.asarray([[1.0, 0.0, 0.0, 0.0]], np.float32)
    pred = np.asarray(mae.patchify(jnp.asarray(images), 8))
    rows, mse = evaluator._rows({"image": images, "pred": pred, "mask": mask}, 1)
    assert mse == 0.0
    _, masked, _, _ = np.split(rows[0], 4, axis=1)
    expected = np.round(np.asarray(mean) * 255).astype(np.uint8)
    np.testing.assert_array_equal(masked[2:-2, 2:-2][:16, :16].reshape(-1, 3),
                                  np.broadcast_to(expected, (256, 3)))
