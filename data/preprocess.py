"""Preprocessing from big_vision-style strings: `"decode|flip_lr|value_range(-1, 1)|keep('image')"`.

A spec is ops joined by `|`, each `name` or `name(args)` with Python-literal arguments (numbers,
strings, tuples, lists, booleans, None; `3/4`-style arithmetic on numbers is allowed). The
parser reads the spec with `ast` and never evaluates code. Each registered op is a factory:
called with the spec's arguments it validates them and returns a function
`(example: dict, rng: np.random.Generator) -> dict` that returns a new dict. Random ops draw
only from `rng`, so an example's output is fixed by the generator the pipeline hands it.

Images are HxWxC uint8 numpy arrays (C = 3, or 1 after `decode(1)`) from `decode` until
`value_range`/`normalize`, which make them float32. Image ops take `key='image'` so that several
views (e.g. `copy('image', 'view2')`) can be augmented independently.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import operator
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageChops, ImageFilter

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

_OPS: dict[str, Callable[..., Op]] = {}
# Ops whose output is a function of the example alone (they never draw from rng): a pipeline
# may compute a spec's leading run of them once per record and cache it (`input.cache`).
_DETERMINISTIC: set[str] = set()
# Ops that change only example[op.key], element by element (constants broadcast over trailing
# axes): the same values on a stacked batch, so a pipeline may run them once per batch.
_ELEMENTWISE: set[str] = set()

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


def register(name: str, *, deterministic: bool = False, elementwise: bool = False
             ) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
    """Decorator registering an op factory under `name` (the name used in spec strings).

    deterministic=True declares that the op never uses its generator (it is called with
    rng=None when its output is cached), so its output may be computed once per record.
    elementwise=True (implies deterministic) declares that the op's output differs from its
    input only in example[op.key] (an attribute the op carries), element by element with
    constants broadcast over the trailing axes, so it gives the same values on a batch of
    stacked examples (`Preprocess.split_batch_ops`).
    """

    def decorate(factory: Callable[..., Op]) -> Callable[..., Op]:
        if name in _OPS:
            raise ValueError(f"pp op {name!r} is already registered ({_OPS[name]})")
        _OPS[name] = factory
        if deterministic or elementwise:
            _DETERMINISTIC.add(name)
        if elementwise:
            _ELEMENTWISE.add(name)
        return factory

    return decorate


def known_ops() -> list[str]:
    """Sorted names of all registered ops."""
    return sorted(_OPS)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A parsed spec: applies its ops in order to one example with one generator."""

    spec: str
    ops: tuple[tuple[str, Op], ...]  # (the op's text in the spec, the op)
    names: tuple[str, ...] = ()  # the ops' registered names

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        for text, op in self.ops:
            try:
                example = op(example, rng)
            except Exception as e:  # Name the op and spec, whatever went wrong inside it.
                raise ValueError(f"pp op {text!r} of {self.spec!r} failed: "
                                 f"{type(e).__name__}: {e}") from e
        return example

    def _subset(self, indices) -> Preprocess:
        ops = tuple(self.ops[i] for i in indices)
        return Preprocess("|".join(text for text, _ in ops), ops,
                          tuple(self.names[i] for i in indices))

    def split_deterministic(self) -> tuple[Preprocess, Preprocess]:
        """(leading deterministic ops, the rest) as two Preprocess that compose to this one.

        The first never draws from its generator, so the second draws exactly what the whole
        spec would: caching the first's output changes no example.
        """
        n = next((i for i, name in enumerate(self.names) if name not in _DETERMINISTIC),
                 len(self.names))
        return self._subset(range(n)), self._subset(range(n, len(self.ops)))

    def split_batch_ops(self) -> tuple[Preprocess, Preprocess]:
        """(per example, per batch): the elementwise ops (`value_range`, `normalize`) of the
        spec's trailing run of elementwise ops and `keep`s, moved to run once on the stacked
        batch. Stacking the per-example outputs and applying the second gives this spec's
        batch bit for bit: those ops change only their key's values, element by element, and
        `keep` only drops keys (an elementwise op whose key a later `keep` drops stays per
        example). The batch stacks uint8 images instead of float32 ones, and costs one numpy
        call per op instead of one per example (~25 us each on a 32 x 32 image).
        """
        start = len(self.ops)
        while start and (self.names[start - 1] in _ELEMENTWISE or self.names[start - 1] == "keep"):
            start -= 1
        batched, kept = set(), None  # kept: the keys every later keep keeps (None: all)
        for i in reversed(range(start, len(self.ops))):
            op = self.ops[i][1]
            if self.names[i] == "keep":
                kept = set(op.keys) if kept is None else kept & set(op.keys)
            elif kept is None or op.key in kept:
                batched.add(i)
        return (self._subset([i for i in range(len(self.ops)) if i not in batched]),
                self._subset(sorted(batched)))


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv}


def _literal(node: ast.AST) -> Any:
    """A Python literal, allowing + - * / between numbers (e.g. `3/4`); never evaluates code."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _literal(node.left), _literal(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic is only allowed between numbers")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    return ast.literal_eval(node)


def _flatten_pipes(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _flatten_pipes(node.left) + _flatten_pipes(node.right)
    return [node]


def parse(spec: str) -> Preprocess:
    """Parses `spec` into a Preprocess; an empty spec is the identity.

    Raises ValueError naming the op and the whole spec for unknown ops, malformed syntax,
    non-literal or wrong arguments.
    """
    if not spec.strip():
        return Preprocess(spec, ())
    known = f"known ops: {', '.join(known_ops())}"
    try:
        tree = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse pp spec {spec!r} ({e.msg}); expected "
                         f"'op|op(arg, key=value)|...'; {known}") from e
    ops, names = [], []
    for node in _flatten_pipes(tree):
        text = ast.get_source_segment(spec.strip(), node)
        if isinstance(node, ast.Name):
            name, args, kwargs = node.id, [], {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            try:
                if any(isinstance(a, ast.Starred) for a in node.args) or any(
                        k.arg is None for k in node.keywords):
                    raise ValueError("*args/**kwargs are not allowed")
                args = [_literal(a) for a in node.args]
                kwargs = {k.arg: _literal(k.value) for k in node.keywords}
            except (ValueError, TypeError, SyntaxError, ZeroDivisionError) as e:
                raise ValueError(f"pp op {text!r} in {spec!r}: arguments must be Python "
                                 f"literals ({e})") from e
        else:
            raise ValueError(f"pp spec {spec!r}: {text!r} is not an op name or call; {known}")
        if name not in _OPS:
            raise ValueError(f"unknown pp op {name!r} in {spec!r}; {known}")
        factory = _OPS[name]
        signature = inspect.signature(factory)
        try:
            signature.bind(*args, **kwargs)
            op = factory(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad arguments for pp op {text!r} in {spec!r}: {e}; "
                             f"expected {name}{signature}") from e
        ops.append((text, op))
        names.append(name)
    return Preprocess(spec, tuple(ops), tuple(names))


# ---------------------------------------------------------------------------------------------
# Helpers


def size2(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or (height, width) -> (height, width), both positive ints."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return tuple(size)


def range2(value, name: str) -> tuple[float, float]:
    """A number x -> (x, x), or a (low, high) pair with low <= high."""
    if isinstance(value, (int, float)):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be a number or (low, high) with low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def probability(p, name: str = "p") -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """`rng.uniform(low, high)` for one number, bit for bit: numpy computes it as low +
    (high - low) * (the next double of rng.random()). A third of uniform's time (1 vs 3 us):
    a DINO example draws ~40 of them."""
    return low + (high - low) * rng.random()


def _method(method: str):
    if method not in _RESAMPLING:
        raise ValueError(f"method must be one of {sorted(_RESAMPLING)}, got {method!r}")
    return _RESAMPLING[method]


def uint8_image(image, op: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        got = (f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ValueError(f"{op} expects an HxWxC uint8 image (before value_range), got {got}")
    return image


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(image: np.ndarray) -> Image.Image:
    """An HxWxC uint8 image (C = 1, 3 or 4) as a PIL image on the array's memory (a crop, not
    contiguous, is copied once). `Image.fromarray` costs twice as much on small images."""
    height, width, channels = image.shape
    if channels not in _PIL_MODES:
        raise ValueError(f"PIL-based ops take 1, 3 or 4 channels, got an image of shape "
                         f"{image.shape}")
    mode = _PIL_MODES[channels]
    return Image.frombuffer(mode, (width, height), np.ascontiguousarray(image), "raw", mode, 0, 1)


def from_pil(image: Image.Image) -> np.ndarray:
    """A PIL image of 8-bit bands as an HxWxC uint8 array (read-only, as `np.asarray` gives)."""
    bands = len(image.getbands())
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, bands)


def _pil_resize(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """Resizes an HxWxC uint8 image with PIL (antialiased when downscaling)."""
    return from_pil(to_pil(image).resize((width, height), resample))


# A random image op may also carry `pil_step(image: Image.Image, rng) -> Image.Image`: the same
# transformation of a PIL image, drawing the same numbers from rng in the same order. A chain
# of them (`pil_chain`) converts to PIL once and back once instead of at every op; DINO's views
# (`dino_multicrop`) are ~5 ops each on small crops, where a round trip costs as much as an op.
PilStep = Callable[[Image.Image, np.random.Generator], Image.Image]


def _pil_image_op(name: str, p: float, key: str, apply: PilStep) -> Op:
    """The op that applies `apply` to example[key] as a PIL image with probability p (one
    `rng.random()` draw, then apply's own draws), carrying the same as its `pil_step`."""

    def pil_step(image, rng):
        return image if rng.random() >= p else apply(image, rng)

    def op(example, rng):
        if rng.random() >= p:
            return example
        image = uint8_image(example[key], name)
        return {**example, key: from_pil(apply(to_pil(image), rng))}

    op.pil_step = pil_step
    return op


def pil_chain(ops: list[Op], name: str) -> PilStep:
    """The `pil_step`s of `ops` applied in order; ValueError naming `name` if an op has none."""
    steps = [getattr(op, "pil_step", None) for op in ops]
    if None in steps:
        raise ValueError(f"{name}: op {ops[steps.index(None)]} has no PIL form (pil_step)")

    def chain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for step in steps:
            image = step(image, rng)
        return image

    return chain


# ---------------------------------------------------------------------------------------------
# Decoding and geometry


@register("decode", deterministic=True)
def decode(channels: int = 3, key: str = "image") -> Op:
    """Encoded image bytes (PNG, JPEG, ...) -> HxWxchannels uint8; 3 = RGB, 1 = greyscale."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    mode = "RGB" if channels == 3 else "L"

    def op(example, rng):
        del rng
        with Image.open(io.BytesIO(example[key])) as image:
            pixels = np.asarray(image.convert(mode))
        return {**example, key: pixels.reshape(*pixels.shape[:2], channels)}

    return op


@register("resize", deterministic=True)
def resize(size, key: str = "image", method: str = "bilinear") -> Op:
    """Resizes to `size` (int: square, or (height, width)), ignoring the aspect ratio."""
    height, width = size2(size)
    resample = _method(method)

    def op(example, rng):
        del rng
        image = uint8_image(example[key], "resize")
        return {**example, key: _pil_resize(image, height, width, resample)}

    return op


@register("resize_small", deterministic=True)
def resize_small(size: int, key: str = "image", method: str = "bilinear") -> Op:
    """Resizes so the shorter side is `size`, keeping the aspect ratio (e.g. 256 before a crop)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    resample = _method(method)

    def op(example, rng):
        del rng
        image = uint8_image(example[key], "resize_small")
        h, w = image.shape[:2]
        scale = size / min(h, w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        return {**example, key: _pil_resize(image, new_h, new_w, resample)}

    return op


def _crop(image: np.ndarray, top: int, left: int, height: int, width: int, op: str) -> np.ndarray:
    if height > image.shape[0] or width > image.shape[1]:
        raise ValueError(f"{op} to {height}x{width} needs an image at least that large, "
                         f"got {image.shape[0]}x{image.shape[1]}")
    return image[top:top + height, left:left + width]


@register("center_crop", deterministic=True)
def center_crop(size, key: str = "image") -> Op:
    """Crops the central `size` (int: square, or (height, width))."""
    height, width = size2(size)

    def op(example, rng):
        del rng
        image = example[key]
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        return {**example, key: _crop(image, top, left, height, width, "center_crop")}

    return op


@register("random_crop")
def random_crop(size, key: str = "image") -> Op:
    """Crops `size` (int: square, or (height, width)) at a uniformly random offset."""
    height, width = size2(size)

    def op(example, rng):
        image = example[key]
        top = int(rng.integers(0, max(image.shape[0] - height, 0) + 1))
        left = int(rng.integers(0, max(image.shape[1] - width, 0) + 1))
        return {**example, key: _crop(image, top, left, height, width, "random_crop")}

    return op


def sample_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: tuple[float, float], ratio: tuple[float, float]
                    ) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) as torchvision's RandomResizedCrop.get_params.

    Up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio (w/h) in
    `ratio`; if none fits, the largest central crop whose aspect ratio is clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(rng, *scale)
        aspect = math.exp(uniform(rng, *log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@register("random_resized_crop")
def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), key: str = "image",
                        method: str = "bilinear") -> Op:
    """Inception-style crop (Szegedy et al. 2015), resized to `size`.

    Defaults are torchvision's / the Inception paper's: area fraction in [0.08, 1], aspect
    ratio in [3/4, 4/3]. DINO uses scale (0.4, 1) for global and (0.05, 0.4) for local crops.
    """
    out_h, out_w = size2(size)
    scale, ratio = range2(scale, "scale"), range2(ratio, "ratio")
    if not 0 < scale[0] <= 1 or scale[1] > 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    if ratio[0] <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    resample = _method(method)

    def op(example, rng):
        image = uint8_image(example[key], "random_resized_crop")
        top, left, h, w = sample_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
        crop = image[top:top + h, left:left + w]
        return {**example, key: _pil_resize(crop, out_h, out_w, resample)}

    def pil_step(image, rng):
        top, left, h, w = sample_crop_box(rng, image.height, image.width, scale, ratio)
        return image.crop((left, top, left + w, top + h)).resize((out_w, out_h), resample)

    op.pil_step = pil_step
    return op


@register("flip_lr")
def flip_lr(p: float = 0.5, key: str = "image") -> Op:
    """Mirrors left-right with probability p (0.5 in nearly every recipe)."""
    p = probability(p)

    def op(example, rng):
        if rng.random() >= p:
            return example
        return {**example, key: np.ascontiguousarray(example[key][:, ::-1])}

    def pil_step(image, rng):
        return image if rng.random() >= p else image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    op.pil_step = pil_step
    return op


# ---------------------------------------------------------------------------------------------
# Photometric augmentations (SimCLR, Chen et al. 2020; BYOL, Grill et al. 2020; DINO, Caron
# et al. 2021). Each is applied with probability p, drawing from rng only.


def _jitter_range(value, name: str, centre: float, low: float, high: float
                  ) -> tuple[float, float] | None:
    """torchvision ColorJitter's argument: x >= 0 -> [max(low, centre - x), centre + x], or an
    explicit (min, max) within [low, high]; None when the range is the single point `centre`
    (the adjustment is skipped, as torchvision does)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 or a (min, max) pair, got {value!r}")
        value = (max(low, centre - value), centre + value)
    bounds = range2(value, name)
    if not low <= bounds[0] <= bounds[1] <= high:
        raise ValueError(f"{name} range {bounds} must lie within [{low}, {high}]")
    return None if bounds == (centre, centre) else bounds


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotates hue by `shift` (a fraction of the colour wheel) in PIL's 8-bit HSV, whose hue
    channel has 256 steps per turn; saturation and value are kept. The hue band stays in
    Pillow (`add_modulo` wraps around the wheel): 5-16% faster than a numpy round trip
    (`tobytes`, `frombuffer`) at 16-96 px, the same pixels."""
    hue, saturation, value = image.convert("HSV").split()
    hue = ImageChops.add_modulo(hue, Image.new("L", image.size, round(shift * 256) % 256))
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def _blend_with_mean_grey(image: Image.Image, factor: float) -> Image.Image:
    """Pillow's ImageEnhance.Contrast: blends with the image's mean "L" level, rounded (the
    mean from the histogram, as Pillow's ImageStat computes it)."""
    histogram = image.convert("L").histogram()
    mean = int(sum(map(operator.mul, histogram, range(256))) / (image.width * image.height) + 0.5)
    return Image.blend(Image.new("RGB", image.size, (mean,) * 3), image, factor)


# ColorJitter's adjustments in torchvision's order (brightness, contrast, saturation, hue), as
# its PIL path (Pillow's ImageEnhance) computes them: blends with black, with the mean grey
# level, with the greyscale image (factor 0 gives the blended-with image, 1 the input), then
# the hue rotation.
_ADJUSTMENTS = (
    lambda image, factor: Image.blend(Image.new("RGB", image.size), image, factor),
    _blend_with_mean_grey,
    lambda image, factor: Image.blend(image.convert("L").convert("RGB"), image, factor),
    _shift_hue,
)


@register("color_jitter")
def color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p: float = 0.8,
                 key: str = "image") -> Op:
    """torchvision ColorJitter on a PIL image (factors in random order), with probability p.

    Brightness, contrast and saturation factors ~ U[max(0, 1 - x), 1 + x], hue shift ~ U[-hue,
    hue] (fraction of the colour wheel, at most 0.5); each may also be a (min, max) pair, and a
    range that is the identity (x = 0) is skipped. Each adjustment works on the uint8 image as
    torchvision does for the PIL images of the DINO/BYOL pipelines (Pillow's ImageEnhance
    blends, hue in 8-bit HSV). Defaults (0.4, 0.4, 0.2, 0.1, p=0.8) are BYOL's (Grill et al.
    2020, App. B), which DINO (Caron et al. 2021) uses; SimCLR (Chen et al. 2020, App. A) uses
    strength s=1: (0.8, 0.8, 0.8, 0.2), p=0.8.
    """
    inf = float("inf")
    ranges = (_jitter_range(brightness, "brightness", 1.0, 0.0, inf),
              _jitter_range(contrast, "contrast", 1.0, 0.0, inf),
              _jitter_range(saturation, "saturation", 1.0, 0.0, inf),
              _jitter_range(hue, "hue", 0.0, -0.5, 0.5))

    def apply(image, rng):
        if image.mode != "RGB":
            raise ValueError(f"color_jitter needs 3 channels, got {len(image.getbands())}")
        for which in rng.permutation(4):
            if ranges[which] is not None:
                image = _ADJUSTMENTS[which](image, uniform(rng, *ranges[which]))
        return image

    return _pil_image_op("color_jitter", probability(p), key, apply)


@register("grayscale")
def grayscale(p: float = 0.2, key: str = "image") -> Op:
    """With probability p, replaces RGB by its ITU-R 601-2 luma (PIL's "L") in all 3 channels.

    p=0.2 as in SimCLR, BYOL and DINO.
    """
    def apply(image, rng):
        del rng
        if image.mode == "L":
            return image
        grey = image.convert("L")  # luma of R, G, B; an alpha band becomes the luma too
        return Image.merge(image.mode, [grey] * len(image.getbands()))

    return _pil_image_op("grayscale", probability(p), key, apply)


@register("gaussian_blur")
def gaussian_blur(p: float, sigma=(0.1, 2.0), key: str = "image") -> Op:
    """With probability p, Gaussian blur with standard deviation ~ U(sigma) pixels.

    sigma in [0.1, 2.0] as in SimCLR (p=0.5) and BYOL/DINO (p=1.0 on the first view, 0.1 on
    the second; DINO: 0.5 on local crops). Uses PIL's GaussianBlur, whose radius is the std.
    """
    p = probability(p)
    sigma = range2(sigma, "sigma")
    if sigma[0] < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")

    def apply(image, rng):
        return image.filter(ImageFilter.GaussianBlur(uniform(rng, *sigma)))

    return _pil_image_op("gaussian_blur", p, key, apply)


@register("solarize")
def solarize(p: float = 0.2, threshold: int = 128, key: str = "image") -> Op:
    """With probability p, inverts pixels >= threshold (x -> 255 - x).

    p=0.2, threshold 128 as on BYOL's / DINO's second view (p=0 on the first).
    """
    p = probability(p)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 256:
        raise ValueError(f"threshold must be in [0, 256], got {threshold!r}")
    lut = [255 - i if i >= threshold else i for i in range(256)]

    def apply(image, rng):
        del rng
        return image.point(lut * len(image.getbands()))

    return _pil_image_op("solarize", p, key, apply)


# ---------------------------------------------------------------------------------------------
# Value ranges and labels


@register("value_range", elementwise=True)
def value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0,
                in_max: float = 255.0, key: str = "image") -> Op:
    """Maps [in_min, in_max] linearly to [vmin, vmax] as float32 (0 -> vmin, 255 -> vmax)."""
    if in_max == in_min:
        raise ValueError(f"in_min and in_max must differ, got {in_min}")

    def op(example, rng):
        del rng
        # The same float32 arithmetic as (x - in_min) * scale + vmin, in one new array.
        scaled = np.subtract(example[key], np.float32(in_min), dtype=np.float32)
        scaled *= np.float32((vmax - vmin) / (in_max - in_min))
        scaled += np.float32(vmin)
        return {**example, key: scaled}

    op.key = key
    return op


@register("normalize", elementwise=True)
def normalize(mean, std, key: str = "image") -> Op:
    """(x - mean) / std per channel as float32, e.g. after value_range(0, 1) the ImageNet
    statistics mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.ndim > 1 or std.ndim > 1 or np.any(std <= 0):
        raise ValueError(f"mean/std must be numbers or per-channel lists with std > 0, "
                         f"got mean={mean.tolist()}, std={std.tolist()}")

    def op(example, rng):
        del rng
        normalized = np.subtract(example[key], mean, dtype=np.float32)  # a new array
        normalized /= std
        return {**example, key: normalized}

    op.key = key
    return op


@register("onehot", deterministic=True)
def onehot(num_classes: int, key: str = "label", key_result: str = "labels", on: float = 1.0,
           off: float = 0.0) -> Op:
    """Integer label(s) in `key` -> float32 vector of num_classes in `key_result` (multi-hot
    for a list of labels); on/off e.g. 0.9/0.1/num_classes for label smoothing."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")

    def op(example, rng):
        del rng
        labels = np.asarray(example[key])
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"label {labels.tolist()} in {key!r} outside [0, {num_classes})")
        vector = np.full(num_classes, off, np.float32)
        vector[labels] = on
        return {**example, key_result: vector}

    return op


# ---------------------------------------------------------------------------------------------
# Keys


@register("keep", deterministic=True)
def keep(*keys: str) -> Op:
    """Keeps only `keys` (e.g. drops variable-length fields that cannot be batched)."""
    if not keys:
        raise ValueError("keep needs at least one key")

    def op(example, rng):
        del rng
        missing = [k for k in keys if k not in example]
        if missing:
            raise KeyError(f"keys {missing} not in example; it has {sorted(example)}")
        return {k: example[k] for k in keys}

    op.keys = keys
    return op


@register("rename", deterministic=True)
def rename(old: str, new: str) -> Op:
    """Moves the value of key `old` to key `new`."""

    def op(example, rng):
        del rng
        example = dict(example)
        example[new] = example.pop(old)
        return example

    return op


@register("copy", deterministic=True)
def copy(src: str, dst: str) -> Op:
    """Copies the value of key `src` to key `dst` (e.g. a second view to augment)."""

    def op(example, rng):
        del rng
        return {**example, dst: example[src]}

    return op


# ---------------------------------------------------------------------------------------------
# Text


@register("tokenize", deterministic=True)
def tokenize(tokenizer: str, length: int, key: str = "caption", out: str = "text") -> Op:
    """Text in `key` -> int32 token ids (length,) in `out` with the tokenizer of spec
    `tokenizer` ('clip_bpe:FILE', 'sentencepiece:FILE' or 'bytes'; see data/tokenizers.py).

    `key` may hold a str, UTF-8 bytes, or a list/array of several (e.g. all captions of an
    image), which give (K, length). The text is removed from the example (strings cannot go
    onto devices) unless key == out.
    """
    from vistax.data import tokenizers  # pylint: disable=import-outside-toplevel

    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    tok = tokenizers.get(tokenizer)

    def op(example, rng):
        del rng
        value = example[key]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (str, bytes, np.str_, np.bytes_)):
            ids = tok.encode([bytes(value) if isinstance(value, np.bytes_) else value], length)[0]
        elif isinstance(value, (list, tuple, np.ndarray)):
            ids = tok.encode([bytes(v) if isinstance(v, np.bytes_) else v for v in value], length)
        else:
            raise TypeError(f"{key!r} holds {type(value).__name__}, not text")
        example = {k: v for k, v in example.items() if k != key}
        example[out] = ids
        return example

    return op

# Modules whose import registers more ops (they use the helpers above, hence imported last).
from vistax.data import multicrop, text_audio  # noqa: E402

OP_MODULES = (multicrop, text_audio)
