"""Train/eval iterators: determinism, epochs, process sharding, checkpointing, eval padding."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vistax.data import pipeline, preprocess

AUGMENT = "decode|random_resized_crop(24, scale=(0.3, 1.0))|flip_lr|value_range(0, 1)"
TRAIN_PP = AUGMENT + "|keep('image', 'label', 'id')"


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a: list[dict], batches_b: list[dict]) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture
def train(shapes_dir):
    """train_iterator over the small shapes train split (240 examples), single process."""

    def make(**kwargs):
        args = dict(dataset=shapes_dir, split="train", pp=TRAIN_PP, global_batch_size=16, seed=0,
                    process_index=0, process_count=1)
        return pipeline.train_iterator(**{**args, **kwargs})

    return make


def test_batches_have_local_shape_and_dtypes(train):
    batch = next(train(process_index=1, process_count=2))
    assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["id"].dtype == np.int64
    # Without process_index/process_count, jax's (one process here) are used.
    _assert_same([next(train(process_index=None, process_count=None))], [next(train())])


def test_same_seed_same_batches_other_seed_other_batches(train):
    _assert_same(_take(train(), 3), _take(train(), 3))
    other = _take(train(seed=1), 3)
    assert not np.array_equal(other[0]["id"], _take(train(), 1)[0]["id"])
    # input.read_threads changes how many batches are made at once, not which (0: in the
    # consumer's thread).
    _assert_same(_take(train(read_threads=0), 3), _take(train(read_threads=3), 3))
    _assert_same(_take(train(read_threads=1), 3), _take(train(), 3))


def test_every_example_once_per_epoch_in_a_new_order(train, shapes_sizes, shapes_dir):
    n = shapes_sizes["num_train"]
    ids = np.concatenate([b["id"] for b in _take(train(pp="keep('id')"), 3 * n // 16)])
    epochs = ids.reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # The order is grain's `shuffle` of the split (seeded by the run's seed), computed in blocks.
    records = pipeline._records(shapes_dir, "train", None)  # pylint: disable=protected-access
    seed = int(np.random.default_rng([0, 0, 0]).integers(2**32))
    grains = grain.MapDataset.source(records).shuffle(seed=seed).repeat()
    np.testing.assert_array_equal(ids, [grains[i]["id"] for i in range(3 * n)])


@pytest.mark.parametrize("seed, stream, index", [
    (0, 1, 0), (0, 0, 0), (7, 1, 12345), (2**32 - 1, 2, 2**32 - 1), (3, 1, 2**32),
    (2**32, 1, 5), (2**40 + 3, 2, 2**63 - 1)])
def test_element_generators_are_default_rng_of_seed_stream_index(seed, stream, index):
    """The fast path (one uint32 array) seeds exactly as the list does, on both sides of 2**32."""
    # pylint: disable-next=protected-access
    got, want = pipeline._rng(seed, stream, index), np.random.default_rng([seed, stream, index])
    np.testing.assert_array_equal(got.integers(0, 2**63, 16), want.integers(0, 2**63, 16))
    assert got.random() == want.random()


def test_augmentation_differs_between_epochs(train, shapes_sizes):
    n = shapes_sizes["num_train"]
    batches = _take(train(pp=AUGMENT + "|keep('image', 'id')"), 2 * n // 16)
    ids = np.concatenate([b["id"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    first, second = np.flatnonzero(ids == 7)
    assert not np.array_equal(images[first], images[second])


def test_two_processes_together_make_the_single_process_batches(train):
    single = _take(train(), 20)  # more than one epoch (15 batches)
    shards = [_take(train(process_index=p, process_count=2), 20) for p in range(2)]
    for step, global_batch in enumerate(single):
        for p in range(2):
            # Process p holds rows p, p + 2, ... of the global batch, with the same augmentation.
            _assert_same([shards[p][step]], [{k: v[p::2] for k, v in global_batch.items()}])


def test_start_step_continues_the_stream_on_any_process_count(train):
    """A run saved after 13 steps on 2 processes continues on 1 or 4 with the examples (and
    augmentations) an uninterrupted run would see next, crossing the epoch boundary."""
    single = _take(train(), 18)
    for count in (1, 2, 4):
        shards = [_take(train(process_index=p, process_count=count, start_step=13), 5)
                  for p in range(count)]
        for step, global_batch in enumerate(single[13:]):
            for p in range(count):
                _assert_same([shards[p][step]], [{k: v[p::count] for k, v in global_batch.items()}])
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        train(start_step=-1)


def test_get_state_set_state_resumes_exactly(train):
    iterator = train()
    _take(iterator, 13)
    state = iterator.get_state()
    expected = _take(iterator, 5)  # crosses the epoch boundary at batch 15
    resumed = train()
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), expected)


def test_orbax_composite_checkpoint_restores_the_stream(train, tmp_path):
    iterator = train()
    _take(iterator, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 3)
    restored = train()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(4, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same(_take(restored, 3), expected)


def test_worker_processes_give_the_same_batches_and_resume(train):
    expected = _take(train(), 6)
    iterator = train(worker_count=2)
    try:
        _assert_same(_take(iterator, 3), expected[:3])
        state = iterator.get_state()
        _assert_same(_take(iterator, 3), expected[3:])
        iterator.set_state(state)
        _assert_same(_take(iterator, 3), expected[3:])
    finally:
        iterator.close()


def test_cache_gives_the_same_batches_over_epochs_and_checks_memory(train, monkeypatch):
    # 20 batches are more than one epoch (15), so the second epoch is served from the cache,
    # with `decode` already applied and the random ops drawing the same numbers.
    _assert_same(_take(train(cache=True), 20), _take(train(), 20))
    # A pp starting with a random op caches the records as read.
    raw = "text_window(8, key='caption')|" + TRAIN_PP
    _assert_same(_take(train(pp=raw, cache=True), 16), _take(train(pp=raw), 16))
    with pytest.raises(ValueError, match="input.cache must be True or False, got 'yes'"):
        train(cache="yes")
    monkeypatch.setattr(pipeline, "physical_memory", lambda: 2**20)  # 1 MiB: too little
    with pytest.raises(ValueError, match=r"input.cache=True would hold .* after 'decode'"):
        train(cache=True)


def test_elementwise_tail_on_the_batch_gives_the_same_batches(train, digits_dir, monkeypatch):
    # TRAIN_PP's value_range runs on each stacked batch; with every op per example (the split
    # turned off) the batches are the same, bit for bit, in training and evaluation.
    def evaluate():
        return list(pipeline.eval_iterator(
            dataset=digits_dir, split="test", global_batch_size=100, process_index=0,
            process_count=1, pp="decode|value_range(-1, 1)|normalize(0.5, 0.2)|keep('image')"))

    batched_train, batched_eval = _take(train(cache=True), 20), evaluate()
    monkeypatch.setattr(preprocess.Preprocess, "split_batch_ops",
                        lambda self: (self, preprocess.parse("")))
    _assert_same(batched_train, _take(train(cache=True), 20))
    _assert_same(batched_eval, evaluate())


def test_examples_that_cannot_be_stacked_name_the_key_and_spec():
    batch = pipeline._Batch(lambda i: {"ok": np.int64(i), "x": np.zeros(i + 1)},
                            preprocess.parse(""), "my|pp", first=0, stride=1, size=2)
    with pytest.raises(ValueError, match=r"pp output 'x' cannot be batched: .* of 'my\|pp' must"):
        batch(0)


_TRAINER = """
import sys
from vistax.data import pipeline
if __name__ == "__main__":
    it = pipeline.train_iterator(dataset=sys.argv[1], split="train", pp="keep('id')",
                                 global_batch_size=16, seed=0, process_index=0, process_count=1,
                                 worker_count=2)
    next(it)
    print("ready", flush=True)
    sys.stdin.read()
"""


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def _running(pid: int) -> bool:
    """Whether pid exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_processes_exit_with_a_killed_trainer(shapes_dir, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    proc = subprocess.Popen([sys.executable, str(script), shapes_dir], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = []
        for pid in _children(proc.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():  # not multiprocessing's resource tracker
                    workers.append(pid)
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in workers)
    finally:
        proc.kill()


def test_eval_pads_and_masks_so_each_example_appears_once(shapes_dir, shapes_sizes):
    n = shapes_sizes["num_test"]  # 48 examples, global batch 9: 6 batches, 6 padding rows
    per_process = [list(pipeline.eval_iterator(
        dataset=shapes_dir, split="test", global_batch_size=9,
        pp="decode|value_range(-1, 1)|keep('image', 'caption', 'id')",
        process_index=p, process_count=3)) for p in range(3)]
    assert [len(batches) for batches in per_process] == [6, 6, 6]
    seen = []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (3, 64, 64, 3) and batch["_mask"].dtype == bool
            assert isinstance(batch["caption"][0], str)
            seen += list(batch["id"][batch["_mask"]])
    assert sorted(seen) == list(range(n))
    assert sum((~b["_mask"]).sum() for batches in per_process for b in batches) == 6


def test_eval_single_process_keeps_stored_order(digits_dir):
    batches = list(pipeline.eval_iterator(dataset=digits_dir, split="test", pp="keep('id')",
                                          global_batch_size=100, process_index=0,
                                          process_count=1))
    ids = np.concatenate([b["id"][b["_mask"]] for b in batches])
    assert len(batches) == 4 and np.all(np.diff(ids) > 0) and len(ids) == 359


def test_dataset_info(digits_dir, shapes_dir, data_dir):
    info = pipeline.dataset_info("digits", data_dir=data_dir)
    assert info.path == digits_dir
    assert info.num_examples == {"train": 1438, "test": 359}
    assert info.class_names == [str(d) for d in range(10)]
    assert sorted(info.features) == ["id", "image", "label"]
    shapes_info = pipeline.dataset_info(shapes_dir)
    assert len(shapes_info.class_names) == 30 and "red circle" in shapes_info.class_names
    assert {"caption", "objects"} <= set(shapes_info.features)


def test_errors_name_the_offending_values(train, data_dir, digits_dir):
    with pytest.raises(ValueError, match="global_batch_size=15.*process_count=2"):
        train(global_batch_size=15, process_count=2)
    with pytest.raises(ValueError, match="240 examples, fewer than one global batch of 256"):
        train(global_batch_size=256)
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['heldout', 'test', 'train'\]"):
        train(split="validation")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet2012'.*'digits', 'docs', 'shapes'"):
        pipeline.dataset_info("imagenet2012")
    with pytest.raises(ValueError, match="no dataset_info.json.*below it.*digits"):
        pipeline.dataset_info(data_dir)
    with pytest.raises(ValueError, match="read_threads=-1 must be >= 0"):
        train(read_threads=-1)
    with pytest.raises(ValueError, match="unknown pp op 'flip'"):
        train(pp="decode|flip")
    with pytest.raises(ValueError, match="'objects' is a dict, which cannot be batched"):
        next(train(pp="decode"))


def test_no_tensorflow_is_imported(train):
    next(train())
    assert "tensorflow" not in sys.modules
