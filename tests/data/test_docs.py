"""Built-in `docs` dataset: splits, record filters, byte-determinism, reading it by name."""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vistax.data import builtins, pipeline, tokenizers
from vistax.data.builders import docs


@pytest.fixture(scope="module")
def docs_dir(data_dir) -> str:
    """Version directory of the `docs` dataset prepared in the session's data dir."""
    return builtins.prepare_builtin("docs", data_dir)


@pytest.fixture(scope="module")
def records(docs_dir) -> dict[str, list[tuple[str, str]]]:
    """{split: [(source, text)]} as stored."""
    builder = tfds.builder_from_directory(docs_dir)
    out = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split)
        out[split] = [(r["source"].decode(), r["text"].decode())
                      for r in (source[i] for i in range(len(source)))]
    return out


def test_splits_are_disjoint_filtered_and_from_both_sources(docs_dir, records):
    info = tfds.builder_from_directory(docs_dir).info
    assert sorted(info.splits.keys()) == ["test", "train"]
    for split, items in records.items():
        assert items and len(items) == info.splits[split].num_examples
        assert all(len(text) >= docs.MIN_CHARS for _, text in items), split
        assert all(docs.split_of(source, text) == split for source, text in items), split
        assert {source.split(":")[0] for source, _ in items} == {"sklearn", "stdlib"}, split
    texts = {split: [text for _, text in items] for split, items in records.items()}
    assert not set(texts["train"]) & set(texts["test"])
    assert len(set(texts["train"])) == len(texts["train"])
    assert 0.02 < len(texts["test"]) / (len(texts["train"]) + len(texts["test"])) < 0.1
    sources = {source for items in records.values() for source, _ in items}
    assert {"sklearn:iris", "stdlib:argparse"} <= sources
    assert not any(s.startswith(("stdlib:_", "stdlib:test", "stdlib:this", "stdlib:antigravity"))
                   for s in sources)


def test_preparing_twice_writes_identical_files(tmp_path, docs_dir):
    again = builtins.prepare_builtin("docs", str(tmp_path))
    names = sorted(os.listdir(docs_dir))
    assert names == sorted(os.listdir(again))
    assert any(name.endswith("-00000-of-00001") and "-train.array_record" in name
               for name in names)
    for name in names:
        with open(os.path.join(docs_dir, name), "rb") as a, \
                open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_reads_by_name_through_the_pipeline(data_dir, docs_dir, records):
    del docs_dir  # prepared; `dataset="docs"` finds it in data_dir
    spec = "text_window(256)|tokenize('bytes', 258, key='text', out='text')|keep('text')"
    batch = next(pipeline.train_iterator(dataset="docs", split="train", pp=spec,
                                         global_batch_size=16, seed=0, data_dir=data_dir,
                                         process_index=0, process_count=1))
    assert list(batch) == ["text"]  # tokenize with key == out replaces the text by its ids
    assert batch["text"].shape == (16, 258) and batch["text"].dtype == np.int32
    tok = tokenizers.get("bytes")
    corpus = [text.encode("utf-8") for _, text in records["train"]]
    for row in batch["text"]:
        assert row[0] == tok.bos_id and np.sum(row == tok.eos_id) == 1
        content = bytes(int(i) - tok.OFFSET for i in row[1:list(row).index(tok.eos_id)])
        assert 0 < len(content) <= 256
        content.decode("utf-8")  # whole characters only
        assert any(content in text for text in corpus)


def test_rst_sections_split_at_headings_and_directives():
    text = ("Intro.\n.. _x_dataset:\n\nThe X dataset\n-------------\n\nAbout X.\n\n"
            ".. dropdown:: References\n\n  - A paper.\n    Continued.\n\n"
            ".. rubric:: Examples\n\n* an example\n")
    assert docs.rst_sections(text) == [
        ("", "Intro."),  # the link target line is dropped
        ("The X dataset", "About X."),
        ("References", "- A paper.\n  Continued."),
        ("Examples", "* an example")]


def test_docstrings_in_source_order_cleaned_without_importing():
    source = ('"""Module.\n\n    Indented."""\nraise SystemExit("never run")\n'
              'class A:\n    """Class A."""\n    def f(self):\n        """Method f.\n\n'
              '        More."""\n        def g():\n            """Nested g."""\n'
              'if True:\n    async def h():\n        """Coroutine h."""\n'
              'def undocumented():\n    pass\n')
    assert list(docs.docstrings(ast.parse(source), "m")) == [
        ("m", "Module.\n\nIndented."), ("m.A", "Class A."), ("m.A.f", "Method f.\n\nMore."),
        ("m.A.f.g", "Nested g."), ("m.h", "Coroutine h.")]


def test_stdlib_modules_are_sorted_top_level_files(tmp_path):
    for name in ("b.py", "a.py", "_private.py", "test_x.py", "this.py", "antigravity.py",
                 "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "package.py").mkdir()
    assert [os.path.basename(p) for p in docs.stdlib_modules(str(tmp_path))] == ["a.py", "b.py"]
