"""Orbax checkpoints of everything a run needs to continue bit-for-bit.

Each step directory under `<workdir>/checkpoints/` holds three items: `state` (params, optimizer
state, extra objective state, step, RNG), `data` (the grain iterator's position, one file per
process) and `config` (JSON, for the record). Saving is asynchronous and keeps the last N; Orbax
writes into a temporary directory and renames it when complete, so an interrupted save never
replaces a good checkpoint, and a restart deletes what a killed save left behind. Restoring
takes the target shardings of the current mesh, so a checkpoint moves to a different mesh shape.
The iterator positions are per process; `data_process_count` tells whether they fit this run.
"""

from __future__ import annotations

import json
import os
import re

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """PyTree handler for the train state.

    Replica-parallel saving spreads the writing of replicated arrays across hosts; in a single
    process every replica is local, and it would only compile a slicing program per array
    shape (~0.3 s each on a CPU), so it is on for multi-process runs only.
    """
    th = ocp.type_handlers
    types = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
        (jax.Array, th.ArrayHandler(use_replica_parallel=jax.process_count() > 1)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=types)


def _leaf_shapes(tree) -> dict[str, tuple | None]:
    """'params/encoder/kernel'-style path -> shape of every leaf (dict keys, attribute names
    and indices joined by '/'), for saved metadata and abstract states alike. Unlike
    `sharding.path_name` it keeps an NNX Variable's trailing `value` attribute, which the saved
    metadata holds as a dict key: dropping one and not the other would match no path."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        shapes["/".join(name(key) for key in path)] = None if shape is None else tuple(shape)
    return shapes


class Checkpointer:
    """A CheckpointManager over `<workdir>/checkpoints` with the items above."""

    def __init__(self, workdir: str, *, keep: int, asynchronous: bool, create: bool = True):
        """`create=False` (evaluation) never makes directories; a missing one has no steps.

        A writer (`create=True`) removes the temporary directories of saves that were killed
        before they completed; a reader leaves them, as a running trainer may be writing one.
        """
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=create,
            cleanup_tmp_directories=create)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = _state_handler()
        registry.add("state", ocp.args.PyTreeSave, state_handler)
        registry.add("state", ocp.args.PyTreeRestore, state_handler)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=registry)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def data_process_count(self, step: int) -> int | None:
        """How many processes saved their data iterator position at `step` (None: none did)."""
        directory = os.path.join(self.directory, str(step), "data")
        names = os.listdir(directory) if os.path.isdir(directory) else []
        counts = {int(m.group(2)) for m in map(_DATA_FILE.fullmatch, names) if m}
        if len(counts) > 1:
            raise ValueError(f"{directory} holds iterator positions of {sorted(counts)} processes; "
                             "expected one process count.")
        return counts.pop() if counts else None

    def saved_config(self, step: int) -> dict | None:
        """The config saved with `step` (a JSON dict), or None if it has none."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "config")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def save(self, step: int, state: dict, data_iterator=None, config=None) -> None:
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: dict, *, partial: bool = False) -> dict:
        """Restores `state` into `abstract_state`'s shapes and shardings.

        `partial=True` reads only the top-level entries `abstract_state` names (evaluation
        needs no optimizer state).
        """
        refusal = (f"Checkpoint {self.directory}/{step} does not fit this config's model or "
                   "optimizer (was the config changed?): ")
        # Compared before reading: a restore Orbax refuses midway leaves reads pending.
        difference = self._difference(step, abstract_state, partial=partial)
        if difference:
            raise ValueError(refusal + difference)
        state_args = ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            partial_restore=partial)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(state=state_args))["state"]
        except (ValueError, KeyError) as e:
            raise ValueError(refusal + str(e)) from e

    def _difference(self, step: int, abstract_state: dict, *, partial: bool) -> str | None:
        """The arrays `step`'s saved state lacks, has in excess or has in other shapes than
        `abstract_state` (the first few, and how many), from its metadata; None if none differ
        or the metadata cannot be read (Orbax's restore then decides)."""
        try:
            saved = _leaf_shapes(self.manager.item_metadata(step)["state"].tree)
        except Exception:  # pylint: disable=broad-except
            return None
        wanted = _leaf_shapes(abstract_state)
        if partial:
            names = {path.split("/")[0] for path in wanted}
            saved = {path: shape for path, shape in saved.items() if path.split("/")[0] in names}
        differences = [f"{path} is {saved[path]} in the checkpoint, {wanted[path]} in this config"
                       for path in sorted(saved.keys() & wanted.keys(),
                                          key=lambda path: (not path.startswith("params/"), path))
                       if None not in (saved[path], wanted[path]) and saved[path] != wanted[path]]
        differences += [f"{path} is not in the checkpoint"
                        for path in sorted(wanted.keys() - saved.keys())]
        differences += [f"{path} is not in this config"
                        for path in sorted(saved.keys() - wanted.keys())]
        if not differences:
            return None
        more = f" ({len(differences)} differences)" if len(differences) > 3 else ""
        return "; ".join(differences[:3]) + more

    def restore_data(self, step: int, data_iterator) -> None:
        """Sets `data_iterator` to this process's saved position at `step`."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(
                data=grain_ckpt.CheckpointRestore(data_iterator)))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(
                f"The data iterator position in {self.directory}/{step} does not fit this run "
                f"({jax.process_count()} processes; input.* unchanged?): {e}") from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
