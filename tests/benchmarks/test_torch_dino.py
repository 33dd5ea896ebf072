"""The PyTorch DINO timed by `vistax bench` does our DINO's work: equal trained-parameter counts,
forward FLOPs equal to our analytic count and, with our student, teacher and center copied
across, the same loss (local crops' resampled positions included); its step moves the teacher
and the center as ours and holds the last layer as configured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vistax.benchmarks import cases
from vistax.configs import dino as dino_configs
from vistax.models import vit
from vistax.train import objectives
from vistax.train.objectives import dino as dino_objective

torch = pytest.importorskip("torch")
torch_dino = pytest.importorskip("vistax.benchmarks.torch_dino")
torch_trainers = pytest.importorskip("vistax.benchmarks.torch_trainers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_objective(**dino):
    config = dino_configs.get_config("tiny")
    config.model.update(width=64, depth=2, mlp_dim=128, num_heads=2)
    config.dino.head.update(out_dim=96, hidden_dim=48, bottleneck_dim=16)
    config.dino.update(dino)
    return objectives.get("dino")(config)


def crops(batch: int = 3, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    return {"global_crops": rng.randn(batch, 2, 32, 32, 3).astype(np.float32),
            "local_crops": rng.randn(batch, 4, 16, 16, 3).astype(np.float32)}


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))


def test_trained_parameter_count_equals_ours(count_params):
    config = cases.CASES["dino_tiny"].build_config()
    objective = objectives.get(config.objective)(config)
    ours = count_params(objective)
    with torch.device("meta"):
        theirs = torch_dino.DINO(torch_dino.setup(objective, epoch_size=1437))
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == ours
    assert sum(p.numel() for p in theirs.teacher.parameters()) == ours


def test_forward_flops_equal_our_analytic_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    objective = small_objective()
    cfg = torch_dino.setup(objective, epoch_size=64)
    model = torch_dino.DINO(cfg)
    batch = crops(batch=2)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        model.loss(nchw(batch["global_crops"]), nchw(batch["local_crops"]))
    backbone, head = cfg.backbone, cfg.settings.head
    per_crop = {g: vit.flops_per_example(backbone, (g, g)) + dino_objective.head_flops(
        head, backbone.width) for g in (4, 2)}
    student, teacher = 2 * per_crop[4] + 4 * per_crop[2], 2 * per_crop[4]
    assert objective.flops_per_example() == student + teacher / 3
    # One resampling of the 16 learned positions to the local crops' 4, per student forward on
    # them: left out of our count (models/vit.py's flops_per_example counts per example).
    resampling = 2 * 4 * 16 * backbone.width
    # The loss's cross-entropy of every (teacher, student) crop pair is an einsum too.
    pairs = 2 * 2 * (2 * 6) * head.out_dim
    assert count.get_total_flops() == 2 * (student + teacher) + resampling + pairs


@pytest.mark.parametrize("dino", [dict(), dict(teacher="none", student_temp=0.2),
                                  dict(head=dict(norm_last_layer=False, num_layers=2))])
def test_loss_matches_ours_with_copied_student_teacher_and_center(dino):
    objective = small_objective(**dino)
    objective.configure_run(total_steps=100, steps=lambda key, text: 0)
    model = objective.build_model(nnx.Rngs(0))
    extra = objective.init_extra(model)
    # A teacher apart from the student and a non-zero center, so that each is read.
    extra["teacher"] = jax.tree.map(lambda p: p * 1.1 + 0.01, extra["teacher"])
    extra["center"] = jnp.linspace(-1.0, 1.0, extra["center"].shape[0])
    if not objective.settings.head.norm_last_layer:
        gain = model.head.last_layer.gain
        gain[...] = gain[...] * jnp.linspace(0.5, 1.5, gain.shape[0])
    batch = crops()
    loss, metrics, stats = objective.loss(model, extra, {k: jnp.asarray(v) for k, v in
                                                         batch.items()}, jax.random.key(0), 0)
    theirs = torch_dino.DINO(torch_dino.setup(objective, epoch_size=64))
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    teacher = jax.tree.map(np.asarray, extra["teacher"].to_pure_dict())
    torch_dino.load_dino_params(theirs, params, teacher, extra["center"])
    with torch.no_grad():
        their_loss = theirs.loss(nchw(batch["global_crops"]), nchw(batch["local_crops"]))
    np.testing.assert_allclose(float(their_loss), float(loss), rtol=2e-5)
    np.testing.assert_allclose(theirs.teacher_logits.mean(dim=0).numpy(),
                               np.asarray(stats["center"]), atol=1e-5)
    assert float(metrics["teacher_entropy"]) > 0.1  # the targets are not one-hot


def test_step_moves_teacher_and_center_as_ours_and_holds_the_last_layer():
    objective = small_objective()
    objective.configure_run(total_steps=10, steps=lambda key, text: 0)
    cfg = torch_dino.setup(objective, epoch_size=128)  # batch 64: a 2-step hold ("1 epochs")
    assert cfg.hold_steps == 2 and cfg.total_steps == 10
    config = objective.config
    step, model = torch_trainers.make_trainer("dino", cfg, config, crops(batch=4))
    last = model.student.head.last_layer.weight
    first_mlp = model.student.head.mlp[0].weight
    snapshots = []
    for i in range(3):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        step()
        snapshots.append((before, model.teacher_logits.mean(dim=0)))
        m = float(dino_objective.cosine_momentum(i, 10, 0.996, 1.0))
        for name, t in model.teacher.named_parameters():
            expected = m * before["teacher." + name] + (1 - m) * model.student.get_parameter(name)
            torch.testing.assert_close(t.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.center, 0.9 * before["center"] + 0.1 * snapshots[-1][1])
        held = torch.equal(last.detach(), before["student.head.last_layer.weight"])
        assert held == (i < 2)
        assert not torch.equal(first_mlp.detach(), before["student.head.mlp.0.weight"])
    assert model.step == 3


def test_per_parameter_clipping_bounds_each_gradient(monkeypatch):
    objective = small_objective()
    config = objective.config
    config.grad_clip_per_param = 1e-3
    step, _ = torch_trainers.make_trainer("dino", torch_dino.setup(objective, epoch_size=64),
                                          config, crops(batch=4))
    norms = []
    original = torch.optim.AdamW.step

    def record(self, *args, **kwargs):  # the gradients the optimizer gets
        norms.extend(float(p.grad.norm()) for group in self.param_groups
                     for p in group["params"] if p.grad is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    step()
    assert 0.999e-3 < max(norms) <= 1e-3 * (1 + 1e-5)  # clipped, and there was work to do


def test_options_without_an_equivalent_are_named():
    for dino, word in ((dict(ibot_weight=1.0), "ibot_weight"), (dict(koleo_weight=0.1), "koleo"),
                       (dict(teacher="sinkhorn"), "sinkhorn")):
        with pytest.raises(torch_trainers.Unsupported, match=word):
            torch_dino.setup(small_objective(**dino), epoch_size=64)
