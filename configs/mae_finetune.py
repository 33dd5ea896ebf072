"""Fine-tuning an MAE-pretrained ViT end to end (He et al. 2021, Sec. 4 and Table 9).

The encoder's weights are loaded by name from the MAE run (`init=<its workdir>`: parameters
`vit/...` there are our `...`), the decoder is dropped and the head starts from zero. Recipe
(Table 9): AdamW b1 0.9, b2 0.999, weight decay 0.05, lr 1e-3 x batch/256, layer-wise lr decay
0.75, batch 1024, 5 warmup epochs, cosine, 100 epochs for ViT-B and 50 for L/H, label smoothing
0.1, mixup 0.8, cutmix 1.0, drop path 0.1. Not in our pp ops yet, so not in these presets:
RandAugment (9, 0.5) and random erasing 0.25. The reference pools by global averaging with an
extra LayerNorm; we keep the pretrained cls token (the paper finds both work alike, App. A.1)
and the fixed sin-cos positions of pretraining.

Presets: tiny (digits, after configs/mae.py:tiny), B/16, L/16, H/14.
Options: init=<MAE workdir> (without it the same model starts from random weights: the
baseline the pretraining must beat).

  vistax train --config=configs/mae_finetune.py:tiny,init=/tmp/mae_tiny --workdir=/tmp/mae_ft
  vistax train --config=configs/mae_finetune.py:tiny --workdir=/tmp/mae_ft_scratch
"""

import ml_collections

from vistax.configs import common, mae, vit

PRESETS = ("tiny", "B/16", "L/16", "H/14")


def load_encoder(c: ml_collections.ConfigDict, path: str) -> None:
    """init_from: every parameter but the head, looked up as `vit/<name>` in the MAE run."""
    c.init_from.path = path
    c.init_from.exclude = r"head/.*"
    c.init_from.rename = ((r"^", "vit/"),)


def get_config(arg=None):
    arg = common.parse_arg(arg, presets=PRESETS, init="")
    c = vit.get_config("tiny" if arg.preset == "tiny" else "B/16")  # classification keys
    c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.05)
    c.param_groups.layer_decay = 0.75
    c.loss.update(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
    if arg.preset == "tiny":
        c.model = mae.tiny_encoder(num_classes=10, drop_path=0.1)
        c.duration = "40 epochs"
        c.schedule.update(base_lr=1e-3, reference_batch_size=None, warmup="5 epochs")
        c.checkpoint.every = "40 epochs"
        c.evals.test.every = "20 epochs"
    else:
        c.model = mae.paper_encoder(arg.preset, num_classes=1000,
                                    drop_path=0.2 if arg.preset == "H/14" else 0.1)
        c.input.batch_size = 1024
        c.duration = "100 epochs" if arg.preset == "B/16" else "50 epochs"
        c.schedule.update(base_lr=1e-3, reference_batch_size=256, warmup="5 epochs",
                          warmup_start_lr=0.0, end_lr=1e-6)
    if arg.init:
        load_encoder(c, arg.init)
    return c
