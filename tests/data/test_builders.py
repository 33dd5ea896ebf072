"""Built-in datasets: split sizes, stratification, byte-determinism, captions vs. pixels."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from sklearn import datasets
import tensorflow_datasets as tfds

from vistax.data import builtins, preprocess
from vistax.data.builders import digits, shapes

_decode = preprocess.parse("decode")


def _records(version_dir: str, split: str) -> list[dict]:
    builder = tfds.builder_from_directory(version_dir)
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i] for i in range(len(source))]


def test_digits_splits_are_stratified_80_20(digits_dir):
    labels = datasets.load_digits().target
    info = tfds.builder_from_directory(digits_dir).info
    assert {s: info.splits[s].num_examples for s in ("train", "test")} == {"train": 1438,
                                                                          "test": 359}
    assert info.features["label"].names == [str(d) for d in range(10)]
    ids = {s: np.array([r["id"] for r in _records(digits_dir, s)]) for s in ("train", "test")}
    assert not set(ids["train"]) & set(ids["test"])
    assert sorted(np.concatenate([ids["train"], ids["test"]])) == list(range(len(labels)))
    for label in range(10):
        in_class = np.sum(labels == label)
        assert np.sum(labels[ids["test"]] == label) == round(0.2 * in_class)


def test_digits_images_are_upscaled_pixels(digits_dir):
    images = datasets.load_digits().images
    for record in _records(digits_dir, "test")[:20]:
        image = _decode({"image": record["image"]}, None)["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        expected = digits.upscale(images[record["id"]])
        np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=-1))


def test_preparing_twice_writes_identical_records(tmp_path, digits_dir, shapes_dir,
                                                  shapes_sizes):
    again_digits = builtins.prepare_builtin("digits", str(tmp_path))
    again_shapes = builtins.prepare_builtin("shapes", str(tmp_path), **shapes_sizes)
    for first, second, split in ((digits_dir, again_digits, "train"),
                                 (shapes_dir, again_shapes, "heldout")):
        name = os.path.basename(os.path.dirname(first))
        assert _records(first, split) == _records(second, split), name
        shard = [f for f in os.listdir(first) if f"-{split}.array_record" in f][0]
        with open(os.path.join(first, shard), "rb") as a, open(os.path.join(second, shard),
                                                              "rb") as b:
            assert a.read() == b.read()


def test_prepare_builtin_concurrently_then_reuses(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(builtins.prepare_builtin("shapes", str(tmp_path), num_train=30,
                                                    num_test=3, num_heldout=3))
        except Exception as e:  # pylint: disable=broad-except  (reported by the assert below)
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    info_file = os.path.join(results[0], "dataset_info.json")
    before = os.stat(info_file)
    assert builtins.prepare_builtin("shapes", str(tmp_path), num_train=30, num_test=3,
                                    num_heldout=3) == results[0]
    after = os.stat(info_file)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VISTAX_DATA_DIR", str(tmp_path))
    assert builtins.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("VISTAX_DATA_DIR")
    assert builtins.default_data_dir().endswith(os.path.join(".cache", "vistax", "datasets"))


def test_prepare_builtin_rejects_unknown_names_and_config(tmp_path):
    with pytest.raises(ValueError, match="'mnist'.*digits.*shapes"):
        builtins.prepare_builtin("mnist", str(tmp_path))
    with pytest.raises(ValueError, match="takes no config"):
        builtins.prepare_builtin("digits", str(tmp_path), num_train=3)


def _objects(record) -> list[dict]:
    sequences = record["objects"]
    return [{key: (value.decode() if isinstance(value, bytes) else value)
             for key, value in zip(sequences, values)} for values in zip(*sequences.values())]


def test_shapes_captions_labels_and_pixels_agree(shapes_dir, shapes_sizes):
    info = tfds.builder_from_directory(shapes_dir).info
    assert info.splits["train"].num_examples == shapes_sizes["num_train"]
    names = info.features["label"].names
    counts = []
    for record in _records(shapes_dir, "test"):
        objects = _objects(record)
        counts.append(len(objects))
        text = record["caption"].decode()
        assert text == shapes.caption(objects)
        for obj in objects:
            assert f"a {obj['colour']} {obj['shape']} {shapes.POSITIONS[obj['position']]}" in text
        assert names[record["label"]] == f"{objects[0]['colour']} {objects[0]['shape']}"
        assert objects[0]["size"] == max(o["size"] for o in objects)
        assert len({o["position"] for o in objects}) == len(objects)
        image = _decode({"image": record["image"]}, None)["image"]
        assert image.shape == (64, 64, 3)
        for obj in objects:  # each shape lies inside its own grid cell
            row, col = divmod(list(shapes.POSITIONS).index(obj["position"]), 3)
            cell = image[round(row * 64 / 3):round((row + 1) * 64 / 3),
                         round(col * 64 / 3):round((col + 1) * 64 / 3)]
            assert np.all(cell == shapes.COLOURS[obj["colour"]], axis=-1).sum() > 20, obj
    assert set(counts) == {1, 2, 3}


def test_shapes_object_centres_have_their_colour():
    rng = np.random.default_rng(0)
    for _ in range(200):
        objects = shapes.sample_objects(rng, "train")
        image = shapes.draw(objects)
        for obj in objects:
            pixel = image[int(round(obj["y"])), int(round(obj["x"]))]
            assert tuple(pixel) == shapes.COLOURS[obj["colour"]], obj


def test_heldout_combinations_never_appear_in_train_or_test(shapes_dir, shapes_sizes):
    for split in ("train", "test"):
        for record in _records(shapes_dir, split):
            combos = {f"{o['colour']} {o['shape']}" for o in _objects(record)}
            assert not combos & set(shapes.HELDOUT), (split, record["caption"])
    heldout = _records(shapes_dir, "heldout")
    assert len(heldout) == shapes_sizes["num_heldout"]
    for record in heldout:
        objects = _objects(record)
        assert f"{objects[0]['colour']} {objects[0]['shape']}" in shapes.HELDOUT
        assert not {f"{o['colour']} {o['shape']}" for o in objects[1:]} & set(shapes.HELDOUT)
