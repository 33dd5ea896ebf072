"""The one trainer loop for every method, and the evaluation of a saved run.

Resumes automatically from the latest checkpoint in the workdir; logs to metrics.jsonl and
TensorBoard; checkpoints, then runs evaluators, on their own schedules; stops on the first
non-finite loss or gradient without saving or evaluating the bad state. Nothing is written to
the workdir until the config has been validated and the starting state built.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from vistax import evals
from vistax.data import pipeline
from vistax.evals.base import to_host
from vistax.train import durations, init_from
from vistax.train.checkpointing import Checkpointer
from vistax.train.experiment import Experiment
from vistax.train.metrics import MetricWriter, Progress, Throughput, peak_flops_per_device
from vistax.train.preemption import PreemptionWatch

log = logging.getLogger("vistax")


class NonFiniteError(FloatingPointError):
    """Raised when a step produced a NaN/Inf loss or gradient norm."""


def _every(key: str, text: str, exp: Experiment) -> int:
    return durations.steps(key, text, global_batch=exp.config.input.batch_size,
                           epoch_size=exp.epoch_size)


def _write_config(workdir: str, config) -> None:
    """Writes workdir/config.json on the first start; a resume with a changed config keeps the
    original and records the new one beside it, so nothing written earlier is replaced."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    with open(path, encoding="utf-8") as f:
        if f.read() == text:
            return
    i = 1
    while os.path.exists(os.path.join(workdir, f"config.{i}.json")):
        i += 1
    with open(os.path.join(workdir, f"config.{i}.json"), "w", encoding="utf-8") as f:
        f.write(text)
    log.warning("Config differs from %s; saved the new one as config.%d.json.", path, i)


def _check_finite(state: dict, last_saved: int | None, metrics: dict) -> None:
    bad = int(jax.device_get(state["first_nonfinite_step"]))
    if bad >= 0:
        raise NonFiniteError(
            f"Non-finite loss or gradient norm first at step {bad + 1} (latest metrics: "
            f"{json.dumps({k: float(v) for k, v in metrics.items()})}). The bad state was not "
            f"saved; the last good checkpoint is step {last_saved}. Lower the learning rate, enable "
            "grad_clip_norm or check the input data.")


def _train_data(config, start_step: int = 0):
    inp = config.input
    return pipeline.train_iterator(
        dataset=inp.dataset, split=inp.split, pp=inp.pp, global_batch_size=inp.batch_size,
        seed=config.seed, data_dir=inp.data_dir, worker_count=inp.worker_count,
        read_threads=inp.read_threads, start_step=start_step, cache=inp.cache)


def _check_same_batch_size(config, reader: Checkpointer, step: int) -> None:
    """The data stream continues only with the global batch size it was read with."""
    saved = reader.saved_config(step) or {}
    saved_batch = saved.get("input", {}).get("batch_size", config.input.batch_size)
    if saved_batch != config.input.batch_size:
        raise ValueError(
            f"input.batch_size={config.input.batch_size}, but checkpoint step {step} in "
            f"{reader.directory} was trained with {saved_batch}: the data stream cannot continue "
            f"without repeating or skipping examples. Keep input.batch_size={saved_batch} to "
            "resume (or start a new workdir with init_from.path).")


def _resume_data(config, reader: Checkpointer, step: int):
    """(data iterator positioned after `step`, note). The saved per-process positions are
    restored when this run has as many processes as the one that saved them; otherwise the
    stream is cut anew at global batch `step` (the same examples, any process count: see
    pipeline.train_iterator)."""
    saved_processes, processes = reader.data_process_count(step), jax.process_count()
    if saved_processes == processes:
        data_iter = _train_data(config)
        try:
            reader.restore_data(step, data_iter)
        except BaseException:
            data_iter.close()
            raise
        return data_iter, ""
    if saved_processes is None:
        return _train_data(config, start_step=step), " (no saved data position: the stream " \
            f"continues at global batch {step})"
    return _train_data(config, start_step=step), (
        f" (data stream re-split from {saved_processes} to {processes} processes)")


def _starting_state(exp: Experiment, workdir: str):
    """(state, step resumed from or None, note, data iterator): the latest checkpoint in
    `workdir` with its data position, or a fresh state with `init_from` applied. Writes
    nothing."""
    config = exp.config
    reader = Checkpointer(workdir, keep=config.checkpoint.keep, asynchronous=False, create=False)
    try:
        latest = reader.latest_step()
        if latest is not None:
            _check_same_batch_size(config, reader, latest)
            state = reader.restore(latest, exp.abstract_state)
            data_iter, data_note = _resume_data(config, reader, latest)
            return state, latest, f", resumed from step {latest}{data_note}", data_iter
    finally:
        reader.close()
    state = exp.init_state()
    if not config.init_from.path:
        return state, None, "", _train_data(config)
    state["params"], summary = init_from.apply(config.init_from, state["params"],
                                               exp.objective.import_weights)
    return state, None, (f"; {len(summary['loaded'])} parameters from {config.init_from.path}, "
                         f"{len(summary['fresh'])} fresh"), _train_data(config)


def train(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns last metrics.

    `stop_after` ends the process's work after that many steps of this invocation (as if
    interrupted), without a final checkpoint: tests use it to simulate preemption.
    """
    exp = Experiment(config, workdir=workdir)  # validates everything; nothing is written yet
    ckpt = writer = data_iter = None
    watch = PreemptionWatch()  # from the start: a notice during compilation counts too
    try:
        state, latest, note, data_iter = _starting_state(exp, workdir)
        is_main = jax.process_index() == 0
        os.makedirs(workdir, exist_ok=True)
        if is_main:
            _write_config(workdir, config)
        ckpt = Checkpointer(workdir, keep=config.checkpoint.keep,
                            asynchronous=config.checkpoint.asynchronous)
        writer = MetricWriter(workdir, enabled=is_main)
        if latest is not None and latest < exp.total_steps:  # the lost run may have logged
            writer.write(latest, {"resumed": 1})  # steps after `latest`: they come again
        return _run(exp, state, latest, note, data_iter, ckpt, writer, watch, stop_after)
    finally:
        watch.close()
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()
        if writer is not None:
            writer.close()
        if data_iter is not None:
            data_iter.close()  # stops grain worker processes


def _run(exp, state, latest, note, data_iter, ckpt, writer, watch, stop_after) -> dict:
    config, inp = exp.config, exp.config.input
    is_main = jax.process_index() == 0
    step = int(jax.device_get(state["step"]))
    total = exp.total_steps
    log_every = _every("log_every", config.log_every, exp)
    ckpt_every = _every("checkpoint.every", config.checkpoint.every, exp)
    eval_every = {name: _every(f"evals.{name}.every", cfg.get("every", evals.DEFAULT_EVERY), exp)
                  for name, cfg in config.evals.items()}
    peak, peak_source = peak_flops_per_device(jax.devices()[0], config.peak_flops_per_device)
    speed = Throughput(batch_size=inp.batch_size, num_devices=jax.device_count(),
                       flops_per_step=exp.flops_per_step, peak_per_device=peak)
    progress = Progress(total_steps=total, mode=config.progress)
    if is_main:
        progress.message(f"vistax: {total} steps of {inp.batch_size} examples on "
                         f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh "
                         f"{dict(exp.mesh.shape)}{note}; peak {peak:.3g} FLOP/s/device "
                         f"({peak_source}).")
    last_saved = latest
    metrics, logged = {}, {}
    start_step = step
    while step < total:
        if stop_after is not None and step - start_step >= stop_after:
            return logged
        state, metrics = exp.train_step(state, exp.global_batch(next(data_iter)))
        step += 1
        if not speed.started():
            jax.block_until_ready(metrics)
            speed.start()
        else:
            speed.count()
        is_last = step == total
        if step % log_every == 0 or is_last:
            host = to_host(metrics)
            _check_finite(state, last_saved, host)
            logged = {f"train/{k}": float(v) for k, v in host.items()}
            logged["train/epoch"] = step / exp.steps_per_epoch
            logged.update(speed.read())
            writer.write(step, logged)
            if is_main:
                progress.update(step, logged)
        preempted = watch.reached(step)  # every step, on every process
        save = step % ckpt_every == 0 or is_last or preempted
        due = [n for n in exp.evaluators if step % eval_every[n] == 0 or is_last]
        if not (save or due):
            continue
        jax.block_until_ready(state)  # queued steps count as training time, not as a pause
        speed.pause()
        _check_finite(state, last_saved, to_host(metrics))
        if save:  # before evaluating: a failing evaluator must not cost the checkpoint
            ckpt.save(step, state, data_iter, config)
            last_saved = step
        if preempted:  # no evaluation: the notice leaves little time
            ckpt.wait()
            writer.write(step, {"preempted": 1})
            progress.message(f"process {jax.process_index()}: preemption notice; saved step "
                             f"{step} of {total} in {ckpt.directory}; the same command "
                             "continues from there.")
            return logged
        if due:
            results = {f"eval/{name}/{key}": value for name in due
                       for key, value in exp.evaluators[name].run(state).items()}
            writer.write(step, results)
            logged.update(results)
            if is_main:
                progress.message(f"step {step}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in results.items()))
        speed.resume()
    return logged


def evaluate(config, workdir: str, *, step: int | None = None) -> dict:
    """Runs all configured evaluators on the latest (or given) checkpoint in `workdir`."""
    if not config.evals:
        raise ValueError("config.evals is empty: nothing to evaluate.")
    exp = Experiment(config, workdir=workdir)
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, asynchronous=False, create=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first with "
                                    f"`vistax train --workdir={workdir}`.")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"--step={step} is not in {ckpt.directory}; it has {steps}.")
        needed = {k: exp.abstract_state[k] for k in ("params", "model_state", "extra")}
        state = ckpt.restore(step, needed, partial=True)  # no optimizer state needed
    finally:
        ckpt.close()
    results = {f"eval/{name}/{key}": value for name, evaluator in exp.evaluators.items()
               for key, value in evaluator.run(state).items()}
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(step, results)
    writer.close()
    return results
