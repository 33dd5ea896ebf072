"""`vistax prepare`: converts user images into a tfds ArrayRecord dataset that pipelines read.

Two inputs:
- `folder`: class subfolders (`root/<class>/**/<image>`, classes sorted by name) -> image, label,
  file_name; or split subfolders (train/, test/, val/, validation/) that each hold class
  subfolders -> one split each (val/ is named `validation`), with the sorted union of class
  names.
- `captions`: a CSV or TSV with a header, one column of image paths (relative to the file's
  folder, or absolute) and one of captions -> image, caption, file_name.

Images are stored encoded: the original bytes when the file is an RGB PNG or JPEG that PIL
verifies and fully decodes and that needs no downscaling; otherwise re-encoded as RGB (PNG,
or JPEG quality 95 when the source was a JPEG: PNG would inflate photos several times).
`max_size` downscales (Lanczos) so the longer side is at most that. An image that cannot be
read or decoded is skipped, counted and named in the report; it never stops the run.

Bad input (missing path, missing column) fails before anything is written. The dataset is
written into a temporary sibling of `output_dir` and renamed into place at the end, so an
interrupted run leaves no partial output; an existing output is refused unless
overwrite=True, and even then only a prepared dataset (with dataset_info.json) is replaced,
after the new one is complete.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shutil
import tempfile
from typing import Iterator

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from vistax.data.builders import base

SPLIT_FOLDERS = ("train", "test", "val", "validation")
_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


@dataclasses.dataclass
class PrepareReport:
    """What `prepare` wrote and skipped."""

    output_dir: str
    splits: dict[str, int] = dataclasses.field(default_factory=dict)  # examples written per split
    skipped_paths: list[str] = dataclasses.field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(self.splits.values())

    @property
    def skipped(self) -> int:
        return len(self.skipped_paths)

    def summary(self) -> str:
        per_split = ", ".join(f"{name}: {n}" for name, n in self.splits.items())
        lines = [f"wrote {self.written} examples ({per_split}) to {self.output_dir}",
                 f"skipped {self.skipped} (unreadable or missing images, rows without one)"]
        lines += [f"  {path}" for path in self.skipped_paths[:20]]
        if self.skipped > 20:
            lines.append(f"  ... and {self.skipped - 20} more")
        return "\n".join(lines)


def encode_image(path: str, max_size: int | None = None) -> bytes:
    """Bytes to store for the image file at `path` (see module docstring); raises if unreadable."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # structural check; the image must be reopened after it
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # full decode: catches truncated files that verify() lets through
        source_format = image.format
        too_big = max_size is not None and max(image.size) > max_size
        if source_format in ("PNG", "JPEG") and image.mode == "RGB" and not too_big:
            return data
        rgb = image.convert("RGB")
    if too_big:
        scale = max_size / max(rgb.size)
        new_size = tuple(max(1, round(s * scale)) for s in rgb.size)
        rgb = rgb.resize(new_size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if source_format == "JPEG":
        rgb.save(buffer, format="JPEG", quality=95)
    else:
        rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def _visible_dirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path)
                  if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _files_below(path: str) -> list[str]:
    """Sorted non-hidden files below `path`, recursively."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return sorted(found)


def _folder_plan(root: str, split: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(class names, {split: [(image path, label)]}) of a class-folder tree."""
    subdirs = _visible_dirs(root)
    split_dirs = [d for d in subdirs if d in SPLIT_FOLDERS]
    if "val" in split_dirs and "validation" in split_dirs:
        raise ValueError(f"{root} has both val/ and validation/: both would be the `validation` "
                         "split; keep one")
    if split_dirs and len(split_dirs) != len(subdirs):
        raise ValueError(f"{root} mixes split folders {split_dirs} with other folders "
                         f"{sorted(set(subdirs) - set(split_dirs))}; expected only split "
                         f"folders ({', '.join(SPLIT_FOLDERS)}) or only class folders")
    # A `val/` folder becomes the `validation` split, the name tfds datasets and configs use.
    split_roots = ({("validation" if d == "val" else d): os.path.join(root, d) for d in split_dirs}
                   if split_dirs else {split: root})
    classes_per_split = {name: _visible_dirs(path) for name, path in split_roots.items()}
    for name, classes in classes_per_split.items():
        if not classes:
            raise ValueError(f"{split_roots[name]} has no class subfolders; expected "
                             f"<class>/<image> below it")
    class_names = sorted(set().union(*classes_per_split.values()))
    plan = {}
    for name, path in split_roots.items():
        plan[name] = [(file, class_names.index(cls)) for cls in classes_per_split[name]
                      for file in _files_below(os.path.join(path, cls))]
    return class_names, plan


def _captions_plan(table: str, split: str, image_column: str, caption_column: str
                   ) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """({split: [(image path, caption)]}, descriptions of rows without an image path)."""
    with open(table, newline="", encoding="utf-8-sig") as f:
        sample = f.read(65536)
        f.seek(0)
        extension = os.path.splitext(table)[1].lower()
        if extension in _DELIMITERS:
            delimiter = _DELIMITERS[extension]
        else:
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",\t").delimiter
            except csv.Error as e:
                raise ValueError(f"cannot tell whether {table} is a CSV or a TSV ({e}); name it "
                                 f".csv or .tsv") from e
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        for column in (image_column, caption_column):
            if column not in header:
                raise ValueError(f"column {column!r} not in the header of {table}; header: "
                                 f"{header}")
        rows = list(reader)
    folder = os.path.dirname(os.path.abspath(table))
    examples, bad_rows = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        image, caption = row.get(image_column), row.get(caption_column)
        if not image or caption is None:
            bad_rows.append(f"{table}:{line} (no image path or caption)")
            continue
        examples.append((os.path.join(folder, os.path.expanduser(image)), caption))
    return {split: examples}, bad_rows


def _builder_name(name: str) -> str:
    """A tfds-valid dataset name (snake_case identifier) from any string."""
    cleaned = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return cleaned if re.match(r"^[a-z]", cleaned) else f"dataset_{cleaned}"


class _PreparedDataset(base.ArrayRecordBuilder, skip_registration=True):
    """Builder of a user dataset whose examples come from `splits` (see `prepare`)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, name: str, data_dir: str, features: tfds.features.FeaturesDict,
                 description: str, splits: dict[str, Iterator[tuple[int, dict]]]):
        self.name = name
        self._feature_spec = features
        self._description_text = description
        self._splits = splits
        super().__init__(data_dir=data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return base.make_info(self, self._feature_spec, self._description_text)

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        return {split: self._generate_examples(examples)
                for split, examples in self._splits.items()}

    def _generate_examples(self, examples):
        yield from examples


def _examples(items, report: PrepareReport, split: str, root: str, max_size: int | None,
              field: str):
    """(key, example) for every readable image of `items` [(path, label or caption)]; counts
    the written ones in report.splits[split] and the skipped ones in report.skipped_paths."""
    report.splits[split] = 0
    for index, (path, value) in enumerate(items):
        try:
            image = encode_image(path, max_size)
        except Exception as e:  # pylint: disable=broad-except  (any unreadable file is skipped)
            logging.warning("skipping %s: %s: %s", path, type(e).__name__, e)
            report.skipped_paths.append(path)
            continue
        file_name = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
        report.splits[split] += 1
        yield index, {"image": image, field: value, "file_name": file_name}


def prepare(input_path: str, output_dir: str, *, kind: str = "auto", split: str = "train",
            name: str | None = None, image_column: str = "image",
            caption_column: str = "caption", max_size: int | None = None,
            overwrite: bool = False) -> PrepareReport:
    """Converts a class-folder tree or a CSV/TSV of image path + caption into a dataset at
    `output_dir` (the directory that `dataset=` of the pipelines accepts).

    kind: 'auto' (a directory is 'folder', a file is 'captions'), 'folder' or 'captions'.
    split: the split name when the input has no split folders. name: the tfds dataset name
    (default: from output_dir's name). Returns a PrepareReport; `report.summary()` says it.
    """
    input_path = os.path.abspath(os.path.expanduser(input_path))
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"input_path {input_path} does not exist")
    if kind == "auto":
        kind = "folder" if os.path.isdir(input_path) else "captions"
    if kind not in ("folder", "captions"):
        raise ValueError(f"kind must be 'auto', 'folder' or 'captions', got {kind!r}")
    if kind == "folder" and not os.path.isdir(input_path):
        raise ValueError(f"kind='folder' needs a directory, {input_path} is a file")
    if kind == "captions" and not os.path.isfile(input_path):
        raise ValueError(f"kind='captions' needs a CSV/TSV file, {input_path} is a directory")
    if not re.fullmatch(r"\w+", split) or split.lower() == "all":
        raise ValueError(f"split must be a name of letters, digits and _ other than 'all' "
                         f"(reserved by tfds), got {split!r}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    if os.path.lexists(output_dir):
        if not overwrite:
            raise FileExistsError(f"output_dir {output_dir} already exists; pass overwrite=True "
                                  "to replace it")
        if not os.path.isfile(os.path.join(output_dir, "dataset_info.json")):
            raise FileExistsError(f"output_dir {output_dir} exists and is not a prepared dataset "
                                  "(no dataset_info.json); refusing to replace it")

    report = PrepareReport(output_dir=output_dir)
    image_feature = tfds.features.Image(shape=(None, None, 3))
    if kind == "folder":
        class_names, plan = _folder_plan(input_path, split)
        features = tfds.features.FeaturesDict({
            "image": image_feature,
            "label": tfds.features.ClassLabel(names=class_names),
            "file_name": tfds.features.Text(),
        })
        field, root = "label", input_path
        description = f"Images in class folders of {input_path}."
    else:
        plan, bad_rows = _captions_plan(input_path, split, image_column, caption_column)
        report.skipped_paths.extend(bad_rows)
        features = tfds.features.FeaturesDict({
            "image": image_feature,
            "caption": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        })
        field, root = "caption", os.path.dirname(input_path)
        description = f"Images and captions listed in {input_path}."

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        builder = _PreparedDataset(
            name=_builder_name(name or os.path.basename(output_dir)), data_dir=staging,
            features=features, description=description,
            splits={s: _examples(items, report, s, root, max_size, field)
                    for s, items in plan.items()})
        try:
            builder.download_and_prepare()
        except AssertionError as e:  # tfds' writer refuses a split without examples
            empty = [s for s in plan if not report.splits.get(s)]
            if not empty:
                raise
            raise ValueError(f"no readable images in split(s) {empty} of {input_path}; nothing "
                             f"was written\n{report.summary()}") from e
        _move_into_place(str(builder.data_path), output_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logging.info("%s", report.summary())
    return report


def _move_into_place(built: str, output_dir: str, overwrite: bool) -> None:
    """Renames `built` to `output_dir`; an existing output is replaced only if `overwrite`."""
    if not os.path.lexists(output_dir):
        os.rename(built, output_dir)  # fails rather than clobber if output_dir appeared meanwhile
        return
    if not overwrite:
        raise FileExistsError(f"output_dir {output_dir} appeared while preparing; the new "
                              "dataset was discarded")
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-",
                               dir=os.path.dirname(output_dir))
    os.rename(output_dir, os.path.join(retired, "dataset"))
    os.rename(built, output_dir)
    shutil.rmtree(retired)
