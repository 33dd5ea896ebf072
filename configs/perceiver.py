"""Perceiver, Perceiver IO and Perceiver AR: any modality through a latent bottleneck.

Presets (CPU minutes):
  tiny        Perceiver on raw `digits` pixels at 16x16 (the 8x8 originals): 256 pixel tokens
              (grey value + 2-D Fourier features, 8 bands) read twice by 64 x 128 latents (2
              cross-attends, 2 blocks of one self-attention layer, weights shared), a Perceiver
              IO classification query.
  shapes      The same model on raw `shapes` pixels at 32x32 (1024 tokens, 30 colour-shape
              classes).
  mlm_tiny    Perceiver IO masked byte modelling on the built-in `docs` text (128-byte windows,
              15% of bytes masked, tied byte embedding); reports masked-byte accuracy on the
              held-out split (evals.val).
  multimodal_tiny
              Image + caption bytes of `shapes` as one input (4x4 pixel patches and bytes, padded
              to one width with learned modality channels); masked modelling of the caption, so
              colour and shape words are predicted from the picture.
  ar_tiny     Perceiver AR on `docs`: 512-byte context, the last 64 positions are causal latents;
              next-byte loss and bits per byte on the held-out split.
Paper presets (build on a simulated mesh; data from input.data_dir):
  imagenet    Perceiver (Jaegle et al. 2021a, Sec. 4.1): 224x224 raw pixels (50,176 tokens,
              64 Fourier bands), 512 x 1024 latents, 8 blocks of 6 self-attention layers with a
              cross-attend before each block, weights shared except the first cross-attend;
              mean-pooled latents -> classes. LAMB, lr 4e-3, batch 1024, 120 epochs.
  io_imagenet Perceiver IO (Jaegle et al. 2021b) on ImageNet with Fourier features: one
              cross-attend, 8 x 6 shared self-attention layers of 512 x 1024 latents, a learned
              classification query (the released `vision-perceiver-fourier` shapes).
  mlm         Perceiver IO's language model (the released `language-perceiver` shapes): 2048
              UTF-8 bytes embedded at 768, 256 x 1280 latents, 26 self-attention layers (qk 256),
              8-head decoder with one query per byte. input.dataset must hold a `text` feature
              (the built-in `docs` by default).
  ar          Perceiver AR (Hawthorne et al. 2022) on bytes: 8192-byte context, 1024 latents,
              12 layers of width 1024.

  vistax train --config=configs/perceiver.py:tiny --workdir=/tmp/perceiver_tiny
  vistax train --config=configs/perceiver.py:mlm_tiny --workdir=/tmp/perceiver_mlm
"""

import ml_collections

from vistax.configs import common, vit

PRESETS = ("tiny", "shapes", "mlm_tiny", "multimodal_tiny", "ar_tiny", "imagenet", "io_imagenet",
           "mlm", "ar")


def model_config(**values) -> ml_collections.ConfigDict:
    """All Perceiver keys (models/perceiver.py: PerceiverConfig) but inputs and decoder."""
    m = ml_collections.ConfigDict(dict(
        num_latents=512, latent_dim=1024, num_blocks=8, layers_per_block=6, cross_attends=1,
        share_blocks=True, cross_heads=1, self_heads=8, qk_channels=0, v_channels=0,
        cross_widening=1, self_widening=1, cross_query_residual=True, min_padding=4,
        dropout=0.0, layernorm_eps=1e-5, activation="gelu", remat="none", dtype="float32",
        param_dtype="float32"))
    m.update(values)
    return m


def image_input(size: int, channels: int, bands: int, **values) -> dict:
    return dict(kind="image", shape=(size, size), channels=channels, fourier_bands=bands,
                **values)


def bytes_input(length: int, width: int) -> dict:
    return dict(kind="bytes", shape=(length,), width=width, vocab_size=259)


def bytes_pp(window: int, key: str = "text") -> str:
    """A random window of `window` bytes of `key`, as window + 2 ids (bos, bytes, eos, pad)."""
    return (f"text_window({window}, key='{key}')|tokenize('bytes', {window + 2}, key='{key}', "
            f"out='text')|keep('text')")


def text_eval(encoder: str, window: int, batch_size: int, every: str) -> ml_collections.ConfigDict:
    """The `metrics` evaluator on the held-out split of `docs`."""
    return ml_collections.ConfigDict(dict(
        type="metrics", encoder=encoder, dataset="docs", split="test", pp=bytes_pp(window),
        batch_size=batch_size, every=every))


def paper_run(c, *, duration: str, checkpoint_every: str) -> None:
    """Paper presets: FSDP over every device, logs every 100 steps."""
    c.duration = duration
    c.mesh.update(data=1, fsdp=-1)
    c.log_every = "100 steps"
    c.checkpoint.every = checkpoint_every


def tiny_schedule(c, *, lr: float, warmup: str, duration: str) -> None:
    c.optimizer.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.05)
    c.schedule.update(base_lr=lr, warmup=warmup)
    c.duration = duration


def get_config(arg=None):
    arg = common.parse_arg(arg, presets=PRESETS)
    c = common.base_config()
    c.objective = "perceiver"
    c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0, mask_rate=0.15,
                                            first_content_id=3))
    preset = arg.preset
    if preset in ("tiny", "shapes"):
        digits = preset == "tiny"
        c.input.dataset = "digits" if digits else "shapes"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        # digits are 8x8 originals (16 px keeps them whole); shapes' 64 px are halved.
        size, channels = (16, 1) if digits else (32, 3)
        c.input.batch_size = 128
        c.input.pp = (f"decode({channels})|random_resized_crop({size}, scale=(0.6, 1.0), "
                      "ratio=(0.8, 1.25))|value_range(-1, 1)|keep('image', 'label')")
        c.model = model_config(
            num_latents=64, latent_dim=128, num_blocks=2, layers_per_block=1, cross_attends=2,
            self_heads=4, self_widening=4,
            inputs=dict(image=image_input(size, channels, bands=size // 2)),
            decoder=dict(kind="classification", num_classes=10 if digits else 30))
        c.loss.label_smoothing = 0.1
        tiny_schedule(c, lr=2e-3, warmup="3 epochs",
                      duration="40 epochs" if digits else "10 epochs")
        c.log_every = "5 epochs" if digits else "1 epochs"
        c.checkpoint.every = "20 epochs" if digits else "5 epochs"
        c.evals.test = ml_collections.ConfigDict(dict(
            type="classification", dataset=c.input.dataset, split="test", batch_size=128,
            pp=f"decode({channels})|resize({size})|value_range(-1, 1)|keep('image', 'label')",
            every="10 epochs" if digits else "5 epochs"))
    elif preset == "mlm_tiny":
        c.input.dataset = "docs"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 64
        c.input.pp = bytes_pp(128)
        c.model = model_config(
            num_latents=64, latent_dim=128, num_blocks=1, layers_per_block=4, cross_heads=4,
            self_heads=4, self_widening=4, qk_channels=0,
            inputs=dict(text=bytes_input(130, 128)),
            decoder=dict(kind="mlm", modality="text", heads=4, qk_channels=128,
                         query_residual=False))
        tiny_schedule(c, lr=1e-3, warmup="200 steps", duration="3000 steps")
        c.log_every = "250 steps"
        c.checkpoint.every = "1000 steps"
        c.evals.val = text_eval("masked_bytes", 128, batch_size=64, every="1000 steps")
    elif preset == "multimodal_tiny":
        c.input.dataset = "shapes"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 64
        pp = ("decode|tokenize('bytes', 96, key='caption', out='text')|value_range(-1, 1)"
              "|keep('image', 'text')")
        c.input.pp = pp
        c.model = model_config(
            num_latents=64, latent_dim=128, num_blocks=1, layers_per_block=4, cross_heads=4,
            self_heads=4, self_widening=4, min_padding=4, qk_channels=128,
            inputs=dict(image=image_input(64, 3, bands=8, patch=4), text=bytes_input(96, 64)),
            decoder=dict(kind="mlm", modality="text", heads=4, qk_channels=128,
                         query_residual=False))
        tiny_schedule(c, lr=1e-3, warmup="200 steps", duration="3000 steps")
        c.log_every = "250 steps"
        c.checkpoint.every = "1000 steps"
        c.evals.val = ml_collections.ConfigDict(dict(
            type="metrics", encoder="masked_bytes", dataset="shapes", split="test", pp=pp,
            batch_size=64, every="1000 steps"))
    elif preset == "ar_tiny":
        c.objective = "perceiver_ar"
        c.loss = ml_collections.ConfigDict(dict(key="text"))
        c.input.dataset = "docs"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 32
        c.input.pp = bytes_pp(511)  # 513 ids: 512 inputs and the targets shifted by one
        c.model = ar_model_config(max_length=512, num_latents=64, width=128, depth=4,
                                  num_heads=4, cross_heads=4, mlp_dim=512)
        tiny_schedule(c, lr=1e-3, warmup="200 steps", duration="2000 steps")
        c.log_every = "250 steps"
        c.checkpoint.every = "1000 steps"
        c.evals.val = text_eval("next_token", 511, batch_size=32, every="1000 steps")
    elif preset in ("imagenet", "io_imagenet"):
        c.input.dataset = "imagenet2012"
        c.input.batch_size = 1024
        c.input.worker_count = 8
        c.input.pp = ("decode|random_resized_crop(224, method='bicubic')|flip_lr|value_range(0, 1)"
                      f"|normalize({vit.IMAGENET_MEAN_STD})|keep('image', 'label')")
        original = preset == "imagenet"
        c.model = model_config(
            cross_attends=8 if original else 1, self_widening=1, dtype="bfloat16",
            remat="dots_no_batch",
            inputs=dict(image=image_input(224, 3, bands=64)),
            decoder=dict(kind="mean" if original else "classification", num_classes=1000))
        c.loss.label_smoothing = 0.1
        c.optimizer.update(name="lamb", b1=0.9, b2=0.999, weight_decay=0.1)
        c.schedule.update(base_lr=4e-3, warmup="10 epochs")
        paper_run(c, duration="120 epochs", checkpoint_every="2 epochs")
        c.evals.val = ml_collections.ConfigDict(dict(
            type="classification", dataset="imagenet2012", split="validation", batch_size=1024,
            pp=("decode|resize_small(256, method='bicubic')|center_crop(224)|value_range(0, 1)"
                f"|normalize({vit.IMAGENET_MEAN_STD})|keep('image', 'label')"),
            every="5 epochs"))
    elif preset == "mlm":
        c.input.dataset = "docs"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 512
        c.input.pp = bytes_pp(2046)
        c.model = model_config(
            num_latents=256, latent_dim=1280, num_blocks=1, layers_per_block=26, cross_heads=8,
            self_heads=8, qk_channels=256, v_channels=1280, dtype="bfloat16",
            remat="dots_no_batch",
            inputs=dict(text=bytes_input(2048, 768)),
            decoder=dict(kind="mlm", modality="text", heads=8, qk_channels=256,
                         query_residual=False))
        c.optimizer.update(name="lamb", b1=0.9, b2=0.999, weight_decay=0.01)
        c.schedule.update(base_lr=1.25e-3, warmup="1000 steps")
        paper_run(c, duration="500000 steps", checkpoint_every="5000 steps")
        c.evals.val = text_eval("masked_bytes", 2046, batch_size=512, every="10000 steps")
    else:  # ar
        c.objective = "perceiver_ar"
        c.loss = ml_collections.ConfigDict(dict(key="text"))
        c.input.dataset = "docs"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 256
        c.input.pp = bytes_pp(8191)
        c.model = ar_model_config(dtype="bfloat16", remat="dots_no_batch")
        c.optimizer.update(name="adamw", b1=0.9, b2=0.95, weight_decay=0.1)
        c.schedule.update(base_lr=3e-4, warmup="1000 steps")
        paper_run(c, duration="200000 steps", checkpoint_every="5000 steps")
        c.evals.val = text_eval("next_token", 8191, batch_size=256, every="10000 steps")
    # Stacked self-attention layers (per-layer clipping, layer decay) are `self_attends` here.
    c.param_groups.stacked = r"(.*/)?(blocks|self_attends)/.*"
    return c


def ar_model_config(**values) -> ml_collections.ConfigDict:
    """All Perceiver AR keys (models/perceiver_ar.py: PerceiverARConfig)."""
    m = ml_collections.ConfigDict(dict(
        vocab_size=259, max_length=8192, num_latents=1024, width=1024, depth=12, num_heads=16,
        cross_heads=16, mlp_dim=4096, dropout=0.0, drop_path=0.0, pad_id=0, vocab_multiple=128,
        layernorm_eps=1e-6,
        qkv_bias=True, activation="gelu", scan=True, remat="none", dtype="float32",
        param_dtype="float32"))
    m.update(values)
    return m
