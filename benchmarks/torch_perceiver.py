"""The Perceiver (Jaegle et al. 2021a) with a Perceiver IO classification query (Jaegle et al.
2021b) in plain PyTorch, timed beside models/perceiver.py.

The reference's structure, in the transformers library's layout that our model follows, built
from our `PerceiverConfig` so that every parameter has a counterpart of the same size: one array
input cut into patches (1 = raw pixels), optionally projected, with fixed Fourier features
concatenated (a non-persistent buffer) or learned positions added; learned latents that
cross-attend to it before each of the first `cross_attends` blocks (the first cross-attend has
its own weights, the later ones share one set) and blocks of latent self-attention (one set for
all blocks with `share_blocks`); a learned query cross-attending to the latents (or their mean)
and a linear head. Each layer: pre-LN attention with separate query/key/value Linears and
`F.scaled_dot_product_attention`, an optional query residual, a pre-LN MLP with a residual; no
final LayerNorm. The loss is cross-entropy with the config's label smoothing. Byte inputs,
several inputs, the mlm and dense decoders and dropout raise `Unsupported`.

Weight decay (torch_trainers: `*weight`s of ndim >= 2) falls on the Linear weights as ours
(`param_groups.wd_mask`) on the kernels: latents, query, learned positions, LayerNorms and biases
are exempt on both sides. `load_perceiver_params` copies our weights across (the parity test).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistax.benchmarks import torch_models
from vistax.benchmarks.torch_models import Unsupported, to_tensor
from vistax.models import perceiver as jax_perceiver

# jax.nn.initializers' truncated normal: std / this constant, cut at two of its std.
_TRUNCATED_STD = 0.87962566103423978


def _check(cfg: jax_perceiver.PerceiverConfig) -> None:
    if len(cfg.inputs) != 1:
        raise Unsupported(f"the PyTorch Perceiver reads one input; model.inputs has "
                          f"{[i.name for i in cfg.inputs]}")
    spec = cfg.inputs[0]
    found = [f"model.inputs.{spec.name}.kind={spec.kind!r}"] if spec.kind == "bytes" else []
    if cfg.decoder.kind not in ("classification", "mean"):
        found.append(f"model.decoder.kind={cfg.decoder.kind!r}")
    if cfg.dropout:
        found.append(f"model.dropout={cfg.dropout!r}")
    if cfg.activation not in torch_models.ACTIVATIONS:
        found.append(f"model.activation={cfg.activation!r}")
    if cfg.dtype not in torch_models.AUTOCAST:
        found.append(f"model.dtype={cfg.dtype!r} compute")
    if cfg.param_dtype != "float32":
        found.append(f"model.param_dtype={cfg.param_dtype!r}")
    if found:
        raise Unsupported(f"the PyTorch Perceiver has no {', '.join(found)}")


def _lecun_normal_(weight: torch.Tensor) -> None:
    """Our attention kernels' init (haiku's Linear default): truncated normal, variance 1/fan_in."""
    std = 1.0 / math.sqrt(weight.shape[1]) / _TRUNCATED_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _embedding(*shape: int) -> nn.Parameter:
    """The latents, queries and learned positions: truncated normal(0.02), as ours."""
    std = 0.02 / _TRUNCATED_STD
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std,
                                              b=2 * std))


def _linear(n_in: int, n_out: int) -> nn.Linear:
    """Our Dense default: Xavier-uniform weight, zero bias."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head attention from q_dim queries to kv_dim keys/values: `qk_channels` for the
    query-key product, `v_channels` for the values (head-major), back to q_dim channels."""

    def __init__(self, q_dim: int, kv_dim: int, qk_channels: int, v_channels: int,
                 num_heads: int):
        super().__init__()
        for name, width in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if width % num_heads:
                raise ValueError(f"Perceiver attention {name}={width} is not divisible by "
                                 f"{num_heads} heads.")
        self.num_heads = num_heads
        self.query = nn.Linear(q_dim, qk_channels)
        self.key = nn.Linear(kv_dim, qk_channels)
        self.value = nn.Linear(kv_dim, v_channels)
        self.out = nn.Linear(v_channels, q_dim)
        for layer in (self.query, self.key, self.value, self.out):
            _lecun_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, kv):
        b, t, s, h = x.shape[0], x.shape[1], kv.shape[1], self.num_heads
        q = self.query(x).view(b, t, h, -1).transpose(1, 2)
        k = self.key(kv).view(b, s, h, -1).transpose(1, 2)
        v = self.value(kv).view(b, s, h, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(qk_channels / heads)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = _linear(dim, hidden)
        self.fc2 = _linear(hidden, dim)
        self.act = torch_models.ACTIVATIONS[activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PerceiverLayer(nn.Module):
    """Pre-LN attention (cross-attention to `inputs` when kv_dim is given, else self-attention)
    with an optional query residual, then a pre-LN MLP (widening x q_dim) with a residual."""

    def __init__(self, q_dim: int, kv_dim: int | None, *, num_heads: int, qk_channels: int,
                 v_channels: int, widening: int, query_residual: bool, eps: float,
                 activation: str):
        super().__init__()
        self.norm_q = nn.LayerNorm(q_dim, eps=eps)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=eps) if kv_dim is not None else None
        self.attn = Attention(q_dim, kv_dim or q_dim, qk_channels, v_channels, num_heads)
        self.norm_mlp = nn.LayerNorm(q_dim, eps=eps)
        self.mlp = Mlp(q_dim, widening * q_dim, activation)
        self.query_residual = query_residual

    def forward(self, x, inputs=None):
        q = self.norm_q(x)
        y = self.attn(q, q if self.norm_kv is None else self.norm_kv(inputs))
        x = x + y if self.query_residual else y
        return x + self.mlp(self.norm_mlp(x))


def _self_attention_layer(cfg) -> PerceiverLayer:
    qk = cfg.qk_channels or cfg.latent_dim
    return PerceiverLayer(cfg.latent_dim, None, num_heads=cfg.self_heads, qk_channels=qk,
                          v_channels=cfg.v_channels or qk, widening=cfg.self_widening,
                          query_residual=True, eps=cfg.layernorm_eps, activation=cfg.activation)


def _cross_attention_layer(cfg) -> PerceiverLayer:
    qk = cfg.qk_channels or cfg.input_channels
    return PerceiverLayer(cfg.latent_dim, cfg.input_channels, num_heads=cfg.cross_heads,
                          qk_channels=qk, v_channels=cfg.v_channels or qk,
                          widening=cfg.cross_widening, query_residual=cfg.cross_query_residual,
                          eps=cfg.layernorm_eps, activation=cfg.activation)


class ArrayInput(nn.Module):
    """(B, *shape[, C]) arrays -> (B, N, C) tokens: patches in raster order (values within a
    patch in (patch dims..., channel) order), optional projection, positions."""

    def __init__(self, spec: jax_perceiver.InputConfig):
        super().__init__()
        self.spec = spec
        values = spec.channels * int(np.prod(spec.patch))
        self.project = _linear(values, spec.project) if spec.project else None
        self.pos_embedding = (_embedding(spec.num_tokens, spec.token_channels)
                              if spec.position == "learned" else None)
        if spec.position == "fourier":
            self.register_buffer("fourier", torch.from_numpy(jax_perceiver.fourier_features(
                spec.grid, spec.fourier_bands, spec.max_resolution, spec.concat_pos,
                spec.sine_only)), persistent=False)
        else:
            self.fourier = None

    def tokens(self, x):
        spec = self.spec
        channel_axis = jax_perceiver.ARRAY_KINDS[spec.kind][1]
        expected = (x.shape[0],) + spec.shape + ((spec.channels,) if channel_axis else ())
        if tuple(x.shape) != expected:
            raise ValueError(f"Perceiver input {spec.name!r} ({spec.kind}) expects arrays of "
                             f"shape (batch, {', '.join(map(str, expected[1:]))}); got "
                             f"{tuple(x.shape)}.")
        if not channel_axis:
            x = x[..., None]
        b, c, n = x.shape[0], x.shape[-1], len(spec.shape)
        if all(p == 1 for p in spec.patch):  # raw values: a view, no copy
            return x.reshape(b, spec.num_tokens, c)
        split = [b] + [v for g, p in zip(spec.grid, spec.patch) for v in (g, p)] + [c]
        order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1]
        return x.reshape(split).permute(order).reshape(b, spec.num_tokens, -1)

    def forward(self, x):
        tokens = self.tokens(x)
        if self.project is not None:
            tokens = self.project(tokens)
        if self.fourier is not None:
            pos = self.fourier.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens, pos], dim=-1)
        elif self.pos_embedding is not None:
            tokens = tokens + self.pos_embedding
        return tokens


class QueryDecoder(nn.Module):
    """Perceiver IO classification: one learned query cross-attends to the latents, then a
    linear head on its output."""

    def __init__(self, cfg):
        super().__init__()
        dec = cfg.decoder
        query_dim = dec.query_dim or cfg.latent_dim
        qk = dec.qk_channels or cfg.latent_dim
        self.queries = _embedding(1, query_dim)
        self.cross_attend = PerceiverLayer(
            query_dim, cfg.latent_dim, num_heads=dec.heads, qk_channels=qk,
            v_channels=dec.v_channels or qk, widening=dec.widening,
            query_residual=dec.query_residual, eps=cfg.layernorm_eps, activation=cfg.activation)
        self.head = _linear(query_dim, dec.num_classes)

    def forward(self, z):
        q = self.queries.expand(z.shape[0], -1, -1)
        return self.head(self.cross_attend(q, z)[:, 0])


class MeanDecoder(nn.Module):
    """The original Perceiver's head: the mean of the latents -> a linear classifier (zero
    weight at init, as ours)."""

    def __init__(self, cfg):
        super().__init__()
        self.head = _linear(cfg.latent_dim, cfg.decoder.num_classes)
        nn.init.zeros_(self.head.weight)

    def forward(self, z):
        return self.head(z.mean(dim=1))


class Perceiver(nn.Module):
    """`inputs` (ModuleDict of the one input), `latents`, `cross_attend`, `cross_attend_repeat`,
    `self_attends` (one stack of layers_per_block layers with share_blocks, else one per
    block), `decoder`; forward({name: array}) -> logits (B, classes)."""

    def __init__(self, cfg: jax_perceiver.PerceiverConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.inputs = nn.ModuleDict({spec.name: ArrayInput(spec) for spec in cfg.inputs})
        self.latents = _embedding(cfg.num_latents, cfg.latent_dim)
        self.cross_attend = _cross_attention_layer(cfg)
        self.cross_attend_repeat = (_cross_attention_layer(cfg) if cfg.cross_attends > 1
                                    else None)
        stacks = 1 if cfg.share_blocks else cfg.num_blocks
        self.self_attends = nn.ModuleList(_self_attention_layer(cfg)
                                          for _ in range(stacks * cfg.layers_per_block))
        self.decoder = QueryDecoder(cfg) if cfg.decoder.kind == "classification" else (
            MeanDecoder(cfg))

    def encode(self, inputs: dict):
        """{name: array} -> latents (B, num_latents, latent_dim)."""
        cfg = self.cfg
        name = cfg.inputs[0].name
        if name not in inputs:
            raise KeyError(f"The Perceiver reads batch[{name!r}] (model.inputs.{name}); the batch "
                           f"has {sorted(inputs)}.")
        x = self.inputs[name](inputs[name])
        z = self.latents.expand(x.shape[0], -1, -1)
        n = cfg.layers_per_block
        for block in range(cfg.num_blocks):
            if block < cfg.cross_attends:
                layer = self.cross_attend if block == 0 else self.cross_attend_repeat
                z = layer(z, x)
            stack = 0 if cfg.share_blocks else block
            for layer in self.self_attends[stack * n:(stack + 1) * n]:
                z = layer(z)
        return z

    def forward(self, inputs: dict):
        return self.decoder(self.encode(inputs))


def loss(model: Perceiver, batch: dict, config, device):
    """The step's loss: cross-entropy of the logits against `label` (or one-hot `labels`) with
    the config's label smoothing, as train/objectives/perceiver.py."""
    inputs = {spec.name: torch.from_numpy(np.array(batch[spec.name], np.float32)).to(device)
              for spec in model.cfg.inputs}
    targets = torch_models.classification_targets(batch, device)
    smoothing = float((config.get("loss") or {}).get("label_smoothing", 0.0))
    return lambda: F.cross_entropy(model(inputs).float(), targets, label_smoothing=smoothing)


# -- weights from vistax ------------------------------------------------------------------------

def _in_out(kernel, n_in: int) -> torch.Tensor:
    """A Linear weight (out, in) from our kernel with `n_in` leading input dims."""
    kernel = np.asarray(kernel)
    return to_tensor(kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).T)


def _layer_state(params: dict, prefix: str, index: int | None = None) -> dict:
    """PyTorch state of a PerceiverLayer from ours (`index`: its slice of a stacked layer)."""
    def get(x):
        return np.asarray(x) if index is None else np.asarray(x)[index]

    sd = {}
    for norm in ("norm_q", "norm_kv", "norm_mlp"):
        if norm in params:
            sd[f"{prefix}{norm}.weight"] = to_tensor(get(params[norm]["scale"]))
            sd[f"{prefix}{norm}.bias"] = to_tensor(get(params[norm]["bias"]))
    attn = params["attn"]
    for name in ("query", "key", "value", "out"):
        n_in = 2 if name == "out" else 1  # out: (heads, v per head, q_dim)
        sd[f"{prefix}attn.{name}.weight"] = _in_out(get(attn[name]["kernel"]), n_in)
        sd[f"{prefix}attn.{name}.bias"] = to_tensor(get(attn[name]["bias"]).reshape(-1))
    for fc in ("fc1", "fc2"):
        sd[f"{prefix}mlp.{fc}.weight"] = _in_out(get(params["mlp"][fc]["kernel"]), 1)
        sd[f"{prefix}mlp.{fc}.bias"] = to_tensor(get(params["mlp"][fc]["bias"]))
    return sd


def load_perceiver_params(model: Perceiver, params: dict) -> None:
    """Copies our Perceiver's parameters (`nnx.state(perceiver, nnx.Param).to_pure_dict()`,
    self-attention layers stacked on a leading layers axis) into the PyTorch Perceiver."""
    cfg = model.cfg
    sd = {"latents": to_tensor(params["latents"]),
          **_layer_state(params["cross_attend"], "cross_attend.")}
    if model.cross_attend_repeat is not None:
        sd.update(_layer_state(params["cross_attend_repeat"], "cross_attend_repeat."))
    for i in range(len(model.self_attends)):
        sd.update(_layer_state(params["self_attends"], f"self_attends.{i}.", index=i))
    for name, inputs in (params.get("inputs") or {}).items():
        if "project" in inputs:
            sd.update(torch_models.dense_state(inputs["project"], f"inputs.{name}.project"))
        if "pos_embedding" in inputs:
            sd[f"inputs.{name}.pos_embedding"] = to_tensor(inputs["pos_embedding"])
    dec = params["decoder"]
    sd.update(torch_models.dense_state(dec["head"], "decoder.head"))
    if cfg.decoder.kind == "classification":
        sd["decoder.queries"] = to_tensor(dec["queries"])
        sd.update(_layer_state(dec["cross_attend"], "decoder.cross_attend."))
    torch_models.load_state(model, sd)
