"""DINO's objective: the loss against a loop over crop pairs (2 x crops - 2 terms), Sinkhorn and
KoLeo against their reference algorithms, schedules at their endpoints, the center and EMA
updates in the right order through the trainer, sharded runs equal one device, the frozen last
layer, and the multi-crop / block-mask pp ops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vistax.configs import dino as dino_configs
from vistax.data import preprocess
from vistax.data.multicrop import block_mask
from vistax.models import dino as dino_models
from vistax.models import vit
from vistax.train.experiment import Experiment
from vistax.train.objectives import dino

RNG = np.random.default_rng(0)


# -- the loss's pieces -------------------------------------------------------------------------

def reference_dino_loss(teacher_probs, student_logits, temp):
    """DINO's loss as the reference writes it: loops over teacher crops iq and student crops v,
    skipping v == iq, the batch mean of each term, divided by the number of terms."""
    total, terms = 0.0, 0
    logp = jax.nn.log_softmax(jnp.asarray(student_logits) / temp, axis=-1)
    for iq in range(teacher_probs.shape[1]):
        for v in range(student_logits.shape[1]):
            if v == iq:
                continue
            total += float(jnp.mean(jnp.sum(-teacher_probs[:, iq] * logp[:, v], axis=-1)))
            terms += 1
    return total / terms, terms


@pytest.mark.parametrize("num_local", [0, 1, 6])
def test_loss_averages_the_2_x_crops_minus_2_pairs(num_local):
    b, k = 5, 7
    teacher = jax.nn.softmax(jnp.asarray(RNG.standard_normal((b, 2, k)), jnp.float32), -1)
    student = jnp.asarray(RNG.standard_normal((b, 2 + num_local, k)), jnp.float32)
    expected, terms = reference_dino_loss(teacher, student, 0.1)
    assert terms == 2 * (2 + num_local) - 2
    got = float(dino.cross_entropy_pairs(teacher, student, 0.1))
    assert got == pytest.approx(expected, rel=1e-5)


def test_kl_is_loss_minus_teacher_entropy_and_zero_when_student_matches():
    """With the student equal to the teacher on every crop, each term is the teacher's entropy."""
    logits = jnp.asarray(RNG.standard_normal((4, 1, 9)), jnp.float32)
    probs = jax.nn.softmax(logits / 0.1, -1)
    teacher = jnp.concatenate([probs, probs], 1)
    student = jnp.concatenate([logits] * 5, 1)
    loss = float(dino.cross_entropy_pairs(teacher, student, 0.1))
    assert loss == pytest.approx(float(dino.entropy(teacher)), rel=1e-5)
    uniform = jnp.full((3, 9), 1 / 9)
    assert float(dino.entropy(uniform)) == pytest.approx(math.log(9), rel=1e-6)
    assert float(dino.entropy(jax.nn.one_hot(jnp.arange(3), 9))) == 0.0


def reference_sinkhorn(logits, temp, iterations):
    """DINOv2's sinkhorn_knopp_teacher in numpy (K x B orientation, one process)."""
    q = np.exp(logits / temp).T
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_matches_the_reference_and_balances_prototypes():
    logits = np.random.default_rng(3).standard_normal((12, 6)) * 0.3
    ours = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.05, 3))
    np.testing.assert_allclose(ours, reference_sinkhorn(logits, 0.05, 3), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(ours.sum(1), 1.0, rtol=1e-5)
    many = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.05, 200))
    np.testing.assert_allclose(many.sum(0), 12 / 6, rtol=1e-5)  # equal use of prototypes
    # Huge logits: the global shift keeps it finite; zero-weight rows are left out exactly.
    big = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits * 1e3, jnp.float32), 0.05, 3))
    assert np.isfinite(big).all()
    weights = jnp.asarray([1.0] * 8 + [0.0] * 4)
    part = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.05, 3, weights))
    np.testing.assert_allclose(part[:8], reference_sinkhorn(logits[:8], 0.05, 3), rtol=2e-4,
                               atol=1e-6)
    assert (part[8:] == 0).all()


def test_koleo_matches_its_formula_and_is_finite_with_duplicates():
    x = RNG.standard_normal((10, 4)).astype(np.float32)
    normed = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.linalg.norm(normed[:, None] - normed[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    expected = -np.mean(np.log(dist.min(1)))
    assert float(dino.koleo(jnp.asarray(x))) == pytest.approx(expected, rel=1e-4)
    dup = jnp.asarray(np.concatenate([x[:3], x[:3]]))
    value, grad = jax.value_and_grad(dino.koleo)(dup)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    assert float(value) > expected  # duplicates have distance ~eps: a large penalty


def test_schedules_reach_their_endpoints():
    total = 1000
    assert float(dino.cosine_momentum(0, total, 0.996, 1.0)) == pytest.approx(0.996)
    assert float(dino.cosine_momentum(total, total, 0.996, 1.0)) == pytest.approx(1.0)
    assert float(dino.cosine_momentum(total // 2, total, 0.996, 1.0)) == pytest.approx(0.998)
    assert float(dino.teacher_temperature(0, 300, 0.04, 0.07)) == pytest.approx(0.04)
    assert float(dino.teacher_temperature(150, 300, 0.04, 0.07)) == pytest.approx(0.055)
    assert float(dino.teacher_temperature(300, 300, 0.04, 0.07)) == pytest.approx(0.07)
    assert float(dino.teacher_temperature(5000, 300, 0.04, 0.07)) == pytest.approx(0.07)
    assert float(dino.teacher_temperature(0, 0, 0.04, 0.07)) == pytest.approx(0.07)


def test_masked_first_takes_masked_patches_in_raster_order():
    mask = jnp.asarray([[False, True, False, True, True], [False] * 5])
    index, weight = dino.masked_first(mask, 3)
    np.testing.assert_array_equal(index[0], [1, 3, 4])
    np.testing.assert_array_equal(weight, [[1, 1, 1], [0, 0, 0]])


# -- through the trainer -----------------------------------------------------------------------

def small_config(data_dir, v2=False, **overrides):
    c = dino_configs.get_config(f"tiny,v2={v2}")
    c.input.data_dir = data_dir
    c.input.batch_size = 16
    c.model.update(width=32, depth=2, mlp_dim=64, num_heads=4, scan=True)
    c.dino.head.update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    c.dino.ibot_head.update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    c.peak_flops_per_device = 1e11
    c.duration = "4 steps"
    c.schedule.update(warmup="1 steps", base_lr=1e-3)
    c.param_groups.hold = ((r"head/last_layer/.*", "2 steps"),)
    c.dino.warmup_teacher_temp_epochs = "2 steps"
    c.dino.teacher_temp = 0.07
    c.evals = {}
    c.update_from_flattened_dict(overrides)
    return c


def crops_batch(rng, b=16, num_local=4, masks=False):
    batch = {"global_crops": rng.uniform(-1, 1, (b, 2, 32, 32, 3)).astype(np.float32),
             "local_crops": rng.uniform(-1, 1, (b, num_local, 16, 16, 3)).astype(np.float32)}
    if masks:
        batch["global_masks"] = rng.uniform(size=(b, 2, 16)) < 0.3
    return batch


BATCHES = [crops_batch(np.random.default_rng(i)) for i in range(3)]
V2_BATCHES = [crops_batch(np.random.default_rng(i), masks=True) for i in range(3)]


def test_center_and_teacher_update_after_the_step_in_order(data_dir):
    """Step 1's teacher targets use the initial center (0) at the warmup temperature; after it
    the center is 0.9 x 0 + 0.1 x the mean teacher output of that step, and the teacher is
    m x initial + (1 - m) x the updated student; the last layer is held for 2 steps."""
    exp = Experiment(small_config(data_dir), devices=jax.devices()[:1])
    state = exp.init_state()
    initial = jax.device_get(state["params"])
    teacher_model = exp.objective.teacher(exp.model(state), state["extra"])
    crops = jnp.asarray(BATCHES[0]["global_crops"]).reshape((-1, 32, 32, 3))
    t_logits = np.asarray(teacher_model(crops)["logits"])
    expected_entropy = float(dino.entropy(jax.nn.softmax(jnp.asarray(t_logits) / 0.04, -1)))
    state, metrics = exp.train_step(state, exp.global_batch(BATCHES[0]))
    assert float(metrics["teacher_temp"]) == pytest.approx(0.04)
    assert float(metrics["teacher_entropy"]) == pytest.approx(expected_entropy, rel=1e-4)
    np.testing.assert_allclose(np.asarray(state["extra"]["center"]), 0.1 * t_logits.mean(0),
                               rtol=1e-4, atol=1e-7)
    m = float(dino.cosine_momentum(0, 4, 0.996, 1.0))
    student = jax.device_get(state["params"])
    teacher = jax.device_get(state["extra"]["teacher"])
    for (path, t), s, i in zip(jax.tree_util.tree_flatten_with_path(teacher)[0],
                               jax.tree.leaves(student), jax.tree.leaves(initial)):
        np.testing.assert_allclose(t, m * i + (1 - m) * s, rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    last = lambda p: np.asarray(p["head"]["last_layer"]["kernel"])  # noqa: E731
    assert np.array_equal(last(student), last(initial))  # held in step 1 (and 2)
    state, _ = exp.train_step(state, exp.global_batch(BATCHES[1]))
    assert np.array_equal(last(jax.device_get(state["params"])), last(initial))
    state, metrics = exp.train_step(state, exp.global_batch(BATCHES[2]))
    assert not np.array_equal(last(jax.device_get(state["params"])), last(initial))
    assert float(metrics["teacher_temp"]) == pytest.approx(0.07)


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["dino", "dinov2"])
def test_sharded_dino_matches_one_device(data_dir, step_losses, v2):
    """Centering (and Sinkhorn, KoLeo, iBOT) reduce over the global batch: 8 devices (and a
    data x fsdp x tensor mesh, with ViT-g/14's SwiGLU feed-forward) give the losses of one
    device."""
    batches = V2_BATCHES if v2 else BATCHES
    model = {"model.activation": "swiglu"} if v2 else {}
    single = step_losses(small_config(data_dir, v2, **{"mesh.data": 1}, **model),
                         jax.devices()[:1], batches)
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2} if v2 else {}
    sharded = step_losses(small_config(data_dir, v2, **mesh, **model), jax.devices(), batches)
    assert np.isfinite(single).all()
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


@pytest.mark.parametrize("v2", [False, True], ids=["dino", "dinov2"])
def test_analytic_flops_match_xla_cost_analysis_of_the_step(data_dir, v2):
    """The tiny preset's lowered train step (unrolled blocks: XLA's cost analysis counts a loop
    body once) against the analytic 3 x student forward (2 x 32 px + 4 x 16 px crops, DINO head,
    iBOT patch head on 8 slots per global crop) + 1 x teacher forward, x batch. XLA also counts
    elementwise work (norms, GELU, softmax over the prototypes, AdamW, the EMA): a few percent."""
    c = dino_configs.get_config(f"tiny,v2={v2}")
    c.input.data_dir = data_dir
    c.peak_flops_per_device = 1e11
    c.evals = {}
    exp = Experiment(c, devices=jax.devices()[:1])
    batch = crops_batch(np.random.default_rng(0), b=c.input.batch_size, masks=v2)
    with exp.context():
        lowered = exp._step.lower(exp.abstract_state, exp.global_batch(batch))
    cost = lowered.cost_analysis()  # of the HLO as lowered: the same dots, no compile needed
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    analytic = exp.flops_per_step
    assert analytic == pytest.approx(3 * exp.objective.flops_per_example() * 64)
    print("analytic / XLA", analytic / xla_flops)
    assert xla_flops * 0.85 <= analytic <= xla_flops * 1.001, (analytic, xla_flops)


def test_flops_read_the_crops_from_the_pp_string():
    c = dino_configs.get_config("B/16")
    assert dino.multicrop_views(c.input.pp) == ((224, 224), (96, 96), 8)
    objective = dino.DINO(c)
    full = objective.flops_per_example()
    c.input.pp = c.input.pp.replace("dino_multicrop(224, 96, 8,", "dino_multicrop(224, 96, 2,")
    fewer = dino.DINO(c).flops_per_example()
    # 6 local crops fewer: 6 x 3 x (backbone on 36 patches + cls, DINO head), divided by 3.
    local = (vit.flops_per_example(dino_models.dino_backbone(c.model.to_dict()), (6, 6))
             + dino.head_flops(objective.settings.head, 768))
    assert full - fewer == pytest.approx(6 * local)
    c.input.pp = "decode|dino_multicrop|keep('global_crops', 'local_crops')"
    assert dino.multicrop_views(c.input.pp) == ((224, 224), (96, 96), 8)  # the op's defaults
    c.input.pp = "decode|resize(224)|keep('image')"
    assert dino.DINO(c).flops_per_example() is None


def test_config_errors_name_the_key(data_dir):
    with pytest.raises(ValueError, match=r"dino.teacher='mean' is not one of"):
        Experiment(small_config(data_dir, **{"dino.teacher": "mean"}), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"dino.head.out_dim=0 must be a positive int"):
        Experiment(small_config(data_dir, **{"dino.head.out_dim": 0}), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"pool='cls'"):
        Experiment(small_config(data_dir, **{"model.pool": "gap"}), devices=jax.devices()[:1])
    plain = small_config(data_dir, True, **{"input.pp": "decode|value_range(-1, 1)|keep('image')"})
    with pytest.raises(ValueError, match=r"reads batch keys \['global_crops', 'global_masks'\]"):
        Experiment(plain, devices=jax.devices()[:1])


# -- views and masks ---------------------------------------------------------------------------

def test_multicrop_gives_two_global_and_n_local_views():
    spec = ("dino_multicrop(32, 16, 5)|value_range(-1, 1, key='global_crops')"
            "|value_range(-1, 1, key='local_crops')|ibot_masks(4, probability=1.0)")
    op = preprocess.parse(spec)
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    out = op({"image": image, "label": 3}, np.random.default_rng(1))
    assert set(out) == {"global_crops", "local_crops", "global_masks", "label"}
    assert out["global_crops"].shape == (2, 32, 32, 3)
    assert out["local_crops"].shape == (5, 16, 16, 3)
    assert out["global_crops"].min() >= -1 and out["global_crops"].max() <= 1
    assert out["global_masks"].shape == (2, 16) and out["global_masks"].dtype == bool
    assert (out["global_masks"].sum(1) >= 1).all()  # ratio >= 0.1 of 16 patches: >= 1
    again = op({"image": image, "label": 3}, np.random.default_rng(1))
    np.testing.assert_array_equal(again["local_crops"], out["local_crops"])
    assert not np.array_equal(out["local_crops"][0], out["local_crops"][1])


def test_multicrop_views_are_its_augmentation_specs_applied_one_by_one():
    """dino_multicrop runs each view as one chain of PIL steps; it gives the same views as the
    registered pp ops applied one at a time (a numpy round trip each), drawing from one
    generator in view order: global 1, global 2, then the local crops."""
    photometric = "|flip_lr(0.5)|color_jitter|grayscale(0.2)"
    global_crop = "random_resized_crop(24, scale=(0.4, 1.0), method='bicubic')"
    local_crop = "random_resized_crop(12, scale=(0.05, 0.4), method='bicubic')"
    views = [preprocess.parse(global_crop + photometric + "|gaussian_blur(1.0)"),
             preprocess.parse(global_crop + photometric + "|gaussian_blur(0.1)|solarize(0.2)")]
    views += [preprocess.parse(local_crop + photometric + "|gaussian_blur(0.5)")] * 3
    op = preprocess.parse("dino_multicrop(24, 12, 3)")
    for seed in range(12):
        image = np.random.default_rng(100 + seed).integers(0, 256, (30, 41, 3), np.uint8)
        out = op({"image": image}, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        expected = [view({"image": image}, rng)["image"] for view in views]
        np.testing.assert_array_equal(out["global_crops"], np.stack(expected[:2]))
        np.testing.assert_array_equal(out["local_crops"], np.stack(expected[2:]))


@pytest.mark.parametrize("target", [4, 20, 60, 98])
def test_block_masks_hit_their_count_with_rectangles(target):
    rng = np.random.default_rng(target)
    mask = block_mask(rng, 14, 14, target)
    assert target - 4 <= mask.sum() <= target
    # Rectangles: every masked patch has a masked neighbour (blocks are >= 4 patches, so
    # rarely a 1-wide sliver, never isolated dots).
    padded = np.pad(mask, 1)
    neighbours = (padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])
    assert (neighbours[mask]).all()


def test_ibot_masks_probability_and_errors():
    op = preprocess.parse("ibot_masks((2, 8), probability=0.0)")
    assert not op({}, np.random.default_rng(0))["global_masks"].any()
    with pytest.raises(ValueError, match="ratio must lie in"):
        preprocess.parse("ibot_masks(4, ratio=(0.1, 1.5))")
    with pytest.raises(ValueError, match="num_local must be an int >= 0"):
        preprocess.parse("dino_multicrop(32, 16, -1)")
    with pytest.raises(ValueError, match="flip must be True or False, got 'no'"):
        preprocess.parse("dino_multicrop(32, 16, 2, flip='no')")
