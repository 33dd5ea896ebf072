"""Pieces every config file shares: the argument parser and the keys the trainer loop reads.

A config file defines `get_config(arg)`; `arg` is the text after the colon in
`--config=configs/vit.py:tiny,variant=S/16`: a preset name, then `key=value` options that the
file declares. Every other key is overridden with `--config.a.b=value`.
"""

from __future__ import annotations

import ast

import ml_collections
from ml_collections import config_dict

# Logical axis -> mesh axes. Parameters and activations name logical axes (models/layers.py);
# this table, a config key like any other, decides the parallelism. `batch` spans data and fsdp
# (FSDP is data parallelism with sharded weights); `embed` on weights is what FSDP shards;
# `mlp`, `heads` and `vocab` are what tensor parallelism splits; `proj` is the output side of
# the image/text projection heads; `input` the width of a Perceiver's input tokens.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("classes", None),
    ("vocab", "tensor"),
    ("proj", None),
    ("input", None),  # Perceiver input channels (pixels + Fourier features: odd widths)
    ("layers", None),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


def parse_arg(arg: str | None, *, presets: tuple[str, ...], **options) -> ml_collections.ConfigDict:
    """Parses `preset[,key=value,...]` into a ConfigDict with `preset` and the declared options.

    Values are Python literals where they parse as one (`runlocal=True`, `depth=6`), strings
    otherwise (`variant=B/16`). An undeclared option or unknown preset is an error naming it.
    """
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    preset = presets[0]
    if parts and "=" not in parts[0]:
        preset = parts.pop(0)
    if preset not in presets:
        raise ValueError(f"Unknown preset {preset!r} in config argument {arg!r}; "
                         f"expected one of {list(presets)}.")
    parsed = dict(options)
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep:
            raise ValueError(f"Config argument {arg!r}: expected key=value after the preset, "
                             f"got {part!r}.")
        if key not in options:
            raise ValueError(f"Unknown option {key!r} in config argument {arg!r}; "
                             f"this config file accepts {sorted(options) or 'no options'}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        parsed[key] = value
    return ml_collections.ConfigDict({"preset": preset, **parsed})


def base_config() -> ml_collections.ConfigDict:
    """Keys the trainer loop reads for every method; a config file fills in the method's part.

    Durations are strings `"<number> steps|epochs|examples"` so a preset and a command-line
    override never disagree about which unit is meant.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    # rbg: XLA's RngBitGenerator for random bits, threefry for split/fold_in; ~5x faster to
    # compile than threefry2x32 (JAX's default) for parameter initialisation on this CPU.
    # (MaxText goes further with unsafe_rbg, whose split/fold_in are approximate.)
    c.prng_impl = "rbg"
    # What runs dots on CPU: "eigen" (XLA's Eigen kernels; batched attention dots up to
    # 1.8x faster than YNNPACK's on 2 cores) or "xla_default" (YNNPACK in jax 0.10). See
    # train/compile_options.py; no effect on GPU/TPU.
    c.xla_cpu_dots = "eigen"
    c.objective = config_dict.placeholder(str)  # name in vistax.train.objectives
    c.duration = "1 epochs"

    c.input = ml_collections.ConfigDict()
    c.input.dataset = config_dict.placeholder(str)  # built-in name or prepared dataset folder
    c.input.data_dir = config_dict.placeholder(str)  # where built-ins are prepared
    c.input.split = "train"
    c.input.pp = ""
    c.input.batch_size = 256  # global, across all devices and processes
    c.input.worker_count = 0  # grain worker processes per host
    # Threads that prepare batches concurrently in each process that reads. A pp of small
    # images is held by the GIL (the tiny presets read 1.3-1.9x faster alone with 1;
    # dino.py:tiny sets it); decoding and resizing large images release it (ImageNet-sized pp
    # reads faster with 2 or more).
    c.input.read_threads = 2
    # Keep the split's records in host memory after their first read, with the pp's leading
    # deterministic ops (decode, resize, ...) applied: for datasets that fit in RAM.
    c.input.cache = False

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False,
        weight_decay=0.0, trust_coefficient=0.001,
        weight_decay_end=config_dict.placeholder(float),  # cosine to it over the run if set
    ))
    c.schedule = ml_collections.ConfigDict(dict(
        name="cosine", base_lr=1e-3, warmup="0 steps", end_lr=0.0, warmup_start_lr=0.0,
        reference_batch_size=config_dict.placeholder(int),  # linear lr scaling if set
    ))
    c.param_groups = ml_collections.ConfigDict(dict(
        freeze=(),  # regexes of parameter paths that get no updates and no optimizer state
        lr_mults=(),  # ((regex, multiplier), ...): first match wins
        wd_mults=(),  # ((regex, multiplier), ...) on top of the decay mask
        # Decay kernels only: biases, norms, position embeddings and tokens are exempt, as in
        # DeiT/timm and big_vision.
        wd_mask=r".*/kernel$",
        # Layer-wise lr decay (BEiT, Bao et al. 2022; MAE fine-tuning, He et al. 2021 Table 9):
        # block i of a depth-L stack gets lr x rate**(L - i), the embeddings rate**(L + 1),
        # everything else (final norm, head) 1. 1.0 turns it off. Blocks are found by regex on
        # stacked leaves (leading `layers` axis), so it works with scan and without.
        layer_decay=1.0,
        layer_decay_blocks=r"(.*/)?encoder/blocks/.*",
        layer_decay_embed=r"(.*/)?(patch_embed/.*|pos_embedding|cls_token|registers)",
        # Leaves that stack one parameter per layer along their leading axis (every Encoder's
        # blocks): per-parameter clipping treats each layer's slice as its own parameter.
        stacked=r"(.*/)?blocks/.*",
        # ((regex, duration), ...): parameters held fixed for the first <duration> of the run
        # (no update, moments or decay; DINO's last layer for 1 epoch).
        hold=(),
    ))
    c.grad_clip_norm = config_dict.placeholder(float)  # global norm; None disables
    # Per-parameter L2 clipping of gradients (DINO: 3.0); None disables.
    c.grad_clip_per_param = config_dict.placeholder(float)
    c.grad_accum_steps = 1

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # within a slice (ICI)
    c.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))  # across slices/hosts
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.log_every = "20 steps"
    c.progress = "auto"  # auto | bar | lines
    c.peak_flops_per_device = config_dict.placeholder(float)  # overrides the device table

    c.checkpoint = ml_collections.ConfigDict(dict(every="1000 steps", keep=3, asynchronous=True))
    # Start a fresh run from another run's parameters (train/init_from.py); ignored on resume.
    c.init_from = ml_collections.ConfigDict(dict(
        path=config_dict.placeholder(str),  # a workdir, its checkpoints/ or one step folder
        step=config_dict.placeholder(int),  # default: the latest
        include=".*", exclude=config_dict.placeholder(str),  # regexes on parameter names
        rename=(),  # ((regex, replacement), ...): our name -> the name in the checkpoint
        tree="params",  # the part of a vistax checkpoint read: params, or extra/teacher (DINO)
    ))
    c.evals = ml_collections.ConfigDict()
    return c
