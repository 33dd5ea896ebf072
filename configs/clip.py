"""CLIP: image and text towers trained with the softmax contrastive loss (Radford et al. 2021).

Presets:
  tiny   On the built-in `shapes` (48x48, byte tokens): minutes on 2 CPU cores; reports zero-shot
         accuracy on held-out colour-shape pairs and test retrieval recall.
  B/32, B/16, L/14
         The paper's towers and recipe (Radford et al. 2021, Tables 19-20 for the shapes, Table
         18 for training): image ViT with ln_pre, bias-free patch embedding, QuickGELU and
         LayerNorm eps 1e-5; a causal 12-layer text transformer (width 512, 8 heads; 768/12 for
         L/14) pooled at end-of-text; embedding 512 (768 for L/14); batch 32768; AdamW b1 0.9,
         b2 0.98, eps 1e-6, weight decay 0.2 on weights only; lr 5e-4 (4e-4 for L/14), 2000 warmup
         steps, cosine; 32 epochs; temperature init 1/0.07 clipped at 100. Data: a dataset
         prepared by `vistax prepare` from a CSV/TSV of image paths and captions, named
         `image_text` in input.data_dir. Tokenizer: `tokenizer=clip_bpe:<bpe_simple_vocab_16e6.txt.gz>`.

Options: see configs/image_text.py (img=, txt=, tokenizer=, text_length=).

  vistax train --config=configs/clip.py:tiny --workdir=/tmp/clip_tiny
"""

import math

from vistax.configs import image_text

PRESETS = ("tiny", "B/32", "B/16", "L/14")
# preset: (embed_dim, text width, text heads, learning rate)
PAPER = {"B/32": (512, 512, 8, 5e-4), "B/16": (512, 512, 8, 5e-4), "L/14": (768, 768, 12, 4e-4)}


def get_config(arg=None):
    arg, c = image_text.base(arg, PRESETS)
    c.loss.max_log_temperature = math.log(100.0)
    if arg.preset == "tiny":
        c.model = image_text.tiny_towers(log_temperature_init=math.log(1 / 0.07))
        image_text.tiny_data(c)
    else:
        embed_dim, text_width, text_heads, lr = PAPER[arg.preset]
        clip_tower = dict(layernorm_eps=1e-5, activation="quick_gelu", dtype="bfloat16",
                          remat="dots_no_batch")
        c.model = image_text.two_towers_config(
            image=dict(variant=arg.preset, image_size=224, pre_norm=True, patch_bias=False,
                       **clip_tower),
            text=dict(width=text_width, depth=12, mlp_dim=4 * text_width, num_heads=text_heads,
                      max_len=77, **clip_tower),
            embed_dim=embed_dim, log_temperature_init=math.log(1 / 0.07))
        image_text.web_data(c, image_size=224)
        c.input.batch_size = 32768
        c.duration = "32 epochs"
        c.optimizer.update(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2)
        c.schedule.update(base_lr=lr, warmup="2000 steps")
        c.mesh.update(data=1, fsdp=-1)
    image_text.apply_options(arg, c)
    return c
