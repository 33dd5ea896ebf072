"""Linear probing of an MAE-pretrained ViT (He et al. 2021, App. A.1 and Table 10).

The encoder is frozen (no updates, no optimizer state, no backward pass) and its cls token,
after the encoder's final LayerNorm, feeds a BatchNorm without affine parameters and a linear
classifier (initialised from a normal of std 0.01, as the reference), the only trained layer.
Recipe (Table 10): LARS, momentum 0.9, no weight decay, lr 0.1 x batch/256, batch 16384, 10
warmup epochs, cosine, 90 epochs, RandomResizedCrop and flips only, no label smoothing or mixing.

Presets: tiny (digits, after configs/mae.py:tiny), B/16, L/16, H/14.
Options: init=<MAE workdir> (without it the frozen encoder keeps its random weights: the
baseline).

  vistax train --config=configs/mae_linear_probe.py:tiny,init=/tmp/mae_tiny --workdir=/tmp/mae_lin
"""

from vistax.configs import common, mae, mae_finetune, vit

PRESETS = ("tiny", "B/16", "L/16", "H/14")


def get_config(arg=None):
    arg = common.parse_arg(arg, presets=PRESETS, init="")
    c = vit.get_config("tiny" if arg.preset == "tiny" else "B/16")
    c.optimizer.update(name="lars", momentum=0.9, weight_decay=0.0)
    c.param_groups.freeze = (r"(?!head/).*",)  # everything but the linear head
    c.loss.update(label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    if arg.preset == "tiny":
        c.model = mae.tiny_encoder(num_classes=10, head_norm="batchnorm", head_init_std=0.01)
        c.duration = "40 epochs"
        # LARS steps are relative to each weight's norm (trust ratio 0.001 x lr per step), so
        # the tiny run keeps the paper's absolute peak lr (0.1 x 16384 / 256 = 6.4) instead of
        # scaling it down 128-fold: at 0.05 the head's weights would move ~0.05% per step, and
        # 450 steps (the paper takes ~7000) would leave it near its initialisation.
        c.schedule.update(base_lr=6.4, reference_batch_size=None, warmup="4 epochs")
        c.checkpoint.every = "40 epochs"
        c.evals.test.every = "20 epochs"
    else:
        c.model = mae.paper_encoder(arg.preset, num_classes=1000, head_norm="batchnorm",
                                    head_init_std=0.01)
        c.input.batch_size = 16384
        c.input.pp = ("decode|random_resized_crop(224, method='bicubic')|flip_lr"
                      f"|value_range(0, 1)|normalize({vit.IMAGENET_MEAN_STD})"
                      "|onehot(1000)|keep('image', 'labels')")
        c.duration = "90 epochs"
        c.schedule.update(base_lr=0.1, reference_batch_size=256, warmup="10 epochs",
                          warmup_start_lr=0.0, end_lr=0.0)
    if arg.init:
        mae_finetune.load_encoder(c, arg.init)
    return c
