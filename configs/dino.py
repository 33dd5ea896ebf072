"""DINO pretraining: self-distillation with no labels (Caron et al. 2021), DINOv2's options.

Presets:
  tiny   A small ViT on 32x32 `digits`: 2 global crops of 32 px and 4 local crops of 16 px, a
         head of 1024 prototypes; ~25 minutes on 2 CPU cores. Reports weighted k-NN accuracy of the
         teacher's features (evals.knn) and writes attention maps (evals.attention).
  S/16, B/16
         The reference recipe (the paper's App. "Implementation details" and its public
         defaults): AdamW, lr 5e-4 x batch/256 after 10 warmup epochs, cosine to 1e-6, weight
         decay cosine 0.04 -> 0.4, batch 1024, 100 epochs, 2 x 224 + 8 x 96 crops with scales
         (0.4, 1) / (0.05, 0.4), K = 65536 prototypes, student temperature 0.1, teacher 0.04,
         center momentum 0.9, teacher momentum 0.996 -> 1, per-parameter gradient clipping at
         3.0, last layer frozen for the first epoch, drop path 0.1 (student).
         Data: `imagenet2012` in input.data_dir (see configs/vit.py).
  g/14   DINOv2's ViT-g/14 (Oquab et al. 2024; `vit_giant2` with `ffn_layer: swiglufused` in
         their vitg14.yaml): width 1536, 40 blocks, 24 heads of 64, a SwiGLU feed-forward of
         hidden width 4096 (model.variant='giant2/14', model.activation='swiglu'; 1.14B
         backbone parameters), drop path 0.4, the v2 options below, 4 registers, LayerScale,
         batch 3072 (a pod-slice config; see `vistax plan`).

Options after the preset:
  recipe=best  The paper's best ViT-S/16 run (Table 3 / their released logs): teacher
               temperature 0.04 -> 0.07 over 30 epochs, last layer not weight-norm-fixed,
               800 epochs.
  v2=True      DINOv2's objective: iBOT masked-patch loss (weight 1, block masks on half the
               global crops at ratio 0.1-0.5), KoLeo (weight 0.1), Sinkhorn-Knopp teacher
               targets (3 iterations), LayerScale 1e-5, 4 registers.
  sweep=collapse
               Fig. 7 at small scale: full DINO, no centering, no sharpening (teacher
               temperature = student temperature); the table and plot show the teacher entropy
               and KL(Pt || Ps) of each run.

  vistax train --config=configs/dino.py:tiny --workdir=/tmp/dino_tiny
  vistax sweep --config=configs/dino.py:tiny,sweep=collapse --workdir=/tmp/dino_collapse
"""

import ml_collections

from vistax.configs import common, vit

PRESETS = ("tiny", "S/16", "B/16", "g/14")
RECIPES = ("default", "best")
SWEEPS = ("", "collapse")
TINY_EVAL_PP = "decode|value_range(-1, 1)|keep('image', 'label')"
PHOTOS = ("astronaut", "coffee", "chelsea")
KNN_K = (20, 10, 100, 200)  # Sec. 4 / their eval_knn.py; the first is the headline accuracy


def head_config(**values) -> ml_collections.ConfigDict:
    """The DINO head (models/dino.py: HeadConfig), paper defaults."""
    h = ml_collections.ConfigDict(dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
                                       num_layers=3, norm_last_layer=True))
    h.update(values)
    return h


def dino_config(**values) -> ml_collections.ConfigDict:
    """All `dino` keys (train/objectives/dino.py: DINOSettings), the reference's defaults."""
    d = ml_collections.ConfigDict(dict(
        head=head_config(), student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs="0 epochs", teacher="centering", center_momentum=0.9,
        sinkhorn_iterations=3, momentum_teacher=0.996, momentum_teacher_end=1.0,
        koleo_weight=0.0, ibot_weight=0.0, ibot_separate_head=False, ibot_head=head_config(),
        ibot_max_masked=0.5))
    d.update(values)
    return d


def multicrop_pp(global_size: int, local_size: int, num_local: int, *, flip: bool,
                 normalize: str, masks_grid: int | None) -> str:
    """pp for DINO's views; `normalize` is applied to both crop stacks."""
    views = f"dino_multicrop({global_size}, {local_size}, {num_local}, flip={flip})"
    keys = ["global_crops"] + (["local_crops"] if num_local else [])
    ops = ["decode", views] + [normalize.format(key=k) for k in keys]
    if masks_grid:
        ops.append(f"ibot_masks({masks_grid})")
        keys.append("global_masks")
    ops.append("keep(" + ", ".join(repr(k) for k in keys) + ")")
    return "|".join(ops)


def eval_configs(dataset: str, test_split: str, pp: str, *, knn_batch: int, knn_every: str,
                 num_images: int, attention_batch: int, attention_every: str, photo_pp: str,
                 **picture) -> ml_collections.ConfigDict:
    """k-NN of the teacher's features (train vs `test_split`) and attention-map pictures of
    `test_split` and the scikit-image photos; `picture` holds value_range or mean_std."""
    return ml_collections.ConfigDict(dict(
        knn=dict(type="knn", dataset=dataset, train_split="train", test_split=test_split, pp=pp,
                 batch_size=knn_batch, k=KNN_K, every=knn_every),
        attention=dict(type="attention_maps", dataset=dataset, split=test_split, pp=pp,
                       batch_size=attention_batch, num_images=num_images, photos=PHOTOS,
                       photo_pp=photo_pp, every=attention_every, **picture)))


def get_config(arg=None):
    arg = common.parse_arg(arg, presets=PRESETS, recipe="default", v2=False, sweep="")
    if arg.recipe not in RECIPES:
        raise ValueError(f"recipe={arg.recipe!r} is not one of {list(RECIPES)}.")
    if arg.sweep not in SWEEPS:
        raise ValueError(f"sweep={arg.sweep!r} is not one of {[s for s in SWEEPS if s]}.")
    v2 = bool(arg.v2) or arg.preset == "g/14"
    c = common.base_config()
    c.objective = "dino"
    c.optimizer.update(name="adamw", weight_decay=0.04, weight_decay_end=0.4)
    c.grad_clip_per_param = 3.0
    c.param_groups.hold = ((r"head/last_layer/.*", "1 epochs"),)
    if arg.preset == "tiny":
        c.input.dataset = "digits"
        c.input.cache = True  # a built-in dataset: a few MB in memory
        c.input.batch_size = 64
        # Six views of 16-32 px are ~100 short Pillow calls per example, each passing the GIL:
        # two threads on two cores trade it back and forth and read at ~0.6x one thread's rate
        # (379-448 vs 636-743 ex/s alone); training is as fast with one (177-181 vs 178-179 img/s).
        c.input.read_threads = 1
        patch, size = 8, 32
        c.model = vit.model_config(width=128, depth=4, mlp_dim=512, num_heads=4,
                                   patch_size=patch, image_size=size, pool="cls", scan=False)
        c.dino = dino_config(head=head_config(out_dim=1024, hidden_dim=512, bottleneck_dim=64),
                             ibot_head=head_config(out_dim=1024, hidden_dim=512,
                                                   bottleneck_dim=64))
        c.duration = "100 epochs"
        c.schedule.update(base_lr=5e-4, warmup="10 epochs", end_lr=1e-6)
        c.log_every = "2 epochs"
        c.checkpoint.every = "50 epochs"
        normalize = "value_range(-1, 1, key={key!r})"
        c.input.pp = multicrop_pp(size, 16, 4, flip=False, normalize=normalize,
                                  masks_grid=size // patch if v2 else None)
        c.evals = eval_configs(
            "digits", "test", TINY_EVAL_PP, knn_batch=128, knn_every="25 epochs",
            num_images=6, attention_batch=16, attention_every="50 epochs",
            photo_pp="decode|resize_small(32)|center_crop(32)|value_range(-1, 1)|keep('image')",
            value_range=(-1.0, 1.0))
    else:
        c.input.dataset = "imagenet2012"
        c.input.batch_size = 3072 if arg.preset == "g/14" else 1024
        c.input.worker_count = 8
        patch, size = int(arg.preset.split("/")[1]), 224
        giant = arg.preset == "g/14"
        c.model = vit.model_config(variant="giant2/14" if giant else arg.preset, image_size=size,
                                   pool="cls", drop_path=0.4 if giant else 0.1,
                                   activation="swiglu" if giant else "gelu",
                                   dtype="bfloat16", remat="dots_no_batch")
        c.dino = dino_config()
        c.duration = "100 epochs"
        c.schedule.update(base_lr=5e-4, reference_batch_size=256, warmup="10 epochs",
                          end_lr=1e-6)
        c.mesh.update(data=1, fsdp=-1)
        c.log_every = "100 steps"
        c.checkpoint.every = "5 epochs"
        normalize = ("value_range(0, 1, key={key!r})"
                     f"|normalize({vit.IMAGENET_MEAN_STD}, key={{key!r}})")
        c.input.pp = multicrop_pp(size, 96 if patch == 16 else 98, 8, flip=True,
                                  normalize=normalize, masks_grid=size // patch if v2 else None)
        eval_pp = ("decode|resize_small(256, method='bicubic')|center_crop(224)|value_range(0, 1)"
                   f"|normalize({vit.IMAGENET_MEAN_STD})|keep('image', 'label')")
        c.evals = eval_configs(
            "imagenet2012", "validation", eval_pp, knn_batch=1024, knn_every="20 epochs",
            num_images=8, attention_batch=256, attention_every="20 epochs",
            photo_pp=eval_pp.replace("|keep('image', 'label')", "|keep('image')"),
            mean_std=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    if arg.recipe == "best":
        c.dino.update(teacher_temp=0.07, warmup_teacher_temp_epochs="30 epochs")
        c.dino.head.norm_last_layer = False
        if arg.preset != "tiny":
            c.duration = "800 epochs"
    if v2:
        c.dino.update(ibot_weight=1.0, koleo_weight=0.1, teacher="sinkhorn")
        c.model.update(num_registers=4, layer_scale=1e-5, mask_token=True)
    if arg.sweep:
        c.sweep = collapse_sweep()
        if arg.preset == "tiny":
            c.duration = c.evals.knn.every = c.evals.attention.every = "30 epochs"
            c.log_every = "1 epochs"
    return c


def collapse_sweep() -> ml_collections.ConfigDict:
    """Fig. 7: centering and sharpening are both needed. Without centering the teacher's
    entropy falls to 0 (one prototype wins); without sharpening (teacher temperature = student
    temperature) it rises to log K and KL(Pt || Ps) to 0 (uniform outputs); with both, KL stays
    > 0."""
    points = ({}, {"dino.teacher": "none"},
              {"dino.teacher_temp": 0.1, "dino.warmup_teacher_temp": 0.1})
    return ml_collections.ConfigDict(dict(
        name="DINO collapse (Fig. 7)", metric=("train/teacher_entropy", "train/kl"),
        points=points, curves=True))
