"""CLIP weight import: Hugging Face `CLIPModel` and open_clip checkpoints, loaded through
`init_from` and the contrastive objective's `import_weights`, give the reference models' image
and text embeddings (fp32, PyTorch on the CPU as the reference).

References are randomly initialised and then every parameter is perturbed, so LayerNorm scales,
biases and the other parameters that initialise to constants carry information too. The
open_clip model is the real `open_clip.model.CLIP` class, full-size ViT-B-32, from the pinned
wheel (tests/conftest.py: `open_clip_package_dir`), imported without the package's __init__.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from vistax.configs import clip as clip_configs  # noqa: E402
from vistax.configs import image_text  # noqa: E402
from vistax.train import init_from  # noqa: E402
from vistax.train.objectives.contrastive import Contrastive  # noqa: E402

TOLERANCE = 1e-4  # relative, per embedding: |ours - ref| / |ref|


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)))


def perturb(module, seed: int, scale: float) -> None:
    """Adds N(0, scale^2) noise to every parameter (also LayerNorm scales and zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def contrastive_objective(model: dict) -> Contrastive:
    """The contrastive objective of configs/clip.py with the given towers (no tokenizer)."""
    c = clip_configs.get_config("tiny")
    c.tokenizer = ""
    c.model = image_text.two_towers_config(**model)
    objective = Contrastive(c)
    objective.validate()
    return objective


def load_with_init_from(objective: Contrastive, path: str):
    """A model whose every parameter comes from the weight file at `path` via `init_from`.

    Nothing keeps its initialisation, so the model is built abstractly and the fresh
    parameters `init_from` replaces are zeros (drawing ViT-B/32's random init costs ~30 s on
    two CPU cores).
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0))))
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nnx.to_pure_dict(state))
    config = objective.config
    config.init_from.path = path
    loaded, summary = init_from.apply(config.init_from, params, objective.import_weights)
    assert summary["fresh"] == []
    nnx.replace_by_pure_dict(state, loaded)
    return nnx.merge(graphdef, state)


@nnx.jit
def _encode(model, images, tokens):
    return model.encode_image(images)[0], model.encode_text(tokens)[0]


def our_embeddings(model, images_nchw: np.ndarray, tokens: np.ndarray):
    """(image, text) embeddings of NCHW images (PyTorch's layout; ours is NHWC) and tokens."""
    zimg, ztxt = _encode(model, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)),
                         jnp.asarray(tokens, jnp.int32))
    return np.asarray(zimg), np.asarray(ztxt)


def normalized(x) -> np.ndarray:
    x = x.detach().double().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- Hugging Face CLIPModel ----------------------------------------------------------------

HF_VOCAB, HF_EOS, HF_CONTEXT, OUR_TEXT_LEN = 100, 99, 20, 16


def hf_clip(hidden_act: str, seed: int = 0):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=HF_VOCAB, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=HF_CONTEXT, hidden_act=hidden_act,
                         bos_token_id=HF_EOS - 1, eos_token_id=HF_EOS, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8,
                           hidden_act=hidden_act),
        projection_dim=24, logit_scale_init_value=math.log(1 / 0.05))
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    perturb(model, seed, 0.05)
    return model


def hf_towers(activation: str, **text) -> dict:
    common = dict(layernorm_eps=1e-5, activation=activation, dtype="float32")
    return dict(
        image=dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8, image_size=32,
                   pre_norm=True, patch_bias=False, **common),
        text=dict(dict(width=48, depth=2, mlp_dim=96, num_heads=4, vocab_size=HF_VOCAB,
                       eos_id=HF_EOS, max_len=OUR_TEXT_LEN, **common), **text),
        embed_dim=24)


def hf_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    tokens = rng.integers(0, HF_EOS - 1, (4, OUR_TEXT_LEN))
    for row, (eos, pad) in enumerate([(15, None), (3, HF_EOS), (7, 0), (0, HF_EOS)]):
        tokens[row, eos] = HF_EOS  # HF's tokenizer pads with eos: pooling takes the first one
        if pad is not None:
            tokens[row, eos + 1:] = pad
    return images, tokens


def hf_reference(hf, images, tokens):
    def features(out):  # transformers 5 returns the model output, older versions the tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        zimg = features(hf.get_image_features(pixel_values=torch.from_numpy(images)))
        ztxt = features(hf.get_text_features(input_ids=torch.from_numpy(tokens)))
    return normalized(zimg), normalized(ztxt)


@pytest.mark.parametrize("hidden_act,activation,saved_as", [
    ("quick_gelu", "quick_gelu", "save_pretrained"),  # HF's default; model.safetensors
    ("gelu", "gelu", "torch_bin"),
    ("gelu_pytorch_tanh", "gelu_tanh", "save_pretrained"),
])
def test_hugging_face_clip_embeddings_match(hidden_act, activation, saved_as, tmp_path):
    hf = hf_clip(hidden_act)
    if saved_as == "save_pretrained":
        hf.save_pretrained(str(tmp_path))
        path = str(tmp_path / "model.safetensors")
    else:
        path = str(tmp_path / "pytorch_model.bin")
        torch.save(hf.state_dict(), path)
    model = load_with_init_from(contrastive_objective(hf_towers(activation)), path)
    images, tokens = hf_inputs()
    ref_img, ref_txt = hf_reference(hf, images, tokens)
    zimg, ztxt = our_embeddings(model, images, tokens)
    assert relative_error(zimg, ref_img) < TOLERANCE
    assert relative_error(ztxt, ref_txt) < TOLERANCE
    assert float(model.log_temperature[...]) == pytest.approx(hf.logit_scale.item(), abs=1e-6)
    if activation == "quick_gelu":
        # The tolerance tells activations apart: the same weights under exact GELU are off.
        wrong = load_with_init_from(contrastive_objective(hf_towers("gelu")), path)
        wrong_img, wrong_txt = our_embeddings(wrong, images, tokens)
        assert relative_error(wrong_img, ref_img) > 10 * TOLERANCE
        assert relative_error(wrong_txt, ref_txt) > 10 * TOLERANCE


def test_mismatches_are_errors_that_name_the_key(tmp_path):
    hf = hf_clip("quick_gelu")
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}

    def import_with(sd, **text):
        return contrastive_objective(hf_towers("quick_gelu", **text)).import_weights(sd)

    with pytest.raises(ValueError, match=r"'text_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has "
                                         r"shape \(96, 48\), the model config expects \(192, 48\)"):
        import_with(sd, mlp_dim=192)
    with pytest.raises(ValueError, match=r"text_model\.encoder\.layers\.<i>\.\* hold 2 layers, "
                                         r"model\.text\.depth=3"):
        import_with(sd, depth=3)
    with pytest.raises(ValueError, match=r"'text_model\.embeddings\.position_embedding\.weight' "
                                         r"has shape \(20, 48\).*max_len"):
        import_with(sd, max_len=32)
    extra = dict(sd, **{"text_model.encoder.layers.0.layer_scale": np.ones(48, np.float32)})
    with pytest.raises(ValueError, match=r"no place for.*layers\.0\.layer_scale"):
        import_with(extra)
    with pytest.raises(ValueError, match=r"Unknown CLIP weight format.*'vit\.embeddings"):
        import_with({"vit.embeddings.cls_token": np.zeros((1, 1, 8), np.float32)})
    # Through init_from the same error reaches the user.
    torch.save(hf.state_dict(), str(tmp_path / "clip.pt"))

    def apply(towers):
        objective = contrastive_objective(towers)
        objective.config.init_from.path = str(tmp_path / "clip.pt")
        abstract = nnx.eval_shape(lambda: objective.build_model(nnx.Rngs(0)))
        params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                              nnx.to_pure_dict(nnx.state(abstract)))
        return init_from.apply(objective.config.init_from, params, objective.import_weights)

    with pytest.raises(ValueError, match=r"token_embedding\.weight' has shape \(100, 48\), the "
                                         r"model config expects \(100, 32\)"):
        apply(hf_towers("quick_gelu", width=32, num_heads=4))
    # Another image size is no mismatch: init_from resamples the patch position embedding.
    towers = hf_towers("quick_gelu")
    towers["image"]["image_size"] = 48
    params, summary = apply(towers)
    assert summary["fresh"] == [] and params["image"]["pos_embedding"].shape == (1, 36, 64)


# -- open_clip ------------------------------------------------------------------------------

@contextlib.contextmanager
def _without_torchvision():
    """open_clip/utils.py imports `torchvision.ops.misc.FrozenBatchNorm2d` at the top, used
    only to freeze ResNet towers' BatchNorm (never by ViT CLIP); torchvision is not installed
    here. Stands in a placeholder for that one name while open_clip's modules import."""
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules.get(name) for name in names}
    stubs = {name: types.ModuleType(name) for name in names}

    class FrozenBatchNorm2d:  # never instantiated by the models used here
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is not installed")

    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def open_clip_model(open_clip_package_dir):
    """open_clip's `model` module, imported as a sub-module of a package object that skips
    the package __init__ (which pulls in torchvision, data transforms and the hub)."""
    package = "_vistax_reference_open_clip"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [os.path.join(open_clip_package_dir, "open_clip")]
        sys.modules[package] = module
    with _without_torchvision():
        return importlib.import_module(f"{package}.model")


def test_open_clip_vit_b_32_embeddings_match(open_clip_model, open_clip_package_dir, tmp_path):
    """open_clip's ViT-B-32 (exact GELU) at full size, saved as open_clip's training
    checkpoints are ({'epoch', 'state_dict'} with DistributedDataParallel's `module.`), into
    configs/clip.py:B/32 with our CLIP BPE tokenizer; activation gelu, fp32."""
    oc_dir = os.path.join(open_clip_package_dir, "open_clip")
    with open(os.path.join(oc_dir, "model_configs", "ViT-B-32.json")) as f:
        oc_cfg = json.load(f)
    torch.manual_seed(0)
    ref = open_clip_model.CLIP(**oc_cfg, quick_gelu=False).eval()
    perturb(ref, seed=1, scale=0.01)
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(1 / 0.03))
    path = str(tmp_path / "epoch_3.pt")
    torch.save({"epoch": 3, "name": "test",
                "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)

    vocab = os.path.join(oc_dir, "bpe_simple_vocab_16e6.txt.gz")
    c = clip_configs.get_config(f"B/32,tokenizer=clip_bpe:{vocab}")
    for tower in (c.model.image, c.model.text):  # the preset is OpenAI's: QuickGELU, bf16
        tower.update(activation="gelu", dtype="float32")
    objective = Contrastive(c)
    objective.validate()
    model = load_with_init_from(objective, path)

    from vistax.data import tokenizers
    captions = ["a photo of a cat", "a diagram of two red circles and a blue star", ""]
    tokens = tokenizers.get(c.tokenizer).encode(captions, 77)
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images), normalize=True)
        ref_txt = ref.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True)
    zimg, ztxt = our_embeddings(model, images, tokens)
    assert relative_error(zimg, ref_img.double().numpy()) < TOLERANCE
    assert relative_error(ztxt, ref_txt.double().numpy()) < TOLERANCE
    assert float(model.log_temperature[...]) == pytest.approx(math.log(1 / 0.03), abs=1e-6)


def small_open_clip(open_clip_model, cls: str, *, quick_gelu: bool, **vision):
    vision_cfg = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16,
                      mlp_ratio=2.0, **vision)
    text_cfg = dict(context_length=16, vocab_size=HF_VOCAB, width=48, heads=4, layers=2,
                    mlp_ratio=2.0)
    torch.manual_seed(0)
    ref = getattr(open_clip_model, cls)(embed_dim=24, vision_cfg=vision_cfg, text_cfg=text_cfg,
                                        quick_gelu=quick_gelu).eval()
    perturb(ref, seed=2, scale=0.05)
    return ref


def test_open_clip_quickgelu_custom_text_layout_matches(open_clip_model, tmp_path):
    """QuickGELU (`-quickgelu` configs, OpenAI's weights), open_clip's CustomTextCLIP layout
    (text tower under `text.`), no ln_pre, a .safetensors file; text pooled at the largest id
    (open_clip's argmax pooling), which is the end-of-text id here."""
    from safetensors.numpy import save_file
    ref = small_open_clip(open_clip_model, "CustomTextCLIP", quick_gelu=True, no_ln_pre=True)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert "text.token_embedding.weight" in sd and "visual.ln_pre.weight" not in sd
    path = str(tmp_path / "open_clip.safetensors")
    save_file(sd, path)
    towers = hf_towers("quick_gelu", max_len=16)
    towers["image"]["pre_norm"] = False
    model = load_with_init_from(contrastive_objective(towers), path)
    images, tokens = hf_inputs(seed=1)
    tokens[1, 4:] = 0  # argmax pooling: one eos per row, the rest smaller ids
    tokens[3, 1:] = 0
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images), normalize=True)
        ref_txt = ref.encode_text(torch.from_numpy(tokens), normalize=True)
    zimg, ztxt = our_embeddings(model, images, tokens)
    assert relative_error(zimg, ref_img.double().numpy()) < TOLERANCE
    assert relative_error(ztxt, ref_txt.double().numpy()) < TOLERANCE


def test_open_clip_unsupported_parts_are_named(open_clip_model):
    """Layer scale (open_clip's `ls_init_value`) has no counterpart: an error, not a silent
    drop; and a ln_pre the config lacks is one too."""
    ref = small_open_clip(open_clip_model, "CLIP", quick_gelu=False, ls_init_value=0.1)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    objective = contrastive_objective(hf_towers("gelu"))
    with pytest.raises(ValueError, match=r"no place for.*visual\.transformer\.resblocks\.0\.ls_1"):
        objective.import_weights(sd)
    towers = hf_towers("gelu")
    towers["image"]["pre_norm"] = False
    with pytest.raises(ValueError, match=r"visual\.ln_pre.*model\.image\.pre_norm=True"):
        contrastive_objective(towers).import_weights(sd)
