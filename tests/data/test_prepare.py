"""`prepare`: class folders and CSV/TSV captions, skipping bad images, refusing to overwrite."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
import pytest

from vistax.data import pipeline, prepare


def _save(path, array: np.ndarray, fmt: str = "PNG") -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


def _image(seed: int, shape=(12, 16, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _all(dataset: str, split: str, pp: str = "keep('image', 'label', 'file_name')") -> dict:
    batches = list(pipeline.eval_iterator(dataset=dataset, split=split, pp=pp,
                                          global_batch_size=1, process_index=0, process_count=1))
    return {key: [b[key][0] for b in batches] for key in batches[0] if key != "_mask"}


def _corrupt(path) -> None:
    """A PNG cut in half: PIL identifies it, but decoding it fails."""
    data = _save(path, _image(99, (32, 32, 3)))
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_class_folders_with_split_folders(tmp_path):
    root = tmp_path / "images"
    originals = {}
    for split, count in (("train", 3), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            for i in range(count):
                path = root / split / name / f"{i}.png"
                originals[f"{split}/{name}/{i}.png"] = (_save(path, _image(i + 10 * label)),
                                                        label)
    _corrupt(root / "train" / "cat" / "broken.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _save(root / "val" / "dog" / "grey.jpg", _image(5, (20, 40)), fmt="JPEG")

    report = prepare.prepare(str(root), str(tmp_path / "out"))
    assert report.splits == {"train": 6, "validation": 5} and report.written == 11  # val/ renamed
    assert report.skipped == 2
    assert sorted(os.path.basename(p) for p in report.skipped_paths) == ["broken.png",
                                                                         "notes.txt"]
    assert "skipped 2" in report.summary()

    info = pipeline.dataset_info(report.output_dir)
    assert info.class_names == ["cat", "dog"] and info.num_examples == {"train": 6, "validation": 5}
    val = _all(report.output_dir, "validation", pp="keep('image', 'label', 'file_name')")
    for image, label, name in zip(val["image"], val["label"], val["file_name"]):
        if name in originals:  # RGB PNGs are stored as they were
            assert image == originals[name][0] and label == originals[name][1]
        else:  # a greyscale JPEG is re-encoded as RGB JPEG
            assert name == "val/dog/grey.jpg" and label == 1
            with Image.open(io.BytesIO(image)) as decoded:
                assert decoded.format == "JPEG" and decoded.mode == "RGB"
                assert decoded.size == (40, 20)


def test_class_folders_without_split_folders_and_max_size(tmp_path):
    for i in range(2):
        _save(tmp_path / "in" / "b" / f"{i}.png", _image(i, (30, 60, 3)))
    _save(tmp_path / "in" / "a" / "x.png", _image(7, (8, 8, 3)))
    report = prepare.prepare(str(tmp_path / "in"), str(tmp_path / "out"), split="full",
                             max_size=20)
    assert report.splits == {"full": 3} and report.skipped == 0
    data = _all(report.output_dir, "full", pp="decode|keep('image', 'label')")
    assert [img.shape for img in data["image"]] == [(8, 8, 3), (10, 20, 3), (10, 20, 3)]
    assert data["label"] == [0, 1, 1]


@pytest.mark.parametrize("extension, delimiter", [(".csv", ","), (".tsv", "\t"),
                                                  (".txt", "\t")])
def test_captions_table_skips_missing_and_corrupt_images(tmp_path, extension, delimiter):
    png = _save(tmp_path / "imgs" / "a.png", _image(1))
    _save(tmp_path / "imgs" / "b.png", _image(2))
    _corrupt(tmp_path / "imgs" / "bad.png")
    absolute = tmp_path / "elsewhere" / "c.png"
    _save(absolute, _image(3))
    rows = [("path", "text"), ("imgs/a.png", "a red, round thing"), ("imgs/missing.png", "gone"),
            ("imgs/bad.png", "corrupt"), ("imgs/b.png", "second"), (str(absolute), "absolute")]
    table = tmp_path / f"captions{extension}"
    table.write_text("".join(delimiter.join(
        f'"{c}"' if delimiter in c else c for c in row) + "\n" for row in rows))

    report = prepare.prepare(str(table), str(tmp_path / "ds"), image_column="path",
                             caption_column="text")
    assert report.written == 3 and report.skipped == 2
    assert sorted(os.path.basename(p) for p in report.skipped_paths) == ["bad.png",
                                                                         "missing.png"]
    data = _all(report.output_dir, "train", pp="keep('image', 'caption', 'file_name')")
    assert data["caption"] == ["a red, round thing", "second", "absolute"]
    assert data["image"][0] == png
    assert data["file_name"][:2] == ["imgs/a.png", "imgs/b.png"]
    assert pipeline.dataset_info(report.output_dir).class_names is None


def test_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path):
    _save(tmp_path / "in" / "only" / "0.png", _image(0))
    first = prepare.prepare(str(tmp_path / "in"), str(tmp_path / "out"))
    info_file = os.path.join(first.output_dir, "dataset_info.json")
    before = os.stat(info_file).st_mtime_ns
    with pytest.raises(FileExistsError, match=str(tmp_path / "out")):
        prepare.prepare(str(tmp_path / "in"), str(tmp_path / "out"))
    assert os.stat(info_file).st_mtime_ns == before
    _save(tmp_path / "in" / "only" / "1.png", _image(1))
    second = prepare.prepare(str(tmp_path / "in"), str(tmp_path / "out"), overwrite=True)
    assert second.written == 2 and pipeline.dataset_info(second.output_dir).num_examples == {
        "train": 2}
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare.prepare(str(tmp_path / "in"), str(tmp_path / "mine"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["in", "mine", "out"]  # no temporary leftovers


def test_bad_input_fails_before_writing(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nx.png,y\n")
    with pytest.raises(ValueError,
                       match=r"column 'text' not in the header.*\['image', 'caption'\]"):
        prepare.prepare(str(table), str(tmp_path / "out"), caption_column="text")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare.prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        prepare.prepare(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["captions.csv", "empty"]


def test_no_readable_image_is_an_error_without_output(tmp_path):
    _corrupt(tmp_path / "in" / "cls" / "bad.png")
    with pytest.raises(ValueError, match="no readable images in split"):
        prepare.prepare(str(tmp_path / "in"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["in"]
