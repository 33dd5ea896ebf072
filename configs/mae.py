"""MAE pretraining: masked autoencoders (He et al. 2021).

Presets:
  tiny   A small ViT (16 patches of 32x32 `digits`) and a 2-block decoder, minutes on
         2 CPU cores. Reports a frozen-feature linear probe on digits (evals.probe) and writes
         reconstruction pictures of digits and scikit-image photos (evals.pictures). Follow it
         with configs/mae_linear_probe.py:tiny and configs/mae_finetune.py:tiny.
  B/16, L/16, H/14
         The paper's recipe (Table 8): AdamW b1 0.9, b2 0.95, weight decay 0.05, lr 1.5e-4 x
         batch/256, batch 4096, 40 warmup epochs, cosine; 800 epochs (the ablations' length;
         Fig. 7 goes to 1600); RandomResizedCrop (scale 0.2-1) and flips only; mask ratio 0.75,
         normalised-pixel targets, decoder of 8 blocks, width 512, 16 heads (Table 1); fixed
         sin-cos position embeddings. Data: `imagenet2012` in input.data_dir (see configs/vit.py).

Options after the preset:
  sweep=mask_ratio|target|decoder_depth
         Declares an ablation sweep (run it with `vistax sweep`), in the spirit of Table 1 and
         Fig. 5: mask ratio 0.25 ... 0.9; normalised vs raw pixels; decoder depth 1 ... 12 (1-4
         for tiny, whose points train 50 epochs). The table's metric is the final linear-probe
         accuracy (evals.probe).

  vistax train --config=configs/mae.py:tiny --workdir=/tmp/mae_tiny
  vistax sweep --config=configs/mae.py:tiny,sweep=mask_ratio --workdir=/tmp/mae_mask_sweep
"""

import ml_collections

from vistax.configs import common, vit

PRESETS = ("tiny", "B/16", "L/16", "H/14")
SWEEPS = ("", "mask_ratio", "target", "decoder_depth")
TINY_PP = "decode|value_range(-1, 1)|keep('image', 'label')"


def mae_config(**values) -> ml_collections.ConfigDict:
    """All `mae` keys (models/mae.py: MAEConfig), paper defaults."""
    m = ml_collections.ConfigDict(dict(mask_ratio=0.75, norm_pix_loss=True, decoder_width=512,
                                       decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048))
    m.update(values)
    return m


def tiny_encoder(**values) -> ml_collections.ConfigDict:
    """The tiny presets' ViT on 32x32 digits (configs/vit.py:tiny's shape): 4 blocks of width
    128, 16 patches of 8x8, cls token."""
    return vit.model_config(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8,
                            image_size=32, pool="cls", posemb="sincos2d_mae", scan=False,
                            **values)


def paper_encoder(preset: str, **values) -> ml_collections.ConfigDict:
    return vit.model_config(variant=preset, image_size=224, pool="cls", posemb="sincos2d_mae",
                            dtype="bfloat16", remat="dots_no_batch", **values)


def digits_probe(every: str) -> ml_collections.ConfigDict:
    """Frozen-feature linear probe on digits: the tiny presets' representation monitor."""
    return ml_collections.ConfigDict(dict(
        type="linear_probe", dataset="digits", train_split="train", test_split="test",
        pp=TINY_PP, batch_size=128, every=every))


def get_config(arg=None):
    arg = common.parse_arg(arg, presets=PRESETS, sweep="")
    if arg.sweep not in SWEEPS:
        raise ValueError(f"sweep={arg.sweep!r} is not one of {[s for s in SWEEPS if s]}.")
    c = common.base_config()
    c.objective = "mae"
    # On CPU, MAE's steps ran faster with XLA's own dot library (YNNPACK) than with the Eigen
    # default (train/compile_options.py), side by side: tiny 104 vs 114 ms, a S/16 encoder at
    # 112 px with the 8 x 512 decoder 6.0 vs 6.3 s.
    c.xla_cpu_dots = "xla_default"
    c.optimizer.update(b1=0.9, b2=0.95, weight_decay=0.05)
    if arg.preset == "tiny":
        c.input.dataset = "digits"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 128
        c.input.pp = ("decode|random_resized_crop(32, scale=(0.5, 1.0), ratio=(0.8, 1.25))"
                      "|value_range(-1, 1)|keep('image')")  # no flips: digits are not symmetric
        c.model = tiny_encoder()
        c.mae = mae_config(decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256)
        c.duration = "150 epochs"
        c.schedule.update(base_lr=1e-3, warmup="10 epochs")
        c.log_every = "10 epochs"
        c.checkpoint.every = "50 epochs"
        c.evals.probe = digits_probe(every="50 epochs")
        c.evals.pictures = ml_collections.ConfigDict(dict(
            type="reconstruction", dataset="digits", split="test", pp=TINY_PP, batch_size=16,
            num_images=6, photos=("astronaut", "coffee", "chelsea"),
            photo_pp="decode|resize_small(32)|center_crop(32)|value_range(-1, 1)|keep('image')",
            value_range=(-1.0, 1.0), every="150 epochs"))
    else:
        c.input.dataset = "imagenet2012"
        c.input.batch_size = 4096
        c.input.worker_count = 8
        c.input.pp = ("decode|random_resized_crop(224, scale=(0.2, 1.0), method='bicubic')"
                      f"|flip_lr|value_range(0, 1)|normalize({vit.IMAGENET_MEAN_STD})"
                      "|keep('image')")
        c.model = paper_encoder(arg.preset)
        c.mae = mae_config()
        c.duration = "800 epochs"
        c.schedule.update(base_lr=1.5e-4, reference_batch_size=256, warmup="40 epochs")
        c.mesh.update(data=1, fsdp=-1)
        c.log_every = "100 steps"
        c.checkpoint.every = "5 epochs"
        eval_pp = ("decode|resize_small(256, method='bicubic')|center_crop(224)|value_range(0, 1)"
                   f"|normalize({vit.IMAGENET_MEAN_STD})|keep('image', 'label')")
        c.evals.probe = ml_collections.ConfigDict(dict(
            type="linear_probe", dataset="imagenet2012", train_split="train",
            test_split="validation", pp=eval_pp, batch_size=1024, every="100 epochs"))
        c.evals.pictures = ml_collections.ConfigDict(dict(
            type="reconstruction", dataset="imagenet2012", split="validation", pp=eval_pp,
            batch_size=256, num_images=8, photos=("astronaut", "coffee", "chelsea"),
            photo_pp=eval_pp.replace("|keep('image', 'label')", "|keep('image')"),
            mean_std=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), every="50 epochs"))
    if arg.sweep:
        c.sweep = sweep_config(arg.sweep, tiny=arg.preset == "tiny")
        if arg.preset == "tiny":  # a third of the length, so a 6-point sweep takes minutes
            c.duration = c.evals.probe.every = c.evals.pictures.every = "50 epochs"
    return c


def sweep_config(name: str, *, tiny: bool) -> ml_collections.ConfigDict:
    """Table 1 / Fig. 5 ablations as override sets; the metric is the final linear-probe accuracy
    (the paper reports fine-tuning and linear probing; the probe is the one a run measures)."""
    if name == "mask_ratio":  # Fig. 5
        points = tuple({"mae.mask_ratio": r} for r in (0.25, 0.4, 0.5, 0.6, 0.75, 0.9))
        x = "mae.mask_ratio"
    elif name == "target":  # Table 1d (pixels with / without per-patch normalisation)
        points = ({"mae.norm_pix_loss": False}, {"mae.norm_pix_loss": True})
        x = "mae.norm_pix_loss"
    else:  # Table 1a
        points = tuple({"mae.decoder_depth": d} for d in ((1, 2, 4) if tiny else (1, 2, 4, 8, 12)))
        x = "mae.decoder_depth"
    return ml_collections.ConfigDict(dict(name=f"MAE {name}", metric="eval/probe/accuracy", x=x,
                                          points=points))
