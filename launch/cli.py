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

Multi-process runs: every process runs the same command, with --distributed=auto on TPU pods
and SLURM clusters (jax.distributed finds its peers), or --coordinator_address, --num_processes
and --process_id (or VISTAX_COORDINATOR, VISTAX_NUM_PROCESSES, VISTAX_PROCESS_ID) elsewhere.
"""

from __future__ import annotations

import os
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
    "distributed", "off", ["off", "auto"],
    "auto: jax.distributed.initialize() detects the cluster (TPU pod, SLURM, ...).")
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
_EMIT = flags.DEFINE_enum("emit", None, ["slurm", "shell"], "sweep: write a job script per point "
                          "to <workdir>/jobs/ (sbatch, or plain for other schedulers and TPU "
                          "pods) and run nothing.")
_SLURM_ARGS = flags.DEFINE_multi_string("slurm_args", [], "sweep --emit=slurm: more sbatch "
                                        "options, one #SBATCH line each, e.g. "
                                        "'--partition=gpu --gres=gpu:8 --nodes=2'.")
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
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "prepare: replace an existing output.")
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
    explicit = _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None
    if _DISTRIBUTED.value == "off" and not explicit:
        return
    import jax
    if explicit:
        _require(("coordinator_address", _COORDINATOR.value),
                 ("num_processes", _NUM_PROCESSES.value), ("process_id", _PROCESS_ID.value))
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()


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
    _require(("config", _CONFIG.value), ("workdir", _WORKDIR.value))
    if command == "sweep":
        _sweep()
        return
    if command == "generate":
        from vistax.launch import generate
        _require(("prompt", _PROMPT.value))
        model = generate.load_model(_CONFIG.value, _WORKDIR.value, _STEP.value)
        text = generate.generate_text(model, _PROMPT.value, _NUM_TOKENS.value,
                                      temperature=_TEMPERATURE.value, seed=_SEED.value)
        print(_PROMPT.value + text)
        return
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
    try:
        status = sweep.main(config_flags.get_config_filename(config_flag),
                            config_flags.get_override_values(config_flag), _WORKDIR.value,
                            parallel=_PARALLEL.value, emit=_EMIT.value,
                            slurm_args=_SLURM_ARGS.value, collect_only=_COLLECT_ONLY.value)
    except sweep.SweepError as e:
        sys.stderr.write(f"FATAL vistax sweep: {e}\n")
        sys.exit(1)
    sys.exit(status)


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
    app.run(lambda argv: _run(command, argv), argv=[f"vistax {command}"] + sys.argv[2:],
            flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
