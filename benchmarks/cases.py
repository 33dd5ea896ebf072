"""The benchmarked cases: a real config file and preset, overrides, and so a batch shape.

Every case is built by the trainer's own `Experiment` from a config in `configs/`, so the step
timed is the step `vistax train` runs (objective, model, optimizer, shardings). The overrides
only fix the shapes and make the two sides of a PyTorch comparison do the same work:

- float32 compute and no remat (the protocol: fp32, full forward + backward + update);
- the ImageNet presets' layers unrolled (`model.scan=False`, as the tiny presets already are):
  the faster step; a scanned stack saves compile time but stacks every layer's activations
  for the backward pass (ViT-S/16 at 112 px on 2 cores: 3.47 s scanned, 3.20 s unrolled; MAE's
  S/16 encoder and 8 x 512 decoder: 5.38 s and 4.77 s, side by side);
- no stochastic depth, dropout, mixup or cutmix in the cases timed against PyTorch (the
  reference models have none), label smoothing kept on both sides;
- the ImageNet presets read a built-in dataset instead (`digits`), with their own pp, so the
  batch has the preset's shapes and no download is needed; evaluators are dropped.

The quick set (`vistax bench` without --cases) takes about 13 minutes on 2 CPU cores; `all`
adds larger models. The `accelerator` set is sized for one GPU or TPU chip: ViT-B/16 and CLIP
B/16 at 224 px in bfloat16 (float32 parameters) with a batch of 256, the presets' compute; it is
refused on CPU, where one of its steps would take many minutes.
"""

from __future__ import annotations

import dataclasses
import importlib

import ml_collections

# (name, description) of the pseudo-case that times a checkpoint save; `checkpoint:<case>`
# saves that case's train state instead of the default one.
CHECKPOINT = "checkpoint"
CHECKPOINT_DEFAULT_CASE = "vit_s16_112"
# checkpoint.every of the base config (configs/common.py): the interval the blocking share is
# computed for, as the loop saves every `checkpoint.every` steps.
DEFAULT_CHECKPOINT_EVERY = "1000 steps"

_FP32 = {"model.dtype": "float32", "model.remat": "none"}
_FP32_TOWERS = {f"model.{tower}.{key}": value for tower in ("image", "text")
                for key, value in (("dtype", "float32"), ("remat", "none"))}
# The DeiT recipe of the ImageNet presets minus what the PyTorch reference does not do.
_PLAIN = {**_FP32, "model.drop_path": 0.0, "loss.mixup_alpha": 0.0, "loss.cutmix_alpha": 0.0}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration."""

    name: str
    config: str  # "<file in configs/ without .py>:<argument>", e.g. "vit:S/16,variant=Ti/16"
    description: str
    overrides: dict = dataclasses.field(default_factory=dict)  # dotted key -> value
    torch: str | None = None  # a kind of torch_trainers.REFERENCES; None: no PyTorch reference
    quick: bool = True  # part of the default set
    accelerator: bool = False  # sized for a GPU/TPU chip: only in the `accelerator` set

    def build_config(self, data_dir: str | None = None) -> ml_collections.ConfigDict:
        """The config `Experiment` gets: the file's preset with the overrides, no evaluators."""
        module, _, arg = self.config.partition(":")
        config = importlib.import_module(f"vistax.configs.{module}").get_config(arg or None)
        config.evals = ml_collections.ConfigDict()
        for key in self.overrides:  # update_from_flattened_dict would add a misspelt key
            *path, leaf = key.split(".")
            parent = config
            for part in path:
                parent = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
            if not isinstance(parent, ml_collections.ConfigDict) or leaf not in parent:
                raise ValueError(f"case {self.name}: {self.config} has no key {key!r}.")
        config.update_from_flattened_dict(dict(self.overrides))
        if data_dir:
            config.input.data_dir = data_dir
        return config


def _imagenet_vit(variant: str, size: int, batch: int, plain: dict = _PLAIN) -> dict:
    """configs/vit.py's ImageNet preset pp (random-resized crop to `size`) on `digits`."""
    from vistax.configs import vit  # pylint: disable=import-outside-toplevel

    pp = vit.get_config(variant).input.pp.replace("random_resized_crop(224",
                                                  f"random_resized_crop({size}")
    return {**plain, "model.scan": False, "input.dataset": "digits", "input.batch_size": batch,
            "input.worker_count": 0, "input.pp": pp, "model.image_size": size}


# The accelerator cases keep the presets' bfloat16 compute; a batch of 256 at 224 px and no
# remat fit one 80 GB GPU: compiled for TPU v5p (`vistax plan`, 4 chips, 64 examples each),
# the steps peak at 7.8 GB (ViT-B/16) and 7.3 GB (CLIP B/16) per chip, ~30 GB for 256.
ACCELERATOR_BATCH = 256
# The presets' input workers: an accelerator host has the cores, and the pipeline column says
# whether they keep up with the step.
ACCELERATOR_WORKERS = 8
_BF16_PLAIN = {key: value for key, value in _PLAIN.items() if key != "model.dtype"}
_BF16_TOWERS = {f"model.{tower}.{key}": value for tower in ("image", "text")
                for key, value in (("remat", "none"), ("scan", False))}


CASES: dict[str, Case] = {c.name: c for c in (
    Case("vit_tiny", "vit:tiny",
         "configs/vit.py:tiny as trained by the README's main job (width 128, depth 4, patch 8, "
         "32 px digits)", overrides=dict(_FP32), torch="vit"),
    Case("vit_ti16_224", "vit:S/16,variant=Ti/16",
         "ViT-Ti/16 at 224 px, 1000 classes (the ImageNet preset's model and pp, fp32)",
         overrides=_imagenet_vit("S/16", 224, 32), torch="vit"),
    Case("vit_s16_112", "vit:S/16", "ViT-S/16 at 112 px, 1000 classes (the ImageNet preset, fp32)",
         overrides=_imagenet_vit("S/16", 112, 64), torch="vit"),
    Case("clip_tiny", "clip:tiny",
         "configs/clip.py:tiny: 48 px image tower and causal byte text tower (width 96, depth 3), "
         "softmax loss", overrides=dict(_FP32_TOWERS), torch="two_towers"),
    Case("mae_tiny", "mae:tiny", "configs/mae.py:tiny: ViT encoder on the 25% visible patches "
         "of 32 px digits and a 2-block decoder", overrides=dict(_FP32), torch="mae"),
    Case("dino_tiny", "dino:tiny", "configs/dino.py:tiny: student on 2 x 32 px + 4 x 16 px "
         "crops, EMA teacher on the 2 global crops, 1024 prototypes", overrides=dict(_FP32),
         torch="dino"),
    Case("perceiver_tiny", "perceiver:tiny", "configs/perceiver.py:tiny: 256 pixel tokens of "
         "16 px digits, 64 x 128 latents", overrides=dict(_FP32), torch="perceiver"),
    # --cases=all adds these.
    Case("siglip_tiny", "siglip:tiny", "configs/siglip.py:tiny: clip_tiny's towers with the "
         "sigmoid loss", overrides=dict(_FP32_TOWERS), torch="two_towers", quick=False),
    Case("clip_s16_112", "clip:tiny,img=S/16,txt=S",
         "CLIP with S-size towers: ViT-S/16 at 112 px (mean-pooled) and a 12-layer causal byte "
         "text tower of width 384, 32 tokens", torch="two_towers", quick=False,
         overrides={**_FP32_TOWERS, "input.batch_size": 64, "model.image.image_size": 112,
                    "model.embed_dim": 384, "input.pp": (
                        "decode|resize(112)|value_range(-1, 1)|tokenize('bytes', 32, "
                        "key='caption', out='text')|keep('image', 'text')")}),
    Case("vit_b16_224", "vit:B/16", "ViT-B/16 at 224 px, 1000 classes (the ImageNet preset, fp32)",
         overrides=_imagenet_vit("B/16", 224, 16), torch="vit", quick=False),
    Case("mae_s16_112", "mae:B/16", "MAE with a ViT-S/16 encoder at 112 px and the paper's "
         "8 x 512 decoder, 75% masked", torch="mae", quick=False,
         overrides={**_FP32, "model.variant": "S/16", "model.image_size": 112,
                    "model.scan": False, "input.dataset": "digits", "input.batch_size": 64,
                    "input.worker_count": 0,
                    "input.pp": ("decode|random_resized_crop(112, scale=(0.2, 1.0), "
                                 "method='bicubic')|flip_lr|value_range(0, 1)|keep('image')")}),
    Case("perceiver_shapes", "perceiver:shapes", "configs/perceiver.py:shapes: 1024 pixel "
         "tokens of 32 px shapes, 64 x 128 latents", overrides=dict(_FP32), torch="perceiver",
         quick=False),
    # --cases=accelerator: GPU/TPU only.
    Case("vit_b16_224_bf16", "vit:B/16", "ViT-B/16 at 224 px, 1000 classes, bfloat16 compute "
         "(the ImageNet preset's model and pp)", torch="vit", quick=False, accelerator=True,
         overrides={**_imagenet_vit("B/16", 224, ACCELERATOR_BATCH, _BF16_PLAIN),
                    "input.worker_count": ACCELERATOR_WORKERS}),
    Case("clip_b16_224_bf16", "clip:B/16,tokenizer=bytes", "CLIP B/16 (Radford et al. 2021, "
         "Table 19/20 towers) at 224 px, 77 byte tokens, bfloat16 compute, on `shapes`",
         torch="two_towers", quick=False, accelerator=True,
         overrides={**_BF16_TOWERS, "input.dataset": "shapes",
                    "input.worker_count": ACCELERATOR_WORKERS,
                    "input.batch_size": ACCELERATOR_BATCH,
                    # 32 epochs of `shapes` are fewer steps than the preset's 2000 warmup ones
                    "duration": "10000 steps"}),
)}

QUICK = tuple(name for name, case in CASES.items() if case.quick) + (CHECKPOINT,)
ALL = tuple(name for name, case in CASES.items() if not case.accelerator) + (CHECKPOINT,)
ACCELERATOR = tuple(name for name, case in CASES.items() if case.accelerator)


def parse_cases(text: str | None) -> tuple[list[Case], str | None]:
    """`--cases` -> (training cases in order, case whose state the checkpoint bench saves or
    None). Empty: the quick set; `all`: every case but the accelerator ones; `accelerator`:
    those; `checkpoint[:<case>]` adds the save timing."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        names = list(QUICK)
    elif names == ["all"]:
        names = list(ALL)
    elif names == ["accelerator"]:
        names = list(ACCELERATOR)
    cases, checkpoint = [], None
    for name in names:
        head, sep, target = name.partition(":")
        if head == CHECKPOINT:
            checkpoint = target if sep else CHECKPOINT_DEFAULT_CASE
            if checkpoint not in CASES:
                raise ValueError(f"--cases: {name!r} names no case; cases: {sorted(CASES)}.")
            continue
        if name not in CASES:
            raise ValueError(f"--cases: unknown case {name!r}; cases: {sorted(CASES)}, "
                             f"'{CHECKPOINT}[:<case>]', 'all' or 'accelerator'.")
        if CASES[name] not in cases:
            cases.append(CASES[name])
    return cases, checkpoint
