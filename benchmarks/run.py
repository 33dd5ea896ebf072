"""`vistax bench`: times the cases of cases.py, prints the tables and writes the JSON report.

Per case: the config is built by `Experiment` (validated, pre-flighted on the built-in
dataset), the input pipeline is timed alone and its first batch kept; the train step is then
timed on that batch, placed on the devices once (so neither the pipeline nor the host-to-device
copy is in the step time), beside it, on the same batch, big_vision's ViT written in linen
(linen_vit.py, ViT cases) and, where a PyTorch equivalent exists and torch imports, the same
step in PyTorch (under `torch.autocast` to bfloat16 where the case computes in bfloat16),
taking turns in short rounds (timing.time_interleaved). On a CPU the step
runs on one device, whose XLA thread pool uses every core, and PyTorch gets as many threads as
the process may use cores. (Two simulated devices, one per core of this 2-core machine, made
the step alone faster, `vit:tiny` 158 -> 126 ms and ViT-Ti/16 2.63 -> 2.49 s, ViT-S/16 even,
but training `vit:tiny` slower, 677 against 735-782 images/s over 200 steps, its input
pipeline sharing the cores: the bench times the step as training runs it.) Model FLOPs are the
objective's analytic count (3 x forward x batch, the MFU convention of train/metrics.py); an
objective without one is counted by XLA's cost analysis of the unoptimised step
(`Experiment.lower_step`), elementwise work included, and says so.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import sys

import jax
import numpy as np

from vistax.benchmarks import cases as cases_lib
from vistax.benchmarks import checkpoint_bench, pipeline_bench, report as report_lib, timing
from vistax.train.experiment import Experiment

TORCH_MODES = ("auto", "off")


def _devices() -> list:
    devices = jax.local_devices()
    return devices[:1] if devices[0].platform == "cpu" else devices


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _torch(mode: str):
    """(torch module or None, status text for the cases when None)."""
    if mode not in TORCH_MODES:
        raise ValueError(f"--torch={mode!r} is not one of {list(TORCH_MODES)}.")
    if mode == "off":
        return None, "off"
    if importlib.util.find_spec("torch") is None:
        return None, "torch not installed"
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except Exception as e:  # a broken install: say so in the column, time the rest
        return None, f"torch not importable: {type(e).__name__}"
    torch.set_num_threads(cpu_cores())
    return torch, "ok"


def compute_dtype(config) -> str:
    """The case's compute dtype: every `dtype` key of `config.model` (towers included) agrees,
    else they are listed."""
    found = set()

    def visit(node):
        for key, value in node.items():
            if hasattr(value, "items"):
                visit(value)
            elif key == "dtype":
                found.add(value)

    visit(config.model)
    return "/".join(sorted(found)) or "float32"


def check_platform(selected: list, platform_name: str) -> None:
    """The accelerator cases are refused on CPU: one step of theirs takes minutes there."""
    refused = [case.name for case in selected if case.accelerator and platform_name == "cpu"]
    if refused:
        raise ValueError(
            f"--cases: {', '.join(refused)} are sized for a GPU/TPU chip (bfloat16, batch "
            f"{cases_lib.ACCELERATOR_BATCH} at 224 px) and JAX runs on cpu here; on CPU time "
            "vit_b16_224 or clip_s16_112 (float32).")


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _xla_flops(exp: Experiment, batch: dict) -> float | None:
    """FLOPs of one step by XLA's cost analysis of the lowered (unoptimised) program; None
    where the Experiment cannot lower its step or XLA gives no count."""
    if not hasattr(exp, "lower_step"):
        return None
    try:
        cost = exp.lower_step(batch).cost_analysis()
    except Exception:  # pylint: disable=broad-except  (a count is optional)
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float(cost.get("flops", 0.0)) if isinstance(cost, dict) else 0.0
    return flops or None


def _rates(seconds: float, batch_size: int, flops: float | None, peak: float,
           devices: int) -> dict:
    per_s = None if flops is None else flops / seconds
    return {"examples_per_s": batch_size / seconds, "flops_per_s": per_s,
            "mfu": None if per_s is None else per_s / (peak * devices)}


def _torch_device(torch, platform_name: str) -> str | None:
    """Where the PyTorch reference runs: the CPU beside a JAX CPU run, CUDA beside a GPU run;
    None where torch has no counterpart of the JAX device (TPUs)."""
    if platform_name == "cpu":
        return "cpu"
    if platform_name in ("gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return None


def _torch_trainer(case, exp, local_batch, torch, torch_status):
    """((step, sync), model) or None; status): the PyTorch equivalent of `case`."""
    if case.torch is None:
        return None, "no reference"
    if torch is None:
        return None, torch_status
    from vistax.benchmarks import torch_trainers  # pylint: disable=import-outside-toplevel

    platform_name = exp.mesh.devices.flat[0].platform
    device = _torch_device(torch, platform_name)
    if device is None:
        return None, f"no reference: torch has no {platform_name} device here"
    try:
        model_config = torch_trainers.REFERENCES[case.torch].model_config(exp.objective,
                                                                          exp.epoch_size)
        step, model = torch_trainers.make_trainer(case.torch, model_config, exp.config,
                                                  local_batch, device=device)
    except torch_trainers.Unsupported as e:
        return None, f"no reference: {e}"
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else None
    return ((step, sync), model), "ok"


def _big_vision_trainer(case, exp, local_batch, device):
    """(((step, sync), params) or None, status): the big_vision-style linen ViT of a ViT case,
    on the device the JAX step runs on."""
    if case.torch != "vit":
        return None, "no reference"
    from vistax.benchmarks import linen_vit  # pylint: disable=import-outside-toplevel

    try:
        return linen_vit.make_trainer(exp.objective.vit_config, exp.config, local_batch,
                                      device=device), "ok"
    except linen_vit.Unsupported as e:
        return None, f"no reference: {e}"


def bench_case(case: cases_lib.Case, *, steps: int, warmup: int, peak: float, devices: list,
               torch=None, torch_status: str = "off", data_dir: str | None = None,
               log=print) -> tuple[dict, Experiment, dict]:
    """(result, experiment, final train state) of one case."""
    config = case.build_config(data_dir)
    log(f"[{case.name}] building {case.config} ...")
    exp = Experiment(config, devices=devices)
    batch_size = config.input.batch_size
    batches = max(steps, pipeline_bench.MIN_BATCHES)
    log(f"[{case.name}] input pipeline alone ({batches} batches after {warmup} warm-up) ...")
    pipe, local = pipeline_bench.run(config, batches=batches, warmup=warmup)
    batch = exp.global_batch(local)
    state = exp.init_state()
    flops, source = exp.flops_per_step, "analytic"
    if flops is None:
        flops, source = _xla_flops(exp, batch), "XLA cost analysis of the step (estimate)"
        if flops is None:
            source = "unknown"

    def call():
        nonlocal state
        state, metrics = exp.train_step(state, batch)
        return state, metrics

    calls = {"jax": (call, timing.block)}
    big_vision, bv_status = _big_vision_trainer(case, exp, local, devices[0])
    if big_vision is not None:
        calls["big_vision"] = big_vision[0]
    trainer, torch_status = _torch_trainer(case, exp, local, torch, torch_status)
    if trainer is not None:
        calls["torch"] = trainer[0]
    turns = f", taking turns: {', '.join(calls)}" if len(calls) > 1 else ""
    log(f"[{case.name}] train step{turns} ({steps} steps after {warmup} warm-up) ...")
    try:
        timed = timing.time_interleaved(calls, steps=steps, warmup=warmup)
    except Exception as e:  # pylint: disable=broad-except
        if trainer is None:
            raise
        # A failing PyTorch reference must not cost the JAX figures: time without it.
        torch_status = f"error: {type(e).__name__}: {e}"
        trainer = None
        del calls["torch"]
        timed = timing.time_interleaved(calls, steps=steps, warmup=warmup)
    def side(name: str, devices_used: int) -> dict:
        """First step, step statistics and rates of one timed implementation."""
        t = timed[name]
        return {"first_step_s": t["first_s"], "step_s": t["stats"],
                **_rates(t["stats"]["median"], batch_size, flops, peak, devices_used)}

    jax_out = {**side("jax", len(devices)), "devices": len(devices)}
    pipe["ratio_to_step"] = pipe["examples_per_s"] / jax_out["examples_per_s"]
    torch_out = {"status": torch_status}
    if trainer is not None:
        model = trainer[1]
        torch_out.update({"params": int(sum(p.numel() for p in model.parameters()
                                            if p.requires_grad)),
                          "device": str(next(model.parameters()).device),
                          "threads": torch.get_num_threads(), **side("torch", 1)})
    bv_out = {"status": bv_status}
    if big_vision is not None:
        bv_out.update({"params": big_vision[1], **side("big_vision", 1)})

    def over(reference: dict) -> float | None:
        return (jax_out["examples_per_s"] / reference["examples_per_s"]
                if reference["status"] == "ok" else None)

    ratio, bv_ratio = over(torch_out), over(bv_out)
    result = {
        "name": case.name, "config": case.config, "description": case.description,
        "overrides": dict(case.overrides), "batch_size": batch_size,
        "shapes": {k: list(v.shape) for k, v in local.items()},
        "dtype": compute_dtype(config),
        "params": _count(state["params"]), "flops_per_step": flops, "flops_source": source,
        "compiler_options": exp.compiler_options or {},
        "jax": jax_out, "torch": torch_out, "ratio": ratio, "big_vision": bv_out,
        "big_vision_ratio": bv_ratio, "pipeline": pipe,
    }
    return result, exp, state


def run(cases: str | None = None, *, steps: int = 12, warmup: int = 3, torch_mode: str = "auto",
        json_path: str | None = None, peak_size: int = 4096, data_dir: str | None = None,
        argv: list[str] | None = None, out=None) -> dict:
    """Runs the benchmark; prints progress to stderr and the tables to `out` (stdout)."""
    out = out or sys.stdout
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
    selected, checkpoint_case = cases_lib.parse_cases(cases)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    devices = _devices()
    check_platform(selected, devices[0].platform)
    torch, torch_status = _torch(torch_mode)
    log(f"measuring the {peak_size}^2 float32 matmul peak ...")
    measured = timing.matmul_peak(peak_size, numpy_too=devices[0].platform == "cpu")
    peak, peak_source = timing.device_peak(devices[0], measured)
    results, checkpoint = [], None
    for case in selected:
        result, exp, state = bench_case(case, steps=steps, warmup=warmup, peak=peak,
                                        devices=devices, torch=torch, torch_status=torch_status,
                                        data_dir=data_dir, log=log)
        results.append(result)
        if case.name == checkpoint_case:
            log(f"[checkpoint] saving {case.name}'s train state ...")
            checkpoint = checkpoint_bench.run(exp, state, case=case.name,
                                              step_seconds=result["jax"]["step_s"]["median"])
        del exp, state
    if checkpoint_case and checkpoint is None:  # its case was not timed: time its step only
        case = cases_lib.CASES[checkpoint_case]
        result, exp, state = bench_case(case, steps=steps, warmup=warmup, peak=peak,
                                        devices=devices, torch=None, torch_status="off",
                                        data_dir=data_dir, log=log)
        log(f"[checkpoint] saving {case.name}'s train state ...")
        checkpoint = checkpoint_bench.run(exp, state, case=case.name,
                                          step_seconds=result["jax"]["step_s"]["median"])
        del exp, state
    import jaxlib  # pylint: disable=import-outside-toplevel

    host = {"platform": devices[0].platform,
            "device_kind": getattr(devices[0], "device_kind", ""),
            "devices": len(devices), "cpu_cores": cpu_cores(),
            "machine": platform.machine(), "python": platform.python_version(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "torch": torch.__version__ if torch else None,
            "torch_threads": torch.get_num_threads() if torch else None}
    report = {
        "schema": report_lib.SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv or sys.argv),
        "host": host,
        "protocol": {"steps": steps, "warmup": warmup, "statistic": "median",
                     "optimizer": "adamw",
                     "step": "full forward + backward + update, one step at a time"},
        "peak": {**measured, "used": peak, "source": peak_source},
        "cases": results,
        "checkpoint": checkpoint,
        "goals": report_lib.goals(results, checkpoint, host),
    }
    print(report_lib.format_report(report), file=out, end="", flush=True)
    if json_path:
        report_lib.write_json(report, json_path)
        print(f"wrote {json_path}", file=out, flush=True)
    return report
