"""Tokenizers: CLIP BPE ids equal open_clip's reference tokenizer; bytes; SentencePiece models
trained by `vistax tokenizer`; the `tokenize` pp op."""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
import random
import subprocess

import numpy as np
import pytest
import sentencepiece as spm

from vistax.data import preprocess, tokenizers
from vistax.data.builders import shapes

# Texts whose ids must equal the reference's: punctuation, digits, contractions in any case,
# accents and other scripts, HTML entities (escaped twice), mojibake ftfy repairs, emoji
# (with skin tones and joiners), odd whitespace, very long text, empty text.
CLIP_TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "Don't stop! It's 3:45pm, isn't it? We'll see; they'd've LEFT.",
    "I'LL WE'VE you'd THEY'RE she's 'quoted' \u2018curly\u2019 \u201cdouble\u201d",
    "12345 3.14159 1,000,000 -42 +7% 2nd 1e-3",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c6r\u00f8sk\u00f8bing Stra\u00dfe \u017f \u01c5 \u0130stanbul",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
    "Tom &amp; Jerry &amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &#x263A;",
    "\U0001F431\U0001F680 emoji \U0001F44D\U0001F3FD family "
    "\U0001F468\u200d\U0001F469\u200d\U0001F467 \u2764\ufe0f",
    "mojibake: \u00c3\u00a9t\u00c3\u00a9 \u00e2\u20ac\u0153quoted\u00e2\u20ac\x9d",
    "   lots   of\twhite\n\nspace \u00a0 and\u200bzero-width \u00adsoft hyphen  ",
    "<html> </w> @user #tag http://example.com/a_b?c=d&e=f ~!@#$%^&*()_+{}|:\"<>?",
    "",
    " ",
    "x",
    "x" * 500,
    " ".join(["supercalifragilisticexpialidocious"] * 40),
    "a red circle at the top left and a blue square at the bottom",
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Random strings over a pool mixing the cases above."""
    pool = ("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-_()[]{}<>/\\@#$%^&*+=~`|"
            "\u00e9\u00e8\u00e0\u00fc\u00f6\u00df\u00f1\u00e7\u00f8\u00e5\u00c6\u0152"
            "\u65e5\u672c\u8a9e\ud55c\U0001F600\U0001F40D\U0001F44D\U0001F3FD\u200d\t\n"
            "\u00a0\u2019\u201c\u201d")
    pieces = list(pool) + ["&amp;", "&lt;", "'s", "'LL", "don't", " the ", "\u00c3\u00a9"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def reference_tokenizer(open_clip_package_dir):
    """open_clip's tokenizer.py loaded alone (its package __init__ imports torchvision)."""
    path = os.path.join(open_clip_package_dir, "open_clip", "tokenizer.py")
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_vocab(open_clip_package_dir) -> str:
    return os.path.join(open_clip_package_dir, "open_clip", "bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def clip(clip_vocab) -> tokenizers.Tokenizer:
    return tokenizers.get(f"clip_bpe:{clip_vocab}")


def _reference_ids(reference_tokenizer, texts, length) -> np.ndarray:
    ids = reference_tokenizer.tokenize(texts, context_length=length)
    return np.asarray(ids.numpy() if hasattr(ids, "numpy") else ids)


def _check_rows(tok, rows: np.ndarray, count: int, length: int) -> None:
    """int32 (count, length); exactly one eos per row, only pad after it, bos first if any."""
    assert rows.dtype == np.int32 and rows.shape == (count, length)
    for row in rows:
        eos = np.flatnonzero(row == tok.eos_id)
        assert len(eos) == 1, row
        assert np.all(row[eos[0] + 1:] == tok.pad_id), row
        if tok.bos_id is not None and length > 1:
            assert row[0] == tok.bos_id, row
        assert np.all((row >= 0) & (row < tok.vocab_size))


@pytest.mark.parametrize("length", [77, 8, 2, 1])
def test_clip_ids_equal_open_clip(clip, reference_tokenizer, length):
    texts = CLIP_TEXTS + _random_texts(150)
    ours = clip.encode(texts, length)
    reference = _reference_ids(reference_tokenizer, texts, length)
    assert reference.shape == ours.shape == (len(texts), length)
    mismatched = [texts[i] for i in range(len(texts)) if not np.array_equal(ours[i], reference[i])]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"
    _check_rows(clip, ours, len(texts), length)


def test_clip_special_ids_truncation_and_decode(clip):
    assert (clip.vocab_size, clip.bos_id, clip.eos_id, clip.pad_id) == (49408, 49406, 49407, 0)
    rows = clip.encode(["", "x" * 500, " ".join(["word"] * 100)], 77)
    assert rows[0, :3].tolist() == [49406, 49407, 0]
    for row in rows[1:]:  # truncated: full rows ending in eot
        assert row[0] == 49406 and row[-1] == 49407 and np.sum(row == 49407) == 1
        assert not np.any(row == 0)
    assert clip.decode(rows[2]) == " ".join(["word"] * 75)
    row = clip.encode(["A Photo of a CAT! Don't &amp; caf\u00e9 \U0001F431"], 77)[0]
    assert clip.decode(row) == "a photo of a cat ! don 't & caf\u00e9 \U0001F431"
    # "!" is id 0, the same as pad: it is kept because rows are read up to their eos.
    assert clip.encode(["!~"], 6)[0].tolist() == [49406, 0, 349, 49407, 0, 0]
    assert clip.decode(clip.encode(["!~"], 6)[0]) == "!~"


def test_clip_special_strings_in_text_are_plain_text(clip, reference_tokenizer):
    """The one deliberate difference from open_clip: a literal '<end_of_text>' in a caption
    becomes the special id there (two eos in a row); here it is text (one eos)."""
    texts = ["a <end_of_text> b", "<start_of_text>"]
    reference = _reference_ids(reference_tokenizer, texts, 16)
    assert np.sum(reference[0] == 49407) == 2  # what is avoided
    ours = clip.encode(texts, 16)
    _check_rows(clip, ours, 2, 16)
    assert clip.decode(ours[0]) == "a < end _ of _ text > b"


def test_bad_specs_name_the_spec_or_file(tmp_path):
    missing = str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(ValueError, match="bpe_simple_vocab_16e6.txt.gz.*does not exist"):
        tokenizers.get(f"clip_bpe:{missing}")
    not_bpe = tmp_path / "vocab.txt"
    not_bpe.write_text("#version\na b\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        tokenizers.get(f"clip_bpe:{not_bpe}")
    with pytest.raises(ValueError, match="cannot load the SentencePiece model"):
        tokenizers.get(f"sentencepiece:{not_bpe}")
    for spec, message in (("clip_bpe", "needs a file"), ("sentencepiece:", "needs a file"),
                          ("wordpiece:x", "unknown tokenizer 'wordpiece:x'"),
                          ("bytes:utf16", "takes no argument")):
        with pytest.raises(ValueError, match=message):
            tokenizers.get(spec)


def test_get_caches_and_pickles_by_spec(clip):
    assert tokenizers.get(clip.spec) is clip
    assert pickle.loads(pickle.dumps(clip)) is clip
    assert pickle.loads(pickle.dumps(tokenizers.get("bytes"))) is tokenizers.get("bytes")


def test_bytes_ids_round_trip_and_truncation():
    tok = tokenizers.get("bytes")
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    assert tok.encode(["ab"], 6).tolist() == [[1, 100, 101, 2, 0, 0]]
    assert tok.encode([""], 4).tolist() == [[1, 2, 0, 0]]
    assert tok.encode(["hello world"], 5).tolist() == [[1, 107, 104, 111, 2]]
    assert tok.encode(["hello"], 1).tolist() == [[2]]
    texts = ["", "a red circle", "Caf\u00e9 \u65e5\u672c \U0001F431", "tab\tand\nnewline",
             "\x00\xff"]
    rows = tok.encode(texts, 40)
    _check_rows(tok, rows, len(texts), 40)
    assert [tok.decode(row) for row in rows] == texts
    assert tok.decode(tok.encode([b"utf-8 bytes \xc3\xa9"], 20)[0]) == "utf-8 bytes \u00e9"
    # Cut inside a multi-byte character: one replacement character, eos still last.
    cut = tok.encode(["\u00e9\u00e9"], 4)[0]
    assert cut.tolist() == [1, 0xC3 + 3, 0xA9 + 3, 2]
    assert tok.decode(tok.encode(["\u00e9"], 3)[0]) == "\ufffd"
    for length in range(1, 12):
        _check_rows(tok, tok.encode(texts, length), len(texts), length)
    with pytest.raises(ValueError, match="positive int"):
        tok.encode(["a"], 0)
    with pytest.raises(TypeError, match="must be str"):
        tok.encode([3], 8)


def _train_default_layout(tmp_path, texts, **options) -> str:
    """A model with SentencePiece's own defaults (unk 0, bos 1, eos 2, no pad) unless
    `options` say otherwise, as a user might bring."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2,
                                   **options)
    path = tmp_path / f"user{len(options)}.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_sentencepiece_user_models(tmp_path):
    rng = np.random.default_rng(0)
    texts = [shapes.caption(shapes.sample_objects(rng, "train")) for _ in range(100)]
    tok = tokenizers.get(f"sentencepiece:{_train_default_layout(tmp_path, texts)}")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # no pad: padded with <unk>
    rows = tok.encode(texts[:20] + [""], 128)
    _check_rows(tok, rows, 21, 128)
    assert [tok.decode(row) for row in rows[:20]] == texts[:20]
    no_eos = _train_default_layout(tmp_path, texts, eos_id=-1)
    with pytest.raises(ValueError, match="defines no eos"):
        tokenizers.get(f"sentencepiece:{no_eos}")


def test_train_sentencepiece_refuses_an_existing_file(tmp_path):
    out = tmp_path / "taken.model"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="taken.model"):
        tokenizers.train_sentencepiece(["a red circle"] * 10, str(out), 32)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="no non-empty texts"):
        tokenizers.train_sentencepiece(["", "  "], str(tmp_path / "empty.model"), 32)
    assert sorted(os.listdir(tmp_path)) == ["taken.model"]


@pytest.fixture
def vistax(vistax_command):
    """vistax(*args, cwd) -> the `vistax` command's result, run on the CPU."""
    def run(*args, cwd):
        return subprocess.run(vistax_command + list(args), cwd=cwd,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                              text=True, timeout=300)
    return run


def test_vistax_tokenizer_trains_on_shapes_captions(vistax, shapes_dir, tmp_path):
    out = tmp_path / "models" / "shapes.model"
    args = ["tokenizer", f"--dataset={shapes_dir}", "--split=train", "--field=caption",
            "--vocab_size=256", f"--out={out}"]
    result = vistax(*args, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and "trained on 240 texts" in result.stdout
    tok = tokenizers.get(f"sentencepiece:{out}")
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
    assert 64 < tok.vocab_size <= 256
    captions = list(tokenizers.dataset_texts(shapes_dir, "test", "caption"))
    assert len(captions) == 48
    rows = tok.encode(captions, 64)
    _check_rows(tok, rows, len(captions), 64)
    assert [tok.decode(row) for row in rows] == captions
    assert np.mean(np.argmax(rows == tok.eos_id, axis=1)) < np.mean([len(c) for c in captions]) / 2
    # A second run refuses to overwrite, naming the file, and leaves it as it was.
    before = out.read_bytes()
    again = vistax(*args, cwd=str(tmp_path))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert str(out) in again.stderr
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == ["shapes.model"]  # no temporary left behind
    bad = vistax("tokenizer", f"--dataset={shapes_dir}", "--field=label", "--vocab_size=64",
                 f"--out={tmp_path / 'other.model'}", cwd=str(tmp_path))
    assert bad.returncode != 0 and "no text field 'label'" in bad.stderr
    assert not (tmp_path / "other.model").exists()


def test_dataset_texts_reads_nested_and_subsets(shapes_dir):
    shapes_of_objects = list(tokenizers.dataset_texts(shapes_dir, "test", "objects/shape"))
    assert len(shapes_of_objects) >= 48 and set(shapes_of_objects) <= set(shapes.SHAPES)
    subset = list(tokenizers.dataset_texts(shapes_dir, "train", "caption", max_examples=5))
    every = list(tokenizers.dataset_texts(shapes_dir, "train", "caption"))
    assert len(subset) == 5 and set(subset) <= set(every)
    with pytest.raises(ValueError, match="no split 'validation'"):
        tokenizers.dataset_texts(shapes_dir, "validation", "caption")


def test_tokenize_pp_op():
    image = np.zeros((4, 4, 3), np.uint8)
    out = preprocess.parse("tokenize('bytes', 16)")(
        {"caption": "a red circle", "image": image}, np.random.default_rng(0))
    assert sorted(out) == ["image", "text"] and out["image"] is image
    assert out["text"].dtype == np.int32 and out["text"].shape == (16,)
    assert tokenizers.get("bytes").decode(out["text"]) == "a red circle"
    several = preprocess.parse("tokenize('bytes', 8, key='captions', out='tokens')")(
        {"captions": np.array([b"one", "two \u00e9".encode(), b"a long third caption"], object)},
        np.random.default_rng(0))
    assert sorted(several) == ["tokens"] and several["tokens"].shape == (3, 8)
    assert [tokenizers.get("bytes").decode(r) for r in several["tokens"]] == [
        "one", "two \u00e9", "a long"]
    same = preprocess.parse("tokenize('bytes', 4, key='text')")({"text": b"abc"}, None)
    assert same["text"].tolist() == [1, 100, 101, 2]
    for spec, message in (("tokenize('bytes', 0)", "positive int"),
                          ("tokenize('sentencepiece:/no/such.model', 8)", "/no/such.model")):
        with pytest.raises(ValueError, match=message):
            preprocess.parse(spec)
    with pytest.raises(ValueError, match="not text"):
        preprocess.parse("tokenize('bytes', 8)")({"caption": 3}, None)
