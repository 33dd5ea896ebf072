"""Named prompt-template sets and class-name sets for zero-shot classification.

A zero-shot evaluator's `templates` and `class_names` keys take a name from these tables or an
explicit list. Each template holds "{}", which is replaced by a class name; a class's text
embedding is the renormalised mean of its templates' embeddings (CLIP's prompt ensembling).
"""

from __future__ import annotations

from collections.abc import Sequence

from vistax.data.builders import shapes

# The 80 ImageNet prompt templates of CLIP (Radford et al. 2021), in the order of OpenAI's
# notebook `Prompt_Engineering_for_ImageNet.ipynb` ("1000 classes, 80 templates").
CLIP_IMAGENET = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7 of them that sequential forward selection kept, in the order selected (same notebook).
CLIP_IMAGENET_7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "clip_imagenet": CLIP_IMAGENET,
    "clip_imagenet_7": CLIP_IMAGENET_7,
    "photo": ("a photo of a {}.",),
    "plain": ("{}",),
    # The built-in `shapes` captions say "a <colour> <shape> <where>" for each object: one
    # prompt without a place and one per grid cell, phrased as the captions phrase them.
    "shapes": ("a {}",) + tuple(f"a {{}} {where}" for where in shapes.POSITIONS.values()),
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    # "<colour> <shape>" in the order of the dataset's `label` ClassLabel.
    "shapes": tuple(shapes.CLASS_NAMES),
    # The held-out combinations only (the first object of every `heldout` image is one of
    # them); labels are mapped to this list by name, see ZeroShotEvaluator.
    "shapes_heldout": tuple(shapes.HELDOUT),
}


def _names(value, key: str, table: dict[str, tuple[str, ...]], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"{key}={value!r} is not a named set of {what} ({sorted(table)}); "
                             "give a name or a list of strings.")
        return table[value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"{key}={value!r}: expected a name in {sorted(table)} or a non-empty "
                         f"list of {what}.")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{key}: every entry must be a non-empty string, got {bad[:5]!r}.")
    return tuple(value)


def class_names(value, key: str = "class_names") -> tuple[str, ...]:
    """A named set of CLASS_NAMES or an explicit list; errors name config key `key`."""
    names = _names(value, key, CLASS_NAMES, "class names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{key} names a class twice: {duplicates[:5]}.")
    return names


def templates(value, key: str = "templates") -> tuple[str, ...]:
    """A named set of TEMPLATES or an explicit list, each holding '{}' once."""
    found = _names(value, key, TEMPLATES, "templates")
    bad = [t for t in found if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{key}: every template must hold '{{}}' (the class name) exactly once; "
                         f"these do not: {bad[:5]!r}.")
    return found


def prompts(names: Sequence[str], template_set: Sequence[str]) -> list[str]:
    """Class-major prompts: prompts[c * len(template_set) + t] is template t of class c."""
    return [t.replace("{}", name) for name in names for t in template_set]
