"""Orbax checkpoints of everything a run needs to continue bit-for-bit.

Each step directory under `<workdir>/checkpoints/` holds three items: `state` (params, optimizer
state, extra objective state, step, RNG), `data` (the grain iterator's position, one file per
process) and `config` (JSON, for the record). Saving is asynchronous and keeps the last N; Orbax
writes into a temporary directory and renames it when complete, so an interrupted save never
replaces a good checkpoint. Restoring takes the target shardings of the current mesh, so a
checkpoint moves to a different mesh shape.
"""

from __future__ import annotations

import json
import os

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp


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


class Checkpointer:
    """A CheckpointManager over `<workdir>/checkpoints` with the items above."""

    def __init__(self, workdir: str, *, keep: int, asynchronous: bool, create: bool = True):
        """`create=False` (evaluation) never makes directories; a missing one has no steps."""
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=create)
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

    def save(self, step: int, state: dict, data_iterator=None, config=None) -> None:
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: dict, data_iterator=None, *,
                partial: bool = False) -> dict:
        """Restores `state` into `abstract_state`'s shapes and shardings (and the iterator).

        `partial=True` reads only the top-level entries `abstract_state` names (evaluation
        needs no optimizer state).
        """
        state_args = ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            partial_restore=partial)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(state=state_args))["state"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"Checkpoint {self.directory}/{step} does not fit this config's model "
                             f"or optimizer (was the config changed?): {e}") from e
        if data_iterator is not None:
            try:
                self.manager.restore(step, args=ocp.args.Composite(
                    data=grain_ckpt.CheckpointRestore(data_iterator)))
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise ValueError(
                    f"The data iterator position in {self.directory}/{step} does not fit this run "
                    f"({jax.process_count()} processes; input.* unchanged?): {e}") from e
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
