"""Mesh from config, logical-axis rules -> shardings of any state tree, global batches.

Parameters name logical axes (models/layers.py); `config.sharding_rules` maps them to the mesh
axes `data`, `fsdp`, `tensor`. Shardings of parameters, optimizer state and extra objective
state all come from one pass over an `eval_shape`d state tree, never written per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def _mesh_shape(key: str, sizes: Mapping[str, int], fill_to: int | None) -> tuple[int, ...]:
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"{key} has unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}.")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    auto = [a for a, s in zip(MESH_AXES, shape) if s == -1]
    bad = [f"{key}.{a}={s}" for a, s in zip(MESH_AXES, shape) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: mesh sizes must be positive, or -1 for 'the rest'.")
    if auto and fill_to is None:
        raise ValueError(f"{key}: sizes must be given (no -1; got {auto}): only `mesh` fills an "
                         "axis from the device count.")
    if len(auto) > 1:
        raise ValueError(f"{key}: at most one axis may be -1 (got {auto}).")
    known = math.prod(s for s in shape if s != -1)
    if auto:
        if fill_to % known:
            raise ValueError(f"{key}={dict(sizes)}: {fill_to} devices do not divide by the fixed "
                             f"axes' product {known}.")
        shape[MESH_AXES.index(auto[0])] = fill_to // known
    return tuple(shape)


def device_grid(ici: Mapping[str, int], dcn: Mapping[str, int] | None,
                devices: Sequence) -> np.ndarray:
    """Devices arranged as the (data, fsdp, tensor) mesh; `ici` within a slice, `dcn` across.

    One `ici` size may be -1 (filled from the device count). With a DCN part, each mesh axis is
    `dcn x ici` long and consecutive blocks of `ici` devices along it share a TPU slice or,
    elsewhere (multi-node GPU, multi-process CPU), a process: only the DCN axes cross the
    slow network.
    """
    dcn_shape = _mesh_shape("mesh_dcn", dcn or {}, None)
    n_dcn = math.prod(dcn_shape)
    if len(devices) % n_dcn:
        raise ValueError(f"mesh_dcn={dict(dcn)} asks for {n_dcn} slices but there are "
                         f"{len(devices)} devices.")
    ici_shape = _mesh_shape("mesh", ici, len(devices) // n_dcn)
    total = math.prod(ici_shape) * n_dcn
    if total != len(devices):
        raise ValueError(f"mesh={dict(ici)} x mesh_dcn={dict(dcn or {})} covers {total} devices, "
                         f"but there are {len(devices)}. Set one mesh axis to -1 to fill.")
    if n_dcn == 1:
        return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    by_slice = hasattr(devices[0], "slice_index")
    granules = {getattr(d, "slice_index" if by_slice else "process_index") for d in devices}
    if len(granules) != n_dcn:
        raise ValueError(f"mesh_dcn={dict(dcn)} asks for {n_dcn} slices, but the devices form "
                         f"{len(granules)} {'slices' if by_slice else 'processes'}.")
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=not by_slice)


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh with Auto axis types; see `device_grid`."""
    grid = device_grid(ici, dcn, list(devices if devices is not None else jax.devices()))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_dict(rules: Sequence[tuple[str, object]]) -> dict:
    """Validates the rule table and returns it as {logical: mesh axes}."""
    out = {}
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"sharding_rules entry {entry!r}: expected (logical_name, mesh_axes).")
        name, axes = entry
        for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding_rules maps {name!r} to unknown mesh axis {axis!r}; "
                                 f"mesh axes are {list(MESH_AXES)}.")
        out[name] = tuple(axes) if isinstance(axes, list) else axes
    return out


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def tree_shardings(abstract_tree, mesh: Mesh, rules: Sequence[tuple[str, object]]):
    """NamedShardings for every array in `abstract_tree` (e.g. an `eval_shape`d train state).

    Variables with logical axis metadata follow the rules; other arrays (step counters, RNG
    keys, optimizer scalars) are replicated. A dimension that does not divide by its mesh axes
    is an error naming the array, rather than a silent replication.
    """
    rules = tuple(rules_dict(rules).items())

    def spec(x):
        # A Variable holding no array (optax.MaskedNode: the state of a frozen parameter) keeps
        # its empty structure, so the result has exactly the leaves of `abstract_tree`.
        return nnx.get_partition_spec(x) if jax.tree.leaves(x) else x

    with nnx.logical_axis_rules(rules):
        specs = jax.tree.map(spec, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    flat_specs = jax.tree_util.tree_flatten_with_path(specs)[0]
    flat_shapes = jax.tree.leaves(abstract_tree)
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        for dim, axes in zip(leaf.shape, spec):
            size = _axis_size(mesh, axes)
            if dim % size:
                raise ValueError(
                    f"Cannot shard {path_name(path)} of shape {tuple(leaf.shape)} with "
                    f"{spec}: dimension {dim} does not divide by mesh axes {axes} of size {size}. "
                    "Change the mesh or config.sharding_rules.")
    return jax.tree.map(lambda s: NamedSharding(mesh, s if isinstance(s, PartitionSpec)
                                                else PartitionSpec()), specs)


def path_name(path) -> str:
    """'encoder/blocks/attn/value/kernel' from a jax key path.

    An NNX Variable adds a trailing attribute key `.value` for its array; that one is dropped,
    while a module or dict entry that happens to be called `value` is kept.
    """
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def batch_axes(rules: Sequence[tuple[str, object]]):
    """Mesh axes of the leading (batch) dimension, from the `batch` rule."""
    return rules_dict(rules).get("batch")


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, object]]) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def num_batch_shards(mesh: Mesh, rules: Sequence[tuple[str, object]]) -> int:
    return _axis_size(mesh, batch_axes(rules))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Process-local numpy batch -> global jax.Arrays, batch dimension sharded over the mesh."""
    return {key: jax.make_array_from_process_local_data(sharding, numeric_field(key, value))
            for key, value in local.items()}


def numeric_field(name: str, value, where: str = "The batch") -> np.ndarray:
    """`value` as a numeric array; text (str/bytes/object) cannot go onto devices."""
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind in "US":
        raise TypeError(f"{where} field {name!r} holds {value.dtype} values; tokenize text or drop "
                        "it with keep(...) in the pp string before batching.")
    return value
