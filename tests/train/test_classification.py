"""Mixup / CutMix: the mixed images and targets are the stated convex combinations."""

import jax
import jax.numpy as jnp
import numpy as np

from vistax.train.objectives.classification import mix_batch

IMAGES = jax.random.normal(jax.random.PRNGKey(0), (6, 16, 16, 3))
TARGETS = jax.nn.one_hot(jnp.arange(6) % 4, 4)


def _mix(seed, **kw):
    args = dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, mix_prob=1.0)
    args.update(kw)
    return mix_batch(IMAGES, TARGETS, jax.random.PRNGKey(seed), **args)


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
    for seed in range(5):
        images, targets = _mix(seed, mixup_alpha=0.8)
        lam = float(targets[0, 0])  # sample 0 is class 0, its partner (sample 5) class 1
        assert 0.0 < lam < 1.0
        np.testing.assert_allclose(images, lam * IMAGES + (1 - lam) * IMAGES[::-1], atol=1e-6)
        np.testing.assert_allclose(targets, lam * TARGETS + (1 - lam) * TARGETS[::-1], atol=1e-6)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_whose_area_sets_the_target_weight():
    for seed in range(8):
        images, targets = _mix(seed, cutmix_alpha=1.0)
        pasted = np.asarray(images != IMAGES)[0].any(-1)  # pixels taken from the partner
        lam = float(targets[0, 0])
        np.testing.assert_allclose(1.0 - pasted.mean(), lam, atol=1e-6)
        rows, cols = np.nonzero(pasted)
        if len(rows):  # the pasted region is one axis-aligned rectangle
            assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        np.testing.assert_allclose(targets, lam * TARGETS + (1 - lam) * TARGETS[::-1], atol=1e-6)


def test_switching_uses_both_and_mix_prob_zero_is_identity():
    kinds = set()
    for seed in range(20):
        images, _ = _mix(seed, mixup_alpha=0.8, cutmix_alpha=1.0)
        changed = np.asarray(images != IMAGES).any(-1)[0]
        kinds.add("cutmix" if 0 < changed.mean() < 1 and not changed.all() else "mixup")
    assert kinds == {"mixup", "cutmix"}
    images, targets = _mix(0, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)
    np.testing.assert_array_equal(images, IMAGES)
    np.testing.assert_array_equal(targets, TARGETS)
