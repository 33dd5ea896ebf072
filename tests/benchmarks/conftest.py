"""Fixtures of the PyTorch reference tests."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """These tests time nothing; one thread avoids OpenMP's barrier waits when other work holds
    the cores (each small op can then cost a scheduler time slice)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def count_params():
    """count_params(objective) -> parameters of its model, counted on shapes only."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    def count(objective) -> int:
        model = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    return count
