"""The input pipeline alone: `data.pipeline.train_iterator` with a case's dataset, pp, batch
size and worker count, as `vistax train` builds it, timed without a train step running.

The rate is examples over the wall time of `batches` consecutive batches after the warm-up and
after taking the batches grain may already hold ready (`ready_batches`: prepared during the
warm-up, counted they would overstate the rate); per-batch times are summarised beside it.
With `input.cache` the warm-up lasts at least one epoch, so the rate is that of every epoch
after the first (which reads and decodes as without the cache). In training the pipeline
shares the CPU with the step, so the rate measured alone is an upper bound of what the step
sees; the goal is a rate at least 3x the step's consumption.
"""

from __future__ import annotations

import math
import time

from vistax.benchmarks import timing
from vistax.data import pipeline

GOAL_RATIO = 3.0
# Fewest batches timed: grain's threads finish batches in bursts of `input.read_threads`, and
# worker processes in bursts of their count, so a rate over a few batches says little.
MIN_BATCHES = 24


def ready_batches(worker_count: int, read_threads: int) -> int:
    """Most batches grain can hold ready while the consumer waits: `read_threads` (at least
    one) in the read buffer of each process that reads (the trainer, or each worker) and one
    more in its hand or queue."""
    return (max(read_threads, 1) + 1) * max(worker_count, 1)


def iterator(config):
    inp = config.input
    return pipeline.train_iterator(dataset=inp.dataset, split=inp.split, pp=inp.pp,
                                   global_batch_size=inp.batch_size, seed=config.seed,
                                   data_dir=inp.data_dir, worker_count=inp.worker_count,
                                   read_threads=inp.read_threads, cache=inp.cache)


def run(config, *, batches: int, warmup: int, clock=time.perf_counter) -> tuple[dict, dict]:
    """(result, first batch): examples/s over `batches` batches after `warmup` (the first batch,
    returned for the step benchmark, is the first warm-up batch)."""
    if batches < 1:
        raise ValueError(f"batches={batches} must be >= 1.")
    inp = config.input
    if inp.cache:  # time the epochs served from the cache
        epoch = pipeline.split_size(inp.dataset, inp.split, inp.data_dir)
        warmup = max(warmup, math.ceil(epoch / inp.batch_size))
    it = iterator(config)
    try:
        start = clock()
        first = next(it)
        first_s = clock() - start
        for _ in range(max(warmup - 1, 0)):
            next(it)
        # Taking the batches grain may hold ready untimed starts the clock with its buffers
        # empty, so the rate is the rate batches are made at.
        for _ in range(ready_batches(inp.worker_count, inp.read_threads)):
            next(it)
        seconds = []
        begin = clock()
        for _ in range(batches):
            t0 = clock()
            next(it)
            seconds.append(clock() - t0)
        elapsed = clock() - begin
    finally:
        it.close()
    result = {
        "dataset": inp.dataset, "split": inp.split, "pp": inp.pp, "batch_size": inp.batch_size,
        "worker_count": inp.worker_count, "read_threads": inp.read_threads, "cache": inp.cache,
        "warmup_batches": warmup, "batches": batches, "first_batch_s": first_s,
        "examples_per_s": batches * inp.batch_size / max(elapsed, 1e-12),
        "batch_s": timing.summarize(seconds),
    }
    return result, first
