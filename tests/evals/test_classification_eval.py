"""The classification evaluator counts every example once: its accuracy equals predicting the
whole split in one go, with a batch size that does not divide the split (padding masked)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vistax.data import pipeline
from vistax.train.experiment import Experiment


def test_accuracy_equals_a_direct_computation(small_vit_config):
    config = small_vit_config(**{"model.head_zero_init": False, "evals.test.batch_size": 48})
    exp = Experiment(config)
    state = exp.init_state(seed=3)
    result = exp.evaluators["test"].run(state)

    cfg = config.evals.test
    split = list(pipeline.eval_iterator(dataset=cfg.dataset, split=cfg.split, pp=cfg.pp,
                                        global_batch_size=360, data_dir=config.input.data_dir,
                                        process_index=0, process_count=1))[0]
    keep = split["_mask"]
    images, labels = split["image"][keep], split["label"][keep]
    assert len(labels) == 359 == result["num_examples"]
    logits = np.asarray(jax.device_get(exp.model(state)(jnp.asarray(images))[0]))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert result["accuracy"] == np.mean(logits.argmax(-1) == labels)
    assert result["top5_accuracy"] == np.mean((top5 == labels[:, None]).any(-1))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(result["loss"], nll, rtol=1e-5)
    assert 0.0 < result["accuracy"] < 1.0  # a random model: neither degenerate
