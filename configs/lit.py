"""LiT: contrastive tuning with a locked image tower (Zhai et al. 2022).

The image tower is initialised from a pretrained checkpoint (`init_from`, e.g. a
`configs/vit.py` run or a converted CLIP) and locked through `param_groups.freeze` (the paper's
"Lu" setting, its best: Sec. 4 and Table 1); the text tower and both projection heads train with
the softmax contrastive loss. Unlocking ("uu") is `--config.param_groups.freeze='()'`.

Presets:
  tiny   On the built-in `shapes`. The locked tower comes from `init_from.path` if set, else it
         stays at its random initialisation (random ViT features already separate colours).
  B/16, L/16
         A ViT image tower from `init_from.path` (required: a `configs/vit.py` run, whose
         parameter names `init_from.rename` maps to `image/...`), a 12-layer bidirectional
         text tower of the same size pooled at end-of-text, batch 16384, Adam(W) lr 1e-3 with weight decay
         1e-4, cosine schedule with 10k warmup steps (Sec. 3: "batch size of 16k", big_vision's
         LiT recipe).

Options: see configs/image_text.py.
"""

import math

from vistax.configs import image_text
from vistax.models import vit

PRESETS = ("tiny", "B/16", "L/16")
LOCKED_IMAGE_TOWER = (r"image/.*",)


def get_config(arg=None):
    arg, c = image_text.base(arg, PRESETS)
    c.param_groups.freeze = LOCKED_IMAGE_TOWER
    if arg.preset == "tiny":
        c.model = image_text.tiny_towers(log_temperature_init=math.log(10.0))
        image_text.tiny_data(c)
    else:
        size = arg.preset.split("/")[0]
        c.text_length = arg.text_length or 16
        tower = dict(layernorm_eps=1e-6, dtype="bfloat16", remat="dots_no_batch")
        c.model = image_text.two_towers_config(
            image=dict(variant=arg.preset, image_size=224, **tower),
            text=dict(variant=size, max_len=c.text_length, causal=False, pool="eos", **tower),
            embed_dim=vit.VARIANTS[size][0], log_temperature_init=math.log(10.0))
        image_text.web_data(c, image_size=224, mean_std="(0.5, 0.5, 0.5), (0.5, 0.5, 0.5)")
        c.input.batch_size = 16384
        c.duration = "32 epochs"
        c.optimizer.update(weight_decay=1e-4)
        c.schedule.update(base_lr=1e-3, warmup="10000 steps")
        c.init_from.include = r"image/.*"
        c.init_from.rename = ((r"^image/(.*)$", r"\1"),)  # a configs/vit.py checkpoint
        c.mesh.update(data=1, fsdp=-1)
    image_text.apply_options(arg, c)
    return c
