"""The benchmark report: one JSON document (schema below) and the tables printed from it.

{
  "schema": "vistax-bench/1", "created": ISO time, "argv": [...],
  "host": {platform, device_kind, devices, cpu_cores, jax, jaxlib, numpy, torch (or null),
           torch_threads},
  "protocol": {steps, warmup, statistic: "median", optimizer: "adamw"},
  "peak": {size, numpy, xla, best (FLOP/s of a size^2 float32 matmul), used, source},
  "cases": [{name, config, description, overrides, batch_size, shapes {key: [dims]},
             dtype (compute dtype: "float32", or "bfloat16" with float32 parameters),
             params, flops_per_step, flops_source,
             jax {first_step_s, step_s {median, mean, min, max, p10, p90, n}, examples_per_s,
                  flops_per_s, mfu},
             torch {status ("ok" | "torch not installed" | "off" | "no reference..." |
                    "error: ..."), and with "ok": params, first_step_s, step_s, examples_per_s,
                    flops_per_s, mfu},
             ratio (JAX examples/s over PyTorch's, or null),
             big_vision {status, and with "ok": params, first_step_s, step_s, examples_per_s,
                         flops_per_s, mfu} (linen_vit.py, ViT cases),
             big_vision_ratio (JAX examples/s over big_vision-style's, or null),
             pipeline {examples_per_s, batch_s, ..., ratio_to_step}}],
  "checkpoint": null or {case, params, bytes, first_blocking_s, blocking_s, completed_s,
                         every, every_steps, step_s, interval_s, blocking_share_pct, ...},
  "goals": [{goal, case, measured, target, met}]
}
"""

from __future__ import annotations

import json
import math
import os

SCHEMA = "vistax-bench/1"
TOP_FIELDS = ("schema", "created", "host", "protocol", "peak", "cases", "checkpoint", "goals")
CASE_FIELDS = ("name", "config", "batch_size", "shapes", "params", "flops_per_step", "jax",
               "torch", "ratio", "pipeline")
JAX_FIELDS = ("step_s", "examples_per_s", "flops_per_s", "mfu")


def validate(report: dict) -> dict:
    """Raises ValueError naming the first missing field; returns `report`."""
    missing = [k for k in TOP_FIELDS if k not in report]
    if missing:
        raise ValueError(f"bench report lacks {missing}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"bench report schema {report['schema']!r} is not {SCHEMA!r}")
    for case in report["cases"]:
        missing = [k for k in CASE_FIELDS if k not in case]
        missing += [f"jax.{k}" for k in JAX_FIELDS if k not in case["jax"]]
        if "status" not in case["torch"]:
            missing.append("torch.status")
        if missing:
            raise ValueError(f"bench report case {case.get('name')!r} lacks {missing}")
    return report


def _clean(value):
    """JSON has no NaN/Infinity: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(report: dict, path: str) -> None:
    validate(report)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(report), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return validate(json.load(f))


# -- goals ----------------------------------------------------------------------------------------

# The targets of issue 8 that later work chases; evaluated where the run measured them.
RATIO_CASES = ("vit_ti16_224", "vit_s16_112")
BIG_VISION_TARGET = 1.3
MFU_CASE, MFU_TARGET = "vit_s16_112", 0.60
PIPELINE_TARGET = 3.0
CHECKPOINT_TARGET_PCT = 5.0
# On a GPU/TPU chip: ViT-B/16 training in bfloat16 at half the chip's bf16 peak or more.
ACCELERATOR_MFU_CASE, ACCELERATOR_MFU_TARGET = "vit_b16_224_bf16", 0.50


def goals(cases: list[dict], checkpoint: dict | None, host: dict | None = None) -> list[dict]:
    """The goals this run measured; `host` (the report's) says whether an accelerator ran."""
    out = []
    accelerator = bool(host) and host.get("platform") not in (None, "cpu")
    for case in cases:
        name = case["name"]
        if (accelerator and name == ACCELERATOR_MFU_CASE and case["jax"]["mfu"] is not None):
            out.append(dict(goal=f"MFU >= {ACCELERATOR_MFU_TARGET:.0%} of the "
                            f"{host.get('device_kind') or host['platform']}'s peak",
                            case=name, measured=case["jax"]["mfu"],
                            target=ACCELERATOR_MFU_TARGET,
                            met=case["jax"]["mfu"] >= ACCELERATOR_MFU_TARGET))
        if name in RATIO_CASES and case["ratio"] is not None:
            out.append(dict(goal="JAX step at least as fast as PyTorch eager (ratio >= 1)",
                            case=name, measured=case["ratio"], target=1.0,
                            met=case["ratio"] >= 1.0))
        bv_ratio = case.get("big_vision_ratio")
        if name in RATIO_CASES and bv_ratio is not None:
            out.append(dict(goal=f"JAX step >= {BIG_VISION_TARGET:g}x big_vision's ViT",
                            case=name, measured=bv_ratio, target=BIG_VISION_TARGET,
                            met=bv_ratio >= BIG_VISION_TARGET))
        if name == MFU_CASE and case["jax"]["mfu"] is not None:
            out.append(dict(goal=f"MFU >= {MFU_TARGET:.0%} of the peak", case=name,
                            measured=case["jax"]["mfu"], target=MFU_TARGET,
                            met=case["jax"]["mfu"] >= MFU_TARGET))
        ratio = (case.get("pipeline") or {}).get("ratio_to_step")
        if ratio is not None:
            out.append(dict(goal=f"input pipeline >= {PIPELINE_TARGET:g}x the step's consumption",
                            case=name, measured=ratio, target=PIPELINE_TARGET,
                            met=ratio >= PIPELINE_TARGET))
    if checkpoint:
        share = checkpoint["blocking_share_pct"]
        out.append(dict(goal=f"checkpoint save blocks < {CHECKPOINT_TARGET_PCT:g}% of the time "
                        f"between saves (every {checkpoint['every']})", case=checkpoint["case"],
                        measured=share, target=CHECKPOINT_TARGET_PCT,
                        met=share < CHECKPOINT_TARGET_PCT))
    return out


# -- tables ------------------------------------------------------------------------------------

def shapes_text(case: dict) -> str:
    """'32 x image 224x224x3, labels 1000': the batch and each field's per-example shape."""
    fields = ", ".join(f"{k} {'x'.join(map(str, dims[1:])) or 'scalar'}"
                       for k, dims in case["shapes"].items())
    return f"{case['batch_size']} x {fields}"


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _grouped(cases: list[dict], text_of) -> str:
    """`text_of(case)` for every case, the cases named where the texts differ."""
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(text_of(c), []).append(c["name"])
    if len(groups) <= 1:
        return next(iter(groups), "-")
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in groups.items())


def _compiler_options(cases: list[dict]) -> str:
    """The XLA compiler options the cases' steps were jitted with (config `xla_cpu_dots`), with
    the cases named where they differ."""
    return _grouped(cases, lambda c: ", ".join(
        f"{k}={v}" for k, v in sorted(c.get("compiler_options", {}).items()))
        or "XLA's default options")


def _dtypes(cases: list[dict]) -> str:
    def text(case):  # reports written before the accelerator cases had float32 cases only
        dtype = case.get("dtype", "float32")
        return dtype if dtype == "float32" else f"{dtype} compute, float32 parameters"

    return _grouped(cases, text)


def format_report(report: dict) -> str:
    host, peak, proto = report["host"], report["peak"], report["protocol"]
    torch_text = (f"torch {host['torch']} ({host['torch_threads']} threads)" if host["torch"]
                  else "torch not installed")
    lines = [
        f"vistax bench: {host['devices']} x {host['device_kind']} ({host['platform']}), "
        f"{host['cpu_cores']} CPU cores; jax {host['jax']}, {torch_text}",
        f"protocol: {_dtypes(report['cases'])}; {proto['optimizer']}, full "
        "forward+backward+update, "
        f"median of {proto['steps']} steps after {proto['warmup']} warm-up",
        f"environment: GLIBC_TUNABLES={host.get('glibc_tunables') or '(unset)'}, "
        f"XLA_FLAGS={host.get('xla_flags') or '(unset)'}",
        f"JAX steps compiled with {_compiler_options(report['cases'])}; the big_vision-style "
        f"reference with XLA's defaults",
        f"peak: {peak['used'] / 1e9:.1f} GFLOP/s ({peak['source']}; numpy "
        f"{_num(peak['numpy'] and peak['numpy'] / 1e9, '.1f')}, XLA {peak['xla'] / 1e9:.1f})",
        "",
    ]
    rows = []
    for c in report["cases"]:
        j, t = c["jax"], c["torch"]
        torch_col = (f"{t['examples_per_s']:.1f}" if t["status"] == "ok" else t["status"])
        bv = c.get("big_vision") or {"status": "-"}
        bv_col = f"{bv['examples_per_s']:.1f}" if bv["status"] == "ok" else "-"
        rows.append([c["name"], shapes_text(c), f"{j['step_s']['median'] * 1e3:.1f}",
                     f"{j['examples_per_s']:.1f}", _num(j["flops_per_s"] and
                                                        j["flops_per_s"] / 1e9, ".1f"),
                     _num(j["mfu"] and 100 * j["mfu"], ".1f"),
                     torch_col, _num(c["ratio"], ".2f"), bv_col,
                     _num(c.get("big_vision_ratio"), ".2f")])
    if rows:
        lines += _table(["case", "batch", "JAX step ms", "ex/s", "GFLOP/s", "MFU %",
                         "torch ex/s", "JAX/torch", "big_vision ex/s", "JAX/bv"], rows,
                        {2, 3, 4, 5, 7, 8, 9})
        notes = [f"  {c['name']}: FLOPs from {c['flops_source']}" for c in report["cases"]
                 if c["flops_source"] != "analytic"]
        torch_notes = [f"  {c['name']}: torch {c['torch']['params']:,} parameters vs JAX "
                       f"{c['params']:,}, step {c['torch']['step_s']['median'] * 1e3:.1f} ms, "
                       f"MFU {100 * (c['torch']['mfu'] or 0):.1f}%"
                       for c in report["cases"] if c["torch"]["status"] == "ok"]
        bv_notes = [f"  {c['name']}: big_vision-style linen ViT {c['big_vision']['params']:,} "
                    f"parameters, step {c['big_vision']['step_s']['median'] * 1e3:.1f} ms, MFU "
                    f"{100 * (c['big_vision']['mfu'] or 0):.1f}%"
                    for c in report["cases"] if (c.get("big_vision") or {}).get("status") == "ok"]
        lines += notes + torch_notes + bv_notes + [""]
        prows = [[c["name"], f"{c['pipeline']['examples_per_s']:.1f}",
                  f"{c['jax']['examples_per_s']:.1f}",
                  _num(c["pipeline"].get("ratio_to_step"), ".1f"),
                  str(c["pipeline"]["worker_count"]),
                  str(c["pipeline"].get("read_threads", "")),
                  "yes" if c["pipeline"].get("cache") else "no"]
                 for c in report["cases"] if c.get("pipeline")]
        if prows:
            lines += ["input pipeline alone (train_iterator, the case's pp):"]
            lines += _table(["case", "pipeline ex/s", "step ex/s", "pipeline/step", "workers",
                             "threads", "cache"], prows, {1, 2, 3, 4, 5}) + [""]
    ck = report.get("checkpoint")
    if ck:
        lines.append(
            f"checkpoint ({ck['case']}, {ck['params']:,} parameters, {ck['bytes'] / 2**20:.0f} "
            f"MiB): save() blocks {ck['blocking_s']['median'] * 1e3:.0f} ms (first save "
            f"{ck['first_blocking_s'] * 1e3:.0f} ms), written after "
            f"{ck['completed_s']['median']:.2f} s; every {ck['every']} x "
            f"{ck['step_s'] * 1e3:.0f} ms = {ck['interval_s']:.0f} s -> blocking "
            f"{ck['blocking_share_pct']:.3g}% (first save {ck['first_blocking_share_pct']:.3g}%)")
        lines.append("")
    if report["goals"]:
        lines.append("goals (issue 8):")
        for g in report["goals"]:
            if "MFU" in g["goal"]:
                measured = f"{100 * g['measured']:.1f}%"
            elif "checkpoint" in g["goal"]:
                measured = f"{g['measured']:.3g}%"
            else:
                measured = f"{g['measured']:.2f}x"
            lines.append(f"  [{'met' if g['met'] else 'not met'}] {g['case']}: {g['goal']}: "
                         f"{measured}")
    return "\n".join(lines).rstrip() + "\n"
