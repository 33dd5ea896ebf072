"""The measurement protocol: warm-up calls, then each timed call on its own, and statistics.

A step is timed from its call until its outputs are ready (`jax.block_until_ready` for JAX;
PyTorch's CPU eager ops return finished), one step at a time, so the figure is the latency of
one full forward + backward + update with nothing queued. The first call is timed apart (it
compiles); `warmup` calls then settle caches and allocators; the median of the next `steps`
calls is the reported figure (robust to a stray slow step on a shared machine), with the
10th/90th percentiles beside it. Two implementations compared side by side take turns in
short rounds (`time_interleaved`), so load that comes and goes on the machine hits both.

The peak that MFU is measured against on a CPU is the best float32 rate of a large square
matmul, numpy's BLAS and XLA's, best of a few: the rate this machine reaches on the operation a
transformer spends its time in, under the same load as the benchmark.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, mean, min, max and 10th/90th percentiles (linear interpolation) of `seconds`."""
    if not seconds:
        raise ValueError("summarize() needs at least one timing.")
    values = sorted(float(s) for s in seconds)
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": values[0],
        "max": values[-1],
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
        "n": len(values),
    }


def time_calls(fn: Callable[[], object], *, steps: int, warmup: int,
               sync: Callable[[object], object] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    """Times `fn()` (whose result `sync` waits for): the first call, `warmup` more untimed
    ones, then `steps` timed calls. Returns {"first_s", "seconds" (per timed call),
    "stats" (summarize of them)}. The first call counts as the first warm-up call."""
    return time_interleaved({"fn": (fn, sync)}, steps=steps, warmup=warmup, clock=clock)["fn"]


# Timed calls per implementation before the other one runs again (time_interleaved).
BLOCK = 4


def time_interleaved(calls: dict[str, tuple[Callable[[], object], Callable | None]], *,
                     steps: int, warmup: int, block: int = BLOCK,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """`time_calls` of several (fn, sync) pairs side by side: after each one's first call and
    warm-up, they take turns in rounds of one untimed settling call and up to `block` timed
    calls each, until each has `steps` timed calls. A change of load on a shared machine so
    reaches every one of them alike, and no timed call follows the other implementation
    directly: the first JAX step after PyTorch's steps took 1.5x as long as the next ones (the
    memory the other one freed and took comes back as fresh pages), a cost that consecutive
    training steps never pay. Returns {name: time_calls' result}."""
    if steps < 1 or warmup < 0 or block < 1:
        raise ValueError(f"steps={steps} and block={block} must be >= 1 and warmup={warmup} "
                         ">= 0.")

    def timed(fn, sync) -> float:
        start = clock()
        out = fn()
        if sync is not None:
            sync(out)
        return clock() - start

    results = {}
    for name, (fn, sync) in calls.items():
        first = timed(fn, sync)
        for _ in range(max(warmup - 1, 0)):
            timed(fn, sync)
        results[name] = {"first_s": first, "seconds": []}
    alone = len(calls) == 1
    while len(next(iter(results.values()))["seconds"]) < steps:
        for name, (fn, sync) in calls.items():
            seconds = results[name]["seconds"]
            if not alone:
                timed(fn, sync)  # settles after the other implementation's turn
            for _ in range(min(block, steps - len(seconds))):
                seconds.append(timed(fn, sync))
    for result in results.values():
        result["stats"] = summarize(result["seconds"])
    return results


def block(tree):
    """jax.block_until_ready, imported only where JAX is timed."""
    import jax  # pylint: disable=import-outside-toplevel

    return jax.block_until_ready(tree)


def _best_rate(run: Callable[[], object], flops: float, repeats: int) -> float:
    run()  # compile / warm the BLAS threads
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best


def matmul_peak(size: int = 4096, repeats: int = 3, *, numpy_too: bool = True) -> dict:
    """FLOP/s of a (size x size) float32 matmul: numpy's BLAS (host) and XLA's on the default
    device, best of `repeats` each. Returns {"size", "numpy", "xla", "best"}; "numpy" is None
    when not measured (accelerators: the host BLAS is not the device)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    flops = 2.0 * size ** 3
    host = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    rates = {"size": size, "numpy": None}
    if numpy_too:
        rates["numpy"] = _best_rate(lambda: host @ host, flops, repeats)
    device = jnp.asarray(host)
    matmul = jax.jit(lambda m: m @ m)
    rates["xla"] = _best_rate(lambda: matmul(device).block_until_ready(), flops, repeats)
    rates["best"] = max(r for r in (rates["numpy"], rates["xla"]) if r)
    return rates


def device_peak(device, measured: dict) -> tuple[float, str]:
    """(peak FLOP/s that MFU divides by, where it came from): the per-chip table of
    train/metrics.py (vendors' dense bf16 figures) for TPUs and GPUs it knows, else the matmul
    rate measured on this machine (CPUs: numpy or XLA, whichever was faster)."""
    from vistax.train import metrics  # pylint: disable=import-outside-toplevel

    if device.platform != "cpu":
        peak, source = metrics.peak_flops_per_device(device)
        if math.isfinite(peak):
            return peak, f"{source}, dense bf16"
        return measured["xla"], f"measured {measured['size']}^2 float32 XLA matmul ({source})"
    which = "numpy" if measured.get("numpy") and measured["numpy"] >= measured["xla"] else "xla"
    return measured["best"], f"measured {measured['size']}^2 float32 matmul ({which})"
