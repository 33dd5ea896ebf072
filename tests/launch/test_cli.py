"""`vistax` end to end in subprocesses: usage, a 3-step train with eval, checkpoint and logs,
resume at the final step, eval of the saved run, prepare, and errors before any work."""

import glob
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vistax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "vit.py")

# 3 steps of the tiny preset with a 1-block ViT: log every step, evaluate and save at step 3.
# A configured peak skips the start-up CPU matmul benchmark.
TRAIN_FLAGS = ["--config.duration=3 steps", "--config.schedule.warmup=1 steps",
               "--config.log_every=1 steps", "--config.evals.test.every=3 steps",
               "--config.checkpoint.every=3 steps", "--config.model.depth=1",
               "--config.peak_flops_per_device=1e12"]


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory, cli):
    """(cwd, workdir, result) of one short `vistax train` run."""
    cwd = str(tmp_path_factory.mktemp("cli"))
    result = cli.run("train", f"--config={CONFIG}:tiny", f"--config.input.data_dir={data_dir}",
                     *TRAIN_FLAGS, "--workdir=W", cwd=cwd)
    assert result.returncode == 0, cli.explain(result)
    return cwd, os.path.join(cwd, "W"), result


def test_usage_without_command(tmp_path, cli):
    for args in ((), ("bogus",)):
        result = cli.run(*args, cwd=str(tmp_path))
        assert result.returncode == 2, cli.explain(result)
        assert "usage: vistax <command>" in result.stderr
        for command in ("train", "eval", "prepare"):
            assert f"\n  {command} " in result.stderr


def test_train_writes_metrics_tensorboard_checkpoint_and_config(trained):
    _, workdir, result = trained
    lines = read_metrics(workdir)
    for line in lines:
        assert isinstance(line["step"], int)
        for key, value in line.items():
            assert isinstance(key, str)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    train = {line["step"]: line for line in lines if "train/loss" in line}
    assert sorted(train) == [1, 2, 3]
    evals = [line for line in lines if "eval/test/accuracy" in line]
    assert [line["step"] for line in evals] == [3]
    assert evals[0]["eval/test/num_examples"] == 359  # the whole digits test split, once
    assert 0.0 <= evals[0]["eval/test/accuracy"] <= 1.0
    # The logged learning rate is the schedule's value for the step taken: warmup over 1 step
    # from 0, then cosine over the remaining 2 from 2e-3 down to 0.
    np.testing.assert_allclose([train[s]["train/learning_rate"] for s in (1, 2, 3)],
                               [0.0, 2e-3, 1e-3], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose([train[s]["train/epoch"] for s in (1, 2, 3)],
                               [s * 128 / 1438 for s in (1, 2, 3)], rtol=1e-9)
    assert all(np.isfinite(train[s]["train/loss"]) for s in (1, 2, 3))

    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 100
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["duration"] == "3 steps" and saved["model"]["depth"] == 1
    assert "3 steps of 128 examples on 8 cpu devices" in result.stdout + result.stderr


def test_rerun_resumes_at_final_step_without_new_work(trained, data_dir, cli):
    cwd, workdir, _ = trained
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        before = f.read()
    result = cli.run("train", f"--config={CONFIG}:tiny", f"--config.input.data_dir={data_dir}",
                     *TRAIN_FLAGS, "--workdir=W", cwd=cwd)
    assert result.returncode == 0, cli.explain(result)
    assert "resumed from step 3" in result.stdout + result.stderr
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        assert f.read() == before  # neither truncated nor appended to
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert not os.path.exists(os.path.join(workdir, "config.1.json"))  # same config: no copy


def test_eval_reproduces_the_accuracy_logged_in_training(trained, data_dir, cli):
    cwd, workdir, _ = trained
    logged = [line for line in read_metrics(workdir) if "eval/test/accuracy" in line][0]
    result = cli.run("eval", f"--config={CONFIG}:tiny", f"--config.input.data_dir={data_dir}",
                     "--config.model.depth=1", "--workdir=W", cwd=cwd)
    assert result.returncode == 0, cli.explain(result)
    printed = dict(line.split(" = ") for line in result.stdout.splitlines() if " = " in line)
    assert float(printed["eval/test/accuracy"]) == float(f"{logged['eval/test/accuracy']:.6g}")
    last = read_metrics(workdir)[-1]
    assert last["step"] == 3
    # Same checkpointed parameters, same mesh, same data: bit-identical metrics.
    for key in ("eval/test/accuracy", "eval/test/top5_accuracy", "eval/test/loss",
                "eval/test/num_examples"):
        assert last[key] == logged[key], key


def test_eval_without_checkpoint_fails(tmp_path, data_dir, cli):
    (tmp_path / "empty").mkdir()
    result = cli.run("eval", f"--config={CONFIG}:tiny", f"--config.input.data_dir={data_dir}",
                     "--workdir=empty", cwd=str(tmp_path))
    assert result.returncode != 0
    assert "No checkpoint in" in result.stderr, cli.explain(result)
    assert os.listdir(tmp_path / "empty") == []  # evaluation creates nothing
    typo = cli.run("eval", f"--config={CONFIG}:tiny", f"--config.input.data_dir={data_dir}",
                   "--workdir=typo", cwd=str(tmp_path))
    assert typo.returncode != 0 and "No checkpoint in" in typo.stderr, cli.explain(typo)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("args, expected", [
    (["--config.input.batch_sise=3"],
     ["--config.input.batch_sise=3", "'batch_sise'", 'Did you mean "batch_size"']),
    (["--config.input.batch_size=abc"], ["--config.input.batch_size=abc", "'abc'"]),
    (["--config.input.batch_size=12"],
     ["input.batch_size=12", "not divisible by the data-parallel size 8"]),
    ([":foo=1"], ["Unknown option 'foo'", "accepts ['variant']"]),
    ([":huge"], ["Unknown preset 'huge'", "'tiny', 'S/16'"]),
    (["--config.evals.test.batch_size=12"], ["evals.test.batch_size=12", "multiple of 8"]),
    (["--config.input.pp=decode|bogus_op(3)"], ["input.pp", "bogus_op"]),
    (["--config.evals.test.split=nope"], ["evals.test.split='nope'", "'test', 'train'"]),
    (["--config.input.pp=decode|onehot(7)"], ["input.pp: batches", "'labels': ((128, 7)",
                                              "do not fit objective 'classification'"]),
], ids=["unknown-key", "wrong-type", "batch-not-divisible", "unknown-option", "unknown-preset",
        "eval-batch-not-divisible", "unknown-pp-op", "unknown-eval-split", "pp-does-not-fit"])
def test_bad_config_fails_before_any_work(tmp_path, data_dir, args, expected, cli):
    config = f"--config={CONFIG}:tiny"
    if args[0].startswith(":"):
        config = f"--config={CONFIG}{args[0]}" if "=" not in args[0] else f"{config},{args[0][1:]}"
        args = []
    result = cli.run("train", config, f"--config.input.data_dir={data_dir}", *args,
                     "--workdir=W", cwd=str(tmp_path))
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, cli.explain(result)
    assert os.listdir(tmp_path) == []  # no workdir, nothing else written


def _png(path, seed, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


def test_prepare_class_folders(tmp_path, cli):
    images = tmp_path / "images"
    for i in range(3):
        _png(str(images / "cat" / f"{i}.png"), i)
    for i in range(2):
        _png(str(images / "dog" / f"{i}.png"), 10 + i)
    data = _png(str(images / "dog" / "broken.png"), 99, (32, 32))
    with open(images / "dog" / "broken.png", "wb") as f:
        f.write(data[: len(data) // 2])
    out = tmp_path / "prepared"
    result = cli.run("prepare", f"--input={images}", f"--output={out}", cwd=str(tmp_path))
    assert result.returncode == 0, cli.explain(result)
    assert f"wrote 5 examples (train: 5) to {out}" in result.stdout
    assert "skipped 1" in result.stdout and "broken.png" in result.stdout
    info = pipeline.dataset_info(str(out))
    assert info.num_examples == {"train": 5}
    assert info.class_names == ["cat", "dog"]
    assert {"image", "label", "file_name"} <= set(info.features)
    # A second run refuses to replace the output.
    again = cli.run("prepare", f"--input={images}", f"--output={out}", cwd=str(tmp_path))
    assert again.returncode != 0 and "already exists" in again.stderr
    shutil.rmtree(images)
    assert pipeline.dataset_info(str(out)).num_examples == {"train": 5}
