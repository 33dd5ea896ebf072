"""Supervised ViT classification.

Presets:
  tiny   A small ViT on the built-in `digits` (32x32), minutes on 2 CPU cores, >= 95% test.
  S/16, B/16, L/16
         ImageNet-1k from scratch with the DeiT recipe (Touvron et al. 2021, Table 9: AdamW,
         lr 5e-4 x batch/512, wd 0.05, 300 epochs, 5 warmup epochs, cosine, label smoothing
         0.1, mixup 0.8, cutmix 1.0, stochastic depth 0.1, bicubic resizing; DeiT uses one
         recipe for every size and did not train L). Not in our pp ops yet, so not in these
         presets: RandAugment, random erasing, repeated augmentation (DeiT Table 8 shows they
         matter). The dataset `imagenet2012` is read from input.data_dir, built by tfds as
         ArrayRecord (`tfds build imagenet2012 --file_format=array_record`) or by
         `vistax prepare --input=<train/ and val/ class folders> --output=<data_dir>/imagenet2012`.

Options after the preset: `variant=<size>/<patch>` replaces the model (e.g. `tiny,variant=mu/4`).

  vistax train --config=configs/vit.py:tiny --workdir=/tmp/vit_tiny
  vistax train --config=configs/vit.py:B/16 --config.input.data_dir=/data/tfds --workdir=...
"""

import ml_collections
from ml_collections import config_dict

from vistax.configs import common

PRESETS = ("tiny", "S/16", "B/16", "L/16")
IMAGENET_MEAN_STD = "(0.485, 0.456, 0.406), (0.229, 0.224, 0.225)"


def model_config(**values) -> ml_collections.ConfigDict:
    """All ViT keys (models/vit.py: ViTConfig); unset size keys come from `variant`."""
    m = ml_collections.ConfigDict(dict(
        variant=config_dict.placeholder(str),
        width=config_dict.placeholder(int), depth=config_dict.placeholder(int),
        mlp_dim=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
        patch_size=config_dict.placeholder(int),
        image_size=224, channels=3, num_classes=0, pool="cls", posemb="learn", num_registers=0,
        representation_size=0, dropout=0.0, drop_path=0.0, head_zero_init=True, head_init_std=0.0,
        head_norm="none", layer_scale=0.0, dynamic_image_size=False, mask_token=False,
        layernorm_eps=1e-6, qkv_bias=True, activation="gelu", patch_bias=True, pre_norm=False,
        scan=True, remat="none",
        dtype="float32", param_dtype="float32",
    ))
    m.update(values)
    return m


def get_config(arg=None):
    arg = common.parse_arg(arg, presets=PRESETS, variant="")
    c = common.base_config()
    c.objective = "classification"
    c.loss = ml_collections.ConfigDict(dict(
        label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, mix_prob=1.0))

    if arg.preset == "tiny":
        c.input.dataset = "digits"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 128
        c.input.pp = ("decode|random_resized_crop(32, scale=(0.7, 1.0), ratio=(0.8, 1.25))"
                      "|onehot(10)|value_range(-1, 1)|keep('image', 'labels')")
        c.model = model_config(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8,
                               image_size=32, num_classes=10, scan=False)
        c.duration = "40 epochs"
        c.optimizer.weight_decay = 0.05
        c.schedule.base_lr = 2e-3
        c.schedule.warmup = "3 epochs"
        c.log_every = "1 epochs"
        c.checkpoint.every = "10 epochs"
        c.evals.test = ml_collections.ConfigDict(dict(
            type="classification", dataset="digits", split="test", batch_size=128,
            pp="decode|value_range(-1, 1)|keep('image', 'label')", every="10 epochs"))
    else:
        c.input.dataset = "imagenet2012"
        c.input.batch_size = 1024
        c.input.worker_count = 8
        c.input.pp = ("decode|random_resized_crop(224, method='bicubic')|flip_lr|onehot(1000)"
                      f"|value_range(0, 1)|normalize({IMAGENET_MEAN_STD})|keep('image', 'labels')")
        c.model = model_config(variant=arg.preset, image_size=224, num_classes=1000,
                               drop_path=0.1, dtype="bfloat16", remat="dots_no_batch")
        c.loss.mixup_alpha = 0.8
        c.loss.cutmix_alpha = 1.0
        c.duration = "300 epochs"
        c.optimizer.weight_decay = 0.05
        c.schedule.base_lr = 5e-4
        c.schedule.reference_batch_size = 512
        c.schedule.warmup = "5 epochs"
        c.schedule.warmup_start_lr = 1e-6
        c.schedule.end_lr = 1e-5
        c.log_every = "100 steps"
        c.checkpoint.every = "1 epochs"
        c.evals.val = ml_collections.ConfigDict(dict(
            type="classification", dataset="imagenet2012", split="validation", batch_size=1024,
            pp=("decode|resize_small(256, method='bicubic')|center_crop(224)|value_range(0, 1)"
                f"|normalize({IMAGENET_MEAN_STD})|keep('image', 'label')"),
            every="5 epochs"))
    if arg.variant:
        c.model.variant = arg.variant
        for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
            c.model[key] = None
    return c
