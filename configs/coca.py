"""CoCa: contrastive captioner, an image encoder with unimodal and multimodal text decoders
(Yu et al. 2022).

Presets:
  tiny   On the built-in `shapes`, like clip.py:tiny plus a 2-layer multimodal decoder that
         captions the image through 32 pooled image tokens; loss = contrastive + 2 x caption.
  B/32, B/16, L/14
         The paper's model (Yu et al. 2022, Table 1: CoCa-Base / CoCa-Large text decoders, 12
         unimodal + 12 multimodal layers of width 768 (1024 for L/14); Sec. 3.2: attentional
         poolers of 1 and 256 queries) on these image towers at 224px; Sec. 4.1 recipe: batch
         65536, 500k steps, lr 8e-4 after a warmup over 2% of the steps then linear decay,
         decoupled weight decay 0.01, caption weight 2 and contrastive weight 1, softmax loss.
         The paper trains with Adafactor (b1 0.9, b2 0.999); this preset uses AdamW with those
         moments. Tokenizer: set one, e.g. `tokenizer=clip_bpe:<bpe_simple_vocab_16e6.txt.gz>`.

Options: see configs/image_text.py (img=, txt=, tokenizer=, text_length=).

  vistax train --config=configs/coca.py:tiny --workdir=/tmp/coca_tiny
"""

import math

import ml_collections

from vistax.configs import image_text

PRESETS = ("tiny", "B/32", "B/16", "L/14")
# Table 1: text decoder size by image tower size.
TEXT = {"B": "B", "L": "L"}
CAPTION_WEIGHT = 2.0  # Sec. 4.1, lambda_Cap
CONTRASTIVE_WEIGHT = 1.0  # Sec. 4.1, lambda_Con


def coca_config(image: dict, text: dict, **values) -> ml_collections.ConfigDict:
    m = image_text.two_towers_config(image=dict(image, pool="none"),
                                     text=dict(text, causal=True, pool="cls"))
    m.decoder_depth = values.pop("decoder_depth")
    m.caption_queries = values.pop("caption_queries", 256)
    m.update(values)
    return m


def get_config(arg=None):
    arg, c = image_text.base(arg, PRESETS)
    c.objective = "coca"
    c.loss.update(caption_weight=CAPTION_WEIGHT, contrastive_weight=CONTRASTIVE_WEIGHT,
                  max_log_temperature=math.log(100.0))
    if arg.preset == "tiny":
        tiny = image_text.tiny_towers()
        c.model = coca_config(
            image=tiny.image.to_dict(), text=dict(tiny.text.to_dict(), depth=2),
            decoder_depth=2, caption_queries=32, embed_dim=tiny.embed_dim,
            log_temperature_init=math.log(1 / 0.07))
        image_text.tiny_data(c)
    else:
        size = TEXT[arg.preset.split("/")[0]]
        tower = dict(layernorm_eps=1e-6, activation="gelu", dtype="bfloat16",
                     remat="dots_no_batch")
        c.model = coca_config(
            image=dict(variant=arg.preset, image_size=224, **tower),
            text=dict(variant=size, max_len=c.text_length, **tower),
            decoder_depth=12, embed_dim=1024 if size == "L" else 768,
            log_temperature_init=math.log(1 / 0.07))
        image_text.web_data(c, image_size=224)
        c.input.batch_size = 65536
        c.duration = "500000 steps"
        c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.01)
        c.schedule.update(name="linear", base_lr=8e-4, warmup="10000 steps")
        c.mesh.update(data=1, fsdp=-1)
    image_text.apply_options(arg, c)
    return c
