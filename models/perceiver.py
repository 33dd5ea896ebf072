"""Perceiver (Jaegle et al. 2021a) and Perceiver IO (Jaegle et al. 2021b) in Flax NNX.

Inputs of any modality become one sequence of tokens (`inputs`: pixels or patches of images,
video, audio frames, spectrogram patches, UTF-8 bytes; several at once, padded to a common
width with learned modality padding). A learned latent array reads them through cross-attention
and is refined by latent self-attention; the cost is linear in the number of input tokens
(num_inputs x num_latents in the cross-attention), not quadratic. A Perceiver IO decoder then
answers output queries by cross-attending to the latents: one learned query for a class, one
learned position query per byte for masked language modelling (logits through the tied byte
embedding), one Fourier position query per pixel for dense outputs.

Layer structure, initialisation and names follow the reference (and the transformers library's
port, which `convert.perceiver_from_hf` loads): pre-LN attention with separate query/key/value
widths, an optional query residual, then a pre-LN MLP with residual; no final LayerNorm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vistax.models import layers
from vistax.models.transformer import DTYPES, REMAT_POLICIES, check_compute_options

# Reference init: truncated normal std 0.02 for the latents and learned position embeddings
# (Perceiver IO code, `TrainablePositionEncoding` with init_scale 0.02), fan-in variance
# scaling for the linear layers (haiku's `hk.Linear` default).
EMBED_INIT = jax.nn.initializers.truncated_normal(0.02)
ARRAY_KINDS = {  # kind -> (number of index dimensions, whether inputs carry a channel axis)
    "image": (2, True), "video": (3, True), "audio": (1, False), "spectrogram": (2, False),
}
INPUT_KINDS = tuple(ARRAY_KINDS) + ("bytes",)
DECODER_KINDS = ("classification", "mean", "mlm", "dense")


def fourier_features(index_dims: Sequence[int], num_bands: int,
                     max_resolution: Sequence[int] | None = None, concat_pos: bool = True,
                     sine_only: bool = False) -> np.ndarray:
    """Fourier position features of a grid, (prod(index_dims), channels) float32.

    Positions span [-1, 1] along each of the d dimensions (raster order); K = num_bands
    frequencies per dimension are spaced linearly from 1 to max_resolution / 2 (the Nyquist
    frequency of the target resolution, Perceiver Sec. 3.2); channels are
    [positions (d, if concat_pos), sin(pi f x) (d*K), cos(pi f x) (d*K, unless sine_only)],
    so d (2K + 1) in the paper's setting.
    """
    index_dims = tuple(int(n) for n in index_dims)
    max_resolution = index_dims if max_resolution is None else tuple(max_resolution)
    if len(max_resolution) != len(index_dims):
        raise ValueError(f"max_resolution {max_resolution} does not have one entry per index "
                         f"dimension of {index_dims}.")
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float64) for n in index_dims]
    pos = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(index_dims))
    freqs = np.stack([np.linspace(1.0, r / 2, num_bands) for r in max_resolution])  # (d, K)
    angles = np.pi * (pos[:, :, None] * freqs[None]).reshape(pos.shape[0], -1)
    parts = [np.sin(angles)] if sine_only else [np.sin(angles), np.cos(angles)]
    if concat_pos:
        parts.insert(0, pos)
    return np.concatenate(parts, axis=-1).astype(np.float32)


def fourier_channels(ndim: int, num_bands: int, concat_pos: bool = True,
                     sine_only: bool = False) -> int:
    return ndim * num_bands * (1 if sine_only else 2) + (ndim if concat_pos else 0)


def _tuple(value, n: int, key: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n or min(values) < 1:
        raise ValueError(f"{key}={value!r} must be a positive int or {n} of them.")
    return values


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """One input modality, read from the batch key `name` (config `model.inputs.<name>`).

    Arrays (`image` (B, H, W, C), `video` (B, T, H, W, C), `audio` (B, S) waveforms,
    `spectrogram` (B, T, F)) are cut into `patch`-sized blocks (1 = raw pixels or samples: the
    Perceiver's setting; e.g. 8 x 8 x 2 video patches or 128-sample audio frames as in the
    paper's AudioSet model), optionally projected to `project` channels, and given Fourier
    position features (`fourier_bands` per dimension at `max_resolution`, default the patch
    grid) concatenated, or learned positions added (`position='learned'`). `bytes`: (B, L)
    token ids with learned token and position embeddings of width `width`; id `pad_id` is
    padding (masked out of the cross-attention); row `vocab_size` of the embedding is [MASK].
    """
    name: str
    kind: str
    shape: tuple[int, ...] = ()  # index dims of arrays, e.g. (224, 224); bytes: (max_length,)
    channels: int = 1
    patch: tuple[int, ...] = ()
    fourier_bands: int = 64
    max_resolution: tuple[int, ...] = ()
    concat_pos: bool = True
    sine_only: bool = False
    position: str = "fourier"  # fourier | learned | none
    project: int = 0  # > 0: a Dense to this many channels after patching (conv1x1)
    vocab_size: int = 259  # bytes: the `bytes` tokenizer's 256 + pad/bos/eos
    width: int = 768
    pad_id: int = 0

    @classmethod
    def from_dict(cls, name: str, cfg: dict) -> "InputConfig":
        key = f"model.inputs.{name}"
        cfg = dict(cfg)
        kind = cfg.get("kind")
        if kind not in INPUT_KINDS:
            raise ValueError(f"{key}.kind={kind!r} is not one of {list(INPUT_KINDS)}.")
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} in {key}; known: {sorted(fields)}.")
        if "shape" not in cfg:
            raise ValueError(f"{key}.shape is required (index dims, e.g. (32, 32); bytes: "
                             f"(max_length,)).")
        ndim = ARRAY_KINDS[kind][0] if kind != "bytes" else 1
        cfg["shape"] = _tuple(cfg["shape"], ndim, f"{key}.shape")
        if kind != "bytes":
            cfg["patch"] = _tuple(cfg.get("patch", 1) or 1, ndim, f"{key}.patch")
            grid = [s // p for s, p in zip(cfg["shape"], cfg["patch"])]
            if any(s % p for s, p in zip(cfg["shape"], cfg["patch"])):
                raise ValueError(f"{key}.shape={cfg['shape']} is not a multiple of "
                                 f"{key}.patch={cfg['patch']}.")
            cfg["max_resolution"] = _tuple(cfg.get("max_resolution") or grid, ndim,
                                           f"{key}.max_resolution")
            if cfg.get("position", "fourier") not in ("fourier", "learned", "none"):
                raise ValueError(f"{key}.position={cfg['position']!r} is not one of "
                                 "['fourier', 'learned', 'none'].")
            if not ARRAY_KINDS[kind][1] and cfg.get("channels", 1) != 1:
                raise ValueError(f"{key}.channels must be 1 for {kind} inputs (no channel axis).")
        return cls(name=name, **cfg)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.shape, self.patch))

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid)) if self.kind != "bytes" else self.shape[0]

    @property
    def token_channels(self) -> int:
        """Channels of one token before positions: the patch's values or the projection."""
        return self.project or self.channels * int(np.prod(self.patch))

    @property
    def num_channels(self) -> int:
        if self.kind == "bytes":
            return self.width
        if self.position == "fourier":
            return self.token_channels + fourier_channels(len(self.shape), self.fourier_bands,
                                                          self.concat_pos, self.sine_only)
        return self.token_channels


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Perceiver IO output queries (config `model.decoder`).

    `classification`: one learned query -> `num_classes` logits (Perceiver IO); `mean`: the
    mean of the latents -> logits (the original Perceiver's head); `mlm`: one learned position
    query per byte of the `modality` input, logits through its tied embedding; `dense`: one
    Fourier position query per token of the array `modality` (optionally with the token's own
    features concatenated, `concat_input`), projected to `out_channels` values.
    `query_dim` 0 means the natural width (latent_dim, the byte width, or the Fourier width).
    """
    kind: str = "classification"
    num_classes: int = 0
    modality: str = ""
    heads: int = 1
    qk_channels: int = 0  # 0: the latent width (the reference's "kv" shape)
    v_channels: int = 0  # 0: qk_channels (mlm: query_dim)
    widening: int = 1
    query_residual: bool = True
    query_dim: int = 0
    out_channels: int = 0  # dense: values per query (0: the modality's patch values)
    concat_input: bool = False

    @classmethod
    def from_dict(cls, cfg: dict) -> "DecoderConfig":
        cfg = dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} in model.decoder; known: "
                             f"{sorted(fields)}.")
        out = cls(**cfg)
        if out.kind not in DECODER_KINDS:
            raise ValueError(f"model.decoder.kind={out.kind!r} is not one of "
                             f"{list(DECODER_KINDS)}.")
        return out


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Resolved Perceiver / Perceiver IO hyper-parameters (config `model`).

    The latent process is `num_blocks` blocks of `layers_per_block` self-attention layers; a
    cross-attention to the inputs precedes each of the first `cross_attends` blocks. With
    `share_blocks` one set of block weights is applied num_blocks times (the parameter count
    does not depend on num_blocks), and cross-attends after the first share one set of weights
    (Perceiver, Sec. 3.1 / Table 5: 8 blocks x 6 layers, 512 x 1024 latents on ImageNet).
    Perceiver IO reads its inputs once (cross_attends=1).
    """
    inputs: tuple[InputConfig, ...]
    decoder: DecoderConfig
    num_latents: int = 512
    latent_dim: int = 1024
    num_blocks: int = 8
    layers_per_block: int = 6
    cross_attends: int = 1
    share_blocks: bool = True
    cross_heads: int = 1
    self_heads: int = 8
    qk_channels: int = 0  # 0: cross-attention the input width ("kv"), self-attention latent_dim
    v_channels: int = 0  # 0: qk_channels
    cross_widening: int = 1
    self_widening: int = 1
    cross_query_residual: bool = True
    min_padding: int = 4  # multimodal: learned modality channels every input gets at least
    dropout: float = 0.0
    layernorm_eps: float = 1e-5
    activation: str = "gelu"
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_compute_options(self)
        for key in ("num_latents", "latent_dim", "num_blocks", "layers_per_block", "cross_heads",
                    "self_heads", "cross_widening", "self_widening"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1.")
        if not 1 <= self.cross_attends <= self.num_blocks:
            raise ValueError(f"model.cross_attends={self.cross_attends} must lie in [1, "
                             f"num_blocks={self.num_blocks}].")
        if not self.inputs:
            raise ValueError("model.inputs is empty: name at least one input modality.")
        names = [i.name for i in self.inputs]
        dec = self.decoder
        if dec.kind in ("mlm", "dense"):
            modality = {i.name: i for i in self.inputs}.get(dec.modality)
            want = "bytes" if dec.kind == "mlm" else "an array"
            if modality is None or (modality.kind == "bytes") != (dec.kind == "mlm"):
                raise ValueError(f"model.decoder.modality={dec.modality!r} must name a {want} "
                                 f"input of model.inputs ({names}).")
        elif dec.num_classes < 1:
            raise ValueError(f"model.decoder.num_classes={dec.num_classes} must be >= 1 for "
                             f"a {dec.kind} decoder.")
        cross_qk = self.qk_channels or self.input_channels
        if cross_qk % self.cross_heads or (self.v_channels or cross_qk) % self.cross_heads:
            raise ValueError(f"model.cross_heads={self.cross_heads} must divide the cross-"
                             f"attention widths qk={cross_qk}, v={self.v_channels or cross_qk} "
                             "(without model.qk_channels they are the input width).")
        self_qk = self.qk_channels or self.latent_dim
        if self_qk % self.self_heads or (self.v_channels or self_qk) % self.self_heads:
            raise ValueError(f"model.self_heads={self.self_heads} must divide the self-attention "
                             f"widths qk={self_qk}, v={self.v_channels or self_qk}.")
        if (self.v_channels or self_qk) != self.latent_dim:
            raise ValueError(f"model.v_channels={self.v_channels} must equal latent_dim="
                             f"{self.latent_dim} (the self-attention output is added to the "
                             "latents).")

    @classmethod
    def from_dict(cls, cfg: dict) -> "PerceiverConfig":
        cfg = dict(cfg)
        inputs = cfg.pop("inputs", None) or {}
        inputs = tuple(InputConfig.from_dict(name, dict(inputs[name])) for name in sorted(inputs))
        decoder = DecoderConfig.from_dict(dict(cfg.pop("decoder", None) or {}))
        fields = {f.name for f in dataclasses.fields(cls)} - {"inputs", "decoder"}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"Unknown Perceiver option(s) {unknown}; known: {sorted(fields)}.")
        return cls(inputs=inputs, decoder=decoder, **cfg)

    @property
    def num_inputs(self) -> int:
        return sum(i.num_tokens for i in self.inputs)

    @property
    def input_channels(self) -> int:
        """Width of the concatenated input tokens (the cross-attention's key/value width)."""
        if len(self.inputs) == 1:
            return self.inputs[0].num_channels
        return max(i.num_channels for i in self.inputs) + self.min_padding

    def modality(self, name: str) -> InputConfig:
        return {i.name: i for i in self.inputs}[name]


# ------------------------------------------------------------------------------------------
# Attention layers


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(d_qk)) v over (B, T, heads, d) arrays; q/k and v widths may differ.

    `mask` (broadcastable to (B, heads, T, S), True = attend). A query with no allowed key gets
    all-zero weights (its output is 0), not the uniform average a large negative bias gives.
    """
    if q.shape[-1] == v.shape[-1]:
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    if mask is not None:
        any_key = jnp.broadcast_to(mask, mask.shape[:-1] + (k.shape[1],)).any(-1)  # (B,h,T)
        y = y * jnp.swapaxes(any_key, 1, 2)[..., None].astype(y.dtype)
    return y


class Attention(nnx.Module):
    """Multi-head attention from `q_dim` queries to `kv_dim` keys/values with `qk_channels`
    for the query-key product and `v_channels` for the values, output `out_dim` channels."""

    def __init__(self, q_dim: int, kv_dim: int, qk_channels: int, v_channels: int, out_dim: int,
                 num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype, kv_axis: str = "embed"):
        for name, width in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if width % num_heads:
                raise ValueError(f"Perceiver attention {name}={width} is not divisible by "
                                 f"{num_heads} heads.")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        init = jax.nn.initializers.lecun_normal
        hq, hv = qk_channels // num_heads, v_channels // num_heads
        self.query = layers.Dense(q_dim, (num_heads, hq), ("embed", "heads", "kv"),
                                  kernel_init=init(in_axis=0, out_axis=(1, 2)), **kw)
        self.key = layers.Dense(kv_dim, (num_heads, hq), (kv_axis, "heads", "kv"),
                                kernel_init=init(in_axis=0, out_axis=(1, 2)), **kw)
        self.value = layers.Dense(kv_dim, (num_heads, hv), (kv_axis, "heads", "kv"),
                                  kernel_init=init(in_axis=0, out_axis=(1, 2)), **kw)
        self.out = layers.Dense((num_heads, hv), out_dim, ("heads", "kv", "embed"),
                                kernel_init=init(in_axis=(0, 1), out_axis=2), **kw)

    def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        heads = ("batch", "length", "act_heads", None)
        q = layers.constrain(self.query(x), heads)
        k = layers.constrain(self.key(kv), heads)
        v = layers.constrain(self.value(kv), heads)
        return self.out(layers.constrain(attend(q, k, v, mask), heads))


class PerceiverLayer(nnx.Module):
    """Pre-LN attention (cross-attention when `kv_dim` is given) with an optional query
    residual, then a pre-LN MLP of width widening x q_dim with a residual. `kv_axis`: the
    logical axis of the attended tokens' width (`input` for the input tokens, not sharded)."""

    def __init__(self, q_dim: int, kv_dim: int | None, *, num_heads: int, qk_channels: int,
                 v_channels: int, widening: int, query_residual: bool, eps: float,
                 activation: str, dropout: float, rngs: nnx.Rngs, dtype, param_dtype,
                 kv_axis: str = "embed"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm_q = layers.LayerNorm(q_dim, eps=eps, **kw)
        self.norm_kv = (layers.LayerNorm(kv_dim, eps=eps, axis=kv_axis, **kw)
                        if kv_dim is not None else None)
        self.attn = Attention(q_dim, kv_dim or q_dim, qk_channels, v_channels, q_dim, num_heads,
                              kv_axis=kv_axis, **kw)
        self.norm_mlp = layers.LayerNorm(q_dim, eps=eps, **kw)
        self.mlp = layers.MLP(q_dim, widening * q_dim, dropout_rate=dropout, activation=activation,
                              **kw)
        self.query_residual = query_residual
        self.dropout_rate = dropout

    def __call__(self, x: jax.Array, inputs: jax.Array | None = None,
                 mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        keys = jax.random.split(rng, 3) if rng is not None else [None] * 3
        q = self.norm_q(x)
        kv = q if self.norm_kv is None else self.norm_kv(inputs)
        y = layers.dropout(self.attn(q, kv, mask), self.dropout_rate, keys[0])
        x = x + y if self.query_residual else y
        x = layers.constrain(x, ("batch", "length", "act_embed"))
        y = layers.dropout(self.mlp(self.norm_mlp(x), keys[1]), self.dropout_rate, keys[2])
        return layers.constrain(x + y, ("batch", "length", "act_embed"))


def _self_attention_layer(cfg: PerceiverConfig, rngs: nnx.Rngs) -> PerceiverLayer:
    qk = cfg.qk_channels or cfg.latent_dim
    return PerceiverLayer(cfg.latent_dim, None, num_heads=cfg.self_heads, qk_channels=qk,
                          v_channels=cfg.v_channels or qk, widening=cfg.self_widening,
                          query_residual=True, eps=cfg.layernorm_eps, activation=cfg.activation,
                          dropout=cfg.dropout, rngs=rngs, dtype=DTYPES[cfg.dtype],
                          param_dtype=DTYPES[cfg.param_dtype])


def _cross_attention_layer(cfg: PerceiverConfig, rngs: nnx.Rngs) -> PerceiverLayer:
    kv = cfg.input_channels
    qk = cfg.qk_channels or kv
    return PerceiverLayer(cfg.latent_dim, kv, num_heads=cfg.cross_heads, qk_channels=qk,
                          v_channels=cfg.v_channels or qk, widening=cfg.cross_widening,
                          query_residual=cfg.cross_query_residual, eps=cfg.layernorm_eps,
                          activation=cfg.activation, dropout=cfg.dropout, rngs=rngs,
                          dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                          kv_axis="input")


# ------------------------------------------------------------------------------------------
# Input preprocessors


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
    """(B, *index_dims, C) -> (B, prod(grid), prod(patch) * C), patches in raster order and
    values within a patch in (patch dims..., channel) order."""
    b, dims, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    n = len(dims)
    grid = [d // p for d, p in zip(dims, patch)]
    split = [b] + [v for g, p in zip(grid, patch) for v in (g, p)] + [c]
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1]
    x = x.reshape(split).transpose(order)
    return x.reshape(b, int(np.prod(grid)), int(np.prod(patch)) * c)


class ArrayInput(nnx.Module):
    """Images, video, audio or spectrograms -> (B, N, C) tokens with positions."""

    def __init__(self, cfg: InputConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.cfg = cfg
        self.dtype = dtype
        values = cfg.channels * int(np.prod(cfg.patch))
        self.project = (layers.Dense(values, cfg.project, (None, "input"), rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype) if cfg.project else None)
        self.pos_embedding = (layers.param(rngs, EMBED_INIT, (cfg.num_tokens, cfg.token_channels),
                                           (None, "input"), param_dtype)
                              if cfg.position == "learned" else None)

    def tokens(self, x: jax.Array) -> jax.Array:
        """The batch's array -> (B, N, patch values) before projection and positions."""
        cfg = self.cfg
        expected = (x.shape[0],) + cfg.shape + ((cfg.channels,) if ARRAY_KINDS[cfg.kind][1] else ())
        if x.shape != expected:
            raise ValueError(f"Perceiver input {cfg.name!r} ({cfg.kind}) expects arrays of shape "
                             f"(batch, {', '.join(map(str, expected[1:]))}); got {x.shape}.")
        if not ARRAY_KINDS[cfg.kind][1]:
            x = x[..., None]
        return patchify(x.astype(self.dtype), cfg.patch)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        tokens = self.tokens(x)
        if self.project is not None:
            tokens = self.project(tokens)
        if cfg.position == "fourier":
            pos = fourier_features(cfg.grid, cfg.fourier_bands, cfg.max_resolution, cfg.concat_pos,
                                   cfg.sine_only)
            pos = jnp.broadcast_to(jnp.asarray(pos, tokens.dtype), tokens.shape[:2] + pos.shape[-1:])
            tokens = jnp.concatenate([tokens, pos], axis=-1)
        elif cfg.position == "learned":
            tokens = tokens + self.pos_embedding[...].astype(tokens.dtype)
        return tokens, jnp.ones(tokens.shape[:2], bool)


class BytesInput(nnx.Module):
    """(B, L) byte ids -> token + learned position embeddings; padding masked out."""

    def __init__(self, cfg: InputConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.cfg = cfg
        self.dtype = dtype
        # One row past the vocabulary: [MASK] for masked byte modelling.
        self.embedding = layers.param(rngs, EMBED_INIT, (cfg.vocab_size + 1, cfg.width),
                                      ("vocab", "embed"), param_dtype)
        self.pos_embedding = layers.param(rngs, EMBED_INIT, (cfg.shape[0], cfg.width),
                                          (None, "embed"), param_dtype)

    @property
    def mask_id(self) -> int:
        return self.cfg.vocab_size

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        if ids.ndim != 2 or ids.shape[1] != cfg.shape[0]:
            raise ValueError(f"Perceiver input {cfg.name!r} (bytes) expects ids of shape (batch, "
                             f"{cfg.shape[0]}); got {ids.shape}.")
        x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        x = x + self.pos_embedding[...].astype(self.dtype)
        return x, ids != cfg.pad_id


# ------------------------------------------------------------------------------------------
# The model


class Perceiver(nnx.Module):
    """Inputs (a dict of modalities) -> latents -> Perceiver IO decoder outputs."""

    def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.inputs = nnx.Dict({
            i.name: (BytesInput(i, **kw) if i.kind == "bytes" else ArrayInput(i, **kw))
            for i in cfg.inputs})
        # Multimodal: each modality's tokens are padded to one width with learned channels of
        # their own, which act as a modality embedding (Perceiver IO, Sec. 4.3 / App. F).
        width = cfg.input_channels
        self.modality_padding = nnx.Dict({
            i.name: layers.param(rngs, EMBED_INIT, (width - i.num_channels,), ("input",),
                                 param_dtype)
            for i in cfg.inputs} if len(cfg.inputs) > 1 else {})
        self.latents = layers.param(rngs, EMBED_INIT, (cfg.num_latents, cfg.latent_dim),
                                    (None, "embed"), param_dtype)
        self.cross_attend = _cross_attention_layer(cfg, rngs)
        self.cross_attend_repeat = (_cross_attention_layer(cfg, rngs) if cfg.cross_attends > 1
                                    else None)
        stacks = 1 if cfg.share_blocks else cfg.num_blocks

        @nnx.split_rngs(splits=stacks * cfg.layers_per_block)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> PerceiverLayer:
            return _self_attention_layer(cfg, rngs)

        # (stacks * layers_per_block) layers stacked on a leading axis; block i runs stack i
        # (or the single shared stack) under a scan.
        self.self_attends = make_layers(rngs)
        self.decoder = _build_decoder(cfg, **kw)

    # -- encoder --------------------------------------------------------------------------

    def embed_inputs(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """Every modality's tokens, padded to one width and concatenated: (B, N, C), (B, N)."""
        tokens, masks = [], []
        for spec in self.cfg.inputs:
            if spec.name not in batch:
                raise KeyError(f"The Perceiver reads batch[{spec.name!r}] (model.inputs."
                               f"{spec.name}); the batch has {sorted(batch)}.")
            x, mask = self.inputs[spec.name](batch[spec.name])
            if len(self.cfg.inputs) > 1:
                pad = self.modality_padding[spec.name][...].astype(x.dtype)
                x = jnp.concatenate([x, jnp.broadcast_to(pad, x.shape[:2] + pad.shape)], -1)
            tokens.append(x)
            masks.append(mask)
        x = jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0]
        mask = jnp.concatenate(masks, axis=1) if len(masks) > 1 else masks[0]
        return layers.constrain(x, ("batch", "length", "act_embed")), mask

    def _run_block(self, z: jax.Array, block: int, rng: jax.Array | None) -> jax.Array:
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.self_attends)
        n = cfg.layers_per_block
        if not cfg.share_blocks:
            stacked = jax.tree.map(lambda p: p[block * n:(block + 1) * n], stacked)

        def apply_layer(h, state, key):
            return nnx.merge(graphdef, state)(h, rng=key)

        if cfg.remat != "none":
            apply_layer = jax.checkpoint(apply_layer, policy=REMAT_POLICIES[cfg.remat])
        keys = jax.random.split(rng, n) if rng is not None else None

        def body(h, xs):
            state, key = xs
            return apply_layer(h, state, key), None

        z, _ = jax.lax.scan(body, z, (stacked, keys))
        return z

    def encode(self, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        """The batch's inputs -> latents (B, num_latents, latent_dim)."""
        cfg = self.cfg
        x, mask = self.embed_inputs(batch)
        attn_mask = mask[:, None, None, :]
        z = jnp.broadcast_to(self.latents[...].astype(x.dtype),
                             (x.shape[0], cfg.num_latents, cfg.latent_dim))
        z = layers.constrain(z, ("batch", "length", "act_embed"))
        keys = (jax.random.split(rng, 2 * cfg.num_blocks) if rng is not None
                else [None] * (2 * cfg.num_blocks))
        for block in range(cfg.num_blocks):
            if block < cfg.cross_attends:
                layer = self.cross_attend if block == 0 else self.cross_attend_repeat
                z = layer(z, x, attn_mask, rng=keys[2 * block])
            z = self._run_block(z, block, keys[2 * block + 1])
        return z

    # -- decoder --------------------------------------------------------------------------

    def __call__(self, batch: dict, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(outputs, {'latents': ..., 'features': (B, D)}): logits (B, classes) for
        classification, byte logits (B, L, vocab + 1) for mlm, values (B, N, out) for dense."""
        k_enc, k_dec = jax.random.split(rng) if rng is not None else (None, None)
        z = self.encode(batch, k_enc)
        out, features = self.decoder(self, batch, z, k_dec)
        return out, {"latents": z, "features": features}


def _build_decoder(cfg: PerceiverConfig, **kw):
    kind = cfg.decoder.kind
    if kind == "mean":
        return MeanDecoder(cfg, **kw)
    return QueryDecoder(cfg, **kw)


class MeanDecoder(nnx.Module):
    """The original Perceiver's head: the mean of the latents -> a linear classifier."""

    def __init__(self, cfg: PerceiverConfig, *, rngs, dtype, param_dtype):
        self.head = layers.Dense(cfg.latent_dim, cfg.decoder.num_classes, ("embed", "classes"),
                                 rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                 kernel_init=jax.nn.initializers.zeros)

    def __call__(self, model, batch, z, rng):
        del model, batch, rng
        pooled = z.mean(1)
        return self.head(pooled), pooled


class QueryDecoder(nnx.Module):
    """Perceiver IO decoding: output queries cross-attend to the latents (one layer)."""

    def __init__(self, cfg: PerceiverConfig, *, rngs, dtype, param_dtype):
        dec = cfg.decoder
        self.cfg = cfg
        self.kind = dec.kind
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        modality = cfg.modality(dec.modality) if dec.kind in ("mlm", "dense") else None
        if dec.kind == "classification":
            query_dim = dec.query_dim or cfg.latent_dim
            self.queries = layers.param(rngs, EMBED_INIT, (1, query_dim), (None, "embed"),
                                        param_dtype)
        elif dec.kind == "mlm":
            query_dim = dec.query_dim or modality.width
            self.queries = layers.param(rngs, EMBED_INIT, (modality.shape[0], query_dim),
                                        (None, "embed"), param_dtype)
        else:  # dense: Fourier features of the output grid (+ the input's own values)
            query_dim = (fourier_channels(len(modality.shape), modality.fourier_bands,
                                          modality.concat_pos, modality.sine_only)
                         + (modality.token_channels if dec.concat_input else 0))
            if dec.query_dim and dec.query_dim != query_dim:
                raise ValueError(f"model.decoder.query_dim={dec.query_dim}: a dense decoder's "
                                 f"queries have {query_dim} channels.")
            self.queries = None
        self.query_dim = query_dim
        qk = dec.qk_channels or cfg.latent_dim
        v = dec.v_channels or (query_dim if dec.kind == "mlm" else qk)
        self.cross_attend = PerceiverLayer(
            query_dim, cfg.latent_dim, num_heads=dec.heads, qk_channels=qk, v_channels=v,
            widening=dec.widening, query_residual=dec.query_residual, eps=cfg.layernorm_eps,
            activation=cfg.activation, dropout=cfg.dropout, **kw)
        if dec.kind == "classification":
            self.head = layers.Dense(query_dim, dec.num_classes, ("embed", "classes"), **kw)
        elif dec.kind == "dense":
            out = dec.out_channels or modality.channels * int(np.prod(modality.patch))
            self.head = layers.Dense(query_dim, out, ("embed", None), **kw)
        else:  # mlm: logits through the tied byte embedding, plus a bias
            self.head = None
            self.bias = nnx.Param(jnp.zeros((modality.vocab_size + 1,), param_dtype),
                                  out_sharding=("vocab",))

    def queries_for(self, model: Perceiver, batch: dict, batch_size: int, dtype) -> jax.Array:
        dec = self.cfg.decoder
        if self.queries is not None:
            q = self.queries[...].astype(dtype)
            return jnp.broadcast_to(q, (batch_size,) + q.shape)
        spec = self.cfg.modality(dec.modality)
        pos = jnp.asarray(fourier_features(spec.grid, spec.fourier_bands, spec.max_resolution,
                                           spec.concat_pos, spec.sine_only), dtype)
        pos = jnp.broadcast_to(pos, (batch_size,) + pos.shape)
        if dec.concat_input:
            values = model.inputs[dec.modality].tokens(batch[dec.modality])
            proj = model.inputs[dec.modality].project
            values = values if proj is None else proj(values)
            pos = jnp.concatenate([values.astype(dtype), pos], axis=-1)
        return pos

    def __call__(self, model, batch, z, rng):
        q = self.queries_for(model, batch, z.shape[0], z.dtype)
        out = self.cross_attend(q, z, None, rng=rng)
        if self.kind == "classification":
            return self.head(out[:, 0]), out[:, 0]
        if self.kind == "dense":
            return self.head(out), z.mean(1)
        table = model.inputs[self.cfg.decoder.modality].embedding[...].astype(out.dtype)
        logits = jnp.einsum("bld,vd->blv", out, table) + self.bias[...].astype(out.dtype)
        return logits, z.mean(1)


def flops_per_example(cfg: PerceiverConfig) -> float:
    """Forward FLOPs of one example (matmuls and attention, 2 per multiply-add).

    Linear in the number of input tokens M: the cross-attention costs O(M N D) for N latents,
    the latent self-attention O(N^2 D) per layer, independent of M (Perceiver, Sec. 2.1)."""
    m, c, n, d = cfg.num_inputs, cfg.input_channels, cfg.num_latents, cfg.latent_dim
    flops = 0.0
    for spec in cfg.inputs:
        if spec.project:
            flops += 2 * spec.num_tokens * spec.channels * np.prod(spec.patch) * spec.project

    def layer(t, q_dim, s, kv_dim, qk, v, widening):
        return 2 * (t * q_dim * qk + s * kv_dim * (qk + v) + t * v * q_dim  # projections
                    + t * s * (qk + v)  # q k^T and the weighted sum of values
                    + 2 * t * q_dim * widening * q_dim)  # MLP

    cross_qk = cfg.qk_channels or c
    flops += cfg.cross_attends * layer(n, d, m, c, cross_qk, cfg.v_channels or cross_qk,
                                       cfg.cross_widening)
    self_qk = cfg.qk_channels or d
    flops += cfg.num_blocks * cfg.layers_per_block * layer(n, d, n, d, self_qk,
                                                            cfg.v_channels or self_qk,
                                                            cfg.self_widening)
    dec = cfg.decoder
    if dec.kind == "mean":
        return float(flops + 2 * d * dec.num_classes)
    if dec.kind == "classification":
        t, q_dim = 1, dec.query_dim or d
    elif dec.kind == "mlm":
        spec = cfg.modality(dec.modality)
        t, q_dim = spec.shape[0], dec.query_dim or spec.width
    else:
        spec = cfg.modality(dec.modality)
        t = spec.num_tokens
        q_dim = (fourier_channels(len(spec.shape), spec.fourier_bands, spec.concat_pos,
                                  spec.sine_only) + (spec.token_channels if dec.concat_input else 0))
    qk = dec.qk_channels or d
    v = dec.v_channels or (q_dim if dec.kind == "mlm" else qk)
    flops += layer(t, q_dim, n, d, qk, v, dec.widening)
    if dec.kind == "classification":
        flops += 2 * q_dim * dec.num_classes
    elif dec.kind == "mlm":
        flops += 2 * t * q_dim * (cfg.modality(dec.modality).vocab_size + 1)
    else:
        spec = cfg.modality(dec.modality)
        flops += 2 * t * q_dim * (dec.out_channels or spec.channels * int(np.prod(spec.patch)))
    return float(flops)


def num_params(model: nnx.Module) -> int:
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
