"""`vistax <command>`: train, eval, sweep, prepare, tokenizer, generate.

  vistax train --config=configs/vit.py:tiny [--config.a.b=value ...] --workdir=DIR
  vistax eval  --config=configs/vit.py:tiny --workdir=DIR      # latest checkpoint in DIR
  vistax sweep --config=configs/mae.py:tiny,sweep=mask_ratio --workdir=SWEEP_DIR
      [--config.a.b=value ...] [--parallel=N | --emit=slurm|shell [--slurm_args='-p gpu ...']
      | --collect_only]   # the config's `sweep` (launch/sweep.py), then results.csv/md/png
  vistax prepare --input=FOLDER_OR_CSV --output=DATASET_DIR [--kind=auto|folder|captions]
  vistax generate --config=configs/perceiver.py:ar_tiny --workdir=DIR --prompt='Return the '
      [--num_tokens=200 --temperature=0.8 --seed=0 --step=N]   # continue text (Perceiver AR)
  vistax tokenizer --dataset=shapes --split=train --field=caption --vocab_size=8000 \
      --out=FILE.model [--data_dir=DIR]   # a SentencePiece model for 'sentencepiece:FILE.model'
  vistax plan --config=configs/dino.py:g/14 --topology=v5e:16x16 [--num_slices=N]
      [--json=FILE] [--epoch_size=N]   # compile the train step for a TPU topology (libtpu):
      # per-device memory, fits or not (exit 1 if not), FLOPs, step time and MFU bounds
  vistax bench [--cases=vit_ti16_224,vit_s16_112,...|all|accelerator] [--steps=12 --warmup=3]
      [--json=FILE] [--torch=auto|off]   # train-step, input-pipeline and checkpoint timings,
      # side by side with PyTorch equivalents (benchmarks/); accelerator: bf16 B/16 on a GPU/TPU

Multi-process runs: every process runs the same command, with --distributed=auto on TPU VMs
(jax.distributed finds its peers), --distributed=slurm under srun (launch/distributed.py reads
the SLURM environment), or --coordinator_address, --num_processes and --process_id (or
VISTAX_COORDINATOR, VISTAX_NUM_PROCESSES, VISTAX_PROCESS_ID) elsewhere. Launchers:

  vistax train ... --local_processes=2 --local_devices=4   # 2 local processes x 4 CPU devices
  vistax slurm --config=... --workdir=DIR --nodes=2 --gpus_per_node=8 [--submit]
  vistax tpu --config=... --workdir=DIR --tpu=NAME --zone=ZONE [--accelerator_type=v5litepod-64
      --runtime_version=V [--queued_resource [--num_slices=2]] [--spot]] [--setup=CMD] [--run]
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import textwrap

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

COMMANDS = {
    "train": "train a config in a workdir (resumes from its latest checkpoint)",
    "eval": "run a config's evaluators on the latest checkpoint in a workdir",
    "sweep": "train the points of a config's `sweep` (or write job scripts) and tabulate them",
    "prepare": "convert a folder of class subfolders or a CSV/TSV of image,caption to a dataset",
    "tokenizer": "train a SentencePiece model on a text field of a dataset split",
    "generate": "continue a text prompt with a trained Perceiver AR run",
    "plan": "compile a config's train step for a TPU topology: memory, fit, FLOPs, MFU bound",
    "bench": "time train steps (vs PyTorch), the input pipeline and checkpoint saves",
    "slurm": "write (and with --submit, sbatch) a SLURM script training a config on N nodes",
    "tpu": "print (and with --run, run) the gcloud commands training a config on a TPU VM/pod",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and argument, "
                                          "e.g. configs/vit.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; "
                                "sweep: the sweep's directory, one subdirectory per point.")
_STEP = flags.DEFINE_integer("step", None, "eval, generate: checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: the text to continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "generate: bytes to generate.",
                                   lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: sampling temperature (0: "
                                  "greedy).", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto", "explicit", "slurm"],
    "How this process joins a multi-process run: auto: jax.distributed.initialize() detects "
    "the cluster (TPU VMs and pods); slurm: read from the SLURM environment under srun (local "
    "GPUs split among the tasks of a node); explicit (implied by --coordinator_address): the "
    "three flags below.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Multi-process runs: seconds without a heartbeat after which "
    "jax.distributed counts a process as dead and stops the others.", lower_bound=1)
_LOCAL_PROCESSES = flags.DEFINE_integer(
    "local_processes", None, "train, eval: start this many processes on this host (CPU, "
    "jax.distributed on 127.0.0.1) running the command; output prefixed [i].", lower_bound=1)
_LOCAL_DEVICES = flags.DEFINE_integer("local_devices", 1, "With --local_processes: simulated CPU "
                                      "devices per process.", lower_bound=1)
_LOCAL_GRACE = flags.DEFINE_float(
    "local_grace_period", 300.0, "With --local_processes: seconds to wait for the others to stop "
    "after one fails (or after a forwarded signal) before terminating them.", lower_bound=0.0)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("VISTAX_COORDINATOR"),
    "host:port of process 0 for jax.distributed (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("VISTAX_NUM_PROCESSES", "0")) or None,
    "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ["VISTAX_PROCESS_ID"]) if "VISTAX_PROCESS_ID" in os.environ
    else None, "This process's index in a multi-process run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "sweep: points trained at a time.", lower_bound=1)
_EMIT = flags.DEFINE_enum("emit", None, ["slurm", "slurm_array", "shell", "tpu"],
                          "sweep: write job scripts to <workdir>/jobs/ and run nothing: an "
                          "sbatch per point, one SLURM array job (--parallel: tasks at a time), "
                          "plain scripts, or gcloud ssh scripts per point (--tpu, --zone).")
_SLURM_ARGS = flags.DEFINE_multi_string("slurm_args", [], "slurm, sweep --emit=slurm*: more "
                                        "sbatch options, one #SBATCH line each, e.g. "
                                        "'--partition=gpu --time=24:00:00'.")
_NODES = flags.DEFINE_integer("nodes", 1, "slurm: nodes.", lower_bound=1)
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node (--gres=gpu:N; "
                                      "0: CPU nodes).", lower_bound=0)
_TASKS_PER_NODE = flags.DEFINE_integer(
    "tasks_per_node", 1, "slurm: processes per node (1: one with all the node's GPUs; "
    "--gpus_per_node: one per GPU).", lower_bound=1)
_JOB_NAME = flags.DEFINE_string("job_name", None, "slurm: job and script name (default from the "
                                "config, e.g. vit-tiny).")
_SUBMIT = flags.DEFINE_bool("submit", False, "slurm: submit the script with sbatch.")
_TPU = flags.DEFINE_string("tpu", None, "tpu, sweep --emit=tpu: the TPU VM, or the queued "
                           "resource (and node prefix) of a multi-slice run.")
_ZONE = flags.DEFINE_string("zone", None, "tpu, sweep --emit=tpu: the TPU's zone.")
_PROJECT = flags.DEFINE_string("project", None, "tpu, sweep --emit=tpu: Google Cloud project "
                               "(default: gcloud's).")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None, "tpu: create the TPU first, "
                                        "of this type (e.g. v5litepod-256).")
_RUNTIME_VERSION = flags.DEFINE_string("runtime_version", None, "tpu: TPU software version of a "
                                       "TPU created here (e.g. v2-alpha-tpuv5-lite).")
_QUEUED_RESOURCE = flags.DEFINE_bool("queued_resource", False, "tpu: create the TPU as a queued "
                                     "resource (and wait until it is ACTIVE).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "tpu, sweep --emit=tpu: TPU slices (>1: "
                                   "multi-slice, data-parallel across slices).", lower_bound=1)
_SPOT = flags.DEFINE_bool("spot", False, "tpu: create Spot TPUs.")
_SETUP = flags.DEFINE_string("setup", None, "tpu, sweep --emit=tpu: a shell command run on every "
                             "worker before training, e.g. 'pip install -e ~/vistax'.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", None, "tpu, sweep --emit=tpu: directory on the "
                                  "TPU VMs to run in (where the --config path is found).")
_REMOTE_PYTHON = flags.DEFINE_string("remote_python", "python3", "tpu, sweep --emit=tpu: the "
                                     "Python on the TPU VMs that has vistax installed.")
_RUN = flags.DEFINE_bool("run", False, "tpu: run the printed commands (needs gcloud).")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "sweep: only tabulate and plot the "
                                  "points' metrics (after cluster runs).")
_INPUT = flags.DEFINE_string("input", None, "prepare: class folder, or CSV/TSV file.")
_OUTPUT = flags.DEFINE_string("output", None, "prepare: dataset directory to create.")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "folder", "captions"], "prepare: input kind.")
_SPLIT = flags.DEFINE_string("split", "train", "prepare: split name for a flat input; "
                             "tokenizer: the split to read (tfds slices such as train[:10%] too).")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", "image", "prepare: CSV column of image paths.")
_CAPTION_COLUMN = flags.DEFINE_string("caption_column", "caption", "prepare: CSV caption column.")
_MAX_SIZE = flags.DEFINE_integer("max_size", None, "prepare: downscale longer side to this.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "prepare, slurm: replace an existing output "
                               "or script.")
_DATASET = flags.DEFINE_string("dataset", None, "tokenizer: built-in name, dataset name in "
                               "--data_dir, or dataset directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tokenizer: where datasets are found "
                                "(default $VISTAX_DATA_DIR or ~/.cache/vistax/datasets).")
_FIELD = flags.DEFINE_string("field", "caption", "tokenizer: text feature to train on ('a/b' "
                             "when nested; every caption of a list).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "tokenizer: vocabulary size (an upper "
                                   "bound: a small corpus may support fewer pieces).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram", "char", "word"],
                                "tokenizer: SentencePiece model type (unigram stops short of "
                                "--vocab_size on small corpora).")
_NORMALIZATION = flags.DEFINE_enum(
    "normalization", "nmt_nfkc", ["nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"],
    "tokenizer: SentencePiece normalization (the _cf rules also lowercase).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "tokenizer: read at most this many "
                                     "records (a fixed random subset) of the split.")
_OUT = flags.DEFINE_string("out", None, "tokenizer: model file to write (never overwritten).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "plan: TPU topology, e.g. v5e:16x16, v5p:8x8x8, "
                                "v4:4x4x4, v6e:8x8; 2xv5e:16x16 for two slices (or --num_slices).")
_JSON = flags.DEFINE_string("json", None, "plan: also write the numbers to this JSON file.")
_EPOCH_SIZE = flags.DEFINE_integer("epoch_size", None, "plan: examples per epoch (default: a "
                                   "placeholder; it sets only schedule constants).",
                                   lower_bound=1)


def _usage() -> str:
    lines = ["usage: vistax <command> [flags]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`vistax <command> --helpfull` lists the flags."]
    return "\n".join(lines)


def _require(*pairs) -> None:
    missing = [f"--{name}" for name, value in pairs if value in (None, "")]
    if missing:
        raise app.UsageError(f"missing {', '.join(missing)}")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, plus a one-line error (not a traceback) for an override of a config
    key that does not exist: ml_collections raises AttributeError/KeyError there."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # as absl's parse_flags_with_usage reports it
        message = str(e)
        message = f"\n{textwrap.indent(message, '  ')}" if "\n" in message else f" {message}"
        sys.stderr.write(f"FATAL Flags parsing error:{message}\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args and isinstance(e.args[0], Exception) else e
        text = str(inner.args[0]) if inner.args else str(inner)
        missing = text.split("\n")[0].strip("'\"")
        overrides = [a for a in argv[1:] if a.startswith("--config.")
                     and missing in a.partition("=")[0][len("--config."):].split(".")]
        hint = " ".join(line.strip() for line in text.split("\n")[1:] if line.strip())
        flag = overrides[0] if overrides else "a --config.* override"
        sys.stderr.write(f"FATAL Flags parsing error: {flag}: the config has no key "
                         f"{missing!r}. {hint}".rstrip() + "\n")
        sys.exit(1)


def _initialize_distributed() -> None:
    from vistax.launch import distributed
    try:
        distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value, heartbeat_timeout_seconds=_HEARTBEAT.value)
    except distributed.DistributedError as e:
        raise app.UsageError(str(e)) from None


def _launch_local(command: str) -> None:
    """--local_processes: this process starts the run's processes and waits (no jax here)."""
    from vistax.launch import local
    taken = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id",
                                      "distributed") if flags.FLAGS[name].present]
    if taken:
        raise app.UsageError(f"--local_processes sets the processes' coordinates itself; drop "
                             f"{', '.join(taken)}")
    args = local.strip_flags(sys.argv[2:], local.LOCAL_FLAGS)
    sys.exit(local.launch(command, args, _LOCAL_PROCESSES.value, _LOCAL_DEVICES.value,
                          grace_period=_LOCAL_GRACE.value))


def _config_overrides() -> tuple[str, list[str]]:
    """(--config value as given, its --config.* overrides as flags)."""
    from vistax.launch import sweep
    config_flag = flags.FLAGS["config"]
    return (config_flags.get_config_filename(config_flag),
            sweep.override_flags(config_flags.get_override_values(config_flag)))


def _passed_on() -> list[str]:
    """Flags of this command that the launched trainers need too."""
    return [f"--heartbeat_timeout={_HEARTBEAT.value}"] if flags.FLAGS["heartbeat_timeout"].present \
        else []


def _slurm() -> None:
    """`vistax slurm`: <workdir>/slurm/<name>.sbatch, then sbatch it with --submit."""
    from vistax.launch import slurm, sweep
    config_arg, overrides = _config_overrides()
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    name = _JOB_NAME.value or slurm.job_name(config_arg)
    try:
        config_arg = sweep.absolute_config_arg(config_arg)
        argv = [sys.executable, "-m", "vistax.launch.cli", "train", f"--config={config_arg}",
                *overrides, f"--workdir={workdir}", "--distributed=slurm", *_passed_on()]
        log_dir = os.path.join(workdir, "slurm")
        text = slurm.train_script(argv, name=name, log_dir=log_dir, nodes=_NODES.value,
                                  gpus_per_node=_GPUS_PER_NODE.value,
                                  tasks_per_node=_TASKS_PER_NODE.value,
                                  slurm_args=_SLURM_ARGS.value)
        path = os.path.join(log_dir, f"{name}.sbatch")
        slurm.write_script(path, text, overwrite=_OVERWRITE.value)
        print(f"wrote {path}\nsubmit it with: sbatch {shlex.quote(path)}  (logs: "
              f"{os.path.join(log_dir, name)}-<job id>.out)")
        if not _SUBMIT.value:
            return
        result = slurm.submit(path)
    except (slurm.SlurmError, sweep.SweepError) as e:
        sys.stderr.write(f"FATAL vistax slurm: {e}\n")
        sys.exit(1)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.returncode)


def _tpu() -> None:
    """`vistax tpu`: prints the gcloud script, and runs it with --run."""
    from vistax.launch import tpu
    _require(("tpu", _TPU.value), ("zone", _ZONE.value))
    config_arg, overrides = _config_overrides()
    try:
        target = tpu.Tpu(_TPU.value, _ZONE.value, _PROJECT.value, _NUM_SLICES.value,
                         _ACCELERATOR_TYPE.value, _RUNTIME_VERSION.value, _QUEUED_RESOURCE.value,
                         _SPOT.value).validate()
        overrides += tpu.mesh_dcn_flags(_CONFIG.value, target.num_slices)
        argv = tpu.train_argv(config_arg, overrides, _WORKDIR.value,
                              python=_REMOTE_PYTHON.value, extra=_passed_on())
        text = tpu.script(target, tpu.remote_command(argv, _REMOTE_DIR.value),
                          setup=_SETUP.value)
        print(text, end="", flush=True)
        if _RUN.value:
            sys.exit(tpu.run_script(text))
    except tpu.TpuError as e:
        sys.stderr.write(f"FATAL vistax tpu: {e}\n")
        sys.exit(1)


def _run(command: str, argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (Orbax, tfds) drown progress
        absl_logging.set_verbosity(absl_logging.WARNING)
    if command == "prepare":
        from vistax.data import prepare
        _require(("input", _INPUT.value), ("output", _OUTPUT.value))
        report = prepare.prepare(_INPUT.value, _OUTPUT.value, kind=_KIND.value, split=_SPLIT.value,
                                 image_column=_IMAGE_COLUMN.value,
                                 caption_column=_CAPTION_COLUMN.value, max_size=_MAX_SIZE.value,
                                 overwrite=_OVERWRITE.value)
        print(report.summary())
        return
    if command == "tokenizer":
        _train_tokenizer()
        return
    if command == "plan":
        _plan()
        return
    if command == "bench":
        _bench()
        return
    _require(("config", _CONFIG.value), ("workdir", _WORKDIR.value))
    if command == "sweep":
        _sweep()
        return
    if command == "slurm":
        _slurm()
        return
    if command == "tpu":
        _tpu()
        return
    if command == "generate":
        from vistax.launch import generate
        _require(("prompt", _PROMPT.value))
        model = generate.load_model(_CONFIG.value, _WORKDIR.value, _STEP.value)
        text = generate.generate_text(model, _PROMPT.value, _NUM_TOKENS.value,
                                      temperature=_TEMPERATURE.value, seed=_SEED.value)
        print(_PROMPT.value + text)
        return
    if _LOCAL_PROCESSES.value:
        _launch_local(command)
    _initialize_distributed()
    from vistax.train import loop
    if command == "train":
        loop.train(_CONFIG.value, _WORKDIR.value)
    else:
        results = loop.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value)
        for name, value in sorted(results.items()):
            print(f"{name} = {value:.6g}")


def _sweep() -> None:
    """Runs or emits the sweep in the process that parsed the flags (no jax imported here);
    the --config.* overrides given reach every point."""
    from vistax.launch import sweep
    if _EMIT.value and _COLLECT_ONLY.value:
        raise app.UsageError("--emit writes job scripts and --collect_only reads their results; "
                             "pass one of them")
    config_flag = flags.FLAGS["config"]
    options = {}
    if _EMIT.value == "slurm_array" and flags.FLAGS["parallel"].present:
        options["max_parallel"] = _PARALLEL.value
    if _EMIT.value == "tpu":
        from vistax.launch import tpu
        _require(("tpu", _TPU.value), ("zone", _ZONE.value))
        creating = [f"--{name}" for name in ("accelerator_type", "runtime_version",
                                             "queued_resource", "spot")
                    if flags.FLAGS[name].present]
        if creating:
            raise app.UsageError(f"sweep --emit=tpu runs on an existing TPU; drop "
                                 f"{', '.join(creating)} (create it with `vistax tpu` first)")
        options.update(target=tpu.Tpu(_TPU.value, _ZONE.value, _PROJECT.value, _NUM_SLICES.value),
                       remote_dir=_REMOTE_DIR.value, python=_REMOTE_PYTHON.value,
                       setup=_SETUP.value)
    try:
        status = sweep.main(config_flags.get_config_filename(config_flag),
                            config_flags.get_override_values(config_flag), _WORKDIR.value,
                            parallel=_PARALLEL.value, emit=_EMIT.value,
                            slurm_args=_SLURM_ARGS.value, collect_only=_COLLECT_ONLY.value,
                            **options)
    except sweep.SweepError as e:
        sys.stderr.write(f"FATAL vistax sweep: {e}\n")
        sys.exit(1)
    sys.exit(status)


def _plan() -> None:
    """Exit 0: the step fits the topology's HBM; 1: it does not (the report says by how much
    and what to try); 2: the topology or config cannot be planned."""
    from vistax.train import plan
    _require(("config", _CONFIG.value), ("topology", _TOPOLOGY.value))
    num_slices = flags.FLAGS["num_slices"]
    try:
        topology = plan.parse_topology(_TOPOLOGY.value,
                                       num_slices.value if num_slices.present else None)
        result = plan.plan(_CONFIG.value, topology, epoch_size=_EPOCH_SIZE.value,
                           config_name=_config_arg())
    except ValueError as e:  # PlanError, and config errors (check_config) naming the key
        sys.stderr.write(f"FATAL vistax plan: {e}\n")
        sys.exit(2)
    print(plan.format_plan(result))
    if _JSON.value:
        plan.write_json(result, _JSON.value)
    sys.exit(0 if result.fits else 1)


_BENCH_CASES = flags.DEFINE_string(
    "cases", None, "bench: comma-separated case names (benchmarks/cases.py; default: the quick "
    "set), 'all' (every CPU-sized case) or 'accelerator' (bfloat16 ViT-B/16 and CLIP B/16 at "
    "batch 256, GPU/TPU only); 'checkpoint[:CASE]' also times a checkpoint save of CASE's "
    "train state.")
_BENCH_STEPS = flags.DEFINE_integer("steps", 12, "bench: timed steps per case (median reported).",
                                    lower_bound=1)
_BENCH_WARMUP = flags.DEFINE_integer("warmup", 3, "bench: untimed steps first (the first "
                                     "compiles).", lower_bound=0)
_BENCH_TORCH = flags.DEFINE_enum("torch", "auto", ["auto", "off"], "bench: also time the "
                                 "PyTorch equivalents where torch imports (auto), or not (off).")
_BENCH_PEAK_SIZE = flags.DEFINE_integer("peak_size", 4096, "bench: side of the float32 matmul "
                                        "whose best rate is the measured CPU peak.", lower_bound=64)


def _bench() -> None:
    """`vistax bench`: the tables on stdout, --json=FILE for the report (benchmarks/run.py)."""
    import jax  # pylint: disable=import-outside-toplevel

    from vistax.benchmarks import cases, run
    try:
        selected, _ = cases.parse_cases(_BENCH_CASES.value)
        run.check_platform(selected, jax.local_devices()[0].platform)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run.run(_BENCH_CASES.value, steps=_BENCH_STEPS.value, warmup=_BENCH_WARMUP.value,
            torch_mode=_BENCH_TORCH.value, json_path=_JSON.value, peak_size=_BENCH_PEAK_SIZE.value,
            data_dir=_DATA_DIR.value, argv=sys.argv)


def _config_arg() -> str:
    """The --config value as given, e.g. 'configs/dino.py:g/14'."""
    given = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")]
    return given[-1] if given else config_flags.get_config_filename(flags.FLAGS["config"])


def _default_platforms(command: str) -> None:
    """Sets JAX_PLATFORMS when it is not set. `plan` compiles for the TPU topology libtpu
    describes on the CPU backend, so it never takes (or waits for) this machine's chips. Other
    commands: with libtpu installed (the `tpu` extra) where there is no TPU and no GPU plugin,
    jax would start the TPU runtime, log errors and fall back to the CPU: go to the CPU directly.
    A TPU is assumed wherever there is a Google PCI device (TPU VMs), /dev/accel* or a TPU_*
    variable; there nothing is set."""
    if command == "plan":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")  # beside other users of it
        return
    if os.environ.get("JAX_PLATFORMS"):
        return
    import glob
    import importlib.metadata
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        return
    if (importlib.util.find_spec("jax_plugins") is not None
            or importlib.metadata.entry_points(group="jax_plugins")):
        return  # a GPU (or other) PJRT plugin: leave the choice to jax
    if glob.glob("/dev/accel*") or any(k.startswith("TPU_") for k in os.environ):
        return
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == "0x1ae0":  # Google
                    return
        except OSError:
            continue
    os.environ["JAX_PLATFORMS"] = "cpu"


# glibc's malloc backs its large allocations with transparent huge pages (glibc >= 2.35; a
# no-op elsewhere). XLA's CPU runtime allocates each step's buffers afresh: with 4 KiB pages
# the kernel zeroes ~2 GB of new pages per ViT-S/16 step, 484k page faults and 1.1 s of system
# time; with huge pages, 1.2k faults and 0.2 s, and the step is 11% faster (PyTorch, whose
# eager ops allocate the same way, gains too). glibc still maps and zeroes the step's temporary
# block afresh each step; jemalloc told to keep freed pages does not (README, Benchmarks), but no
# pip package ships it and PyTorch gains as much, so nothing is preloaded here.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def _reexec_with_malloc_tuning() -> None:
    """Restarts this process once (same pid, arguments and environment) with MALLOC_TUNABLE
    added to GLIBC_TUNABLES: glibc reads it only at start-up. Not where GLIBC_TUNABLES already
    sets glibc.malloc.hugetlb (the user's choice), off glibc, or with VISTAX_MALLOC_TUNING=0."""
    tuning = os.environ.get("VISTAX_MALLOC_TUNING", "1")
    if tuning not in ("0", "1"):
        sys.exit(f"vistax: VISTAX_MALLOC_TUNING={tuning!r} is not '0' (off) or '1' (on).")
    current = os.environ.get("GLIBC_TUNABLES", "")
    if (tuning == "0" or not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in current
            or platform.libc_ver()[0] != "glibc"):
        return
    os.environ["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def _train_tokenizer() -> None:
    from vistax.data import tokenizers
    _require(("dataset", _DATASET.value), ("vocab_size", _VOCAB_SIZE.value), ("out", _OUT.value))
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    if os.path.lexists(out):  # before reading any data
        raise app.UsageError(f"--out={out} exists; refusing to overwrite it (remove it or choose "
                             "another path)")
    texts = tokenizers.dataset_texts(_DATASET.value, _SPLIT.value, _FIELD.value,
                                     data_dir=_DATA_DIR.value, max_examples=_MAX_EXAMPLES.value)
    try:
        tok, count = tokenizers.train_sentencepiece(
            texts, out, _VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
            normalization=_NORMALIZATION.value)
    except FileExistsError as e:
        raise app.UsageError(str(e)) from None
    print(f"wrote {out}: SentencePiece {_MODEL_TYPE.value}, vocab_size {tok.vocab_size} "
          f"(asked {_VOCAB_SIZE.value}), pad {tok.pad_id}, eos {tok.eos_id}, trained on {count} "
          f"texts of {_DATASET.value} {_SPLIT.value} {_FIELD.value!r}; use it as "
          f"tokenizer 'sentencepiece:{out}'")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(_usage(), file=sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    command = sys.argv[1]
    _reexec_with_malloc_tuning()
    _default_platforms(command)
    app.run(lambda argv: _run(command, argv), argv=[f"vistax {command}"] + sys.argv[2:],
            flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
