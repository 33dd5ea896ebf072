"""What the image-text config files (clip.py, siglip.py, lit.py) share: towers, data, evals.

Options every one of them accepts after the preset (`configs/clip.py:B/16,txt=L,...`):
  img=<size>/<patch>   replaces the image tower (a ViT variant, e.g. `B/16`)
  txt=<size>           replaces the text tower's width/depth/MLP/heads (ViT table, e.g. `B`)
  tokenizer=<spec>     `bytes`, `clip_bpe:<vocab .txt.gz>` or `sentencepiece:<model>`; the pp
                       strings, the text tower's vocabulary and the zero-shot prompts follow it
  text_length=<int>    tokens per caption
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vistax.configs import common, vit

OPTIONS = dict(img="", txt="", tokenizer="", text_length=0)
# CLIP's image normalisation (the statistics of its training set), used by its presets.
CLIP_MEAN_STD = ("(0.48145466, 0.4578275, 0.40821073), "
                 "(0.26862954, 0.26130258, 0.27577711)")

# The built-in `shapes` data: 64x64 images, captions naming 1-3 coloured shapes.
TINY_IMAGE_SIZE = 48
TINY_TEXT_LENGTH = 32  # bytes: the first object's phrase, e.g. 'a red circle at the top'


def text_config(**values) -> ml_collections.ConfigDict:
    """All text-tower keys (models/text.py: TextConfig); unset sizes come from `variant`."""
    t = ml_collections.ConfigDict(dict(
        variant=config_dict.placeholder(str),
        width=config_dict.placeholder(int), depth=config_dict.placeholder(int),
        mlp_dim=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
        vocab_size=config_dict.placeholder(int), eos_id=config_dict.placeholder(int),
        max_len=77, causal=True, pool="eos", layernorm_eps=1e-5, qkv_bias=True,
        activation="gelu", dropout=0.0, drop_path=0.0, scan=True, remat="none",
        dtype="float32", param_dtype="float32",
    ))
    t.update(values)
    return t


def two_towers_config(image: dict, text: dict, **values) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(
        embed_dim=512, proj_bias=False, log_temperature_init=0.0,
        bias_init=config_dict.placeholder(float)))
    m.image = vit.model_config(**image)
    m.text = text_config(**text)
    m.update(values)
    return m


def base(arg: str | None, presets: tuple[str, ...]) -> tuple[ml_collections.ConfigDict,
                                                               ml_collections.ConfigDict]:
    """(parsed argument, config with the keys every image-text method shares)."""
    arg = common.parse_arg(arg, presets=presets, **OPTIONS)
    c = common.base_config()
    c.objective = "contrastive"
    c.tokenizer = arg.tokenizer or ("bytes" if arg.preset == "tiny" else
                                    config_dict.placeholder(str))
    c.text_length = arg.text_length or (TINY_TEXT_LENGTH if arg.preset == "tiny" else 77)
    c.loss = ml_collections.ConfigDict(dict(
        type="softmax", impl="sharded", max_log_temperature=config_dict.placeholder(float)))
    return arg, c


def tokenize(c) -> str:
    if not c.tokenizer:
        raise ValueError("Set the tokenizer: e.g. `configs/clip.py:B/16,tokenizer=clip_bpe:"
                         "/path/bpe_simple_vocab_16e6.txt.gz`.")
    return f"tokenize({c.tokenizer!r}, {c.text_length}, key='caption', out='text')"


def tiny_data(c) -> None:
    """Training on `shapes` train, zero-shot on the held-out combinations, retrieval on test."""
    size = TINY_IMAGE_SIZE
    c.input.dataset = "shapes"
    c.input.cache = True  # a built-in dataset: a few MB in memory
    c.input.batch_size = 256
    # value_range after tokenize: the trailing value ops run once per batch (and the cache
    # holds uint8 images).
    image, scale = f"decode|resize({size})", "value_range(-1, 1)"
    c.input.pp = f"{image}|{tokenize(c)}|{scale}|keep('image', 'text')"
    c.duration = "8 epochs"
    c.log_every = "1 epochs"
    c.checkpoint.every = "4 epochs"
    c.schedule.base_lr = 1e-3
    c.schedule.warmup = "1 epochs"
    c.optimizer.weight_decay = 0.05
    zero_shot = dict(type="zero_shot", dataset="shapes", batch_size=200,
                     pp=f"{image}|{scale}|keep('image', 'label')", every="4 epochs",
                     tokenizer=c.tokenizer, text_length=c.text_length, templates="shapes")
    # Images whose main object is a colour-shape pair never seen in training: among all 30
    # class names (chance 1/30), and among the 5 held-out names only (chance 1/5).
    c.evals.zeroshot_heldout = ml_collections.ConfigDict(dict(
        zero_shot, split="heldout", class_names="shapes"))
    c.evals.zeroshot_heldout5 = ml_collections.ConfigDict(dict(
        zero_shot, split="heldout", class_names="shapes_heldout"))
    c.evals.zeroshot_test = ml_collections.ConfigDict(dict(
        zero_shot, split="test", class_names="shapes"))
    c.evals.retrieval_test = ml_collections.ConfigDict(dict(
        type="retrieval", dataset="shapes", split="test", batch_size=200,
        pp=f"{image}|{tokenize(c)}|{scale}|keep('image', 'text')", every="4 epochs"))


def tiny_towers(**values) -> ml_collections.ConfigDict:
    size = TINY_IMAGE_SIZE
    return two_towers_config(
        image=dict(width=96, depth=3, mlp_dim=384, num_heads=4, patch_size=8,
                   image_size=size, pool="gap", scan=False),
        text=dict(width=96, depth=3, mlp_dim=384, num_heads=4, max_len=TINY_TEXT_LENGTH,
                  scan=False),
        embed_dim=96, **values)


def web_data(c, image_size: int, mean_std: str = CLIP_MEAN_STD) -> None:
    """Paper-scale image-text data: a prepared dataset (`vistax prepare` from a CSV/TSV)."""
    c.input.dataset = "image_text"
    c.input.worker_count = 8
    c.input.pp = (f"decode|resize({image_size}, method='bicubic')|{tokenize(c)}"
                  f"|value_range(0, 1)|normalize({mean_std})|keep('image', 'text')")
    c.log_every = "100 steps"
    c.checkpoint.every = "2000 steps"


def apply_options(arg, c) -> None:
    """img= / txt= replace the tower sizes, keeping every other tower key."""
    if arg.img:
        c.model.image.variant = arg.img
        for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
            c.model.image[key] = None
    if arg.txt:
        c.model.text.variant = arg.txt
        for key in ("width", "depth", "mlp_dim", "num_heads"):
            c.model.text[key] = None
