"""`vistax sweep` (launch/sweep.py): point names, override values that survive the command line,
validation errors, results tables and plots (one metric or several, per point or as training
curves) from hand-written metrics, job scripts, local runs with a stand-in trainer, and one real
2-point sweep through the CLI that a second run skips."""

import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
from PIL import Image

from vistax.launch import sweep, tpu


# A config with one key of each overridable kind, and a sweep over `lr`.
SMALL_CONFIG = """
import ml_collections
from ml_collections import config_dict

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.lr = 0.1
    c.steps = 10
    c.flag = False
    c.model = ml_collections.ConfigDict(dict(
        variant="S/16", pool=("cls",), clip=config_dict.placeholder(float)))
    c.sweep = ml_collections.ConfigDict({SWEEP})
    return c
"""


def write_config(tmp_path, name="sweep_config.py", **spec) -> str:
    """A SMALL_CONFIG file whose `sweep` holds `spec` (default: metric, x=lr, 2 points)."""
    spec = {"metric": "eval/test/accuracy", "x": "lr",
            "points": ({"lr": 0.01}, {"lr": 0.03}), **spec}
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / name
    path.write_text(SMALL_CONFIG.replace("{SWEEP}", repr(spec)))
    return str(path)


def write_lines(path, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows)


def read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ---- names and values ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, name", [
    ({"mae.mask_ratio": 0.25}, "mae.mask_ratio=0.25"),
    ({"schedule.base_lr": 1e-05}, "schedule.base_lr=1e-05"),
    ({"model.variant": "B/16", "model.depth": 2}, "model.variant=B-16,model.depth=2"),
    ({"model.pool": ("map", 4)}, "model.pool=map-4"),
    ({"model.scan": True, "input.pp": ""}, "model.scan=true,input.pp=empty"),
    ({}, "base"),
])
def test_point_name(overrides, name):
    assert sweep.point_name(overrides) == name


def test_long_point_names_are_cut_and_stay_distinct():
    names = [sweep.point_name({"input.pp": "decode|" + "resize(32)|" * 20 + tail})
             for tail in ("flip", "crop")]
    assert all(len(name) == 100 for name in names)
    assert names[0][:91] == names[1][:91] and names[0] != names[1]


@pytest.mark.parametrize("default, value", [
    (0.1, 1e-05), (0.1, 3e-4), (0.1, 2.5), (0.1, 0.1 + 0.2),
    (10, 7), (10, -3),
    (False, True), (True, False),
    ("S/16", "B/16"), ("x", "true"), ("x", "1e-3"), ("x", ""), ("x", "a b, c"),
    ((1, 2), (3, 4)), ((1, 2), ()), ((1, 2), (5,)), (("a",), ("a,b", "c d")),
    ((), ((".*/kernel$", 0.5), ("bias", None))),
], ids=lambda v: type(v).__name__)
def test_rendered_values_parse_back_through_the_config_flag(tmp_path, default, value):
    path = tmp_path / "one_key.py"
    path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict(dict(key={default!r}))\n")
    flags = sweep.override_flags({"key": value})
    config = sweep.load_config(str(path), flags)
    assert config.key == value and type(config.key) is type(value), flags


# ---- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    (dict(metric=None), ["sweep.metric=None", "metrics.jsonl key"]),
    (dict(metric=""), ["sweep.metric=''", "metrics.jsonl key"]),
    (dict(metric=()), ["sweep.metric=()", "non-empty tuple"]),
    (dict(metric=("train/loss", 3)), ["sweep.metric=('train/loss', 3): element 1, 3, is not"]),
    (dict(metric=("train/loss", "train/loss")),
     ["sweep.metric=('train/loss', 'train/loss') names 'train/loss' twice"]),
    (dict(curves="yes"), ["sweep.curves='yes'", "expected True"]),
    (dict(curves=1), ["sweep.curves=1", "or False"]),
    (dict(points=()), ["sweep.points=()", "non-empty"]),
    (dict(points=({"lr": 0.5}, "lr=0.7")), ["sweep.points[1]='lr=0.7'", "expected a dict"]),
    (dict(metrics="loss"), ["sweep.metrics is not a sweep key"]),
    (dict(x="model.varaint"), ["sweep.x", "'model.varaint'", "did you mean 'model.variant'"]),
    (dict(points=({"lr": 0.5}, {"model.varaint": "B/16"})),
     ["sweep.points[1] key 'model.varaint'", "did you mean 'model.variant'"]),
    (dict(points=({"lr": 0.5}, {"lr": 0.7}, {"lr": 0.5})),
     ["sweep.points[2] {'lr': 0.5} gives the same config as sweep.points[0]"]),
    (dict(points=({"lr": 1}, {"lr": 1.0})), ["sweep.points[1]", "same config as sweep.points[0]"]),
    (dict(points=({"lr": 0.1, "steps": 5}, {"steps": 5})),
     ["sweep.points[1] {'steps': 5} gives the same config as sweep.points[0]"]),
    (dict(points=({"steps": "ten"},)), ["sweep.points[0] {'steps': 'ten'}", "--config.steps=ten",
                                       "invalid literal for int()"]),
    (dict(points=({"model.variant": 16},)),
     ["sweep.points[0] sets model.variant=16 (int)", "gives '16' (str)"]),
    (dict(points=({"model.clip": None},)), ["sweep.points[0]", "--config.model.clip=None",
                                           "could not convert string to float"]),
], ids=["no-metric", "empty-metric", "empty-metric-tuple", "non-str-metric", "repeated-metric",
        "curves-str", "curves-int", "no-points", "point-not-dict", "unknown-sweep-key", "unknown-x",
        "unknown-point-key", "duplicate", "duplicate-int-float", "duplicate-of-default",
        "wrong-type", "changes-type", "none-for-float"])
def test_validation_errors_name_the_key_and_value(tmp_path, spec, expected):
    with pytest.raises(sweep.SweepError) as error:
        sweep.plan(write_config(tmp_path, **spec))
    for text in expected:
        assert text in str(error.value)


def test_config_without_sweep_or_file(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                    "    return ml_collections.ConfigDict(dict(lr=0.1))\n")
    with pytest.raises(sweep.SweepError, match="has no `sweep` entry"):
        sweep.plan(f"{path}:tiny")
    with pytest.raises(sweep.SweepError, match="missing.py .*does not exist"):
        sweep.plan(str(tmp_path / "missing.py"))


def test_base_overrides_reach_every_point_but_not_a_swept_key(tmp_path):
    path = write_config(tmp_path, points=({"model.variant": "B/16"}, {"model.variant": "B-16"}))
    planned = sweep.plan(path, {"steps": 3, "model.pool": ("map",)})
    assert planned.base_flags == ("--config.steps=3", "--config.model.pool=('map',)")
    assert [p.config.steps for p in planned.points] == [3, 3]
    assert [p.config.model.variant for p in planned.points] == ["B/16", "B-16"]
    names = [p.name for p in planned.points]  # both spell model.variant=B-16: digests added
    assert names[0] != names[1] and all(n.startswith("model.variant=B-16-") for n in names)
    with pytest.raises(sweep.SweepError, match=r"--config.model overrides 'model.variant'"):
        sweep.plan(path, {"model": {"variant": "L/16"}})
    with pytest.raises(sweep.SweepError, match=r"--config.stepz: .* did you mean 'steps'"):
        sweep.plan(path, {"stepz": 3})


def test_config_dict_points_are_flattened(tmp_path):
    path = tmp_path / "nested.py"
    path.write_text(SMALL_CONFIG.replace("{SWEEP}", "dict(metric='m', points=(ml_collections."
                                         "ConfigDict(dict(model=dict(variant='B/16'))),))"))
    (point,) = sweep.plan(str(path)).points
    assert point.overrides == {"model.variant": "B/16"} and point.name == "model.variant=B-16"


# ---- results --------------------------------------------------------------------------------

@pytest.fixture
def four_points(tmp_path):
    """(sweep, sweep_dir): points finished, never run, failed after an evaluation, and
    finished without the metric."""
    planned = sweep.plan(write_config(tmp_path, points=tuple(
        {"lr": lr} for lr in (0.01, 0.03, 0.1, 0.3))))
    sweep_dir = str(tmp_path / "S")
    names = [p.name for p in planned.points]
    metric = "eval/test/accuracy"
    write_lines(os.path.join(sweep_dir, names[0], "metrics.jsonl"), [
        {"step": 5, "train/loss": 2.0}, {"step": 5, metric: 0.5},
        {"step": 10, metric: 0.75}, {"step": 10, "resumed": 1}, {"step": 10, metric: 0.8125},
        {"step": 8, metric: 0.1}, '{"step": 12, "eval/te'])  # a line cut short by a kill
    write_lines(os.path.join(sweep_dir, names[0], sweep.RUNS_FILE), [
        {"exit_code": 1, "wall_s": 12.5}, {"exit_code": 0, "wall_s": 7.5}])
    write_lines(os.path.join(sweep_dir, names[2], "metrics.jsonl"), [{"step": 5, metric: 0.3}])
    write_lines(os.path.join(sweep_dir, names[2], sweep.RUNS_FILE), [
        {"exit_code": 0, "wall_s": 1.0}, {"exit_code": 137, "wall_s": 2.0}])
    write_lines(os.path.join(sweep_dir, names[3], "metrics.jsonl"), [{"step": 5, "x": 1.0}])
    return planned, sweep_dir


def test_collect_writes_csv_and_markdown(four_points):
    planned, sweep_dir = four_points
    paths = sweep.write_results(planned, sweep.collect(planned, sweep_dir), sweep_dir)
    assert paths == [os.path.join(sweep_dir, f"results.{e}") for e in ("csv", "md", "png")]
    rows = read_csv(paths[0])
    assert list(rows[0]) == ["point", "lr", "eval/test/accuracy", "step", "wall_s", "status"]
    assert [(r["point"], r["lr"], r["eval/test/accuracy"], r["step"], r["wall_s"], r["status"])
            for r in rows] == [
        ("lr=0.01", "0.01", "0.8125", "10", "20.0", "ok"),
        ("lr=0.03", "0.03", "", "", "", "not run"),
        ("lr=0.1", "0.1", "", "", "3.0", "failed (exit 137)"),
        ("lr=0.3", "0.3", "", "", "", "no metric"),
    ]
    with open(paths[1], encoding="utf-8") as f:
        markdown = f.read()
    assert markdown.startswith("## sweep_config.py\n")
    assert ("| point | lr | eval/test/accuracy | step | wall_s | status |\n"
            "|---|---|---|---|---|---|\n") in markdown
    assert "| lr=0.01 | 0.01 | 0.8125 | 10 | 20.0 | ok |" in markdown
    assert "| lr=0.03 | 0.03 |  |  |  | not run |" in markdown
    assert "| lr=0.1 | 0.1 |  |  | 3.0 | failed (exit 137) |" in markdown


def _assert_png(path, size=None):
    """A PNG that decodes, `size` (width, height) pixels if given."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    with Image.open(io.BytesIO(data)) as image:
        assert size is None or image.size == size
        image.verify()


def test_plots_numeric_categorical_and_empty(four_points, tmp_path):
    planned, sweep_dir = four_points
    results = sweep.collect(planned, sweep_dir)
    sweep.write_plot(planned, results, str(tmp_path / "line.png"))  # x=lr: a line
    _assert_png(tmp_path / "line.png")
    categorical = sweep.plan(write_config(tmp_path, name="cat.py", x=None, points=(
        {"model.variant": "B/16"}, {"model.variant": "L/16", "flag": True})))
    sweep.write_plot(categorical, sweep.collect(categorical, sweep_dir), str(tmp_path / "b.png"))
    _assert_png(tmp_path / "b.png")  # bars, both "n/a"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["S", "b.png", "cat.py", "line.png", "sweep_config.py"])  # no partial files left


ACC, LOSS = "eval/test/accuracy", "train/loss"
LRS = ({"lr": 0.01}, {"lr": 0.03}, {"lr": 0.1}, {"lr": 0.3})


@pytest.fixture
def two_metrics(tmp_path):
    """(sweep, sweep_dir) over accuracy and loss: points with both (accuracy last at step 10,
    loss at 12), with accuracy only, failed, and never run."""
    planned = sweep.plan(write_config(tmp_path, metric=(ACC, LOSS), points=LRS))
    sweep_dir = str(tmp_path / "S")
    names = [p.name for p in planned.points]
    write_lines(os.path.join(sweep_dir, names[0], "metrics.jsonl"), [
        {"step": 0, LOSS: 2.5}, {"step": 6, LOSS: 1.5, ACC: 0.5}, {"step": 6, LOSS: 1.25},
        {"step": 10, ACC: 0.75}, {"step": 12, LOSS: 0.5}, '{"step": 14, "train/lo'])
    write_lines(os.path.join(sweep_dir, names[1], "metrics.jsonl"), [{"step": 4, ACC: 0.25}])
    write_lines(os.path.join(sweep_dir, names[2], "metrics.jsonl"), [{"step": 3, LOSS: 9.0}])
    for name, code, wall in zip(names, (0, 0, 1), (4.0, 1.0, 2.0)):
        write_lines(os.path.join(sweep_dir, name, sweep.RUNS_FILE),
                    [{"exit_code": code, "wall_s": wall}])
    return planned, sweep_dir


def test_several_metrics_tabulate_to_their_columns(two_metrics):
    planned, sweep_dir = two_metrics
    assert planned.metrics == (ACC, LOSS) and not planned.curves
    results = sweep.collect(planned, sweep_dir)
    paths = sweep.write_results(planned, results, sweep_dir)
    rows = read_csv(paths[0])
    assert list(rows[0]) == ["point", "lr", ACC, LOSS, "step", "wall_s", "status"]
    assert [tuple(r.values()) for r in rows] == [  # step: the accuracy's
        ("lr=0.01", "0.01", "0.75", "0.5", "10", "4.0", "ok"),
        ("lr=0.03", "0.03", "0.25", "", "4", "1.0", "no metric"),
        ("lr=0.1", "0.1", "", "", "", "2.0", "failed (exit 1)"),
        ("lr=0.3", "0.3", "", "", "", "", "not run"),
    ]
    with open(paths[1], encoding="utf-8") as f:
        markdown = f.read()
    assert f"`{ACC}`, `{LOSS}` each at the last step that logged it (`step`: that of `{ACC}`)" \
        in markdown
    assert f"| point | lr | {ACC} | {LOSS} | step | wall_s | status |\n" in markdown
    assert "| lr=0.03 | 0.03 | 0.25 |  | 4 | 1.0 | no metric |" in markdown
    figure = sweep.results_figure(planned, results)  # per point, a panel per metric
    assert [ax.get_title() for ax in figure.axes] == [ACC, LOSS]
    assert [ax.get_ylabel() for ax in figure.axes] == [ACC, LOSS]
    assert tuple(figure.axes[1].lines[0].get_xydata()[0]) == (0.01, 0.5)  # the one loss
    _assert_png(paths[2], size=(2 * 768, 504))


def test_curves_plot_each_metric_against_the_step(two_metrics, tmp_path):
    _, sweep_dir = two_metrics
    planned = sweep.plan(write_config(tmp_path, name="curves.py", metric=(ACC, LOSS),
                                      points=LRS, curves=True))
    results = sweep.collect(planned, sweep_dir)
    assert results[0].curves == (((6, 0.5), (10, 0.75)), ((0, 2.5), (6, 1.25), (12, 0.5)))
    assert results[2].curves == ((), ((3, 9.0),)) and results[2].values == (None, None)
    figure = sweep.results_figure(planned, results)
    accuracy, loss = figure.axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "0.01: 0.5", "0.03: no metric", "0.1: failed (exit 1)", "0.3: not run"]  # x values
    assert [t.get_text() for t in accuracy.get_legend().get_texts()][:2] == [
        "0.01: 0.75", "0.03: 0.25"]
    assert loss.get_legend().get_title().get_text() == "lr" and loss.get_xlabel() == "step"
    assert loss.lines[0].get_xydata().tolist() == [[0, 2.5], [6, 1.25], [12, 0.5]]
    sweep.write_plot(planned, results, str(tmp_path / "curves.png"))
    _assert_png(tmp_path / "curves.png", size=(2 * 768, 504))

    single = sweep.plan(write_config(tmp_path, name="one.py", metric=LOSS, x=None,
                                     points=LRS, curves=True))
    figure = sweep.results_figure(single, sweep.collect(single, sweep_dir))
    (ax,) = figure.axes
    assert ax.get_legend().get_title().get_text() == "point" and ax.get_title() == "one.py"
    assert ax.get_legend().get_texts()[0].get_text() == "lr=0.01: 0.5"  # point names
    sweep.write_plot(single, sweep.collect(single, sweep_dir), str(tmp_path / "one.png"))
    _assert_png(tmp_path / "one.png", size=(768, 504))


def test_dino_collapse_sweep_plans_three_points_with_two_metrics():
    root = os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))
    planned = sweep.plan(os.path.join(root, "configs", "dino.py") + ":tiny,sweep=collapse")
    assert planned.metrics == ("train/teacher_entropy", "train/kl") and planned.curves
    assert len(planned.points) == 3 and planned.points[0].name == "base"
    assert planned.points[1].config.dino.teacher == "none"


# ---- job scripts ----------------------------------------------------------------------------

def test_emit_slurm_writes_scripts_that_record_their_launch(tmp_path, cli):
    planned = sweep.plan(write_config(tmp_path), {"steps": 3})
    sweep_dir = str(tmp_path / "S")
    paths = sweep.emit_jobs(planned, sweep_dir, "slurm",
                            ["--partition=gpu --gres=gpu:8 -t 1:00:00", "--nodes=2"])
    jobs = os.path.join(sweep_dir, "jobs")
    assert paths == [os.path.join(jobs, n) for n in
                     ("lr=0.01.sbatch", "lr=0.03.sbatch", "submit_all.sh")]
    with open(paths[1], encoding="utf-8") as f:
        script = f.read()
    point_dir = os.path.join(sweep_dir, "lr=0.03")
    lines = script.splitlines()
    assert lines[:8] == [
        "#!/bin/bash", "#SBATCH --job-name=sweep_config.py-lr=0.03",
        f"#SBATCH --output={point_dir}/log.txt", "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:8", "#SBATCH -t 1:00:00",
        "#SBATCH --nodes=2"]
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.split() == ["srun", sys.executable, "-m", "vistax.launch.cli", "train",
                            f"--config={tmp_path}/sweep_config.py", "--config.steps=3",
                            "--config.lr=0.03", f"--workdir={point_dir}", "--distributed=slurm"]
    with open(paths[-1], encoding="utf-8") as f:
        submit = f.read()
    assert "sbatch lr=0.01.sbatch\nsbatch lr=0.03.sbatch\n" in submit
    assert all(os.access(p, os.X_OK) for p in paths)
    assert sorted(os.listdir(point_dir)) == []  # created for Slurm's log, nothing run

    # The script, with a stand-in srun that fails, appends its launch to sweep_runs.jsonl.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho \"srun $*\"\nexit 3\n")
    os.chmod(bin_dir / "srun", 0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(["bash", paths[1]], env=env, capture_output=True, text=True)
    assert result.returncode == 3 and "srun " in result.stdout, cli.explain(result)
    (run,) = sweep.read_runs(point_dir)
    assert run["exit_code"] == 3 and run["config_sha"] == planned.points[1].config_sha
    assert run["launcher"] == "slurm" and run["wall_s"] >= 0
    assert [r.status for r in sweep.collect(planned, sweep_dir)] == [
        "not run", "failed (exit 3)"]


def test_emit_shell_writes_plain_scripts(tmp_path):
    planned = sweep.plan(write_config(tmp_path))
    sweep_dir = str(tmp_path / "S")
    paths = sweep.emit_jobs(planned, sweep_dir, "shell")
    assert [os.path.basename(p) for p in paths] == ["lr=0.01.sh", "lr=0.03.sh", "run_all.sh"]
    with open(paths[0], encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#!/bin/bash" and lines[-1].startswith("exec ")
    assert lines[-1].split()[1:] == [
        sys.executable, "-m", "vistax.launch.cli", "train", f"--config={tmp_path}/sweep_config.py",
        "--config.lr=0.01", f"--workdir={sweep_dir}/lr=0.01", "--distributed=auto", '"$@"']
    with open(paths[-1], encoding="utf-8") as f:
        assert 'bash lr=0.01.sh "$@" || failed=1\nbash lr=0.03.sh "$@" || failed=1\n' in f.read()


def stand_in_srun(tmp_path, code=0):
    """A bin dir with an srun that records its argv (JSON lines in <bin>/calls) and exits
    `code`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(
        f"#!/bin/sh\n{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "
        f"\"$@\" >> {bin_dir}/calls\necho \"srun ran\"\nexit {code}\n")
    os.chmod(bin_dir / "srun", 0o755)
    return bin_dir


def test_emit_slurm_array_picks_the_point_of_the_task(tmp_path):
    planned = sweep.plan(write_config(tmp_path, points=tuple(
        {"lr": lr} for lr in (0.01, 0.03, 0.1))), {"steps": 3})
    sweep_dir = str(tmp_path / "S")
    out = io.StringIO()
    assert sweep.main(planned.config_arg, {"steps": 3}, sweep_dir, emit="slurm_array",
                      slurm_args=["-p gpu --gres=gpu:8"], max_parallel=2, stream=out) == 0
    path = os.path.join(sweep_dir, "jobs", "sweep_config.py.array.sbatch")
    assert out.getvalue().startswith(f"wrote {path}: an array job of 3 points; submit it with: "
                                     f"sbatch {path}\n")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[:6] == [
        "#!/bin/bash", "#SBATCH --job-name=sweep_config.py", "#SBATCH --array=0-2%2",
        f"#SBATCH --output={sweep_dir}/jobs/sweep_config.py-%A_%a.out",
        "#SBATCH -p gpu", "#SBATCH --gres=gpu:8"]
    assert os.access(path, os.X_OK) and sorted(os.listdir(sweep_dir)) == [
        "jobs", "lr=0.01", "lr=0.03", "lr=0.1"]

    # Task 1 of the array trains point 1 (a stand-in srun records the command and fails).
    bin_dir = stand_in_srun(tmp_path, code=4)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="1")
    result = subprocess.run(["bash", path], cwd="/", env=env, capture_output=True, text=True)
    assert result.returncode == 4 and result.stdout == "", result.stderr
    with open(bin_dir / "calls", encoding="utf-8") as f:
        (call,) = [json.loads(line) for line in f]
    point_dir = os.path.join(sweep_dir, "lr=0.03")
    assert call == [sys.executable, "-m", "vistax.launch.cli", "train",
                    f"--config={tmp_path}/sweep_config.py", "--config.steps=3", "--config.lr=0.03",
                    f"--workdir={point_dir}", "--distributed=slurm"]
    assert (tmp_path / "S" / "lr=0.03" / "log.txt").read_text() == "srun ran\n"
    (run,) = sweep.read_runs(point_dir)
    assert (run["exit_code"], run["config_sha"], run["launcher"]) == (
        4, planned.points[1].config_sha, "slurm_array")
    assert [r.status for r in sweep.collect(planned, sweep_dir)] == [
        "not run", "failed (exit 4)", "not run"]

    # Outside an array job, or beyond it, the script stops before running anything.
    for task in (None, "3"):
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        env.pop("SLURM_ARRAY_TASK_ID", None)
        if task:
            env["SLURM_ARRAY_TASK_ID"] = task
        result = subprocess.run(["bash", path], env=env, capture_output=True, text=True)
        assert result.returncode == 2
        assert f"SLURM_ARRAY_TASK_ID={task or '(unset)'}: expected 0..2" in result.stderr
    assert len((bin_dir / "calls").read_text().splitlines()) == 1
    # No limit without --parallel.
    sweep.emit_jobs(planned, sweep_dir, "slurm_array")
    with open(path, encoding="utf-8") as f:
        assert "#SBATCH --array=0-2\n" in f.read()


def test_emit_tpu_writes_gcloud_scripts_per_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    planned = sweep.plan(write_config(tmp_path))
    sweep_dir = str(tmp_path / "S")
    target = tpu.Tpu("pod", "us-west4-a", project="p", num_slices=1)
    paths = sweep.emit_jobs(planned, sweep_dir, "tpu", target=target, remote_dir="~/vistax",
                            setup="pip install -e ~/vistax")
    jobs = os.path.join(sweep_dir, "jobs")
    assert paths == [os.path.join(jobs, n) for n in
                     ("lr=0.01.tpu.sh", "lr=0.03.tpu.sh", "run_all.tpu.sh")]
    with open(paths[1], encoding="utf-8") as f:
        lines = f.read().splitlines()
    point_dir = os.path.join(sweep_dir, "lr=0.03")
    ssh = next(line for line in lines if line.startswith("gcloud "))
    assert shlex.split(ssh) == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-west4-a", "--project=p",
        "--worker=all", "--command=cd ~/vistax && python3 -m vistax.launch.cli train "
        f"--config=sweep_config.py --config.lr=0.03 --workdir={point_dir} --distributed=auto"]
    with open(paths[-1], encoding="utf-8") as f:
        run_all = f.read()
    assert ("gcloud compute tpus tpu-vm ssh pod --zone=us-west4-a --project=p --worker=all "
            "'--command=pip install -e ~/vistax' || exit $?\nfailed=0\n"
            "bash lr=0.01.tpu.sh || failed=1\nbash lr=0.03.tpu.sh || failed=1\n") in run_all

    # Run here with a stand-in gcloud: the launch is recorded in the point's sweep_runs.jsonl.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(bin_dir / "gcloud", 0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(["bash", paths[1]], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (run,) = sweep.read_runs(point_dir)
    assert (run["exit_code"], run["launcher"]) == (0, "tpu")

    # Multi-slice: one command for every slice's workers, the data axis across slices (where
    # the point does not lay it out itself).
    with pytest.raises(sweep.SweepError, match="point lr=0.01: --num_slices=2: the config has "
                                               "no mesh_dcn"):
        sweep.emit_jobs(planned, sweep_dir, "tpu", target=tpu.Tpu("ms", "z", num_slices=2))
    (tmp_path / "dcn.py").write_text(
        "import ml_collections\n\ndef get_config(arg=None):\n    return ml_collections."
        "ConfigDict(dict(lr=0.1, mesh_dcn=dict(data=1, fsdp=1), sweep=dict(metric='m', points=("
        "{'lr': 0.5}, {'mesh_dcn.fsdp': 2}))))\n")
    paths = sweep.emit_jobs(sweep.plan(str(tmp_path / "dcn.py")), sweep_dir, "tpu",
                            target=tpu.Tpu("ms", "z", num_slices=2))
    commands = []
    for path in paths[:2]:
        with open(path, encoding="utf-8") as f:
            ssh = shlex.split(next(line for line in f if line.startswith("gcloud ")))
        assert ssh[:9] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "ms",
                           "--zone=z", "--node=all", "--worker=all"]
        commands.append(shlex.split(ssh[9])[5:7])
    assert commands == [["--config.lr=0.5", "--config.mesh_dcn.data=2"],
                        ["--config.mesh_dcn.fsdp=2", f"--workdir={sweep_dir}/mesh_dcn.fsdp=2"]]


def test_cli_emit_flags(tmp_path, cli):
    config = write_config(tmp_path)
    base = ["sweep", f"--config={config}", "--workdir=S"]
    result = cli.run(*base, "--emit=slurm_array", "--parallel=3", cwd=str(tmp_path))
    assert result.returncode == 0, cli.explain(result)
    array = tmp_path / "S" / "jobs" / "sweep_config.py.array.sbatch"
    assert "#SBATCH --array=0-1%3\n" in array.read_text()
    result = cli.run(*base, "--emit=tpu", "--zone=z", cwd=str(tmp_path))
    assert result.returncode == 1 and "missing --tpu" in result.stderr, cli.explain(result)
    result = cli.run(*base, "--emit=tpu", "--tpu=t", "--zone=z", "--accelerator_type=v4-8",
                     cwd=str(tmp_path))
    assert result.returncode == 1, cli.explain(result)
    assert "sweep --emit=tpu runs on an existing TPU; drop --accelerator_type" in result.stderr
    result = cli.run(*base, "--emit=tpu", "--tpu=t", "--zone=z", "--remote_python=/opt/py",
                     cwd=str(tmp_path))
    assert result.returncode == 0, cli.explain(result)
    assert "/opt/py -m vistax.launch.cli train" in (
        tmp_path / "S" / "jobs" / "lr=0.01.tpu.sh").read_text()


# ---- local runs -----------------------------------------------------------------------------

def test_run_points_in_parallel_reports_failures_and_skips_finished(tmp_path, monkeypatch):
    planned = sweep.plan(write_config(tmp_path, points=tuple(
        {"lr": lr} for lr in (0.01, 0.03, 0.1))))
    sweep_dir = str(tmp_path / "S")

    def stand_in(_, point, sweep_dir, **kwargs):  # "trains" by writing the metric; lr=0.03 fails
        code = 2 if point.config.lr == 0.03 else 0
        line = json.dumps({"step": 4, "eval/test/accuracy": point.config.lr})
        return [sys.executable, "-c", "import os, sys; print('training', sys.argv[1]); "
                f"open(os.path.join(sys.argv[1], 'metrics.jsonl'), 'a').write({line!r} + '\\n'); "
                f"sys.exit({code})", sweep.point_dir(sweep_dir, point)]

    monkeypatch.setattr(sweep, "train_command", stand_in)
    out = io.StringIO()
    status = sweep.main(planned.config_arg, {}, sweep_dir, parallel=2, stream=out)
    assert status == 1
    text = out.getvalue()
    failed_log = os.path.join(sweep_dir, "lr=0.03", "log.txt")
    assert "lr=0.03: FAILED (exit 2) after" in text and f"log {failed_log}" in text
    assert f"point lr=0.03 failed (exit 2); log {failed_log}" in text
    assert f"[lr=0.1] training {sweep_dir}/lr=0.1" in text
    with open(failed_log, encoding="utf-8") as f:
        log = f.read().splitlines()
    assert log[0].startswith("# vistax sweep, ") and log[1] == f"training {sweep_dir}/lr=0.03"
    rows = read_csv(os.path.join(sweep_dir, "results.csv"))
    assert [(r["eval/test/accuracy"], r["status"]) for r in rows] == [
        ("0.01", "ok"), ("", "failed (exit 2)"), ("0.1", "ok")]

    # Again: the finished points are skipped, the failed one is launched again.
    codes = sweep.run_points(planned, sweep_dir, stream=io.StringIO())
    assert codes == {"lr=0.01": None, "lr=0.1": None, "lr=0.03": 2}
    assert [len(sweep.read_runs(sweep.point_dir(sweep_dir, p))) for p in planned.points] == \
        [1, 2, 1]

    # The config changed (here by a --config.* flag): the old runs are neither resumed nor
    # reported as results of the new config.
    changed = sweep.plan(planned.config_arg, {"steps": 20})
    out = io.StringIO()
    codes = sweep.run_points(changed, sweep_dir, stream=out)
    assert codes == {"lr=0.01": 2, "lr=0.03": 2, "lr=0.1": 2}
    assert "holds a run of a different config" in out.getvalue()
    assert {r.status for r in sweep.collect(changed, sweep_dir)} == {
        "stale (trained with another config)"}


def test_cli_sweep_errors_before_any_work(tmp_path, cli):
    plain = tmp_path / "plain.py"
    plain.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                     "    return ml_collections.ConfigDict(dict(lr=0.1))\n")
    result = cli.run("sweep", f"--config={plain}", "--workdir=S", cwd=str(tmp_path))
    assert result.returncode == 1
    assert "FATAL vistax sweep: " in result.stderr and "has no `sweep` entry" in result.stderr, \
        cli.explain(result)
    config = write_config(tmp_path)
    both = cli.run("sweep", f"--config={config}", "--workdir=S", "--emit=slurm", "--collect_only",
                   cwd=str(tmp_path))
    assert both.returncode != 0 and "pass one of them" in both.stderr, cli.explain(both)
    swept = cli.run("sweep", f"--config={config}", "--config.lr=0.5", "--workdir=S",
                    cwd=str(tmp_path))
    assert swept.returncode == 1 and "--config.lr overrides 'lr'" in swept.stderr, \
        cli.explain(swept)
    assert not (tmp_path / "S").exists()


# ---- end to end -----------------------------------------------------------------------------

E2E_CONFIG = """
import ml_collections
from vistax.configs import vit

def get_config(arg=None):
    c = vit.get_config("tiny")
    c.input.data_dir = {data_dir!r}
    c.input.batch_size = 32
    c.model.update(dict(depth=1, width=32, mlp_dim=64, num_heads=2, patch_size=8))
    c.duration = "6 steps"
    c.schedule.warmup = "1 steps"
    c.log_every = "3 steps"
    c.checkpoint.every = "6 steps"
    c.evals.test.every = "6 steps"
    c.peak_flops_per_device = 1e12  # skips the start-up CPU benchmark
    c.progress = "lines"
    c.sweep = ml_collections.ConfigDict(dict(
        metric="eval/test/accuracy", x="schedule.base_lr", name="tiny ViT lr",
        points=({{"schedule.base_lr": 1e-3}}, {{"schedule.base_lr": 3e-3}})))
    return c
"""


@pytest.mark.slow
def test_sweep_end_to_end_then_skips_finished_points(tmp_path, data_dir, cli):
    (tmp_path / "lr_sweep.py").write_text(E2E_CONFIG.format(data_dir=data_dir))
    args = ["sweep", "--config=lr_sweep.py", "--workdir=S"]
    result = cli.run(*args, cwd=str(tmp_path))
    assert result.returncode == 0, cli.explain(result)
    sweep_dir = tmp_path / "S"
    names = ["schedule.base_lr=0.001", "schedule.base_lr=0.003"]
    rows = read_csv(sweep_dir / "results.csv")
    assert [r["point"] for r in rows] == names
    assert [r["schedule.base_lr"] for r in rows] == ["0.001", "0.003"]
    for row in rows:
        assert row["status"] == "ok" and row["step"] == "6" and float(row["wall_s"]) > 0
        assert 0.0 <= float(row["eval/test/accuracy"]) <= 1.0
    _assert_png(sweep_dir / "results.png")
    metrics = {}
    for name in names:
        with open(sweep_dir / name / "config.json", encoding="utf-8") as f:
            assert json.load(f)["schedule"]["base_lr"] == float(name.split("=")[1])
        assert os.listdir(sweep_dir / name / "checkpoints") == ["6"]
        assert "step 6: eval/test/accuracy=" in (sweep_dir / name / "log.txt").read_text()
        metrics[name] = (sweep_dir / name / "metrics.jsonl").read_text()

    start = time.perf_counter()
    again = cli.run(*args, cwd=str(tmp_path))
    assert again.returncode == 0, cli.explain(again)
    assert again.stdout.count("finished earlier with this config; skipped") == 2
    assert time.perf_counter() - start < 20  # no jax process started
    for name in names:
        assert (sweep_dir / name / "metrics.jsonl").read_text() == metrics[name]
        assert len(sweep.read_runs(str(sweep_dir / name))) == 1
    assert read_csv(sweep_dir / "results.csv") == rows
