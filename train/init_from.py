"""Initialise a fresh run's parameters from a checkpoint (`config.init_from`).

The source is a vistax run (a workdir, its checkpoints/ folder or one step folder) or another
codebase's weight file (`.safetensors`, or a torch `.bin`/`.pt`/`.pth` loaded with
`weights_only=True`, never unpickling arbitrary objects), converted by the objective's
`import_weights` (e.g. Hugging Face ViT for classification). Parameters are chosen by regex on
their names (`include`, `exclude`), may be looked up under another name (`rename`:
((regex, replacement), ...) applied to our names), and learned patch position embeddings are
resampled when the patch grid differs (fine-tuning at a new image size, ViT paper Sec. 3.2).
Everything else keeps its fresh initialisation. Every process reads the source as numpy.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from vistax.models.layers import resample_posemb
from vistax.train import param_groups


def _step_dir(path: str, step: int | None) -> str:
    """`path` is a workdir, its checkpoints/ folder, or one step folder."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "state")):
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) \
        else path
    steps = sorted(int(d) for d in (os.listdir(root) if os.path.isdir(root) else []) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"init_from.path={path!r} holds no vistax checkpoint.")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"init_from.step={step} is not in {root}; it has steps {steps}.")
    return os.path.join(root, str(step))


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of saved Variables ({'value': array}) -> {'a/b/kernel': array}."""
    if isinstance(tree, dict) and set(tree) == {"value"} and not isinstance(tree["value"], dict):
        return {prefix: tree["value"]}
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A foreign weight file as {name: float32 numpy array}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from.path={path!r}: no such weight file.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    try:
        import torch
    except ImportError:
        raise ImportError(f"init_from.path={path!r} is a torch file; install torch (the `torch` "
                          "extra) or convert it to .safetensors.") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "float")}


def read_params(path: str, step: int | None = None, importer=None, tree: str = "params"
                ) -> dict[str, np.ndarray]:
    """All parameters of a checkpoint as {name: numpy array}.

    `importer(state_dict) -> nested params` converts a foreign weight file (see module doc).
    `tree` is the part of a vistax checkpoint's state read as parameters: "params", or e.g.
    "extra/teacher" (DINO's EMA teacher, the network its paper evaluates).
    """
    if path.endswith(WEIGHT_FILES):
        if importer is None:
            raise ValueError(f"init_from.path={path!r} is a foreign weight file, which this "
                             "objective cannot import.")
        return _flatten(importer(read_state_dict(path)))
    state_dir = os.path.join(_step_dir(path, step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(state_dir).item_metadata
    keys = tree.split("/")
    for depth, key in enumerate(keys):
        if not hasattr(meta, "keys") or key not in meta.keys():
            have = sorted(meta.keys()) if hasattr(meta, "keys") else []
            raise ValueError(f"init_from.tree={tree!r}: the checkpoint in {state_dir} has no "
                             f"{'/'.join(keys[:depth + 1])!r}; it has {have} there.")
        meta = meta[key]
    item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    for key in reversed(keys):
        item, args = {key: item}, {key: args}
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
    for key in keys:
        restored = restored[key]
    return _flatten(restored)


def _source_name(name: str, rename) -> str:
    for regex, replacement in rename:
        name = regex.sub(replacement, name)
    return name


def apply(cfg, params, importer=None):
    """Returns `params` (sharded jax arrays) with the selected leaves replaced from `cfg.path`.

    Also returns a summary (names loaded, names kept fresh) for the log.
    """
    source = read_params(cfg.path, cfg.get("step"), importer, cfg.get("tree") or "params")
    rename = []
    for pair in cfg.get("rename", ()):
        if len(pair) != 2:
            raise ValueError(f"init_from.rename entry {pair!r}: expected (regex, replacement).")
        rename.append((param_groups.compile_regex("init_from.rename", pair[0]), pair[1]))
    include = param_groups.compile_regex("init_from.include", cfg.get("include") or ".*")
    exclude = (param_groups.compile_regex("init_from.exclude", cfg.exclude)
               if cfg.get("exclude") else None)
    names = param_groups.names(params)
    leaves, treedef = jax.tree.flatten(params)
    loaded, fresh, missing = [], [], []
    new_leaves = []
    for name, leaf in zip(names, leaves):
        if not include.fullmatch(name) or (exclude and exclude.fullmatch(name)):
            fresh.append(name)
            new_leaves.append(leaf)
            continue
        src = _source_name(name, rename)
        if src not in source:
            missing.append(f"{name} (looked up as {src})")
            new_leaves.append(leaf)
            continue
        value = source[src]
        if value.shape != leaf.shape:
            value = _adapt(name, value, leaf.shape)
        new_leaves.append(jax.device_put(value.astype(leaf.dtype), leaf.sharding))
        loaded.append(name)
    if missing:
        raise ValueError(f"init_from.path={cfg.path!r} lacks {len(missing)} selected parameter(s): "
                         f"{missing[:5]}; it has e.g. {sorted(source)[:5]}. Narrow "
                         "init_from.include/exclude or add init_from.rename rules.")
    if not loaded:
        raise ValueError(f"init_from.include={cfg.get('include')!r} selects no parameter.")
    return jax.tree.unflatten(treedef, new_leaves), {"loaded": loaded, "fresh": fresh}


def _adapt(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resamples a patch position embedding to a new grid; any other mismatch is an error."""
    if name.split("/")[-1] == "pos_embedding" and value.ndim == 3 and value.shape[2] == shape[2]:
        side = int(round(np.sqrt(shape[1])))
        if side * side == shape[1]:
            return np.asarray(resample_posemb(value, (side, side)))
    raise ValueError(f"init_from: {name} has shape {value.shape} in the checkpoint but "
                     f"{tuple(shape)} here; exclude it (init_from.exclude) to train it afresh.")
