"""Durations: '<number> steps|epochs|examples' strings, whole steps rounded up, named errors."""

import math

import pytest

from vistax.train import durations
from vistax.train.durations import Duration


@pytest.mark.parametrize("text, expected", [
    ("30 epochs", Duration(30.0, "epochs")),
    ("1 step", Duration(1.0, "steps")),
    ("1 epoch", Duration(1.0, "epochs")),
    ("1e3 examples", Duration(1000.0, "examples")),
    (" 2.5 epochs ", Duration(2.5, "epochs")),
    (".5 steps", Duration(0.5, "steps")),
    ("0 steps", Duration(0.0, "steps")),
])
def test_parse(text, expected):
    assert durations.parse_duration("duration", text) == expected


def test_to_steps_rounds_up():
    # 10 epochs of 1438 examples at batch 128: 14380 / 128 = 112.34 -> 113 steps.
    assert durations.steps("duration", "10 epochs", global_batch=128, epoch_size=1438) == 113
    assert math.ceil(10 * 1438 / 128) == 113
    # Exactly divisible: no extra step.
    assert durations.steps("duration", "2 epochs", global_batch=100, epoch_size=1000) == 20
    assert durations.steps("duration", "1e3 examples", global_batch=128, epoch_size=None) == 8
    assert durations.steps("duration", "1024 examples", global_batch=128, epoch_size=None) == 8
    assert durations.steps("duration", "1025 examples", global_batch=128, epoch_size=None) == 9
    assert durations.steps("duration", "2.5 steps", global_batch=128, epoch_size=None) == 3
    assert durations.steps("duration", "7 steps", global_batch=128, epoch_size=None) == 7
    assert durations.steps("duration", "0 epochs", global_batch=128, epoch_size=1438) == 0
    # Steps and examples never need the epoch size.
    assert Duration(3.0, "steps").to_steps(global_batch=8, epoch_size=None) == 3


@pytest.mark.parametrize("text", ["30", "epochs", "3 minutes", "-1 steps", "", "1 steps 2"])
def test_bad_strings_name_key_and_value(text):
    with pytest.raises(ValueError) as info:
        durations.steps("schedule.warmup", text, global_batch=8, epoch_size=100)
    assert f"schedule.warmup={text!r}" in str(info.value)
    with pytest.raises(ValueError) as info:
        durations.parse_duration("evals.test.every", text)
    assert f"evals.test.every={text!r}" in str(info.value)


def test_epochs_without_epoch_size_names_key_and_value():
    with pytest.raises(ValueError) as info:
        durations.steps("checkpoint.every", "3 epochs", global_batch=8, epoch_size=None)
    message = str(info.value)
    assert message.startswith("checkpoint.every='3 epochs'")
    assert "training set size" in message
