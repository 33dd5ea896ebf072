"""The bench report: JSON round trip with every field, validation naming what is missing, goals
and the printed tables; the case list and its parsing."""

import json

import pytest

from vistax.benchmarks import cases, report


def stats(median):
    return {"median": median, "mean": median, "min": median, "max": median, "p10": median,
            "p90": median, "n": 3}


def fake_case(name="vit_s16_112", torch_ok=True):
    jax_side = {"first_step_s": 9.0, "step_s": stats(1.0), "devices": 1, "examples_per_s": 64.0,
                "flops_per_s": 1e11, "mfu": 0.625}
    torch_side = ({"status": "ok", "params": 10, "threads": 2, "first_step_s": 2.0,
                   "step_s": stats(1.25), "examples_per_s": 51.2, "flops_per_s": 8e10,
                   "mfu": 0.5} if torch_ok else {"status": "no reference"})
    return {"name": name, "config": "vit:S/16", "description": "d", "overrides": {},
            "batch_size": 64, "shapes": {"image": [64, 112, 112, 3], "labels": [64, 1000]},
            "dtype": "float32", "params": 10, "flops_per_step": 1e11, "flops_source": "analytic",
            "compiler_options": {"xla_cpu_experimental_ynn_fusion_type": "A,B"},
            "jax": jax_side, "torch": torch_side, "ratio": 1.25 if torch_ok else None,
            "big_vision": ({"status": "ok", "params": 10, "first_step_s": 3.0,
                            "step_s": stats(1.6), "examples_per_s": 40.0, "flops_per_s": 6e10,
                            "mfu": 0.4} if torch_ok else {"status": "no reference"}),
            "big_vision_ratio": 1.6 if torch_ok else None,
            "pipeline": {"examples_per_s": 128.0, "worker_count": 0, "batch_s": stats(0.5),
                         "ratio_to_step": 2.0}}


def fake_report():
    checkpoint = {"case": "vit_s16_112", "params": 10, "bytes": 2**20, "saves": 3,
                  "first_blocking_s": 0.5, "blocking_s": stats(0.2), "completed_s": stats(1.0),
                  "first_completed_s": 1.5, "every": "1000 steps", "every_steps": 1000,
                  "step_s": 1.0, "interval_s": 1000.0, "blocking_share_pct": 0.02,
                  "first_blocking_share_pct": 0.05}
    case_list = [fake_case(), fake_case("mae_tiny", torch_ok=False)]
    return {"schema": report.SCHEMA, "created": "2025-01-01T00:00:00+00:00", "argv": ["x"],
            "host": {"platform": "cpu", "device_kind": "cpu", "devices": 1, "cpu_cores": 2,
                     "jax": "0", "torch": "2", "torch_threads": 2},
            "protocol": {"steps": 3, "warmup": 1, "statistic": "median", "optimizer": "adamw"},
            "peak": {"size": 64, "numpy": 1.6e11, "xla": 1.5e11, "best": 1.6e11,
                     "used": 1.6e11, "source": "measured"},
            "cases": case_list, "checkpoint": checkpoint,
            "goals": report.goals(case_list, checkpoint)}


def test_json_round_trips_with_every_field(tmp_path):
    original = fake_report()
    original["cases"][1]["jax"]["mfu"] = float("nan")  # JSON has no NaN: written as null
    path = str(tmp_path / "sub" / "bench.json")
    report.write_json(original, path)
    loaded = report.read_json(path)
    assert loaded["cases"][1]["jax"]["mfu"] is None
    loaded["cases"][1]["jax"]["mfu"] = original["cases"][1]["jax"]["mfu"] = None
    assert loaded == json.loads(json.dumps(original))
    for key in report.TOP_FIELDS:
        assert key in loaded
    for key in report.CASE_FIELDS:
        assert key in loaded["cases"][0]


def test_validate_names_missing_fields():
    broken = fake_report()
    del broken["cases"][0]["jax"]["mfu"]
    with pytest.raises(ValueError, match="jax.mfu"):
        report.validate(broken)
    broken = fake_report()
    del broken["peak"]
    with pytest.raises(ValueError, match="peak"):
        report.validate(broken)


def test_goals_and_tables():
    rep = fake_report()
    goals = {(g["case"], g["goal"].split()[0]): g["met"] for g in rep["goals"]}
    assert goals[("vit_s16_112", "JAX")] is True  # ratio 1.25
    assert goals[("vit_s16_112", "MFU")] is True  # 62.5%
    assert goals[("vit_s16_112", "input")] is False  # pipeline 2x < 3x
    assert goals[("vit_s16_112", "checkpoint")] is True
    (bv_goal,) = [g for g in rep["goals"] if "big_vision" in g["goal"]]
    assert bv_goal["met"] is True and bv_goal["measured"] == 1.6  # >= 1.3x
    text = report.format_report(rep)
    assert "JAX/bv" in text and "1.60" in text and "big_vision-style linen ViT 10" in text
    assert "64 x image 112x112x3, labels 1000" in text
    assert "JAX/torch" in text and "1.25" in text and "no reference" in text
    assert "blocking 0.02%" in text and "[not met] vit_s16_112: input pipeline" in text
    assert "JAX steps compiled with xla_cpu_experimental_ynn_fusion_type=A,B;" in text
    rep["cases"][1]["compiler_options"] = {}
    assert ("JAX steps compiled with xla_cpu_experimental_ynn_fusion_type=A,B (vit_s16_112); "
            "XLA's default options (mae_tiny);") in report.format_report(rep)
    assert "protocol: float32; adamw" in text
    rep["cases"][1]["dtype"] = "bfloat16"
    del rep["cases"][0]["dtype"]  # a report written before cases had a dtype: float32
    assert ("protocol: float32 (vit_s16_112); bfloat16 compute, float32 parameters (mae_tiny); "
            "adamw") in report.format_report(rep)


def test_the_accelerator_mfu_goal_is_judged_on_an_accelerator_only():
    case = fake_case("vit_b16_224_bf16")
    case["jax"]["mfu"] = 0.52
    host = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}
    (goal,) = [g for g in report.goals([case], None, host) if g["case"] == "vit_b16_224_bf16"
               and "MFU" in g["goal"]]
    assert goal["met"] and goal["target"] == 0.5
    assert goal["goal"] == "MFU >= 50% of the NVIDIA H100 80GB HBM3's peak"
    case["jax"]["mfu"] = 0.41
    assert not [g for g in report.goals([case], None, host) if "MFU" in g["goal"]][0]["met"]
    for cpu in (None, {"platform": "cpu", "device_kind": "cpu"}):
        assert not [g for g in report.goals([case], None, cpu) if "MFU" in g["goal"]]


def test_parse_cases():
    quick, checkpoint = cases.parse_cases(None)
    assert [c.name for c in quick] == [n for n in cases.QUICK if n != cases.CHECKPOINT]
    assert checkpoint == cases.CHECKPOINT_DEFAULT_CASE
    everything, _ = cases.parse_cases("all")
    accelerator, checkpoint = cases.parse_cases("accelerator")
    assert checkpoint is None and accelerator and all(c.accelerator for c in accelerator)
    assert len(everything) + len(accelerator) == len(cases.CASES)
    assert not any(c.accelerator for c in everything)
    chosen, checkpoint = cases.parse_cases("vit_tiny, checkpoint:vit_tiny,vit_tiny")
    assert [c.name for c in chosen] == ["vit_tiny"] and checkpoint == "vit_tiny"
    assert cases.parse_cases("clip_tiny")[1] is None
    with pytest.raises(ValueError, match="unknown case 'vit'"):
        cases.parse_cases("vit")
    with pytest.raises(ValueError, match="names no case"):
        cases.parse_cases("checkpoint:nope")


def test_every_case_builds_its_config():
    for case in cases.CASES.values():
        config = case.build_config()
        assert not config.evals
        for key, value in case.overrides.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (case.name, key)
    bad = cases.Case("bad", "vit:tiny", "d", overrides={"model.dtpye": "float32"})
    with pytest.raises(ValueError, match="model.dtpye"):
        bad.build_config()


def test_accelerator_cases_compute_in_bfloat16_and_are_refused_on_cpu():
    from vistax.benchmarks import run  # pylint: disable=import-outside-toplevel

    accelerator, _ = cases.parse_cases("accelerator")
    assert {c.name for c in accelerator} == {"vit_b16_224_bf16", "clip_b16_224_bf16"}
    for case in accelerator:
        config = case.build_config()
        assert run.compute_dtype(config) == "bfloat16"
        assert config.input.batch_size == cases.ACCELERATOR_BATCH
        towers = [config.model.image, config.model.text] if "image" in config.model else [
            config.model]
        for tower in towers:
            assert tower.param_dtype == "float32" and tower.remat == "none"
    assert run.compute_dtype(cases.CASES["clip_tiny"].build_config()) == "float32"
    with pytest.raises(ValueError, match="clip_b16_224_bf16 are sized for a GPU/TPU chip"):
        run.check_platform(accelerator, "cpu")
    run.check_platform(accelerator, "gpu")
    run.check_platform(cases.parse_cases("all")[0], "cpu")


@pytest.mark.parametrize("name", cases.ACCELERATOR)
def test_accelerator_cases_build_the_trainer(name):
    """What `vistax bench` builds on a GPU before its first step (config checks, schedule,
    optimizer, model shapes), here on CPU."""
    import jax  # pylint: disable=import-outside-toplevel

    from vistax.train.experiment import Experiment  # pylint: disable=import-outside-toplevel

    exp = Experiment(cases.CASES[name].build_config(), devices=jax.devices()[:1])
    assert exp.flops_per_step > 2.5e13  # B/16 towers at 224 px, 256 examples, x3 for backward
