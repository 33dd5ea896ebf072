"""Durations written as `"<number> steps|epochs|examples"`, turned into step counts.

One key holds both number and unit, so a preset in epochs and an override in steps never clash.
An epoch is `epoch_size / global_batch` steps; batches run across epoch boundaries (the data
stream reshuffles each epoch and never drops examples).
"""

from __future__ import annotations

import dataclasses
import math
import re

UNITS = ("steps", "epochs", "examples")


@dataclasses.dataclass(frozen=True)
class Duration:
    value: float
    unit: str

    def to_steps(self, *, global_batch: int, epoch_size: int | None) -> int:
        """Whole steps covering this duration (rounded up; 0 stays 0)."""
        if self.unit == "steps":
            return int(math.ceil(self.value))
        if self.unit == "examples":
            return int(math.ceil(self.value / global_batch))
        if not epoch_size:
            raise ValueError(f"A duration in epochs ({self.value:g} epochs) needs the training "
                             "set size, which is unknown here.")
        return int(math.ceil(self.value * epoch_size / global_batch))


def parse_duration(key: str, text) -> Duration:
    """Parses `text` from config key `key`; errors name the key and the value."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(steps?|epochs?|examples?)\s*",
                         str(text))
    if not match:
        raise ValueError(f"{key}={text!r}: expected '<number> steps', '<number> epochs' or "
                         "'<number> examples', e.g. '30 epochs'.")
    unit = match.group(2) if match.group(2).endswith("s") else match.group(2) + "s"
    return Duration(float(match.group(1)), unit)


def steps(key: str, text, *, global_batch: int, epoch_size: int | None) -> int:
    """`parse_duration(key, text).to_steps(...)`, with the key in any error."""
    try:
        return parse_duration(key, text).to_steps(global_batch=global_batch, epoch_size=epoch_size)
    except ValueError as e:
        if str(e).startswith(key):
            raise
        raise ValueError(f"{key}={text!r}: {e}") from None
