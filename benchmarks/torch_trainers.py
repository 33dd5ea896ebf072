"""One PyTorch training step per reference kind, timed by `vistax bench` beside ours.

A case's `torch` field names a kind of `REFERENCES`:

- `vit`: torch_models.ViT, cross-entropy with the config's label smoothing (dense or one-hot
  labels, as the batch holds);
- `two_towers`: torch_models.TwoTowers, CLIP's softmax or SigLIP's sigmoid loss, CLIP's
  temperature clamp after the step;
- `mae`: torch_mae.MAE, masked-patch MSE on fresh random masks every step;
- `dino`: torch_dino.DINO, student and EMA teacher on the multi-crop views;
- `perceiver`: torch_perceiver.Perceiver (a Perceiver IO classification query or mean-pooled
  latents), cross-entropy with the config's label smoothing.

Each kind says which of the objective's resolved configs its model is built from
(`model_config`), which compute dtypes that config asks for, how to build the model and its loss
on a fixed batch, and what runs before and after the optimizer step. `make_trainer` wraps them
in the same step for every kind: zero_grad, forward and loss (under `torch.autocast` to
bfloat16 where the config computes in bfloat16: timm's and open_clip's `--amp --amp-dtype
bfloat16`), backward, the kind's `before_update`, per-parameter clipping
(`grad_clip_per_param`, DINO's `clip_gradients`: a fused qkv weight is one tensor here, three
kernels in ours) and global-norm clipping when the config asks, `torch.optim.AdamW` on the
trainable parameters with the config's base lr, betas, eps and weight decay on weight matrices
only (our `param_groups.wd_mask` decays kernels only), then the kind's `after_step`. Learning
rate and weight decay schedules are left out: they change no work.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistax.benchmarks import torch_dino, torch_mae, torch_models, torch_perceiver
from vistax.benchmarks.torch_models import AUTOCAST, Unsupported
from vistax.train.optimizer import PER_PARAM_CLIP_EPS


@dataclasses.dataclass(frozen=True)
class Reference:
    """How one kind of PyTorch equivalent is built and trained."""

    # (objective, examples per epoch) -> the config its model is built from
    model_config: Callable[[Any, int], Any]
    dtypes: Callable[[Any], list[str]]  # that config -> its compute dtypes (one per tower)
    build: Callable[[Any], nn.Module]
    # (model, batch, config, device) -> a function computing the loss of one step
    loss: Callable[[nn.Module, dict, Any, str], Callable[[], torch.Tensor]]
    # (model, config) -> a function run on the gradients before the update, or None
    before_update: Callable[[nn.Module, Any], Callable[[], None] | None] = (
        lambda model, config: None)
    # (model, config) -> a function run after each optimizer step, or None
    after_step: Callable[[nn.Module, Any], Callable[[], None] | None] = lambda model, config: None


def _classification(model, batch: dict, config, device):
    images = torch_models.images_nchw(batch, device)
    targets = torch_models.classification_targets(batch, device)
    smoothing = float(config.loss.label_smoothing)
    return lambda: F.cross_entropy(model(images), targets, label_smoothing=smoothing)


def _contrastive(model, batch: dict, config, device):
    images = torch_models.images_nchw(batch, device)
    tokens = torch.from_numpy(np.asarray(batch["text"], np.int64)).to(device)
    sigmoid = config.loss.type == "sigmoid"

    def loss():
        zimg, ztxt = model(images, tokens)
        logits = model.log_temperature.exp() * zimg @ ztxt.T
        n = logits.shape[0]
        if sigmoid:
            labels = 2.0 * torch.eye(n, device=logits.device) - 1.0
            return -F.logsigmoid(labels * (logits + model.bias)).sum() / n
        targets = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    return loss


def _clamp_temperature(model, config):
    """CLIP's clamp of the learned log-temperature after each step (our loss's max)."""
    max_log_t = config.loss.get("max_log_temperature")
    if max_log_t is None:
        return None

    def clamp():
        with torch.no_grad():
            model.log_temperature.clamp_(max=float(max_log_t))

    return clamp


REFERENCES: dict[str, Reference] = {
    "vit": Reference(model_config=lambda objective, epoch_size: objective.vit_config,
                     dtypes=lambda cfg: [cfg.dtype], build=torch_models.ViT,
                     loss=_classification),
    "two_towers": Reference(model_config=lambda objective, epoch_size: objective.model_config,
                            dtypes=lambda cfg: [cfg.image.dtype, cfg.text.dtype],
                            build=torch_models.TwoTowers, loss=_contrastive,
                            after_step=_clamp_temperature),
    "mae": Reference(model_config=lambda objective, epoch_size: objective.mae_config,
                     dtypes=lambda cfg: [cfg.encoder.dtype], build=torch_mae.MAE,
                     loss=torch_mae.loss),
    "dino": Reference(model_config=torch_dino.setup, dtypes=lambda cfg: [cfg.dtype],
                      build=torch_dino.DINO, loss=torch_dino.loss,
                      before_update=torch_dino.before_update, after_step=torch_dino.after_step),
    "perceiver": Reference(model_config=lambda objective, epoch_size: objective.perceiver_config,
                           dtypes=lambda cfg: [cfg.dtype], build=torch_perceiver.Perceiver,
                           loss=torch_perceiver.loss),
}


def _reference(kind: str) -> Reference:
    if kind not in REFERENCES:
        raise ValueError(f"no PyTorch equivalent of kind {kind!r}; kinds: {sorted(REFERENCES)}")
    return REFERENCES[kind]


def compute_context(kind: str, model_config, device: str = "cpu"):
    """The context the forward and loss run in: `torch.autocast` to bfloat16 where the config
    computes in bfloat16 (all towers must agree), else none."""
    dtypes = set(_reference(kind).dtypes(model_config))
    if len(dtypes) > 1:
        raise Unsupported(f"the PyTorch towers compute in one dtype; the config has {dtypes}")
    dtype = dtypes.pop()
    if dtype not in AUTOCAST:
        raise Unsupported(f"the PyTorch model has no {dtype} compute (it has {sorted(AUTOCAST)})")
    if AUTOCAST[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST[dtype])


def build_model(kind: str, model_config) -> nn.Module:
    """The torch model of `kind` from its config (`REFERENCES[kind].model_config(...)`)."""
    return _reference(kind).build(model_config)


def make_trainer(kind: str, model_config, config, batch: dict, *, seed: int = 0,
                 device: str = "cpu"):
    """(step, model): `step()` trains one step on `batch` (dict of numpy arrays as the JAX
    step gets them, NHWC images) on `device` and returns the loss (on CUDA, call
    `torch.cuda.synchronize()` before reading a clock); `config` gives the optimizer and loss."""
    reference = _reference(kind)
    context = compute_context(kind, model_config, device)
    torch.manual_seed(seed)
    model = reference.build(model_config).to(device).train()
    opt = config.optimizer
    if opt.name != "adamw":
        raise Unsupported(f"optimizer.name={opt.name!r}: the PyTorch reference uses AdamW only")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n.endswith("weight") and p.ndim >= 2]
    other = [p for n, p in named if not (n.endswith("weight") and p.ndim >= 2)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(opt.weight_decay)},
         {"params": other, "weight_decay": 0.0}],
        lr=float(config.schedule.base_lr), betas=(float(opt.b1), float(opt.b2)),
        eps=float(opt.eps))
    loss_fn = reference.loss(model, batch, config, device)
    before_update = reference.before_update(model, config)
    after_step = reference.after_step(model, config)
    clip = config.get("grad_clip_norm")
    clip_each = config.get("grad_clip_per_param")
    trained = [p for _, p in named]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context:
            loss = loss_fn()
        loss.backward()
        if before_update is not None:
            before_update()
        if clip_each:
            grads = [p.grad for p in trained if p.grad is not None]
            norms = torch._foreach_norm(grads)  # pylint: disable=protected-access
            torch._foreach_mul_(grads, [  # pylint: disable=protected-access
                (float(clip_each) / (n + PER_PARAM_CLIP_EPS)).clamp(max=1.0) for n in norms])
        if clip:
            torch.nn.utils.clip_grad_norm_(trained, float(clip))
        optimizer.step()
        if after_step is not None:
            after_step()
        return loss.detach()

    return step, model
