"""Observability: throughput and MFU arithmetic, the peak table, progress display, writers."""

import io
import json
import os

import pytest

from vistax.train import metrics


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", fake)
    return fake


def test_throughput_and_mfu_exclude_paused_time(clock):
    speed = metrics.Throughput(batch_size=64, num_devices=4, flops_per_step=2e12,
                               peak_per_device=1e12)
    speed.start()
    for _ in range(10):
        clock.now += 0.5
        speed.count()
    speed.pause()
    clock.now += 30.0  # an evaluation: not training time
    speed.resume()
    out = speed.read()
    assert out["perf/steps_per_sec"] == pytest.approx(2.0)
    assert out["perf/images_per_sec"] == pytest.approx(128.0)
    assert out["perf/images_per_sec_per_core"] == pytest.approx(32.0)
    assert out["perf/model_tflops_per_sec"] == pytest.approx(4.0)
    assert out["perf/mfu"] == pytest.approx(4e12 / 4e12)
    assert speed.read() == {}  # the window restarted and holds no steps yet


class FakeDevice:
    def __init__(self, kind, platform="tpu"):
        self.device_kind, self.platform = kind, platform


def test_peak_table_and_override():
    assert metrics.peak_flops_per_device(FakeDevice("TPU v5 lite"))[0] == 197e12
    assert metrics.peak_flops_per_device(FakeDevice("TPU v5p"))[0] == 459e12
    assert metrics.peak_flops_per_device(FakeDevice("NVIDIA H100 80GB HBM3", "gpu"))[0] == 989e12
    assert metrics.peak_flops_per_device(FakeDevice("TPU v4"), 1.0) == (1.0, "config.peak_flops_per_device")
    value, source = metrics.peak_flops_per_device(FakeDevice("Mystery", "gpu"))
    assert value != value and "peak_flops_per_device" in source  # NaN, with advice


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_lines_otherwise(clock):
    term = Terminal()
    bar = metrics.Progress(total_steps=10, stream=term)
    for step in range(1, 11):
        clock.now += 1.0
        bar.update(step, {"train/loss": 1.0 / step} if step % 5 == 0 else None)
    text = term.getvalue()
    assert text.count("\r[") == 10 and text.endswith("\n")
    assert "[############............] step 5/10" in text and "ETA 0:00:05" in text
    assert "loss 0.1" in text

    plain = io.StringIO()
    lines = metrics.Progress(total_steps=10, stream=plain)
    for step in range(1, 11):
        lines.update(step, {"train/loss": 0.5} if step % 5 == 0 else None)
    assert plain.getvalue().count("\n") == 2 and "\r" not in plain.getvalue()


def test_writer_writes_only_on_the_main_process(tmp_path):
    main, other = str(tmp_path / "main"), str(tmp_path / "other")
    writer = metrics.MetricWriter(main)
    writer.write(3, {"train/loss": 0.25, "eval/x/top": 1})
    writer.close()
    silent = metrics.MetricWriter(other, enabled=False)
    silent.write(3, {"train/loss": 0.25})
    silent.close()
    with open(os.path.join(main, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == [{"step": 3, "train/loss": 0.25, "eval/x/top": 1}]
    assert not os.path.exists(other)
