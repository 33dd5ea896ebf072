"""Text tokenizers with one interface: fixed-length int32 rows for the text towers.

    tok = tokenizers.get("clip_bpe:/path/to/bpe_simple_vocab_16e6.txt.gz")   # cached per spec
    tok = tokenizers.get("sentencepiece:/path/to/model.model")
    tok = tokenizers.get("bytes")
    ids = tok.encode(["a red circle", "a blue star"], 77)   # int32 (2, 77)
    text = tok.decode(ids[0])

Every row is `[bos] + content + [eos]` right-padded with `pad_id`. Text too long for the row is
cut so that eos is always the last kept token, so every row holds exactly one eos (also for
empty text); text towers pool at it. `decode` reads a row up to its first eos (the whole row,
less trailing pads, when it has none) and drops a leading bos.

Schemes:
- `clip_bpe:FILE`: OpenAI CLIP's byte-level BPE from its merges file (open_clip's
  `bpe_simple_vocab_16e6.txt.gz`), giving exactly the ids of open_clip's `tokenize(texts,
  context_length)`: text fixed by ftfy, HTML-unescaped twice, whitespace collapsed, lowercased;
  split by CLIP's regular expression; each piece's UTF-8 bytes merged by rank with `</w>` on
  the last symbol. Vocabulary 49408, bos 49406 (<start_of_text>), eos 49407 (<end_of_text>),
  pad 0 (which is also the id of "!": rows are read up to their eos, never by pad). One
  deliberate difference: open_clip turns the literal strings "<start_of_text>" and
  "<end_of_text>" inside a text into the special ids; here they are ordinary text, so a caption
  cannot end its row early or hold two eos.
- `sentencepiece:FILE`: a SentencePiece model (`sentencepiece` package), e.g. one trained by
  `vistax tokenizer`, which have pad 0, eos 1, unk 2 and no bos. A user model's own ids are
  used; its bos is prepended when it defines one. A model without eos is refused. A model
  without pad is padded with the lowest id that is neither eos nor bos (0, <unk>, in the
  default layout), which is harmless because rows are read up to their first eos.
- `bytes`: UTF-8 bytes, pad 0, bos 1, eos 2, byte b -> b + 3; vocabulary 259.

Tokenizers pickle as their spec (a worker process re-reads the file through `get`).
"""
from __future__ import annotations

import functools
import gzip
import html
import io
import math
import os
import uuid
from typing import Any, Iterable, Iterator, Sequence

import ftfy
import numpy as np
import regex
import sentencepiece as spm

SCHEMES = ("clip_bpe", "sentencepiece", "bytes")


class Tokenizer:
    """Base class: subclasses set the ids and implement `_encode_batch` / `_decode_content`."""

    spec: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    def __reduce__(self):
        return get, (self.spec,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Content ids (no bos/eos/pad) of each text."""
        raise NotImplementedError

    def _decode_content(self, ids: list[int]) -> str:
        """Text of content ids (no bos/eos)."""
        raise NotImplementedError

    def encode(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int32 (len(texts), length): [bos] + ids + [eos], truncated so that eos is the last kept
        token, right-padded with pad_id. A single str (or bytes, read as UTF-8) is one text."""
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        texts = [_as_text(t) for t in texts]
        prefix = [] if self.bos_id is None else [self.bos_id]
        rows = np.full((len(texts), length), self.pad_id, np.int32)
        for row, content in zip(rows, self._encode_batch(texts)):
            kept = (prefix + content[:max(length - 1 - len(prefix), 0)])[:length - 1]
            row[:len(kept) + 1] = kept + [self.eos_id]
        return rows

    def decode(self, ids) -> str:
        """Text of one row, read up to its first eos, without bos, eos and pad."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"decode takes one row of int ids, got a {ids.dtype} array of shape "
                             f"{ids.shape}")
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        else:
            while ids and ids[-1] == self.pad_id:
                ids.pop()
        if self.bos_id is not None and ids and ids[0] == self.bos_id:
            ids = ids[1:]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} outside the vocabulary [0, {self.vocab_size}) of "
                             f"{self.spec!r}")
        return self._decode_content(ids)


def _as_text(text: Any) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8")
    if isinstance(text, np.str_):
        return str(text)
    if not isinstance(text, str):
        raise TypeError(f"texts must be str (or UTF-8 bytes), got {type(text).__name__}")
    return text


# ---------------------------------------------------------------------------------------------
# Bytes


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes: pad 0, bos 1, eos 2, byte b -> b + 3 (vocabulary 259)."""

    OFFSET = 3

    def __init__(self, spec: str = "bytes"):
        self.spec = spec
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 256 + self.OFFSET

    def _encode_batch(self, texts):
        return [[b + self.OFFSET for b in text.encode("utf-8")] for text in texts]

    def _decode_content(self, ids):
        # A row cut inside a multi-byte character ends in U+FFFD.
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# CLIP byte-level BPE

CLIP_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49152 + 256 byte/word-end symbols
CLIP_END_OF_WORD = "</w>"
# CLIP's pre-tokenisation (as the reference requires it exactly): common English contraction
# suffixes, runs of letters, single digits, runs of other non-space characters.
_CLIP_PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_symbols() -> list[str]:
    """Byte b -> a visible character: bytes that are printable Latin-1 characters stand for
    themselves; the others (controls, space, NBSP, soft hyphen) take 256, 257, ... in order."""
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    spare = iter(range(256, 512))
    return [chr(b) if b in visible else chr(next(spare)) for b in range(256)]


class ClipBpeTokenizer(Tokenizer):
    """OpenAI CLIP's tokenizer read from its merges file (see the module docstring)."""

    _CACHE_LIMIT = 200_000

    def __init__(self, spec: str, path: str):
        self.spec = spec
        try:
            with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(
                    path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer {spec!r}: cannot read the BPE merges file {path!r} "
                             f"({type(e).__name__}: {e})") from e
        # Line 0 is a version header; CLIP uses the first CLIP_NUM_MERGES merges after it.
        merges = [tuple(line.split()) for line in lines[1:1 + CLIP_NUM_MERGES]]
        if len(merges) < CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"tokenizer {spec!r}: {path!r} is not a CLIP BPE merges file (needs "
                             f"a header line and {CLIP_NUM_MERGES} lines 'a b'; got "
                             f"{len(merges)} lines, or some not of two symbols)")
        self._byte_symbol = _byte_symbols()
        self._symbol_byte = {s: b for b, s in enumerate(self._byte_symbol)}
        # Ids: the 256 byte symbols ordered by code point, the same with </w>, one per merge,
        # then <start_of_text> and <end_of_text>. A later duplicate keeps the later id.
        base = sorted(self._byte_symbol, key=ord)
        vocab = base + [s + CLIP_END_OF_WORD for s in base] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self._id_of = {symbol: i for i, symbol in enumerate(vocab)}
        self._symbols = vocab
        self._rank = {merge: i for i, merge in enumerate(merges)}
        self._pieces = regex.compile(_CLIP_PIECES, regex.IGNORECASE)
        self._word_cache: dict[str, list[int]] = {}
        self.vocab_size = len(vocab)
        self.bos_id, self.eos_id, self.pad_id = len(vocab) - 2, len(vocab) - 1, 0

    @staticmethod
    def clean(text: str) -> str:
        """ftfy's fix, HTML entities undone twice, whitespace runs -> one space, lowercase."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _merge(self, symbols: list[str]) -> list[str]:
        """Applies merges lowest rank first, each to all its non-overlapping pairs left to right."""
        while len(symbols) > 1:
            best, best_rank = None, math.inf
            for pair in zip(symbols, symbols[1:]):
                rank = self._rank.get(pair, math.inf)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        ids = self._word_cache.get(word)
        if ids is None:
            symbols = [self._byte_symbol[b] for b in word.encode("utf-8")]
            symbols[-1] += CLIP_END_OF_WORD
            ids = [self._id_of[s] for s in self._merge(symbols)]
            if len(self._word_cache) >= self._CACHE_LIMIT:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    def _encode_batch(self, texts):
        return [[i for word in self._pieces.findall(self.clean(text)) for i in self._word_ids(word)]
                for text in texts]

    def _decode_content(self, ids):
        data = bytearray()
        for i in ids:
            if i >= self.bos_id:
                continue
            symbol = self._symbols[i]
            word_end = symbol.endswith(CLIP_END_OF_WORD)
            data.extend(self._symbol_byte[c] for c in
                        (symbol[:-len(CLIP_END_OF_WORD)] if word_end else symbol))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", "replace").strip()


# ---------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (see the module docstring for its special ids)."""

    def __init__(self, spec: str, path: str):
        self.spec = spec
        try:
            with open(path, "rb") as f:
                proto = f.read()
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer {spec!r}: cannot load the SentencePiece model {path!r} "
                             f"({type(e).__name__}: {e})") from e
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer {spec!r}: the SentencePiece model {path!r} defines no "
                             "eos (end-of-text) piece, which every row ends with; train it with "
                             "eos_id >= 0 (as `vistax tokenizer` does)")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.pad_id() >= 0:
            self.pad_id = self._sp.pad_id()
        else:
            self.pad_id = min(set(range(3)) - {self.eos_id, self.bos_id})

    def _encode_batch(self, texts):
        return self._sp.encode(texts, out_type=int)

    def _decode_content(self, ids):
        return self._sp.decode(ids)


def train_sentencepiece(texts: Iterable[str], out: str, vocab_size: int, *,
                        model_type: str = "bpe", normalization: str = "nmt_nfkc",
                        character_coverage: float = 1.0) -> tuple[SentencePieceTokenizer, int]:
    """Trains a SentencePiece model on `texts` (empty ones skipped) and writes it to `out`.

    The model has pad 0, eos 1, unk 2 and no bos. `model_type`: bpe (default; it reaches the
    asked size on small corpora, where unigram stops early), unigram, char or word.
    `vocab_size` is an upper bound: a small corpus may support fewer pieces (the returned
    tokenizer's vocab_size says how many).
    `normalization` is a SentencePiece rule: nmt_nfkc (default), nfkc, nmt_nfkc_cf, nfkc_cf
    (those two also lowercase) or identity. Refuses an existing `out` (FileExistsError naming
    it); the file appears whole or not at all. Returns the tokenizer and the number of texts.
    """
    if not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an int >= 4, got {vocab_size!r}")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.lexists(out):
        raise FileExistsError(f"{out!r} exists; refusing to overwrite it (remove it or choose "
                              "another path)")
    count = 0

    def sentences() -> Iterator[str]:
        nonlocal count
        for text in texts:
            text = _as_text(text)
            if text.strip():
                count += 1
                yield text

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            hard_vocab_limit=False, model_type=model_type,
            normalization_rule_name=normalization, character_coverage=character_coverage,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        if count == 0:
            raise ValueError("no non-empty texts to train a SentencePiece model on") from None
        raise ValueError(f"SentencePiece training failed: {e}") from e
    directory = os.path.dirname(out)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(model.getvalue())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, out)  # atomic, and fails if `out` appeared meanwhile
        except FileExistsError:
            raise FileExistsError(f"{out!r} exists; refusing to overwrite it (remove it or "
                                  "choose another path)") from None
        except OSError:  # a file system without hard links
            if os.path.lexists(out):
                raise FileExistsError(f"{out!r} exists; refusing to overwrite it") from None
            os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return get(f"sentencepiece:{out}"), count


# ---------------------------------------------------------------------------------------------
# Dataset text


def _text_field(features, field: str):
    """The feature at `field` ('a/b' for nested), which must be Text or a Sequence of Text."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    feature = features
    for part in field.split("/"):
        if isinstance(feature, tfds.features.Sequence):
            feature = feature.feature
        if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature.keys():
            feature = None
            break
        feature = feature[part]
    while isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return feature if isinstance(feature, tfds.features.Text) else None


def _text_fields(features, prefix: str = "") -> list[str]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    while isinstance(features, tfds.features.Sequence):
        features = features.feature
    if isinstance(features, tfds.features.Text):
        return [prefix]
    if isinstance(features, tfds.features.FeaturesDict):
        return [f for k in features.keys()
                for f in _text_fields(features[k], f"{prefix}/{k}" if prefix else k)]
    return []


def _strings(value) -> Iterator[str]:
    if isinstance(value, (bytes, str, np.str_, np.bytes_)):
        yield _as_text(bytes(value) if isinstance(value, np.bytes_) else value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        for item in value:
            yield from _strings(item)
    else:
        raise TypeError(f"expected text, got {type(value).__name__}")


def dataset_texts(dataset: str, split: str, field: str = "caption", data_dir: str | None = None,
                  max_examples: int | None = None, seed: int = 0) -> Iterator[str]:
    """The texts of `field` ('a/b' for nested; each of a list of captions) in `split` of a
    dataset (as `pipeline` resolves it), read through a tfds data source (no TensorFlow).
    max_examples: at most that many records, a fixed random subset in stored order. Checks
    the dataset, split and field when called; reads as the iterator is consumed."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    from vistax.data import pipeline  # pylint: disable=import-outside-toplevel

    builder = tfds.builder_from_directory(pipeline.resolve(dataset, data_dir))
    file_format = builder.info.file_format
    if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"dataset {dataset!r} is stored as {file_format.value}; vistax reads "
                         "ArrayRecord (`tfds build <name> --file_format=array_record`)")
    splits = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; splits: {splits}")
    features = builder.info.features
    if _text_field(features, field) is None:
        raise ValueError(f"dataset {dataset!r} has no text field {field!r}; text fields: "
                         f"{_text_fields(features)}")
    images = [k for k in features.keys() if isinstance(features[k], tfds.features.Image)]
    source = builder.as_data_source(split, decoders={k: tfds.decode.SkipDecoding()
                                                     for k in images})
    indices = np.arange(len(source))
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        if max_examples < len(indices):
            indices = np.sort(np.random.default_rng(seed).choice(
                len(indices), max_examples, replace=False))
    return _read_texts(source, indices, field.split("/"))


def _read_texts(source, indices: np.ndarray, path: list[str]) -> Iterator[str]:
    for start in range(0, len(indices), 1024):
        for record in source.__getitems__([int(i) for i in indices[start:start + 1024]]):
            for key in path:
                record = record[key]
            yield from _strings(record)


# ---------------------------------------------------------------------------------------------
# Specs


@functools.lru_cache(maxsize=None)
def get(spec: str) -> Tokenizer:
    """The tokenizer of `spec` ('clip_bpe:FILE', 'sentencepiece:FILE' or 'bytes'), built once
    per spec. Raises ValueError naming the spec for an unknown scheme or a missing file."""
    if not isinstance(spec, str):
        raise ValueError(f"a tokenizer spec is a str, got {spec!r}")
    scheme, _, argument = spec.partition(":")
    if scheme == "bytes":
        if argument:
            raise ValueError(f"tokenizer {spec!r}: 'bytes' takes no argument")
        return BytesTokenizer(spec)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tokenizer {spec!r}; specs: 'clip_bpe:VOCAB_FILE' (e.g. "
                         "open_clip's bpe_simple_vocab_16e6.txt.gz), 'sentencepiece:MODEL_FILE', "
                         "'bytes'")
    if not argument:
        raise ValueError(f"tokenizer {spec!r} needs a file: '{scheme}:PATH'")
    path = os.path.abspath(os.path.expanduser(argument))
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {spec!r}: file {path!r} does not exist")
    if scheme == "clip_bpe":
        return ClipBpeTokenizer(spec, path)
    return SentencePieceTokenizer(spec, path)
