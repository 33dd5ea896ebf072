"""Multi-crop views and block masks for self-distillation (DINO, iBOT, DINOv2) as pp ops.

`dino_multicrop` turns `image` into `global_crops` (2, G, G, C) and `local_crops` (N, L, L, C)
uint8 arrays with DINO's augmentation policy; `value_range`/`normalize(..., key=...)` then
apply to the stacks as to an image. Crops of one resolution are stacked so the model runs
each resolution as one batch. `ibot_masks` draws iBOT's block masks for the global crops.
"""
from __future__ import annotations

import math

import numpy as np

from vistax.data import preprocess as pp


@pp.register("dino_multicrop")
def dino_multicrop(global_size=224, local_size=96, num_local: int = 8,
                   global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), flip: bool = True,
                   method: str = "bicubic", key: str = "image") -> pp.Op:
    """DINO's views (Caron et al. 2021, Sec. 3.1 and App. "Data augmentation", after BYOL):
    2 global crops (random resized crop of scale `global_scale` to `global_size`) and
    `num_local` local crops (scale `local_scale`, `local_size`); paper defaults 224/96,
    (0.4, 1)/(0.05, 0.4), 8 local crops (Table 4 / Sec. 5.1). Every view gets a flip (p 0.5,
    `flip=False` for data that is not mirror-symmetric, e.g. digits), colour jitter (0.4, 0.4,
    0.2, 0.1; p 0.8) and grayscale (p 0.2); then Gaussian blur with p 1.0 on the first global
    crop, p 0.1 and solarisation (p 0.2) on the second, p 0.5 on local crops.

    Writes `global_crops` (2, G, G, C) and, if num_local > 0, `local_crops` (num_local, L, L, C),
    uint8; removes `key`.
    """
    if not isinstance(num_local, int) or isinstance(num_local, bool) or num_local < 0:
        raise ValueError(f"num_local must be an int >= 0, got {num_local!r}")
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    global_crop = pp.random_resized_crop(global_size, global_scale, method=method)
    local_crop = pp.random_resized_crop(local_size, local_scale, method=method)
    photometric = ([pp.flip_lr(0.5)] if flip else []) + [pp.color_jitter(), pp.grayscale(0.2)]
    # Each view is a chain of the pp ops' PIL forms: the image becomes a PIL image once and
    # each view an array once (the same pixels and draws as applying the ops one by one).
    global_views = (
        pp.pil_chain([global_crop, *photometric, pp.gaussian_blur(1.0)], "dino_multicrop"),
        pp.pil_chain([global_crop, *photometric, pp.gaussian_blur(0.1), pp.solarize(0.2)],
                     "dino_multicrop"))
    local_view = pp.pil_chain([local_crop, *photometric, pp.gaussian_blur(0.5)], "dino_multicrop")

    def op(example, rng):
        image = pp.to_pil(pp.uint8_image(example[key], "dino_multicrop"))
        out = {k: v for k, v in example.items() if k != key}
        out["global_crops"] = np.stack([pp.from_pil(view(image, rng)) for view in global_views])
        if num_local:
            out["local_crops"] = np.stack([pp.from_pil(local_view(image, rng))
                                           for _ in range(num_local)])
        return out

    return op


def block_mask(rng: np.random.Generator, height: int, width: int, num_masked: int, *,
               min_block: int = 4, min_aspect: float = 0.3) -> np.ndarray:
    """A (height, width) bool mask of about `num_masked` patches made of rectangles (BEiT's
    blockwise masking, Bao et al. 2022, Alg. 1, which iBOT and DINOv2 use): each rectangle has
    an area drawn between `min_block` and the patches still to mask and a log-uniform aspect
    ratio in [min_aspect, 1/min_aspect]; placements that add nothing new are retried up to 10
    times, after which masking stops (so a few patches fewer than asked are possible)."""
    mask = np.zeros((height, width), bool)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    count = 0
    while count < num_masked:
        left_to_mask = num_masked - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, left_to_mask), left_to_mask)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < height and 0 < w < width):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            new = int((~mask[top:top + h, left:left + w]).sum())
            if 0 < new <= left_to_mask:
                mask[top:top + h, left:left + w] = True
                added = new
                break
        if not added:
            break
        count += added
    return mask


@pp.register("ibot_masks")
def ibot_masks(grid, probability: float = 0.5, ratio=(0.1, 0.5), num_crops: int = 2,
               key: str = "global_masks") -> pp.Op:
    """Block masks for iBOT's masked-patch loss on the global crops (Zhou et al. 2022, Sec. 3;
    DINOv2, Oquab et al. 2024, Sec. 4): each of `num_crops` crops is masked with probability
    `probability` (0.5), at a ratio drawn uniformly in `ratio` ((0.1, 0.5)) of its `grid`
    patches (int, or (rows, cols): image size / patch size). Writes `key`: (num_crops, rows *
    cols) bool, True = masked, in raster order like the ViT's patch tokens. (DINOv2's collate
    spreads the ratios over a batch with a linspace; drawing them per example gives the same
    distribution of ratios.)"""
    rows, cols = pp.size2(grid)
    probability = pp.probability(probability, "probability")
    low, high = pp.range2(ratio, "ratio")
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio!r}")
    if not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"num_crops must be a positive int, got {num_crops!r}")

    def op(example, rng):
        masks = np.zeros((num_crops, rows * cols), bool)
        for i in range(num_crops):
            if rng.random() < probability:
                target = int(rows * cols * rng.uniform(low, high))
                masks[i] = block_mask(rng, rows, cols, target).reshape(-1)
        return {**example, key: masks}

    return op
