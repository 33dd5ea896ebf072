"""pp ops and the spec parser."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
import pytest

from vistax.data import preprocess


def _run(spec: str, example: dict, seed: int = 0) -> dict:
    return preprocess.parse(spec)(example, np.random.default_rng(seed))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def test_decode_returns_rgb_for_grey_and_colour(image):
    assert np.array_equal(_run("decode", {"image": _png(image)})["image"], image)
    grey = _run("decode", {"image": _png(image[..., 0])})["image"]
    assert grey.shape == (40, 60, 3) and np.array_equal(grey[..., 2], image[..., 0])
    assert _run("decode(1)", {"image": _png(image[..., 0])})["image"].shape == (40, 60, 1)


def test_geometry_output_sizes(image):
    ex = {"image": image}
    assert _run("resize(16)", ex)["image"].shape == (16, 16, 3)
    assert _run("resize((10, 20))", ex)["image"].shape == (10, 20, 3)
    assert _run("resize_small(20)", ex)["image"].shape == (20, 30, 3)
    center = _run("center_crop((20, 30))", ex)["image"]
    assert np.array_equal(center, image[10:30, 15:45])
    crop = _run("random_crop(8)", ex)["image"]
    assert crop.shape == (8, 8, 3)
    rows = [r for r in range(33) for c in range(53) if np.array_equal(image[r:r + 8, c:c + 8],
                                                                       crop)]
    assert rows, "random_crop output is not a window of the input"
    assert _run("random_resized_crop(24)", ex)["image"].shape == (24, 24, 3)


def test_random_resized_crop_area_and_ratio_within_bounds():
    rng = np.random.default_rng(0)
    for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (3 / 4, 4 / 3)),
                         ((0.05, 0.4), (0.5, 2.0))):
        fractions = []
        for _ in range(2000):
            top, left, h, w = preprocess.sample_crop_box(rng, 200, 300, scale, ratio)
            assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
            fraction = h * w / (200 * 300)
            # Rounding h and w to pixels moves the area by at most about (h + w) / 2 pixels.
            slack = (h + w) / (200 * 300)
            assert scale[0] - slack <= fraction <= scale[1] + slack
            # The aspect ratio before rounding lies in [(w - .5) / (h + .5), (w + .5) / (h - .5)].
            assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
            fractions.append(fraction)
        # Area ~ U(scale), minus the draws that do not fit: the range is covered, not a corner.
        assert np.min(fractions) < scale[0] + 0.1 * (scale[1] - scale[0])
        assert np.max(fractions) > scale[0] + 0.7 * (scale[1] - scale[0])


def test_flip_lr_mirrors_exactly(image):
    assert np.array_equal(_run("flip_lr(p=1.0)", {"image": image})["image"], image[:, ::-1])
    assert _run("flip_lr(p=0.0)", {"image": image})["image"] is image
    flips = sum(_run("flip_lr", {"image": image}, seed)["image"][0, 0, 0] != image[0, 0, 0]
                for seed in range(400))
    assert 150 < flips < 250


def test_pil_round_trip_and_resize_match_fromarray(image):
    """to_pil/from_pil read crops (not contiguous) and 1/3/4 channels as Image.fromarray and
    np.asarray do, so PIL-based ops give the same pixels."""
    for channels in (1, 3, 4):
        full = np.random.default_rng(channels).integers(0, 256, (40, 60, channels), np.uint8)
        crop = full[3:31, 5:50]
        squeezed = crop[..., 0] if channels == 1 else crop
        pil = preprocess.to_pil(crop)
        assert pil.mode == Image.fromarray(squeezed).mode
        np.testing.assert_array_equal(preprocess.from_pil(pil), crop)
        for method in ("bilinear", "bicubic"):
            resample = preprocess._RESAMPLING[method]  # pylint: disable=protected-access
            expected = np.asarray(Image.fromarray(squeezed).resize((24, 17), resample))
            np.testing.assert_array_equal(
                preprocess._pil_resize(crop, 17, 24, resample),  # pylint: disable=protected-access
                expected.reshape(17, 24, channels))
    with pytest.raises(ValueError, match=r"1, 3 or 4 channels, got an image of shape \(4, 4, 2\)"):
        preprocess.to_pil(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("channels, spec", [
    (3, "random_resized_crop(16, scale=(0.2, 1.0), method='bicubic')|flip_lr|color_jitter(p=0.9)"
        "|grayscale(0.5)|gaussian_blur(0.5)|solarize(0.5)"),
    (1, "random_resized_crop((9, 14))|flip_lr|grayscale(0.5)|gaussian_blur(0.5)"
        "|solarize(0.5, threshold=100)"),
    (4, "flip_lr|grayscale(0.5)|gaussian_blur(0.5)|solarize(0.5, threshold=200.5)"),
])
def test_pil_chain_matches_the_ops_one_by_one(channels, spec):
    """The ops' PIL forms chained (one conversion in, one out) give the pixels the registered
    ops give one at a time and leave the generator in the same state."""
    parsed = preprocess.parse(spec)
    chain = preprocess.pil_chain([op for _, op in parsed.ops], "test")
    for seed in range(30):
        image = np.random.default_rng(seed).integers(0, 256, (23, 31, channels), np.uint8)
        want_rng, got_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        want = parsed({"image": image}, want_rng)["image"]
        got = preprocess.from_pil(chain(preprocess.to_pil(image), got_rng))
        np.testing.assert_array_equal(got, want)
        assert got_rng.random() == want_rng.random()
    with pytest.raises(ValueError, match=r"views: op .* has no PIL form"):
        preprocess.pil_chain([parsed.ops[0][1], preprocess.parse("value_range").ops[0][1]],
                             "views")


def test_value_range_and_normalize():
    image = np.array([[[0, 255, 51]]], np.uint8)
    out = _run("value_range(-1, 1)", {"image": image})["image"]
    assert out.dtype == np.float32 and np.allclose(out, [[[-1, 1, -0.6]]])
    assert np.allclose(_run("value_range(0, 1)", {"image": image})["image"], [[[0, 1, 0.2]]])
    norm = _run("value_range(0, 1)|normalize((0.5, 0.5, 0.0), (0.5, 0.25, 0.2))",
                {"image": image})["image"]
    assert norm.dtype == np.float32 and np.allclose(norm, [[[-1, 2, 1]]])


def test_solarize_and_grayscale_on_known_pixels():
    image = np.array([[[0, 127, 128], [200, 255, 10]]], np.uint8)
    solar = _run("solarize(p=1.0)", {"image": image})["image"]
    np.testing.assert_array_equal(solar, [[[0, 127, 127], [55, 0, 10]]])
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 10, 10]]], np.uint8)
    grey = _run("grayscale(p=1.0)", {"image": primaries})["image"]
    # ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B, the same as PIL's "L" conversion.
    np.testing.assert_array_equal(grey[..., 0], [[76, 150, 29, 10]])
    assert np.all(grey == grey[..., :1])
    pil = np.asarray(Image.fromarray(primaries).convert("L"))
    np.testing.assert_array_equal(grey[..., 0], pil)
    # Every band becomes the luma, an alpha band too; one band is already grey.
    rgba = np.concatenate([primaries, np.full((1, 4, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(_run("grayscale(p=1.0)", {"image": rgba})["image"],
                                  np.repeat(grey[..., :1], 4, -1))
    single = image[..., :1]
    np.testing.assert_array_equal(_run("grayscale(p=1.0)", {"image": single})["image"], single)
    np.testing.assert_array_equal(_run("solarize(p=1.0)", {"image": single})["image"],
                                  [[[0], [55]]])


def test_color_jitter_and_blur(image):
    ex = {"image": image}
    assert _run("color_jitter(p=0.0)", ex)["image"] is image
    jittered = _run("color_jitter(p=1.0)", ex)["image"]
    assert jittered.dtype == np.uint8 and jittered.shape == image.shape
    assert not np.array_equal(jittered, image)
    # Hue 0 and factors of exactly 1 are skipped: the image is unchanged.
    np.testing.assert_array_equal(_run("color_jitter(0, 0, 0, 0, p=1.0)", ex)["image"], image)
    flat = np.full((20, 20, 3), 90, np.uint8)
    assert np.array_equal(_run("gaussian_blur(1.0)", {"image": flat})["image"], flat)
    blurred = _run("gaussian_blur(1.0, sigma=2.0)", ex)["image"]
    assert blurred.std() < image.std() * 0.7


def test_color_jitter_adjustments_on_known_pixels(image):
    pixels = np.array([[[255, 0, 0], [0, 128, 0], [10, 20, 200], [90, 90, 90]]], np.uint8)
    ex = {"image": pixels}
    luma = np.asarray(Image.fromarray(pixels).convert("L")).astype(int)  # 76, 75, 38, 90
    # Brightness blends with black: factor 0.5 halves every value (up to rounding).
    half = _run("color_jitter((0.5, 0.5), 0, 0, 0, p=1.0)", ex)["image"]
    assert np.abs(half.astype(int) - pixels / 2).max() <= 1
    # Contrast 0 is the mean grey level everywhere; saturation 0 is the greyscale image.
    flat = _run("color_jitter(0, (0, 0), 0, 0, p=1.0)", ex)["image"]
    np.testing.assert_array_equal(flat, np.full_like(pixels, round(luma.mean())))
    grey = _run("color_jitter(0, 0, (0, 0), 0, p=1.0)", ex)["image"]
    np.testing.assert_array_equal(grey, np.repeat(luma[..., None], 3, -1))
    # Half a turn of hue takes red to cyan and keeps a grey pixel grey (8-bit HSV: within 4).
    turned = _run("color_jitter(0, 0, 0, (0.5, 0.5), p=1.0)", ex)["image"].astype(int)
    assert np.abs(turned[0, 0] - [0, 255, 255]).max() <= 4
    np.testing.assert_array_equal(turned[0, 3], [90, 90, 90])
    # A quarter turn and back lands within the 8-bit HSV quantisation of the start.
    there = _run("color_jitter(0, 0, 0, (0.25, 0.25), p=1.0)", {"image": image})["image"]
    back = _run("color_jitter(0, 0, 0, (-0.25, -0.25), p=1.0)", {"image": there})["image"]
    assert np.abs(back.astype(int) - image).mean() < 2
    for spec, match in (("color_jitter(brightness=-0.1)", "brightness must be >= 0"),
                        ("color_jitter(hue=0.6)", r"hue range \(-0.5, 0.6\) must lie within"),
                        ("color_jitter(contrast=(1.5, 1.2))", "contrast")):
        with pytest.raises(ValueError, match=match):
            preprocess.parse(spec)


@pytest.mark.parametrize("factor", [0.0, 0.37, 1.0, 1.61])
def test_color_jitter_matches_pillow_image_enhance(factor):
    """Brightness, contrast and saturation are torchvision's PIL path, Pillow's ImageEnhance,
    pixel for pixel; the hue rotation is 8-bit HSV's (here on a 7 x 5 image: no transposes)."""
    from PIL import ImageEnhance  # pylint: disable=import-outside-toplevel

    pixels = np.random.default_rng(3).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    ex, pil = {"image": pixels}, Image.fromarray(pixels)
    f = (factor, factor)
    for spec, enhance in ((f"color_jitter({f}, 0, 0, 0, p=1.0)", ImageEnhance.Brightness),
                          (f"color_jitter(0, {f}, 0, 0, p=1.0)", ImageEnhance.Contrast),
                          (f"color_jitter(0, 0, {f}, 0, p=1.0)", ImageEnhance.Color)):
        np.testing.assert_array_equal(_run(spec, ex)["image"],
                                      np.asarray(enhance(pil).enhance(factor)), err_msg=spec)
    shift = factor / 4 - 0.2  # -0.2 ... 0.2 turns: 8-bit steps of round(shift * 256)
    hsv = np.array(pil.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(int) + round(shift * 256)) % 256
    np.testing.assert_array_equal(
        _run(f"color_jitter(0, 0, 0, ({shift}, {shift}), p=1.0)", ex)["image"],
        np.asarray(Image.fromarray(hsv, "HSV").convert("RGB")))


def test_uniform_draws_what_generator_uniform_draws():
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    for low, high in [(0.6, 1.4), (-0.1, 0.1), (np.log(3 / 4), np.log(4 / 3)), (2.0, 2.0)] * 50:
        assert preprocess.uniform(a, low, high) == b.uniform(low, high)
    assert a.random() == b.random()  # the streams stay in step


def test_leading_deterministic_ops_split_off():
    parsed = preprocess.parse("decode|resize(8)|flip_lr|value_range(0, 1)|keep('image')")
    head, tail = parsed.split_deterministic()
    assert head.spec == "decode|resize(8)"
    assert tail.spec == "flip_lr|value_range(0, 1)|keep('image')"
    assert preprocess.parse("flip_lr|decode").split_deterministic()[0].ops == ()
    whole = preprocess.parse("decode|value_range(0, 1)")
    assert whole.split_deterministic()[0].spec == whole.spec


def test_trailing_elementwise_ops_split_off_to_run_on_the_batch(image):
    spec = ("random_resized_crop(16)|value_range(0, 1)|normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))"
            "|copy('image', 'aux')|value_range(-1, 1, key='aux')|keep('image', 'label')")
    per_example, per_batch = preprocess.parse(spec).split_batch_ops()
    # value_range on 'aux', which the keep drops, stays per example (and copy ends the tail).
    assert per_example.spec == ("random_resized_crop(16)|value_range(0, 1)|normalize((0.5, 0.4, "
                                "0.3), (0.2, 0.3, 0.4))|copy('image', 'aux')|value_range(-1, 1, "
                                "key='aux')|keep('image', 'label')")
    assert per_batch.ops == ()
    spec = ("random_resized_crop(16)|keep('image', 'label')|value_range(0, 1)"
            "|normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))|keep('label', 'image')")
    whole = preprocess.parse(spec)
    per_example, per_batch = whole.split_batch_ops()
    assert per_example.spec == ("random_resized_crop(16)|keep('image', 'label')"
                                "|keep('label', 'image')")
    assert per_batch.spec == "value_range(0, 1)|normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))"
    examples = [{"image": image, "label": np.int64(i)} for i in range(5)]
    stacked = [per_example(ex, np.random.default_rng(i)) for i, ex in enumerate(examples)]
    assert stacked[0]["image"].dtype == np.uint8  # the batch stacks uint8
    batch = per_batch({k: np.stack([ex[k] for ex in stacked]) for k in stacked[0]}, None)
    reference = [whole(ex, np.random.default_rng(i)) for i, ex in enumerate(examples)]
    for key in ("image", "label"):  # bit for bit
        np.testing.assert_array_equal(batch[key], np.stack([ex[key] for ex in reference]))
    assert batch["image"].dtype == np.float32
    # Nothing after the last non-elementwise op: nothing moves.
    assert preprocess.parse("value_range|flip_lr").split_batch_ops()[1].ops == ()


def test_random_ops_use_only_the_given_generator(image):
    spec = "random_resized_crop(16)|flip_lr|color_jitter|grayscale|gaussian_blur(0.5)|solarize"
    pp = preprocess.parse(spec)
    np.random.seed(1)
    a = pp({"image": image}, np.random.default_rng(7))["image"]
    np.random.seed(2)
    b = pp({"image": image}, np.random.default_rng(7))["image"]
    c = pp({"image": image}, np.random.default_rng(8))["image"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_labels_and_keys():
    ex = {"label": np.int64(3), "image": np.zeros((2, 2, 3), np.uint8), "caption": "x"}
    out = _run("onehot(5)|keep('image', 'labels')", ex)
    assert sorted(out) == ["image", "labels"]
    np.testing.assert_array_equal(out["labels"], [0, 0, 0, 1, 0])
    smooth = _run("onehot(4, key='label', key_result='y', on=0.9, off=0.1/3)",
                  {"label": 0})["y"]
    assert np.allclose(smooth, [0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3])
    out = _run("copy('image', 'view')|rename('caption', 'text')", ex)
    assert out["view"] is ex["image"] and out["text"] == "x" and "caption" not in out
    assert "label" in ex, "ops must not modify their input"


@pytest.mark.parametrize("spec, message", [
    ("decode|no_such_op", "unknown pp op 'no_such_op'"),
    ("decode|resize(size=-1)", "bad arguments for pp op 'resize"),
    ("resize(16, 17, 18, 19)", "bad arguments for pp op"),
    ("flip_lr(q=1)", "bad arguments for pp op 'flip_lr"),
    ("value_range(__import__('os'))", "arguments must be Python literals"),
    ("decode|resize(", "cannot parse pp spec"),
    ("decode.x", "not an op name or call"),
])
def test_parser_errors_name_op_and_spec(spec, message):
    with pytest.raises(ValueError) as error:
        preprocess.parse(spec)
    text = str(error.value)
    assert message in text and repr(spec) in text
    if "unknown" in message or "not an op" in message:
        assert "known ops: " in text and "random_resized_crop" in text


def test_runtime_errors_name_op_and_spec():
    pp = preprocess.parse("decode|keep('image', 'labels')")
    with pytest.raises(ValueError, match=r"keep\('image', 'labels'\).*'labels'.*has \['image'"):
        pp({"image": _png(np.zeros((2, 2, 3), np.uint8))}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="before value_range"):
        _run("value_range|solarize(p=1.0)", {"image": np.zeros((2, 2, 3), np.uint8)})


def test_registry_lists_required_ops():
    assert set(preprocess.known_ops()) >= {
        "decode", "resize", "resize_small", "center_crop", "random_crop", "random_resized_crop",
        "flip_lr", "color_jitter", "grayscale", "gaussian_blur", "solarize", "value_range",
        "normalize", "onehot", "keep", "rename", "copy"}
    assert preprocess.parse("").ops == ()
