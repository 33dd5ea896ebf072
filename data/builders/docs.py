"""`docs`: English text that ships with installed packages, for byte-level language models.

Records come from two sources, in this order:
- scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`, files sorted by name),
  one record per section: a section starts at a heading (a line underlined with `-`, `=`, ...)
  or a `.. dropdown::` / `.. rubric::` directive, and its record is the title, a blank line and
  the dedented body. Link targets (`.. _name:`) are dropped; other markup is kept as written.
  `source` is "sklearn:<file stem>", e.g. "sklearn:iris".
- the docstrings of the Python standard library's top-level modules (the `*.py` files directly
  in `sysconfig.get_paths()["stdlib"]`, sorted by name, without names starting with `_` or
  `test`, and without `this` and `antigravity`), read with `ast` (nothing is imported): the
  module's docstring, then those of its classes and functions (methods and nested definitions
  included) in source order, each cleaned with `inspect.cleandoc`. `source` is "stdlib:" and
  the dotted path, e.g. "stdlib:argparse" or "stdlib:argparse.ArgumentParser.parse_args".

Records shorter than MIN_CHARS (64) characters are dropped, and so is a text equal to an
earlier record's (so no text is in both splits). A record is in `test` when
zlib.crc32(source + "\\n" + text) % 20 == 0 (about 5%), else in `train`; both splits keep the
order above. Preparing twice on one installation writes identical bytes; the text depends on
the installed Python and scikit-learn (their versions are in the dataset's description), and
a prepared dataset is never refreshed.

Sizes measured with Python 3.11.7 and scikit-learn 1.9.1: train 2016 records (0.73 MB of
UTF-8 text), test 106 records (0.035 MB); 33 records (31 train, 2 test) come from sklearn, the
rest from 149 stdlib modules. Records are short: median 200 bytes, 31% under 128 bytes, 82%
under 512, longest 6.3 kB; nearly all ASCII. Preparing takes about 2.5-3.5 s.
"""
from __future__ import annotations

import ast
import importlib.resources
import inspect
import os
import platform
import re
import sysconfig
import textwrap
import zlib
from typing import Iterator

import tensorflow_datasets as tfds

from vistax.data.builders import base

MIN_CHARS = 64
TEST_MODULUS = 20  # crc32 % TEST_MODULUS == 0 -> test
SKIPPED_MODULES = ("this", "antigravity")  # besides names starting with "_" or "test"

_TARGET = re.compile(r"^\.\. _[^:]*:\s*$")  # an rst link target line, e.g. ".. _iris_dataset:"
_DIRECTIVE_SECTION = re.compile(r"^\.\. (?:dropdown|rubric)::\s*(.*?)\s*$")
_UNDERLINE = re.compile(r"^([-=~^*#\"'`+])\1{2,}\s*$")


def rst_sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of each section of an rst file (see module docstring); text before the
    first section has the title ""."""
    lines = [line for line in text.splitlines() if not _TARGET.match(line)]
    sections, title, body = [], "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE_SECTION.match(line)
        is_heading = (i + 1 < len(lines) and line.strip() and not line[0].isspace()
                      and _UNDERLINE.match(lines[i + 1])
                      and len(lines[i + 1].strip()) >= len(line.strip()))
        if directive or is_heading:
            sections.append((title, body))
            title, body = (directive.group(1) if directive else line.strip()), []
            i += 1 if directive else 2
            continue
        body.append(line)
        i += 1
    sections.append((title, body))
    return [(title, textwrap.dedent("\n".join(body)).strip()) for title, body in sections
            if title or "".join(body).strip()]


def sklearn_records() -> Iterator[tuple[str, str]]:
    """(source, text) of every section of scikit-learn's dataset descriptions."""
    descr = importlib.resources.files("sklearn.datasets.descr")
    for entry in sorted((e for e in descr.iterdir() if e.name.endswith(".rst")),
                        key=lambda e: e.name):
        source = f"sklearn:{entry.name[:-len('.rst')]}"
        for title, body in rst_sections(entry.read_text(encoding="utf-8")):
            yield source, "\n\n".join(part for part in (title, body) if part)


def stdlib_modules(stdlib_dir: str | None = None) -> list[str]:
    """Sorted paths of the standard library's top-level modules that `docs` reads."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    names = sorted(name for name in os.listdir(stdlib_dir)
                   if name.endswith(".py") and os.path.isfile(os.path.join(stdlib_dir, name)))
    return [os.path.join(stdlib_dir, name) for name in names
            if not name.startswith(("_", "test")) and name[:-3] not in SKIPPED_MODULES]


def docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(dotted name, cleaned docstring) of a module and of its classes and functions, nested
    ones included, in source order."""

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=False)
                if doc:
                    yield name, inspect.cleandoc(doc)
                yield from visit(child, name)
            else:
                yield from visit(child, prefix)

    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield module, inspect.cleandoc(doc)
    yield from visit(tree, module)


def stdlib_records(stdlib_dir: str | None = None) -> Iterator[tuple[str, str]]:
    """(source, text) of every docstring of the standard library's top-level modules."""
    for path in stdlib_modules(stdlib_dir):
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)  # honours a coding cookie
        module = os.path.basename(path)[:-3]
        for name, text in docstrings(tree, module):
            yield f"stdlib:{name}", text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be stored as UTF-8
        return False
    return True


def records() -> list[tuple[str, str]]:
    """(source, text) of all records, in order, after the length and duplicate filters."""
    kept, seen = [], set()
    for source, text in (*sklearn_records(), *stdlib_records()):
        if len(text) >= MIN_CHARS and text not in seen and _is_utf8(text):
            seen.add(text)
            kept.append((source, text))
    return kept


def split_of(source: str, text: str) -> str:
    """'test' for about 1 in TEST_MODULUS records (a crc32 of source and text), else 'train'."""
    digest = zlib.crc32(f"{source}\n{text}".encode("utf-8"))
    return "test" if digest % TEST_MODULUS == 0 else "train"


class Docs(base.ArrayRecordBuilder, skip_registration=True):
    """tfds builder of the `docs` dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn dataset descriptions and stdlib docstrings, crc32 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        import sklearn  # pylint: disable=import-outside-toplevel  (slow import)

        features = tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(doc="'sklearn:<file>' or 'stdlib:<dotted name>'."),
        })
        made_from = (f"\nMade from Python {platform.python_version()} and scikit-learn "
                     f"{sklearn.__version__}.")
        return base.make_info(self, features, __doc__ + made_from)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the text ships with Python and scikit-learn.
        by_split = {"train": [], "test": []}
        for source, text in records():
            by_split[split_of(source, text)].append((source, text))
        return {split: self._generate_examples(items) for split, items in by_split.items()}

    def _generate_examples(self, items: list[tuple[str, str]]):
        for index, (source, text) in enumerate(items):
            yield index, {"text": text, "source": source}
