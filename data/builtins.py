"""Built-in datasets (`digits`, `shapes`, `docs`), prepared on first use into the vistax data dir.

The data dir is $VISTAX_DATA_DIR if set, else ~/.cache/vistax/datasets. Preparing is safe
when several processes start at once (an exclusive file lock per dataset; tfds itself writes
into a temporary directory and renames it into place) and never touches a prepared dataset.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

from absl import logging as absl_logging

from vistax.data.builders import digits, docs, shapes

BUILTINS = {"digits": digits.Digits, "shapes": shapes.Shapes, "docs": docs.Docs}


def default_data_dir() -> str:
    """$VISTAX_DATA_DIR if set, else ~/.cache/vistax/datasets."""
    return os.environ.get("VISTAX_DATA_DIR") or os.path.expanduser("~/.cache/vistax/datasets")


@contextlib.contextmanager
def _quiet_absl():
    """tfds warns through absl that a not-yet-prepared version folder has no dataset_info.json;
    that is the expected state before preparation, so only errors are shown meanwhile."""
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """Holds an exclusive `flock` on `path` (created if missing) for the `with` body."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_builtin(name: str, data_dir: str | None = None, **config) -> str:
    """Prepares built-in dataset `name` into `data_dir` if missing; returns its version dir.

    `config` goes to the dataset's config (shapes: num_train, num_test, num_heldout); the
    directory then names the sizes, so different sizes never collide.
    """
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; built-ins: {sorted(BUILTINS)}")
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    if name == "shapes":
        builder_config = shapes.shapes_config(**config)
        # tfds refuses a new config object under the name of a declared one: reuse the declared.
        declared = {c.name: c for c in shapes.Shapes.BUILDER_CONFIGS}
        builder_config = declared.get(builder_config.name, builder_config)
    elif config:
        raise ValueError(f"built-in dataset {name!r} takes no config, got {sorted(config)}")
    else:
        builder_config = None
    with _quiet_absl():
        builder = BUILTINS[name](data_dir=data_dir, config=builder_config)
        if builder.is_prepared():
            return str(builder.data_path)
    os.makedirs(data_dir, exist_ok=True)
    lock_name = f".{name}-{builder_config.name if builder_config else 'default'}.lock"
    with _exclusive_lock(os.path.join(data_dir, lock_name)), _quiet_absl():
        # Another process may have finished while this one waited for the lock.
        return BUILTINS[name](data_dir=data_dir, config=builder_config).prepare()
