"""Shared by the trainer tests: the losses of a few train steps on given batches."""

import jax
import numpy as np
import pytest

from vistax.train.experiment import Experiment


def _step_losses(config, devices, batches) -> np.ndarray:
    """Builds `config` on `devices`, then one train step per host batch; the losses."""
    exp = Experiment(config, devices=devices)
    state = exp.init_state()
    losses = []
    for batch in batches:
        state, metrics = exp.train_step(state, exp.global_batch(batch))
        losses.append(float(jax.device_get(metrics["loss"])))
    return np.array(losses)


@pytest.fixture(scope="session")
def step_losses():
    return _step_losses
