"""SigLIP: image and text towers trained with the pairwise sigmoid loss (Zhai et al. 2023).

Presets:
  tiny   On the built-in `shapes`, like clip.py:tiny but with the sigmoid loss.
  B/16, L/16, So400m/14
         The paper's setup (Zhai et al. 2023, Sec. 4): image ViT with MAP pooling; a
         bidirectional text transformer of the same size pooled at its last (end-of-text)
         token, 16 tokens per caption; towers' heads with bias; log-temperature init ln 10, bias
         init -10; batch 32k; lr 1e-3 with weight decay 1e-4 (Sec. 4.1; "decoupled" as in
         big_vision: optax adamw multiplies by the lr), AdamW b2 0.95 for stability (Sec. 4.6);
         the sigmoid loss computed in the chunked ring of Sec. 3.3. Tokenizer: a SentencePiece
         model of 32k pieces (`tokenizer=sentencepiece:<model>`, e.g. trained by
         `vistax tokenizer`).

Options: see configs/image_text.py.
"""

from vistax.configs import image_text
from vistax.models import two_towers, vit

PRESETS = ("tiny", "B/16", "L/16", "So400m/14")


def get_config(arg=None):
    arg, c = image_text.base(arg, PRESETS)
    c.loss.type = "sigmoid"
    siglip = dict(log_temperature_init=two_towers.SIGLIP_LOG_TEMPERATURE,
                  bias_init=two_towers.SIGLIP_BIAS, proj_bias=True)
    if arg.preset == "tiny":
        c.model = image_text.tiny_towers(**siglip)
        image_text.tiny_data(c)
    else:
        size = arg.preset.split("/")[0]
        text_size = "So400m" if size == "So400m" else size
        c.text_length = arg.text_length or 16
        tower = dict(layernorm_eps=1e-6, activation="gelu_tanh", dtype="bfloat16",
                     remat="dots_no_batch")
        c.model = image_text.two_towers_config(
            image=dict(variant=arg.preset, image_size=224, pool="map", posemb="learn", **tower),
            text=dict(variant=text_size, max_len=c.text_length, causal=False, pool="eos",
                      **tower),
            embed_dim=vit.VARIANTS[text_size][0], **siglip)
        image_text.web_data(c, image_size=224, mean_std="(0.5, 0.5, 0.5), (0.5, 0.5, 0.5)")
        c.input.batch_size = 32768
        c.duration = "32 epochs"  # as CLIP's presets; set it for your data (examples seen)
        c.optimizer.update(b1=0.9, b2=0.95, weight_decay=1e-4)
        c.schedule.update(base_lr=1e-3, warmup="5000 steps")
        c.mesh.update(data=1, fsdp=-1)
    image_text.apply_options(arg, c)
    return c
