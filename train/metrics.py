"""Metric writers (metrics.jsonl + TensorBoard, process 0 only), progress display, throughput/MFU.

MFU = model FLOPs per step x steps/s / (devices x peak FLOP/s per device), model FLOPs being
3 x forward (PaLM, Chowdhery et al. 2022, App. B). Peaks are the vendors' dense bf16 figures;
a CPU's peak is measured with a float32 matmul at start-up unless configured.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# device_kind prefix -> dense bf16 FLOP/s per device (chip for TPU, GPU for NVIDIA).
PEAK_FLOPS = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of the host CPU: the best float32 matmul rate of numpy's BLAS and of XLA.

    Other load on the machine lowers this figure (and so raises MFU); set
    `peak_flops_per_device` for numbers compared across runs.
    """
    a = np.ones((size, size), np.float32)
    x = jnp.asarray(a)
    matmul = jax.jit(lambda m: m @ m)
    matmul(x).block_until_ready()
    best = math.inf
    for run in (lambda: a @ a, lambda: matmul(x).block_until_ready()):
        run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(device: jax.Device, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if override:
        return float(override), "config.peak_flops_per_device"
    kind = getattr(device, "device_kind", "")
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix], f"table ({kind})"
    if device.platform == "cpu":
        return measured_cpu_peak() / len(jax.devices("cpu")), "measured float32 matmul"
    return float("nan"), f"unknown device kind {kind!r}; set peak_flops_per_device"


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl and TensorBoard scalars."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter  # process 0 only; no TensorFlow needed
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        for name, value in clean.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Throughput:
    """Measures training speed between log points, excluding evaluation and checkpoint time.

    The clock starts after the first step completes, so compilation is not counted.
    """

    def __init__(self, *, batch_size: int, num_devices: int, flops_per_step: float | None,
                 peak_per_device: float):
        self.batch_size = batch_size
        self.num_devices = num_devices
        self.flops_per_step = flops_per_step
        self.peak = peak_per_device
        self._start = None
        self._steps = 0
        self._paused = 0.0
        self._pause_start = None

    def started(self) -> bool:
        return self._start is not None

    def start(self) -> None:
        self._start = time.perf_counter()
        self._steps = 0
        self._paused = 0.0

    def count(self, steps: int = 1) -> None:
        self._steps += steps

    def pause(self) -> None:
        self._pause_start = time.perf_counter()

    def resume(self) -> None:
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def read(self) -> dict[str, float]:
        """Speed since the last `read`/`start`, then restarts the window."""
        if self._start is None or self._steps == 0:
            return {}
        elapsed = time.perf_counter() - self._start - self._paused
        steps_per_sec = self._steps / max(elapsed, 1e-9)
        out = {
            "perf/steps_per_sec": steps_per_sec,
            "perf/images_per_sec": steps_per_sec * self.batch_size,
            "perf/images_per_sec_per_core": steps_per_sec * self.batch_size / self.num_devices,
        }
        if self.flops_per_step:
            achieved = self.flops_per_step * steps_per_sec
            out["perf/model_tflops_per_sec"] = achieved / 1e12
            out["perf/mfu"] = achieved / (self.num_devices * self.peak)
        self.start()
        return out


class Progress:
    """A one-line progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, *, total_steps: int, mode: str = "auto", stream=None):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.bar = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self._start = time.perf_counter()
        self._start_step = None
        self._last = {}

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if self._start_step is None:  # the clock starts after the first step (compilation)
            self._start_step = step
            self._start = time.perf_counter()
        if metrics:
            self._last.update(metrics)
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        if "perf/images_per_sec" in self._last:
            parts.append(f"{self._last['perf/images_per_sec']:.1f} img/s")
        for key in ("train/loss", "perf/mfu"):
            if key in self._last:
                parts.append(f"{key.split('/')[-1]} {self._last[key]:.4g}")
        parts.append(f"ETA {_format_seconds(eta)}")
        line = " | ".join(parts)
        if self.bar:
            width = 24
            filled = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}\033[K")
            if step >= self.total:
                self.stream.write("\n")
        elif metrics:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.bar:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
