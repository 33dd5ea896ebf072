"""PyTorch equivalents of vistax's models, timed beside them on the same batch (eager).

`ViT` is timm's `VisionTransformer` written in plain torch (timm itself imports torchvision,
which does not install beside this project's torch): pre-norm blocks, a fused qkv Linear,
`F.scaled_dot_product_attention`, a GELU MLP, cls token and learned position embedding, a
linear head; learned positions are resampled for other image sizes as ours
(`dynamic_image_size`). It is built from our `ViTConfig`, so every parameter has a counterpart
of the same size and the parameter counts are equal. The one departure from timm's defaults
is ours too: positions are added to the patch tokens only and the cls token gets none (timm's
`no_embed_class=True`). `load_vit_params` copies our weights across (the parity test).

`TwoTowers` is the CLIP/SigLIP pair: that ViT as image tower, a text transformer (token and
learned position embeddings, causal or padding-masked blocks, final LayerNorm, pooled at the
first end-of-text token), linear projections, L2 normalisation, a learned log-temperature and,
for the sigmoid loss, a learned bias; parameter counts equal ours as well.

The building blocks (`Block`, `Attention`, `Mlp`), the state converters (`vit_state`,
`encoder_state`, `dense_state`) and `images_nchw` serve the other references too
(torch_mae.py, torch_dino.py, torch_perceiver.py); torch_trainers.py turns each into a training
step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistax.models import layers as jax_layers
from vistax.models import vit as jax_vit

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


def init_linears(module: nn.Module) -> None:
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
        self._grids = {}  # (patch grid, device) -> its positions' table (`positions`)
        init_linears(self)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token is not None)

    def positions(self, grid: tuple[int, int], device) -> torch.Tensor:
        """(1, h*w, D) position embeddings of a `grid` of patches. Learned ones are resampled
        to another grid (`dynamic_image_size`, DINO's smaller crops) by the linear map our
        `vit.interpolate_posemb` applies, built once per grid (its bicubic kernel is
        jax.image.resize's, Keys a = -0.5; PyTorch's F.interpolate uses a = -0.75)."""
        cfg = self.cfg
        if grid == tuple(cfg.grid):
            return self.pos_embedding
        if not cfg.dynamic_image_size:
            raise ValueError(f"ViT built for {cfg.image_size}px images got a {grid} patch grid; "
                             "set dynamic_image_size=True.")
        key = (grid, str(device))
        if key not in self._grids:
            if cfg.posemb != "learn":  # the fixed table of that grid
                style = "mae" if cfg.posemb == "sincos2d_mae" else "mocov3"
                table = jax_layers.sincos_posemb_2d(*grid, cfg.width, style=style)
            else:  # the (h*w, n) resampling of the n learned positions
                n = cfg.grid[0] * cfg.grid[1]
                table = jax_vit.interpolate_posemb(np.eye(n, dtype=np.float32)[None], cfg.grid,
                                                   grid)[0]
            self._grids[key] = torch.from_numpy(np.array(table)).to(device)
        if cfg.posemb != "learn":
            return self._grids[key]
        return self._grids[key] @ self.pos_embedding

    def tokens(self, images, keep=None):
        """The encoder's input: [cls] + embedded patches with their positions; `keep` (B, K)
        int64 picks the patches to encode (MAE's visible ones), as ours."""
        x = self.patch_embed(images)
        x = x.flatten(2).transpose(1, 2) + self.positions(tuple(x.shape[-2:]), x.device)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pre_norm is None else self.pre_norm(x)

    def encode(self, x):
        """The blocks and the final LayerNorm (our `encoder`)."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images):
        x = self.encode(self.tokens(images))
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
        init_linears(self)

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

def to_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))  # a writable copy


def encoder_state(encoder: dict, depth: int, width: int, qkv_bias: bool, prefix: str = "blocks.",
                  norm: str | None = "norm") -> dict:
    """PyTorch state of `depth` Blocks (named `<prefix><i>.`) and, under `norm`, the final
    LayerNorm, from our `Encoder`'s parameters (blocks stacked on a leading layers axis)."""
    d = width
    blocks = encoder["blocks"]
    attn = blocks["attn"]
    sd = {}
    if norm:
        sd[f"{norm}.weight"] = to_tensor(encoder["norm"]["scale"])
        sd[f"{norm}.bias"] = to_tensor(encoder["norm"]["bias"])
    for i in range(depth):
        pre = f"{prefix}{i}."
        sd[pre + "attn.qkv.weight"] = to_tensor(np.concatenate(
            [np.asarray(attn[n]["kernel"][i]).reshape(d, d).T for n in ("query", "key", "value")]))
        if qkv_bias:
            sd[pre + "attn.qkv.bias"] = to_tensor(np.concatenate(
                [np.asarray(attn[n]["bias"][i]).reshape(d) for n in ("query", "key", "value")]))
        sd[pre + "attn.proj.weight"] = to_tensor(
            np.asarray(attn["out"]["kernel"][i]).reshape(d, d).T)
        sd[pre + "attn.proj.bias"] = to_tensor(attn["out"]["bias"][i])
        for layer_norm in ("norm1", "norm2"):
            sd[pre + f"{layer_norm}.weight"] = to_tensor(blocks[layer_norm]["scale"][i])
            sd[pre + f"{layer_norm}.bias"] = to_tensor(blocks[layer_norm]["bias"][i])
        for fc in ("fc1", "fc2"):
            sd[pre + f"mlp.{fc}.weight"] = to_tensor(np.asarray(blocks["mlp"][fc]["kernel"][i]).T)
            sd[pre + f"mlp.{fc}.bias"] = to_tensor(blocks["mlp"][fc]["bias"][i])
    return sd


def dense_state(dense: dict, name: str) -> dict:
    """PyTorch Linear `name` from our Dense (kernel (in, out), optional bias)."""
    sd = {f"{name}.weight": to_tensor(np.transpose(dense["kernel"]))}
    if "bias" in dense:
        sd[f"{name}.bias"] = to_tensor(dense["bias"])
    return sd


def vit_state(model: ViT, params: dict, prefix: str = "") -> dict:
    """PyTorch state (keys under `prefix`) of the ViT from our ViT's parameters."""
    cfg = model.cfg
    kernel = np.transpose(params["patch_embed"]["kernel"], (3, 2, 0, 1))
    sd = {"patch_embed.weight": to_tensor(kernel),
          **encoder_state(params["encoder"], cfg.depth, cfg.width, cfg.qkv_bias)}
    if "bias" in params["patch_embed"]:
        sd["patch_embed.bias"] = to_tensor(params["patch_embed"]["bias"])
    if cfg.posemb == "learn":
        sd["pos_embedding"] = to_tensor(params["pos_embedding"])
    if model.cls_token is not None:
        sd["cls_token"] = to_tensor(params["cls_token"])
    if model.pre_norm is not None:
        sd["pre_norm.weight"] = to_tensor(params["pre_norm"]["scale"])
        sd["pre_norm.bias"] = to_tensor(params["pre_norm"]["bias"])
    if model.head is not None:
        sd.update(dense_state(params["head"], "head"))
    return {prefix + k: v for k, v in sd.items()}


def load_state(model: nn.Module, sd: dict) -> None:
    """Loads `sd` into `model`; every parameter and persistent buffer must be in it."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{type(model).__name__}: missing {missing}, unexpected {unexpected}")


def load_vit_params(model: ViT, params: dict) -> None:
    """Copies our ViT's parameters (`nnx.state(vit, nnx.Param).to_pure_dict()`, blocks stacked
    on a leading layers axis) into the PyTorch ViT."""
    load_state(model, vit_state(model, params))


# -- batches ------------------------------------------------------------------------------------

def images_nchw(batch: dict, device, key: str = "image") -> torch.Tensor:
    """NHWC numpy images -> contiguous NCHW float32 (what timm / open_clip models take)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(batch[key], np.float32)
                                                 .transpose(0, 3, 1, 2))).to(device)


def classification_targets(batch: dict, device) -> torch.Tensor:
    """One-hot `labels` (float) or class indices `label` (int64), as our classifiers read them."""
    if "labels" in batch:
        return torch.from_numpy(np.asarray(batch["labels"], np.float32)).to(device)
    if "label" in batch:
        return torch.from_numpy(np.asarray(batch["label"], np.int64)).to(device)
    raise KeyError(f"Classification needs a 'labels' (one-hot) or 'label' field in the batch; "
                   f"got {sorted(batch)}.")
