"""PyTorch equivalents of vistax's models, timed beside them on the same batch (eager).

`ViT` is timm's `VisionTransformer` written in plain torch (timm itself imports torchvision,
which does not install beside this project's torch): pre-norm blocks, a fused qkv Linear,
`F.scaled_dot_product_attention`, a GELU MLP, cls token and learned position embedding, a
linear head. It is built from our `ViTConfig`, so every parameter has a counterpart of the same
size and the parameter counts are equal. The one departure from timm's defaults is ours too:
positions are added to the patch tokens only and the cls token gets none (timm's
`no_embed_class=True`). `load_vit_params` copies our weights across (the parity test).

`TwoTowers` is the CLIP/SigLIP pair: that ViT as image tower, a text transformer (token and
learned position embeddings, causal or padding-masked blocks, final LayerNorm, pooled at the
first end-of-text token), linear projections, L2 normalisation, a learned log-temperature and,
for the sigmoid loss, a learned bias; parameter counts equal ours as well.

`make_trainer` returns one training step (zero_grad, forward, loss, backward, AdamW step) on
a fixed batch: `torch.optim.AdamW` with the config's lr, betas, eps and weight decay on weight
matrices only (our `param_groups.wd_mask` decays kernels only), global-norm clipping when the
config clips, CLIP's temperature clamp after the step. A config that computes in bfloat16
(float32 parameters, bfloat16 matmuls) gets PyTorch's mixed-precision recipe, the forward and
loss under `torch.autocast(dtype=torch.bfloat16)` (`compute_context`): timm's and open_clip's
`--amp --amp-dtype bfloat16`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistax.models import layers as jax_layers

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class Unsupported(ValueError):
    """The config uses a feature the PyTorch equivalent does not have."""


# Our compute dtypes -> the autocast dtype of the PyTorch equivalent (None: no autocast).
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}


def _check_dtype(cfg, what: str) -> None:
    if cfg.dtype not in AUTOCAST:
        raise Unsupported(f"the PyTorch {what} has no {cfg.dtype} compute (dtype={cfg.dtype!r}; "
                          f"it has {sorted(AUTOCAST)})")


def compute_context(kind: str, model_config, device: str = "cpu"):
    """The context the forward and loss run in: `torch.autocast` to bfloat16 where the config
    computes in bfloat16 (both towers must agree), else none."""
    towers = ([model_config] if kind == "vit"
              else [model_config.image, model_config.text])
    dtypes = {t.dtype for t in towers}
    if len(dtypes) > 1:
        raise Unsupported(f"the PyTorch towers compute in one dtype; the config has {dtypes}")
    for tower in towers:
        _check_dtype(tower, "model")
    dtype = AUTOCAST[dtypes.pop()]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection (timm's layout: q, k, v stacked, head-major)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, is_causal: bool = False):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise Unsupported(f"the PyTorch MLP has no activation {activation!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.activation)

    def forward(self, x, mask=None, is_causal: bool = False):
        x = x + self.attn(self.norm1(x), mask, is_causal)
        return x + self.mlp(self.norm2(x))


def _check_vit(cfg) -> None:
    unsupported = {
        "pool": cfg.pool not in ("cls", "gap"), "num_registers": cfg.num_registers,
        "representation_size": cfg.representation_size, "head_norm": cfg.head_norm != "none",
        "layer_scale": cfg.layer_scale, "mask_token": cfg.mask_token,
        "drop_path": cfg.drop_path, "dropout": cfg.dropout,
    }
    found = [f"{k}={getattr(cfg, k)!r}" for k, bad in unsupported.items() if bad]
    if found:
        raise Unsupported(f"the PyTorch ViT has no {', '.join(found)}")
    _check_dtype(cfg, "ViT")


def _init_linears(module: nn.Module) -> None:
    """timm's init: truncated normal(0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """timm-style ViT from our ViTConfig; NCHW images -> logits (or the pooled vector)."""

    def __init__(self, cfg):
        super().__init__()
        _check_vit(cfg)
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.channels, d, p, stride=p, bias=cfg.patch_bias)
        gh, gw = cfg.grid
        if cfg.posemb == "learn":
            self.pos_embedding = nn.Parameter(torch.randn(1, gh * gw, d) / math.sqrt(d))
        else:
            style = "mae" if cfg.posemb == "sincos2d_mae" else "mocov3"
            self.register_buffer("pos_embedding", torch.from_numpy(
                jax_layers.sincos_posemb_2d(gh, gw, d, style=style)), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pool == "cls" else None
        self.pre_norm = nn.LayerNorm(d, eps=cfg.layernorm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layernorm_eps)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else None
        _init_linears(self)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embedding
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return pooled if self.head is None else self.head(pooled)


class TextTransformer(nn.Module):
    """Our TextTransformer (pool eos/mean/first, causal or not) in torch; (B, L) -> (B, D)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.pool == "cls" or cfg.drop_path or cfg.dropout:
            raise Unsupported("the PyTorch text tower has no cls pooling, dropout or drop path")
        _check_dtype(cfg, "text tower")
        self.cfg = cfg
        # Plain parameters (not nn.Embedding): not "weight"s, so no weight decay, as ours.
        self.token_embedding = nn.Parameter(0.02 * torch.randn(cfg.vocab_size, cfg.width))
        self.pos_embedding = nn.Parameter(0.01 * torch.randn(cfg.max_len, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        _init_linears(self)

    def forward(self, tokens):
        cfg = self.cfg
        length = tokens.shape[1]
        x = F.embedding(tokens, self.token_embedding) + self.pos_embedding[:length]
        eos_pos = (tokens == cfg.eos_id).int().argmax(dim=-1)
        valid = torch.arange(length, device=tokens.device)[None, :] <= eos_pos[:, None]
        mask, is_causal = None, cfg.causal
        if not (cfg.causal and cfg.pool == "eos"):  # padding must be masked out of the keys
            mask = valid[:, None, None, :]
            if cfg.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool,
                                         device=tokens.device).tril()
            is_causal = False
        for block in self.blocks:
            x = block(x, mask, is_causal)
        x = self.norm(x)
        if cfg.pool == "eos":
            return x[torch.arange(x.shape[0], device=x.device), eos_pos]
        if cfg.pool == "mean":
            weights = valid.to(x.dtype)[..., None]
            return (x * weights).sum(1) / weights.sum(1)
        return x[:, 0]


class TwoTowers(nn.Module):
    """CLIP/SigLIP towers from our TwoTowersConfig; returns L2-normalised embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.image = ViT(cfg.image)
        self.text = TextTransformer(cfg.text)
        self.image_proj = nn.Linear(cfg.image.width, cfg.embed_dim, bias=cfg.proj_bias)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=cfg.proj_bias)
        self.log_temperature = nn.Parameter(torch.tensor(float(cfg.log_temperature_init)))
        self.bias = (nn.Parameter(torch.tensor(float(cfg.bias_init)))
                     if cfg.bias_init is not None else None)

    def forward(self, images, tokens):
        zimg = F.normalize(self.image_proj(self.image(images)), dim=-1)
        ztxt = F.normalize(self.text_proj(self.text(tokens)), dim=-1)
        return zimg, ztxt


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- weights from vistax ------------------------------------------------------------------------

def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))  # a writable copy


def load_vit_params(model: ViT, params: dict) -> None:
    """Copies our ViT's parameters (`nnx.state(vit, nnx.Param).to_pure_dict()`, blocks stacked
    on a leading layers axis) into the PyTorch ViT."""
    d = model.cfg.width
    sd = {"patch_embed.weight": _t(np.transpose(params["patch_embed"]["kernel"], (3, 2, 0, 1))),
          "norm.weight": _t(params["encoder"]["norm"]["scale"]),
          "norm.bias": _t(params["encoder"]["norm"]["bias"])}
    if "bias" in params["patch_embed"]:
        sd["patch_embed.bias"] = _t(params["patch_embed"]["bias"])
    if model.cfg.posemb == "learn":
        sd["pos_embedding"] = _t(params["pos_embedding"])
    if model.cls_token is not None:
        sd["cls_token"] = _t(params["cls_token"])
    if model.pre_norm is not None:
        sd["pre_norm.weight"] = _t(params["pre_norm"]["scale"])
        sd["pre_norm.bias"] = _t(params["pre_norm"]["bias"])
    if model.head is not None:
        sd["head.weight"] = _t(np.transpose(params["head"]["kernel"]))
        sd["head.bias"] = _t(params["head"]["bias"])
    blocks = params["encoder"]["blocks"]
    attn = blocks["attn"]
    for i in range(model.cfg.depth):
        pre = f"blocks.{i}."
        sd[pre + "attn.qkv.weight"] = _t(np.concatenate(
            [np.asarray(attn[n]["kernel"][i]).reshape(d, d).T for n in ("query", "key", "value")]))
        if model.cfg.qkv_bias:
            sd[pre + "attn.qkv.bias"] = _t(np.concatenate(
                [np.asarray(attn[n]["bias"][i]).reshape(d) for n in ("query", "key", "value")]))
        sd[pre + "attn.proj.weight"] = _t(np.asarray(attn["out"]["kernel"][i]).reshape(d, d).T)
        sd[pre + "attn.proj.bias"] = _t(attn["out"]["bias"][i])
        for norm in ("norm1", "norm2"):
            sd[pre + f"{norm}.weight"] = _t(blocks[norm]["scale"][i])
            sd[pre + f"{norm}.bias"] = _t(blocks[norm]["bias"][i])
        for fc in ("fc1", "fc2"):
            sd[pre + f"mlp.{fc}.weight"] = _t(np.asarray(blocks["mlp"][fc]["kernel"][i]).T)
            sd[pre + f"mlp.{fc}.bias"] = _t(blocks["mlp"][fc]["bias"][i])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"load_vit_params: missing {missing}, unexpected {unexpected}")


# -- training steps -------------------------------------------------------------------------

def _images(batch: dict, device, key: str = "image") -> torch.Tensor:
    """NHWC numpy images -> contiguous NCHW float32 (what timm / open_clip models take)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(batch[key], np.float32)
                                                 .transpose(0, 3, 1, 2))).to(device)


def _classification(model: ViT, batch: dict, config, device):
    images = _images(batch, device)
    if "labels" in batch:
        targets = torch.from_numpy(np.asarray(batch["labels"], np.float32)).to(device)
    else:
        targets = torch.from_numpy(np.asarray(batch["label"], np.int64)).to(device)
    smoothing = float(config.loss.label_smoothing)
    return lambda: F.cross_entropy(model(images), targets, label_smoothing=smoothing)


def _contrastive(model: TwoTowers, batch: dict, config, device):
    images = _images(batch, device)
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


def build_model(kind: str, model_config) -> nn.Module:
    """`kind` "vit" (a ViTConfig) or "two_towers" (a TwoTowersConfig) -> the torch model."""
    if kind == "vit":
        return ViT(model_config)
    if kind == "two_towers":
        return TwoTowers(model_config)
    raise ValueError(f"no PyTorch equivalent of kind {kind!r}")


def make_trainer(kind: str, model_config, config, batch: dict, *, seed: int = 0,
                 device: str = "cpu"):
    """(step, model): `step()` trains one step on `batch` (dict of numpy arrays as the JAX
    step gets them, NHWC images) on `device` and returns the loss (on CUDA, call
    `torch.cuda.synchronize()` before reading a clock); `config` gives the optimizer and loss."""
    torch.manual_seed(seed)
    model = build_model(kind, model_config).to(device).train()
    opt = config.optimizer
    if opt.name != "adamw":
        raise Unsupported(f"optimizer.name={opt.name!r}: the PyTorch reference uses AdamW only")
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") and p.ndim >= 2]
    other = [p for n, p in named if not (n.endswith("weight") and p.ndim >= 2)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(opt.weight_decay)},
         {"params": other, "weight_decay": 0.0}],
        lr=float(config.schedule.base_lr), betas=(float(opt.b1), float(opt.b2)),
        eps=float(opt.eps))
    loss_fn = (_classification if kind == "vit" else _contrastive)(model, batch, config, device)
    context = compute_context(kind, model_config, device)
    clip = config.get("grad_clip_norm")
    max_log_t = config.loss.get("max_log_temperature") if kind == "two_towers" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context:
            loss = loss_fn()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        optimizer.step()
        if max_log_t is not None:
            with torch.no_grad():
                model.log_temperature.clamp_(max=float(max_log_t))
        return loss.detach()

    return step, model
