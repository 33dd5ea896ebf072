"""Weight import from other codebases' state dicts into vistax parameter trees.

Inputs are plain mappings name -> numpy array (from safetensors or a torch state dict loaded
with `weights_only=True`); outputs are nested dicts shaped like `nnx.state(model, nnx.Param)`,
applied with `load_into(model, params)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from vistax.models.vit import ViTConfig


def load_into(model: nnx.Module, params: Mapping) -> None:
    """Copies a nested dict of arrays into `model`'s parameters; shapes must match exactly."""
    state = nnx.state(model, nnx.Param)
    flat_new = dict(nnx.traversals.flatten_mapping(params))
    flat_old = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)))
    missing = sorted("/".join(k) for k in set(flat_old) - set(flat_new))
    unexpected = sorted("/".join(k) for k in set(flat_new) - set(flat_old))
    if missing or unexpected:
        raise ValueError(f"Imported weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}.")
    for key, old in flat_old.items():
        if tuple(old.shape) != tuple(flat_new[key].shape):
            raise ValueError(f"Imported {'/'.join(key)} has shape {flat_new[key].shape}, the model "
                             f"expects {old.shape}.")
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


# Legacy Hugging Face ViT names (checkpoints on the hub) -> the names of transformers >= 5.
_HF_VIT_LEGACY = (
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
)


def _hf_vit_names(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Strips `prefix` and renames legacy keys, so both naming schemes load."""
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            for pattern, repl in _HF_VIT_LEGACY:
                key = re.sub(pattern, repl, key)
        out[key] = np.asarray(value, np.float32)
    return out


def vit_from_hf(sd: Mapping[str, np.ndarray], cfg: ViTConfig, prefix: str = "vit.") -> dict:
    """Hugging Face `ViTModel` / `ViTForImageClassification` weights -> vistax ViT params.

    Accepts both the hub's legacy key names and those of transformers >= 5; a bare `ViTModel`
    state dict has no `vit.` prefix (pass `prefix=""`). HF adds a position embedding to the
    class token too; that sum is a constant, so it is folded into our `cls_token` (our position
    embedding covers patches only). The HF pooler (Dense + tanh on the class token) maps to
    `pre_logits` when `cfg.representation_size` is set.
    """
    if cfg.pool != "cls" or cfg.posemb != "learn" or cfg.num_registers:
        raise ValueError("HF ViT weights need pool='cls', posemb='learn' and no registers.")
    sd = _hf_vit_names(sd, prefix)

    def g(name):
        if name not in sd:
            raise KeyError(f"HF ViT weight {prefix}{name} not found; keys look like "
                           f"{sorted(sd)[:4]}.")
        return sd[name]

    d, h = cfg.width, cfg.num_heads
    k = d // h
    pos = g("embeddings.position_embeddings")
    params = {
        "cls_token": g("embeddings.cls_token") + pos[:, :1],
        "pos_embedding": pos[:, 1:],
        "patch_embed": {
            "kernel": g("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
            "bias": g("embeddings.patch_embeddings.projection.bias"),
        },
    }

    def layer(i: int) -> dict:
        p = f"layers.{i}."
        attn = {ours: {"kernel": g(f"{p}attention.{theirs}.weight").T.reshape(d, h, k),
                       "bias": g(f"{p}attention.{theirs}.bias").reshape(h, k)}
                for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))}
        attn["out"] = {"kernel": g(p + "attention.o_proj.weight").T.reshape(h, k, d),
                       "bias": g(p + "attention.o_proj.bias")}
        return {
            "norm1": {"scale": g(p + "layernorm_before.weight"), "bias": g(p + "layernorm_before.bias")},
            "norm2": {"scale": g(p + "layernorm_after.weight"), "bias": g(p + "layernorm_after.bias")},
            "attn": attn,
            "mlp": {"fc1": {"kernel": g(p + "mlp.fc1.weight").T, "bias": g(p + "mlp.fc1.bias")},
                    "fc2": {"kernel": g(p + "mlp.fc2.weight").T, "bias": g(p + "mlp.fc2.bias")}},
        }

    params["encoder"] = {"blocks": _stack([layer(i) for i in range(cfg.depth)]),
                         "norm": {"scale": g("layernorm.weight"), "bias": g("layernorm.bias")}}
    if cfg.representation_size:
        params["pre_logits"] = {"kernel": g("pooler.dense.weight").T, "bias": g("pooler.dense.bias")}
    if cfg.num_classes and "classifier.weight" in sd:  # absent in a bare ViTModel
        params["head"] = {"kernel": g("classifier.weight").T, "bias": g("classifier.bias")}
    return params


def _stack(trees: list[dict]) -> dict:
    """Stacks per-layer dicts on a new leading axis (our `layers` axis)."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _stack([t[key] for t in trees]) for key in first}
    return np.stack(trees)
