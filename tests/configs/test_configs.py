"""Config files: the `preset,key=value` argument, every preset of every file validating on the
8 simulated devices, and `check_config` errors that name the offending key and value."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest

from vistax.configs import common, vit
from vistax.train import experiment

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def config_modules():
    """(name, module) of every file in configs/ that defines get_config."""
    found = []
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        module = importlib.import_module(f"vistax.configs.{name}")
        if hasattr(module, "get_config"):
            found.append((name, module))
    return found


def all_presets():
    return [pytest.param(module, preset, id=f"{name}:{preset}")
            for name, module in config_modules()
            for preset in getattr(module, "PRESETS", (None,))]


def test_config_files_are_discovered():
    names = [name for name, _ in config_modules()]
    assert "vit" in names and "common" not in names


# -- parse_arg -------------------------------------------------------------------------------


def test_parse_arg_preset_default_and_options():
    presets = ("tiny", "B/16")
    assert common.parse_arg(None, presets=presets, variant="").to_dict() == dict(preset="tiny",
                                                                                variant="")
    assert common.parse_arg("", presets=presets).preset == "tiny"
    assert common.parse_arg("B/16", presets=presets).preset == "B/16"
    arg = common.parse_arg("tiny,variant=S/16", presets=presets, variant="")
    assert arg.preset == "tiny" and arg.variant == "S/16" and isinstance(arg.variant, str)
    # Options without a preset keep the default preset.
    arg = common.parse_arg("variant=mu/4", presets=presets, variant="")
    assert arg.preset == "tiny" and arg.variant == "mu/4"


def test_parse_arg_literals():
    arg = common.parse_arg(" tiny , depth=6, runlocal=True, lr=1e-3, name=abc ",
                           presets=("tiny",), depth=0, runlocal=False, lr=0.0, name="")
    assert arg.depth == 6 and type(arg.depth) is int
    assert arg.runlocal is True
    assert arg.lr == 1e-3 and type(arg.lr) is float
    assert arg.name == "abc"
    # Options not given keep their declared defaults.
    arg = common.parse_arg("tiny,depth=2", presets=("tiny",), depth=0, runlocal=False)
    assert arg.depth == 2 and arg.runlocal is False


def test_parse_arg_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"Unknown option 'foo'.*accepts \['variant'\]"):
        common.parse_arg("tiny,foo=1", presets=("tiny",), variant="")
    with pytest.raises(ValueError, match=r"Unknown option 'foo'.*accepts no options"):
        common.parse_arg("tiny,foo=1", presets=("tiny",))
    with pytest.raises(ValueError, match=r"Unknown preset 'huge'.*\['tiny', 'B/16'\]"):
        common.parse_arg("huge", presets=("tiny", "B/16"))
    with pytest.raises(ValueError, match=r"expected key=value after the preset, got 'S/16'"):
        common.parse_arg("tiny,S/16", presets=("tiny", "S/16"))
    with pytest.raises(ValueError, match=r"Unknown preset 'huge'"):
        vit.get_config("huge")


def test_vit_variant_option_replaces_the_model():
    c = vit.get_config("tiny,variant=mu/4")
    assert c.model.variant == "mu/4"
    assert all(c.model[k] is None for k in ("width", "depth", "mlp_dim", "num_heads",
                                             "patch_size"))
    assert c.input.dataset == "digits"  # the rest of the preset stays


# -- every preset validates ------------------------------------------------------------------


@pytest.mark.parametrize("module, preset", all_presets())
def test_every_preset_passes_check_config(module, preset, request):
    assert len(jax.devices()) == 8
    arg = preset
    if hasattr(module, "image_text") and preset != "tiny":
        # Paper-scale image-text presets name no tokenizer; CLIP's 49408-token BPE here.
        vocab = os.path.join(request.getfixturevalue("open_clip_package_dir"), "open_clip",
                             "bpe_simple_vocab_16e6.txt.gz")
        arg = f"{preset},tokenizer=clip_bpe:{vocab}"
    config = module.get_config(arg)
    objective, mesh, _, params = experiment.check_config(config)
    assert mesh.size == 8
    assert jax.tree.leaves(params)
    assert config.input.batch_size % 8 == 0
    assert objective.config is config


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """A data_dir holding a 2-class `imagenet2012` made by `vistax prepare` from train/ and
    val/ class folders (val/ becomes the `validation` split the presets evaluate on)."""
    from PIL import Image
    from vistax.data import prepare
    root = tmp_path_factory.mktemp("imagenet_folders")
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare(str(root), str(data_dir / "imagenet2012"))
    return str(data_dir)


@pytest.mark.parametrize("preset", ["S/16", "B/16", "L/16"])
def test_paper_presets_build_against_a_prepared_imagenet(preset, fake_imagenet):
    c = vit.get_config(preset)
    c.input.data_dir = fake_imagenet
    exp = experiment.Experiment(c)  # resolves `imagenet2012`, traces the step and the eval
    assert exp.epoch_size == 4 and exp.total_steps == 2  # ceil(300 epochs x 4 / batch 1024)
    assert c.model.variant == preset and c.model.drop_path == 0.1  # DeiT Table 9
    assert "method='bicubic'" in c.input.pp and "method='bicubic'" in c.evals.val.pp


@pytest.mark.parametrize("name", ["mae", "mae_finetune", "mae_linear_probe"])
def test_mae_paper_presets_build_against_a_prepared_imagenet(name, fake_imagenet):
    """Traces the step and every evaluator (probe, reconstruction pictures of the photos at
    224px) of the B/16 presets."""
    module = importlib.import_module(f"vistax.configs.{name}")
    c = module.get_config("B/16")
    c.input.data_dir = fake_imagenet
    exp = experiment.Experiment(c)
    assert exp.total_steps >= 1
    if name == "mae":
        assert c.mae.mask_ratio == 0.75 and c.mae.decoder_depth == 8 and c.mae.norm_pix_loss
        assert set(c.evals) == {"probe", "pictures"}
    if name == "mae_linear_probe":
        assert c.optimizer.name == "lars" and c.model.head_norm == "batchnorm"


def test_dino_paper_preset_builds_against_a_prepared_imagenet(fake_imagenet):
    """Traces DINOv2-on-S/16's step (2 x 224 + 8 x 96 crops, block masks on the 14 x 14 grid)
    and its k-NN and attention-map evaluators."""
    from vistax.configs import dino
    c = dino.get_config("S/16,v2=True")
    c.input.data_dir = fake_imagenet
    exp = experiment.Experiment(c)
    assert exp.total_steps >= 1
    assert (c.dino.teacher, c.dino.ibot_weight, c.dino.koleo_weight) == ("sinkhorn", 1.0, 0.1)
    assert c.model.num_registers == 4 and c.model.layer_scale == 1e-5
    assert "dino_multicrop(224, 96, 8, flip=True)" in c.input.pp and "ibot_masks(14)" in c.input.pp
    default = dino.get_config("B/16")
    assert (default.dino.teacher_temp, default.dino.student_temp, default.dino.center_momentum,
            default.dino.momentum_teacher, default.dino.head.out_dim) == (0.04, 0.1, 0.9, 0.996,
                                                                          65536)
    assert default.grad_clip_per_param == 3.0 and default.optimizer.weight_decay_end == 0.4
    best = dino.get_config("S/16,recipe=best")
    assert best.dino.teacher_temp == 0.07 and best.dino.warmup_teacher_temp_epochs == "30 epochs"
    points = dino.get_config("tiny,sweep=collapse").sweep.points
    no_sharpening = {"dino.teacher_temp": 0.1, "dino.warmup_teacher_temp": 0.1}
    assert [dict(p) for p in points] == [{}, {"dino.teacher": "none"}, no_sharpening]


def test_mae_sweeps_declare_their_points():
    from vistax.configs import mae
    ratios = [p["mae.mask_ratio"] for p in mae.get_config("tiny,sweep=mask_ratio").sweep.points]
    assert ratios[0] == 0.25 and ratios[-1] == 0.9 and 0.75 in ratios
    target = mae.get_config("tiny,sweep=target").sweep
    assert [p["mae.norm_pix_loss"] for p in target.points] == [False, True]
    assert mae.get_config("B/16,sweep=decoder_depth").sweep.metric == "eval/probe/accuracy"
    with pytest.raises(ValueError, match=r"sweep='depth' is not one of"):
        mae.get_config("tiny,sweep=depth")


# -- check_config errors ---------------------------------------------------------------------


def tiny(**overrides):
    c = vit.get_config("tiny")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    return c


@pytest.mark.parametrize("overrides, message", [
    ({"input.batch_size": 12},
     r"input\.batch_size=12 .* is not divisible by the data-parallel size 8"),
    ({"input.batch_size": 0}, r"input\.batch_size=0 must be positive"),
    ({"mesh.tensor": 2, "input.batch_size": 6},
     r"input\.batch_size=6 .* data-parallel size 4"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"mesh: at most one axis may be -1"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, r"covers 4 devices, but there are 8"),
    ({"mesh.data": 3}, r"covers 3 devices, but there are 8"),
    ({"mesh.data": -1, "mesh.tensor": 3}, r"8 devices do not divide by the fixed axes' product 3"),
    ({"mesh.data": 0}, r"mesh\.data=0: mesh sizes must be positive"),
    ({"mesh.pipeline": 1}, r"mesh has unknown axes \['pipeline'\]"),
    ({"sharding_rules": (("batch", ("data", "pipe")),)},
     r"sharding_rules maps 'batch' to unknown mesh axis 'pipe'"),
    ({"optimizer.name": "adam"}, r"optimizer\.name='adam'"),
    ({"schedule.name": "poly"}, r"schedule\.name='poly'"),
    ({"objective": "byol"}, r"objective='byol'"),
    ({"grad_accum_steps": 3}, r"grad_accum_steps=3 must be >= 1 and divide input\.batch_size=128"),
    ({"grad_accum_steps": 0}, r"grad_accum_steps=0"),
    ({"grad_accum_steps": 32}, r"input\.batch_size=128 / grad_accum_steps=32 = 4 is not divisible"),
    ({"duration": "30"}, r"duration='30'"),
    ({"log_every": "often"}, r"log_every='often'"),
    ({"schedule.warmup": "3 minutes"}, r"schedule\.warmup='3 minutes'"),
    ({"checkpoint.every": "epochs"}, r"checkpoint\.every='epochs'"),
    ({"evals.test.every": "1 hour"}, r"evals\.test\.every='1 hour'"),
    ({"evals.test.type": "kmeans"}, r"evals\.test\.type='kmeans'"),
    ({"model.pool": "avg"}, r"model\.pool='avg'"),
    ({"model.num_classes": 0}, r"model\.num_classes"),
    ({"loss.label_smoothing": 1.0}, r"loss\.label_smoothing=1\.0"),
    ({"progress": "fancy"}, r"progress='fancy'"),
    ({"prng_impl": "philox"}, r"prng_impl='philox'"),
    ({"checkpoint.keep": 0}, r"checkpoint\.keep=0"),
    ({"input.dataset": None}, r"input\.dataset is not set"),
    ({"param_groups.freeze": ("encoder/blocks/atn/.*",)},
     r"param_groups\.freeze: pattern 'encoder/blocks/atn/\.\*' matches no parameter"),
])
def test_check_config_errors_name_key_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        experiment.check_config(tiny(**overrides))


def test_indivisible_weight_names_the_parameter():
    # The tiny ViT has 4 heads; 8-way tensor parallelism cannot split them.
    config = tiny(**{"mesh.data": 1, "mesh.tensor": 8})
    with pytest.raises(ValueError) as info:
        experiment.check_config(config)
    message = str(info.value)
    assert "Cannot shard encoder/blocks/attn/" in message
    assert "dimension 4 does not divide by mesh axes tensor of size 8" in message
    # 4-way tensor parallelism does divide (data takes the other 2 devices).
    experiment.check_config(tiny(**{"mesh.data": -1, "mesh.tensor": 4}))


def test_fsdp_that_does_not_divide_names_the_parameter():
    # width 128 over 8-way fsdp divides; width 36 (4 heads of 9) does not.
    experiment.check_config(tiny(**{"mesh.data": 1, "mesh.fsdp": 8}))
    config = tiny(**{"mesh.data": 1, "mesh.fsdp": 8, "model.width": 36})
    with pytest.raises(ValueError, match=r"Cannot shard \S+ of shape .*dimension 36 does not "
                                         r"divide by mesh axes fsdp of size 8"):
        experiment.check_config(config)


def test_config_values_are_type_checked():
    """ml_collections keeps types: a string for an int key is refused, not silently kept."""
    c = vit.get_config("tiny")
    with pytest.raises(TypeError):
        c.input.batch_size = "abc"
    with pytest.raises(TypeError):
        c.model.depth = 1.5
    c.model.depth = 2  # same type: fine
    c.lock()  # as `vistax` does: no new keys from overrides
    with pytest.raises(AttributeError, match="batch_size"):
        c.input.batch_sise = 3


@pytest.fixture(scope="module")
def fake_image_text(tmp_path_factory):
    """A data_dir holding `image_text` made by `vistax prepare` from a CSV of image, caption."""
    from PIL import Image
    from vistax.data import prepare
    root = tmp_path_factory.mktemp("captions")
    rows = ["image,caption"]
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append(f"{i}.png,a photo of thing number {i}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    data_dir = tmp_path_factory.mktemp("tfds_captions")
    prepare.prepare(str(root / "captions.csv"), str(data_dir / "image_text"))
    return str(data_dir)


@pytest.mark.parametrize("name, preset", [("clip", "B/32"), ("siglip", "B/16"), ("lit", "B/16"),
                                          ("coca", "B/32")])
def test_image_text_paper_presets_trace_their_sharded_step(name, preset, fake_image_text,
                                                          open_clip_package_dir):
    """The paper-scale towers, batch and loss (all-gathered softmax / sigmoid ring over the
    8-way fsdp mesh) trace end to end on the prepared captions."""
    module = importlib.import_module(f"vistax.configs.{name}")
    vocab = os.path.join(open_clip_package_dir, "open_clip", "bpe_simple_vocab_16e6.txt.gz")
    c = module.get_config(f"{preset},tokenizer=clip_bpe:{vocab}")
    c.input.data_dir = fake_image_text
    c.duration, c.schedule.warmup = "2 steps", "1 steps"  # 4 examples: ~1 step in 32 epochs
    exp = experiment.Experiment(c)
    assert exp.mesh.shape["fsdp"] == 8 and c.input.batch_size >= 16384
    assert c.loss.impl == "sharded"


@pytest.mark.parametrize("preset", ["io_imagenet", "mlm", "ar"])
def test_perceiver_paper_presets_build_on_a_simulated_mesh(preset, fake_imagenet, data_dir):
    """Perceiver IO on 224x224 raw pixels (50,176 tokens), the 2048-byte language model and the
    8192-byte Perceiver AR: parameters sharded over 8 devices (FSDP), step and evaluator
    traced."""
    from vistax.configs import perceiver
    c = perceiver.get_config(preset)
    c.input.data_dir = fake_imagenet if preset == "io_imagenet" else data_dir
    exp = experiment.Experiment(c)
    assert exp.mesh.shape["fsdp"] == 8 and exp.total_steps >= 1
    count = sum(x.size for x in jax.tree.leaves(exp.abstract_state["params"]))
    # The released models' sizes: Perceiver IO ImageNet with Fourier features 48.4M (Perceiver
    # IO paper's ImageNet model), the language model 201M (transformers' `deepmind/language-perceiver`).
    expected = {"io_imagenet": 48.44e6, "mlm": 201.1e6, "ar": count}[preset]
    assert abs(count / expected - 1) < 1e-3, count
