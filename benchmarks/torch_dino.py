"""DINO (Caron et al. 2021) in plain PyTorch, timed beside train/objectives/dino.py.

The released code's training step, built from our config so that every trained parameter has
a counterpart of the same size: a student and an EMA teacher, each a torch_models.ViT backbone
(cls output; learned positions resampled for the local crops) and the DINO head (3-layer GELU
MLP, L2 normalisation, weight-normalised prototypes without bias); the crops of one resolution
go through the student as one batch, the teacher sees the global crops only. The loss is the
cross-entropy between the centred, sharpened teacher and the student over the pairs of
different crops (Algorithm 1); after the optimizer step, the teacher's EMA (cosine momentum
schedule) and the center's EMA. The step also does what the reference does around AdamW:
per-parameter gradient clipping (`grad_clip_per_param`, generic in torch_trainers) and the last
layer's hold during the first epoch (`param_groups.hold` on `head/last_layer`: its gradients
are dropped, so AdamW skips it). The learning rate and weight decay stay at the config's base
values: their schedules change no work. DINOv2's options (iBOT, KoLeo, Sinkhorn-Knopp) have no
equivalent here. `load_dino_params` copies our weights across (the parity test).
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from vistax.benchmarks import torch_models
from vistax.models import dino as jax_dino
from vistax.models import vit as jax_vit
from vistax.train import optimizer as jax_optimizer
from vistax.train.objectives import dino as dino_objective


@dataclasses.dataclass(frozen=True)
class DINOSetup:
    """What the reference needs of our DINO objective: backbone, `dino` settings, and the step
    counts of the schedules it follows (teacher momentum, teacher temperature, last-layer hold)."""

    backbone: jax_vit.ViTConfig
    settings: dino_objective.DINOSettings
    total_steps: int = 1
    temp_warmup_steps: int = 0
    hold_steps: int = 0

    @property
    def dtype(self) -> str:
        return self.backbone.dtype


def setup(objective, epoch_size: int) -> DINOSetup:
    """The objective's resolved DINO setup; options without a PyTorch equivalent raise
    torch_models.Unsupported naming the key."""
    s = objective.settings
    found = [f"dino.{k}={getattr(s, k)!r}" for k, bad in (
        ("ibot_weight", s.ibot_weight), ("koleo_weight", s.koleo_weight),
        ("teacher", s.teacher == "sinkhorn")) if bad]
    if found:
        raise torch_models.Unsupported(f"the PyTorch DINO has no {', '.join(found)}")
    config = objective.config
    model = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
    held = jax_optimizer.hold_steps(config, nnx.state(model, nnx.Param).to_pure_dict(),
                                    epoch_size=epoch_size)
    head_hold = set(jax.tree.leaves(held["head"]["last_layer"]))
    other_hold = {v for k, sub in held.items() for v in jax.tree.leaves(sub) if k != "head"}
    other_hold |= set(jax.tree.leaves(held["head"]["mlp"]))
    if len(head_hold) > 1 or other_hold - {0}:
        raise torch_models.Unsupported("param_groups.hold: the PyTorch DINO holds the head's "
                                       "last layer only")
    return DINOSetup(backbone=jax_dino.dino_backbone(config.model.to_dict()), settings=s,
                     total_steps=objective.total_steps,
                     temp_warmup_steps=objective.temp_warmup_steps,
                     hold_steps=int(head_hold.pop()))


class Prototypes(nn.Module):
    """Weight-normalised linear layer without bias: row k of `weight` scaled to unit length
    (times `gain[k]` when trained); (..., dim) -> (..., num)."""

    def __init__(self, dim: int, num: int, trained_gain: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.gain = nn.Parameter(torch.ones(num)) if trained_gain else None

    def forward(self, x):
        w = self.weight * torch.rsqrt((self.weight * self.weight).sum(dim=1, keepdim=True))
        if self.gain is not None:
            w = w * self.gain[:, None]
        return x @ w.T


class Head(nn.Module):
    """DINO's head: MLP (GELU between layers) -> L2 norm -> prototypes."""

    def __init__(self, in_dim: int, cfg: jax_dino.HeadConfig):
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.num_layers - 1) + [cfg.bottleneck_dim]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.last_layer = Prototypes(cfg.bottleneck_dim, cfg.out_dim,
                                     trained_gain=not cfg.norm_last_layer)
        torch_models.init_linears(self)

    def forward(self, x):
        for i, dense in enumerate(self.mlp):
            x = dense(x)
            if i < len(self.mlp) - 1:
                x = F.gelu(x)
        return self.last_layer(F.normalize(x, dim=-1, eps=1e-12))


class Network(nn.Module):
    """Backbone (cls output) + head; NCHW crops of one resolution -> (n, K) logits."""

    def __init__(self, backbone: jax_vit.ViTConfig, head: jax_dino.HeadConfig):
        super().__init__()
        self.vit = torch_models.ViT(backbone)
        self.head = Head(backbone.width, head)

    def forward(self, images):
        return self.head(self.vit(images))


class DINO(nn.Module):
    """`student` (trained), `teacher` (EMA, no gradients) and the `center` buffer."""

    def __init__(self, cfg: DINOSetup):
        super().__init__()
        self.cfg = cfg
        self.student = Network(cfg.backbone, cfg.settings.head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg.settings.head.out_dim))
        self.step = 0  # optimizer steps taken: the schedules' position
        self.teacher_logits = None  # the last step's, for the center update

    def teacher_temperature(self) -> float:
        """This step's teacher temperature (our schedule)."""
        s = self.cfg.settings
        return float(dino_objective.teacher_temperature(
            self.step, self.cfg.temp_warmup_steps, s.warmup_teacher_temp, s.teacher_temp))

    def loss(self, global_crops, local_crops=None):
        """global_crops (B, T, C, H, W), local_crops (B, V - T, C, h, w) -> DINO's loss."""
        s = self.cfg.settings
        b, t = global_crops.shape[:2]
        global_views = global_crops.flatten(0, 1)
        student = [self.student(global_views).reshape(b, t, -1)]
        if local_crops is not None:
            student.append(self.student(local_crops.flatten(0, 1)).reshape(
                b, local_crops.shape[1], -1))
        with torch.no_grad():
            teacher = self.teacher(global_views).float()
        self.teacher_logits = teacher
        centred = teacher - self.center if s.teacher == "centering" else teacher
        probs = F.softmax(centred / self.teacher_temperature(), dim=-1)
        probs = probs.reshape(b, t, -1)
        logp = F.log_softmax(torch.cat(student, dim=1).float() / s.student_temp, dim=-1)
        ce = -torch.einsum("btk,bvk->btv", probs, logp).mean(dim=0)
        v = logp.shape[1]
        pairs = 1.0 - torch.eye(t, v, device=ce.device)
        return (ce * pairs).sum() / (t * v - t)

    def drop_held_gradients(self) -> None:
        """The last layer's hold (the reference's `cancel_gradients_last_layer`)."""
        if self.step < self.cfg.hold_steps:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA of the student into the teacher (cosine momentum), then of the teacher's mean
        logits into the center; advances the schedules."""
        s = self.cfg.settings
        m = float(dino_objective.cosine_momentum(  # at the step just taken, counted from 0
            self.step, self.cfg.total_steps, s.momentum_teacher, s.momentum_teacher_end))
        student = list(self.student.parameters())
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)
        c = s.center_momentum
        self.center.mul_(c).add_(self.teacher_logits.mean(dim=0), alpha=1.0 - c)
        self.step += 1


def loss(model: DINO, batch: dict, config, device):
    """The step's loss on the batch's `global_crops` and `local_crops` (B, n, H, W, C)."""
    del config
    crops = {}
    for key in ("global_crops", "local_crops"):
        if key in batch:
            x = np.asarray(batch[key], np.float32)
            crops[key] = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))
                                          ).to(device)
    return lambda: model.loss(crops["global_crops"], crops.get("local_crops"))


def after_step(model: DINO, config):
    del config
    return model.update_teacher


def before_update(model: DINO, config):
    del config
    return model.drop_held_gradients


def load_dino_params(model: DINO, params: dict, teacher: dict | None = None,
                     center=None) -> None:
    """Copies our student's parameters (`nnx.state(dino, nnx.Param).to_pure_dict()`) and,
    when given, the teacher's (`extra['teacher']` as a pure dict; else the student's) and the
    center."""

    def network(p: dict, prefix: str) -> dict:
        head = model.student.head
        sd = torch_models.vit_state(model.student.vit, p["vit"], prefix=prefix + "vit.")
        for i in range(len(head.mlp)):
            sd.update(torch_models.dense_state(p["head"]["mlp"][i], f"{prefix}head.mlp.{i}"))
        last = p["head"]["last_layer"]
        sd[prefix + "head.last_layer.weight"] = torch_models.to_tensor(np.transpose(last["kernel"]))
        if "gain" in last:
            sd[prefix + "head.last_layer.gain"] = torch_models.to_tensor(last["gain"])
        return sd

    sd = {**network(params, "student."), **network(teacher or params, "teacher."),
          "center": (torch.zeros_like(model.center) if center is None
                     else torch_models.to_tensor(center))}
    torch_models.load_state(model, sd)
