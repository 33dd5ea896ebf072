"""`xla_cpu_dots`: which library the compiled train step's dots run in on CPU."""

import re

import numpy as np
import pytest

from vistax.train.experiment import Experiment

BATCH = {"image": np.zeros((32, 32, 32, 3), np.float32), "label": np.zeros((32,), np.int32)}


def _library_dots(exp: Experiment) -> tuple[int, int]:
    """(YNNPACK fusions of a dot without a reduction, dot instructions anywhere) in the
    compiled step's HLO. (YNNPACK's reduction fusions may take in the dot that feeds them, as
    attention's scores feed the softmax's max: those stay with either choice.)"""
    hlo = exp.lower_step(exp.train_batch_spec({k: v[0] for k, v in BATCH.items()})).compile()
    text = hlo.as_text()
    bodies = dict(re.findall(r"^(%\S+) .*?\{\n(.*?)\n\}", text, re.M | re.S))
    ynn = other = 0
    for line in text.splitlines():
        if " dot(" in line:
            other += 1
        called = re.search(r"calls=(%[^,\s]+)", line)
        if '"__ynn_fusion"' in line and called:
            body = bodies[called.group(1)]
            ynn += " dot(" in body and " reduce(" not in body
    return ynn, other


def test_dots_leave_ynnpack_on_cpu_unless_asked(small_vit_config):
    ynn, other = _library_dots(Experiment(small_vit_config()))
    assert ynn == 0 and other > 0  # the default: "eigen"
    ynn, _ = _library_dots(Experiment(small_vit_config(xla_cpu_dots="xla_default")))
    assert ynn > 0  # jax 0.10's XLA sends dots to YNNPACK
    with pytest.raises(ValueError, match=r"xla_cpu_dots='mkl' is not one of \['eigen', "):
        Experiment(small_vit_config(xla_cpu_dots="mkl"))
