"""Host data pipelines: tfds ArrayRecord datasets read with `tfds` data sources + grain, no TF.

`train_iterator` is infinite and checkpointable; `eval_iterator` is finite, padded and masked.
Both read records through `builder.as_data_source` with images left encoded (decoded by the
`decode` pp op) and text as `str`, and shard by global element index so that the batches of all
processes together are exactly the batches of a single-process run:

    global stream:  shuffle(epoch 0) ++ shuffle(epoch 1) ++ ...   (element index g = 0, 1, 2, ...)
    process p:      elements g = p, p + P, p + 2P, ...  batched by B / P
    => step t of process p holds g = tB + p + kP (k < B/P); all p together: g in [tB, (t+1)B).

Augmentation randomness is a function of (seed, g) only, so it is the same on resume, for any
number of processes or workers, and differs between epochs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
import time
from typing import Any, Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from vistax.data import builtins
from vistax.data import preprocess as preprocess_lib
from vistax.data import shuffle as shuffle_lib

MASK_KEY = "_mask"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What evaluators and configs need to know about a prepared dataset."""

    path: str  # the version directory holding dataset_info.json
    num_examples: dict[str, int]
    class_names: list[str] | None  # names of a ClassLabel feature 'label', if there is one
    features: list[str]  # top-level feature names


def _find_prepared(directory: str) -> list[str]:
    """Directories up to 3 levels below `directory` that hold a dataset_info.json."""
    found = []
    for root, dirs, files in os.walk(directory):
        if "dataset_info.json" in files:
            found.append(root)
        if root[len(directory):].count(os.sep) >= 3:
            dirs.clear()
    return sorted(found)


def _version_dirs(root: str) -> list[str]:
    """Version subfolders (x.y.z) of `root` that hold a dataset_info.json, oldest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        parts = name.split(".")
        if all(p.isdigit() for p in parts) and os.path.isfile(
                os.path.join(root, name, "dataset_info.json")):
            found.append((tuple(int(p) for p in parts), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def resolve(dataset: str, data_dir: str | None = None) -> str:
    """Version directory of `dataset`.

    `dataset` is a built-in name (prepared on demand), the name of a dataset prepared in
    `data_dir` by tfds or `vistax prepare` (its latest version, e.g. `imagenet2012` ->
    <data_dir>/imagenet2012/5.1.0), or a directory.
    """
    if dataset in builtins.BUILTINS:
        return builtins.prepare_builtin(dataset, data_dir)
    is_name = os.sep not in dataset and not dataset.startswith((".", "~"))
    if is_name:
        named = os.path.join(os.path.abspath(os.path.expanduser(
            data_dir or builtins.default_data_dir())), dataset)
        versions = _version_dirs(named)
        if versions:
            return versions[-1]
        if os.path.isfile(os.path.join(named, "dataset_info.json")):
            return named
    path = os.path.abspath(os.path.expanduser(dataset))
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    if os.path.isdir(path) and _version_dirs(path):
        return _version_dirs(path)[-1]
    if os.path.isdir(path):
        candidates = _find_prepared(path)
        hint = (f"; prepared datasets below it: {candidates[:10]}" if candidates
                else "; it holds no prepared dataset (run `vistax prepare`)")
        raise ValueError(f"dataset directory {path!r} has no dataset_info.json{hint}")
    where = f" nor a dataset prepared in {named!r}" if is_name else ""
    raise ValueError(f"unknown dataset {dataset!r}: not a built-in ({sorted(builtins.BUILTINS)})"
                     f"{where}, and no directory {path!r} exists. tfds datasets must be built as "
                     "ArrayRecord: `tfds build <name> --file_format=array_record --data_dir=...`.")


def _builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    builder = tfds.builder_from_directory(resolve(dataset, data_dir))
    file_format = builder.info.file_format
    if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"dataset {dataset!r} ({builder.data_path}) is stored as "
                         f"{file_format.value}; vistax reads ArrayRecord without TensorFlow. "
                         "Rebuild it: `tfds build <name> --file_format=array_record`.")
    return builder


def split_size(dataset: str, split: str, data_dir: str | None = None) -> int:
    """Examples in `split` of `dataset`, tfds slices included ('train[:90%]' -> 90%)."""
    builder = _builder(dataset, data_dir)
    try:
        return builder.info.splits[split].num_examples
    except (ValueError, KeyError) as e:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; splits: "
                         f"{sorted(builder.info.splits.keys())}. ({e})") from None


def dataset_info(dataset: str, data_dir: str | None = None) -> DatasetInfo:
    """Split sizes, class names and feature names of `dataset` (built-in name or directory)."""
    builder = _builder(dataset, data_dir)
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    return DatasetInfo(
        path=str(builder.data_path),
        num_examples={name: split.num_examples for name, split in builder.info.splits.items()},
        class_names=list(label.names) if isinstance(label, tfds.features.ClassLabel) else None,
        features=list(features.keys()),
    )


def _text_paths(feature, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of Text features (a Sequence of dicts decodes to a dict of lists)."""
    if isinstance(feature, tfds.features.Text):
        return [path]
    if isinstance(feature, tfds.features.FeaturesDict):
        return [p for key in feature.keys() for p in _text_paths(feature[key], path + (key,))]
    if isinstance(feature, tfds.features.Sequence):
        return _text_paths(feature.feature, path)
    return []


def _to_str(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_str(v) for v in value]
    return value


class _Records:
    """Random access to one split: encoded images stay bytes, Text features become `str`."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        features = builder.info.features
        images = [k for k in features.keys() if isinstance(features[k], tfds.features.Image)]
        self._source = builder.as_data_source(
            split, decoders={k: tfds.decode.SkipDecoding() for k in images})
        self._text_paths = _text_paths(features)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        for path in self._text_paths:
            parent = record
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = _to_str(parent[path[-1]])
        return record


# Host memory the records cache may fill (all worker processes together, each holding its own
# copy), as a share of the machine's physical memory.
CACHE_MEMORY_SHARE = 0.5


def _nbytes(value: Any) -> int:
    """Approximate bytes held by a record's values."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 8


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class _CachedRecords:
    """Records after a pp's leading deterministic ops, each computed on first access and then
    held in host memory (big_vision's `cache_raw`, extended to e.g. `decode`): later epochs
    skip the tfds read and those ops. Cached arrays are made read-only, so an op that wrote
    into its input in place would fail instead of corrupting later epochs."""

    def __init__(self, records: _Records, head: preprocess_lib.Preprocess, *, copies: int,
                 where: str):
        self._records, self._head = records, head
        self._cache: list[dict[str, Any] | None] = [None] * len(records)
        estimate = _nbytes(self[0]) * len(records) * copies
        budget = CACHE_MEMORY_SHARE * physical_memory()
        if estimate > budget:
            raise ValueError(
                f"input.cache=True would hold about {estimate / 2**30:.1f} GiB of {where} in "
                f"memory ({len(records)} records after {head.spec or 'reading'!r}, sized from the "
                f"first, x {copies} process(es)), more than {CACHE_MEMORY_SHARE:.0%} of this "
                f"machine's {physical_memory() / 2**30:.1f} GiB; set input.cache=False for this "
                "dataset.")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = self._cache[index]
        if cached is None:
            cached = self._head(self._records[index], None)
            for value in cached.values():
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            self._cache[index] = cached
        return cached


def _records(dataset: str, split: str, data_dir: str | None) -> _Records:
    builder = _builder(dataset, data_dir)
    splits = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; splits: {splits} "
                         "(tfds slices such as 'train[:90%]' are accepted)")
    return _Records(builder, split)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process; jax's when not given."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel  (only when not given)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count={process_count}), "
                         f"got {process_index}")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    return global_batch_size // process_count


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of element `index` in `stream` (0: shuffle, 1: train pp, 2: eval pp):
    `np.random.default_rng([seed, stream, index])`. numpy turns that list into 32-bit words (an
    int in [0, 2**32) is one word), so a uint32 array of the three is the same seed without the
    per-int conversion: 14 instead of 24 us per example, whose whole pp takes ~150-250 us in the
    tiny presets."""
    if 0 <= seed < 2**32 and 0 <= index < 2**32:  # stream is 0, 1 or 2
        return np.random.default_rng(np.array((seed, stream, index), np.uint32))
    return np.random.default_rng([seed, stream, index])


def _check_batchable(example: dict[str, Any], spec: str) -> dict[str, Any]:
    """Raises if a pp output value cannot be stacked into a batch (lists and dicts vary in
    length per example, e.g. shapes' `objects`), naming the key instead of grain's spec dump."""
    for key, value in example.items():
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(f"pp output {key!r} is a {type(value).__name__}, which cannot be "
                             f"batched; keep only array/str/number features with keep(...) in "
                             f"{spec!r}")
    return example


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """Applies pp to the element with global index `index` using its own generator."""

    preprocess: preprocess_lib.Preprocess
    seed: int

    def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        example = self.preprocess(record, _rng(self.seed, 1, index))
        return _check_batchable(example, self.preprocess.spec)


@dataclasses.dataclass(frozen=True)
class _TrainElement:
    """Stream position -> the example of the record there: epoch position // len(records),
    in that epoch's order. The record is read directly, not through grain's source dataset
    (whose per-element bookkeeping cost as much as a small pp)."""

    records: Any  # _Records or _CachedRecords
    order: shuffle_lib.EpochShuffle
    example: _TrainExample

    def __call__(self, position: int) -> dict[str, Any]:
        return self.example(position, self.records[self.order.parent_index(position)])


# How many batches the train stream has: endless, as many as grain's `repeat()` has elements.
_ENDLESS = sys.maxsize


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Batch t -> the examples `element(first + stride * (t * size + j))`, j < size, stacked
    per key with np.stack (as grain's `batch`), then the pp's elementwise tail (`batch_ops`,
    `Preprocess.split_batch_ops`) on the stack. One grain element per batch, not per example:
    grain's per-element bookkeeping (source, shuffle, map, slices, batch) cost ~75 us per
    example, as much as `mae_tiny`'s whole pp on a 32 x 32 image."""

    element: Any  # Callable[[int], dict[str, Any]], picklable for worker processes
    batch_ops: preprocess_lib.Preprocess
    spec: str  # the pp's, for errors
    first: int
    stride: int
    size: int

    def __call__(self, t: int) -> dict[str, np.ndarray]:
        start = self.first + self.stride * t * self.size
        examples = [self.element(start + self.stride * j) for j in range(self.size)]
        batch = {}
        for key in examples[0]:
            try:
                batch[key] = np.stack([example[key] for example in examples])
            except (KeyError, ValueError) as e:
                raise ValueError(f"pp output {key!r} cannot be batched: {e}; the examples of "
                                 f"{self.spec!r} must share keys and shapes") from e
        return self.batch_ops(batch, None)


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """Padded index -> preprocessed record (index mod len) with `_mask` False for padding."""

    records: _Records
    preprocess: preprocess_lib.Preprocess

    def __call__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        example = self.preprocess(self.records[index % n], _rng(0, 2, index % n))
        return {**_check_batchable(example, self.preprocess.spec), MASK_KEY: np.bool_(index < n)}


def example_spec(*, dataset: str, split: str, pp: str, data_dir: str | None = None,
                 eval_mode: bool = False) -> dict[str, np.ndarray]:
    """The first example of `split` after `pp` (with the `_mask` key in eval mode).

    The trainer reads shapes and dtypes from it to trace its step and evaluators before any
    work, so a pp that does not fit the model fails at start-up with the key that is wrong.
    """
    records = _records(dataset, split, data_dir)
    parsed = preprocess_lib.parse(pp)
    if eval_mode:
        return _EvalExample(records, parsed)(0)
    return _TrainExample(parsed, 0)(0, records[0])


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read its absl flags; outside an absl app none are parsed."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int, *, parent: int) -> None:
    """grain worker init: a daemon thread ends this worker within a second of `parent`, the
    process that started it, ending. A trainer killed by SIGKILL or the OOM killer cannot stop
    its workers, which would otherwise keep running (and holding memory) as orphans. (Linux's
    PR_SET_PDEATHSIG would fire when the starting *thread* ends, which grain's may.)"""
    del worker_index, worker_count

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # pylint: disable=protected-access  (no cleanup left to do for an orphan)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _iterate(ds: grain.MapDataset, worker_count: int, read_threads: int) -> grain.DatasetIterator:
    """Iterator over batches: `read_threads` batches in flight per process, in order."""
    if worker_count < 0 or read_threads < 0:
        raise ValueError(f"worker_count={worker_count} and read_threads={read_threads} must be "
                         ">= 0")
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=max(read_threads, 1)))
    if worker_count:
        _ensure_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                      worker_init_fn=functools.partial(_exit_with_parent,
                                                                       parent=os.getpid()))
    return iter(iter_ds)


def train_iterator(*, dataset: str, split: str, pp: str, global_batch_size: int, seed: int,
                   data_dir: str | None = None, worker_count: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   read_threads: int = 2, start_step: int = 0,
                   cache: bool = False) -> grain.DatasetIterator:
    """Infinite iterator of this process's batches (dicts of numpy arrays, leading dim
    global_batch_size // process_count), from global batch `start_step` on.

    Every epoch is a new permutation of the split (grain's index shuffle, seeded per epoch,
    computed in blocks by `shuffle.EpochShuffle`);
    batches may straddle epochs. `it.get_state()` / `it.set_state(state)` resume the exact
    stream, also through `grain.checkpoint.CheckpointSave/CheckpointRestore` with Orbax.
    worker_count > 0 computes batches in that many grain worker processes (same batches);
    they are started with 'spawn', so the program's entry point must sit under
    `if __name__ == "__main__":`. read_threads batches are prepared concurrently per process.

    Global batch t is elements [tB, (t+1)B) of the global stream whatever the process count,
    so `start_step=t` continues a run's stream after t steps on any number of processes (the
    iterator's saved state is per process; this is how a run resumes on another count).

    cache=True keeps each record in memory after its first read, with the pp's leading
    deterministic ops (e.g. `decode`, `resize`) already applied; the batches are exactly those
    of cache=False. For datasets that fit in RAM (each worker process holds its own copy); a
    ValueError says so before training when the estimate exceeds `CACHE_MEMORY_SHARE` of it.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if not isinstance(cache, bool):
        raise ValueError(f"input.cache must be True or False, got {cache!r}")
    process_index, process_count = _process(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    records = _records(dataset, split, data_dir)
    if len(records) < global_batch_size:
        raise ValueError(f"split {split!r} of {dataset!r} has {len(records)} examples, fewer than "
                         f"one global batch of {global_batch_size}")
    whole = preprocess_lib.parse(pp)
    parsed, batch_ops = whole.split_batch_ops()
    if cache:
        head, parsed = parsed.split_deterministic()
        records = _CachedRecords(records, head, copies=max(worker_count, 1),
                                 where=f"split {split!r} of {dataset!r}")
    shuffle_seed = int(_rng(seed, 0, 0).integers(2**32))
    order = shuffle_lib.EpochShuffle(grain.MapDataset.source(records), seed=shuffle_seed)
    # Local batch t holds the stream's elements start_step * B + process_index + P * (t * b + j),
    # j < b: the global batches [tB, (t+1)B) dealt round-robin to the P processes.
    ds = grain.MapDataset.range(_ENDLESS).map(_Batch(
        _TrainElement(records, order, _TrainExample(parsed, seed)), batch_ops, whole.spec,
        first=start_step * global_batch_size + process_index, stride=process_count,
        size=local_batch_size))
    return _iterate(ds, worker_count, read_threads)


def eval_iterator(*, dataset: str, split: str, pp: str, global_batch_size: int,
                  data_dir: str | None = None, worker_count: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  read_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the split in stored order, in ceil(n / global_batch_size) batches on
    every process, each of global_batch_size // process_count rows.

    The split is padded to a whole number of global batches with repeats of real examples;
    `batch['_mask']` is False on those rows. Over all processes the unmasked rows are every
    example exactly once. Random pp ops get a generator fixed by the example's index.
    """
    process_index, process_count = _process(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    records = _records(dataset, split, data_dir)
    padded = math.ceil(len(records) / global_batch_size) * global_batch_size
    parsed, batch_ops = preprocess_lib.parse(pp).split_batch_ops()
    ds = grain.MapDataset.range(padded // global_batch_size).map(_Batch(
        _EvalExample(records, parsed), batch_ops, pp, first=process_index,
        stride=process_count, size=local_batch_size))
    return _iterate(ds, worker_count, read_threads)
