"""``fromzero pretrain``, ``finetune``, ``crossval``, ``distill`` and ``tune``: the verbs that train.

Each takes recipe overrides after its own options (``--section.key VALUE`` for pretraining,
``--key VALUE`` for fine-tuning): ``main`` passes them on as the handler's second argument."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from fromzero.cli import _add_parser
from fromzero.errors import FromzeroError


def _add_pretrain(sub: argparse._SubParsersAction, with_pretrain_help: bool) -> None:
    pre = _add_parser(
        sub, "pretrain", "pretrain a GPT from a YAML recipe", func=_cmd_pretrain, takes_overrides=True,
        description="Pretrain a GPT language model. Writes runs/<recipe>-<timestamp>/ with config.yaml, "
        "metrics.jsonl, tb/, plots/ and checkpoints/{last,best}.",
        # The recipe-option list reads the config sources: build it only when pretrain is the command.
        epilog=_pretrain_epilog() if with_pretrain_help else None,
    )
    pre.add_argument("--config", help="recipe YAML (e.g. recipes/shakespeare-char.yaml)")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoints/last")
    pre.add_argument("--force", action="store_true", help="start over in an existing run directory")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")


# finetune and crossval share their options (crossval: --folds instead of --resume).
_FINETUNE_LIKE = {
    "finetune": "fine-tune a model from a YAML recipe (text classification, SFT, images)",
    "crossval": "stratified K-fold cross-validation of a fine-tuning recipe",
}


def _add_finetune_like(sub: argparse._SubParsersAction, name: str, with_finetune_help: bool) -> None:
    helptext, func = _FINETUNE_LIKE[name], _cmd_finetune if name == "finetune" else _cmd_crossval
    ft = _add_parser(
        sub, name, helptext, func=func, takes_overrides=True,
        description=("Fine-tune: full, frozen (head / top N layers) or LoRA. Writes a run directory with "
                     "config.yaml, metrics.jsonl, tb/, plots/, metrics.json (test) and checkpoints/best."
                     if name == "finetune" else
                     "Split train+val into K stratified folds; fine-tune once per fold (validating on "
                     "the held-out fold) and report mean +- std of every metric in crossval.json."),
        epilog=_finetune_epilog() if with_finetune_help else None,
    )
    ft.add_argument("--config", help="recipe YAML (e.g. recipes/genre-minilm.yaml)")
    from fromzero.tasks import finetuning_tasks

    ft.add_argument("--task", help=f"{' | '.join(finetuning_tasks())} (default: the recipe's task)")
    if name == "crossval":
        ft.add_argument("--folds", type=int, default=5, help="number of folds K (>= 2)")
    else:
        ft.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a stopped run from RUN_DIR/checkpoints/last (its config.yaml; "
                             "overrides such as --max_steps still apply)")
    ft.add_argument("--force", action="store_true", help="replace the files of an existing run directory")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    ds = _add_parser(
        sub, "distill", "distil a teacher checkpoint into a smaller student (classifiers, language models)",
        description="Train a student (the teacher with fewer layers, --student_layers N, and/or other shapes, "
        "--student_config FILE) on\nalpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss. Runs "
        "as the fine-tuning task of the\nteacher (text-classification for a classifier, sft for a GPT): every "
        "fine-tuning option applies\n(see fromzero finetune --help), and the run directory is the same.\n\n"
        "examples:\n  fromzero distill --teacher runs/genre/checkpoints/best --config "
        "recipes/distill-genre-minilm.yaml\n  fromzero distill --teacher runs/sft/checkpoints/best "
        "--student_layers 2 --data dialogue.jsonl", func=_cmd_distill, takes_overrides=True,
    )
    ds.add_argument("--teacher", required=True, help="teacher checkpoint directory (a text classifier or a GPT)")
    ds.add_argument("--config", help="recipe YAML (e.g. recipes/distill-genre-minilm.yaml)")
    ds.add_argument("--task", help="text-classification | sft (None: the recipe's, else from the teacher's kind)")
    ds.add_argument("--force", action="store_true", help="replace the files of an existing run directory")
    ds.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    tu = _add_parser(
        sub, "tune", "search hyperparameters with Optuna (TPE + median pruning, resumable SQLite study)",
        description="The recipe's tune section says what to search; everything else is a normal pretraining or "
        "fine-tuning\nrecipe. Each trial is a full run in OUT/trial-NNN. Results: OUT/best_params.json, "
        "OUT/best-recipe.yaml,\nOUT/trials.csv, OUT/plots/. Run the same command again to resume a stopped "
        "search (Ctrl-C stops it:\nthe trial it cuts is recorded as interrupted and does not count). Recipe "
        "keys can be overridden for every\ntrial after the options, as with pretrain / finetune: "
        "--train.max_steps 500, --epochs 2, ...\n\n"
        "  tune:\n    metric: val_loss                  # default: val_loss (fine-tuning: the recipe's monitor)\n"
        "    direction: minimize               # default: maximize for accuracy/F1/HR/NDCG, else minimize\n"
        "    space:\n      train.lr: {log_uniform: [1.0e-4, 1.0e-2]}\n      model.dropout: {uniform: [0.0, 0.3]}\n"
        "      model.n_layer: {int: [2, 6]}\n      train.batch_size: {choice: [16, 32]}\n\n"
        "examples:\n  fromzero tune --config recipes/tune-shakespeare-char.yaml --trials 20\n"
        "  fromzero tune --config recipes/tune-shakespeare-char.yaml --trials 20 --train.max_steps 300",
        func=_cmd_tune, takes_overrides=True,
    )
    tu.add_argument("--config", required=True, help="recipe YAML with a tune section")
    tu.add_argument("--trials", type=int, default=20, help="trials in the study in total (finished ones count when resuming)")
    tu.add_argument("--timeout", type=float, default=None, help="stop starting new trials after this many seconds")
    tu.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    tu.add_argument("--study-name", default=None, help="study name in the storage (default: the recipe's file name)")
    tu.add_argument("--out", default=None, help="output directory (default: runs/tune-<recipe>)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")


# ---------------------------------------------------------------------------------------------
# pretrain


_PRETRAIN_ALIASES = {"--device": "--train.device", "--dtype": "--train.dtype", "--compile": "--train.compile",
                     "--out-dir": "--out_dir", "--seed": "--train.seed"}


def _pretrain_epilog() -> str:
    from fromzero.options import static_options_help  # reads the source: no torch import for --help

    return (
        "recipe options (override any with --section.key VALUE; shown with built-in defaults,\n"
        "a recipe sets its own):\n" + "\n".join(static_options_help("fromzero.config:PretrainConfig")) + "\n\n"
        "aliases: --device, --dtype, --compile, --seed mean --train.device, --train.dtype,\n"
        "--train.compile, --train.seed; --out-dir means --out_dir.\n\n"
        "example:\n  fromzero pretrain --config recipes/shakespeare-char.yaml --train.max_steps 500\n"
    )


def _cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.config import load_pretrain_config
    from fromzero.training.pretrain import load_resume_config, pretrain

    expanded = [_PRETRAIN_ALIASES.get(key, key) + eq + val
                for key, eq, val in (tok.partition("=") for tok in overrides)]
    expanded = _bool_flags(expanded, {"--train.compile"})
    if args.resume:
        if args.config:
            raise FromzeroError("--resume takes its config from the run directory; drop --config")
        run_dir = Path(args.resume)
        cfg = load_resume_config(run_dir, expanded)
        result = pretrain(cfg, run_dir=run_dir, resume=True, progress=not args.quiet)
    else:
        if not args.config:
            raise FromzeroError("pretrain needs --config RECIPE.yaml (or --resume RUN_DIR)")
        cfg = load_pretrain_config(args.config, expanded)
        result = pretrain(cfg, force=args.force, progress=not args.quiet)
    if result.stopped_early:  # Ctrl-C / SIGTERM: exit 130, as an interrupted command, like finetune
        print(f"stopped: interrupted at step {result.step} (best val loss {result.best_val_loss:.4f}); "
              f"continue it with fromzero pretrain --resume {result.run_dir}")
        return 130
    print(f"done: step {result.step}, val loss {result.last_val_loss:.4f} (best {result.best_val_loss:.4f}); "
          f"run directory {result.run_dir}")
    return 0


def _bool_flags(tokens: list[str], flags: set[str]) -> list[str]:
    """Let boolean options be given bare (``--compile``) as well as with a value."""
    out: list[str] = []
    for tok, nxt in zip(tokens, tokens[1:] + ["--"]):  # the last token is followed by nothing: "--"
        out += [tok, "true"] if tok in flags and nxt.startswith("--") else [tok]
    return out


# ---------------------------------------------------------------------------------------------
# finetune, distill, tune, crossval


def _finetune_epilog() -> str:
    from fromzero.options import static_options_help  # reads the source: no torch import for --help
    from fromzero.tasks import finetuning_tasks

    parts = ["recipe options, per task, in the recipe sections every recipe has (override any with\n"
             "--section.key VALUE, or the short --key VALUE; built-in defaults shown, a recipe sets its own):"]
    for name, task in finetuning_tasks().items():
        parts.append(f"\ntask {name}:\n" + "\n".join(static_options_help(task.config)))
    parts.append("\nexamples:\n  fromzero finetune --config recipes/genre-minilm.yaml --method.name lora\n"
                 "  fromzero finetune --config recipes/digits-cnn.yaml --train.epochs 5\n")
    return "\n".join(parts)


def _finetune_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    tokens = _bool_flags(list(overrides), {"--compile", "--train.compile", "--packing", "--data.packing", "--force"})
    if getattr(args, "force", False):
        tokens += ["--force", "true"]
    if getattr(args, "quiet", False):
        tokens += ["--progress", "false"]
    return tokens


def _cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.finetune.recipe import load_finetune_config, load_run_config, run_finetune

    if args.resume:
        if args.config or args.task or args.force:
            raise FromzeroError("--resume takes the recipe from the run directory; drop --config / --task / --force")
        task, cfg = load_run_config(args.resume, _finetune_overrides(args, overrides))
        return _finetune_outcome(run_finetune(task, cfg, resume=True))
    task, cfg = load_finetune_config(args.config, _finetune_overrides(args, overrides), task=args.task)
    return _finetune_outcome(run_finetune(task, cfg))


def _finetune_outcome(result: dict) -> int:
    """done (exit 0), or stopped by Ctrl-C / SIGTERM (exit 130, as an interrupted command): a
    script must be able to tell a cut run from a finished one."""
    if result.get("interrupted"):
        run = result["run_dir"]
        print(f"stopped: interrupted at step {result.get('steps', '?')}; continue it with "
              f"fromzero finetune --resume {run} (or end it there, scoring the best weights so far: "
              f"add --max_steps {result.get('steps', 'N')})")
        return 130
    print(f"done: run directory {result['run_dir']}")
    return 0


def _cmd_distill(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.finetune.distill import distill_task
    from fromzero.finetune.recipe import load_finetune_config, run_finetune

    # --student-config / --student-layers as the command's own spelling of the recipe keys
    tokens = ["--" + t[2:].replace("-", "_") if t.startswith("--student-") else t for t in overrides]
    tokens = _finetune_overrides(args, tokens) + ["--teacher", args.teacher]
    task, cfg = load_finetune_config(args.config, tokens, task=args.task or distill_task(args.teacher, args.config))
    return _finetune_outcome(run_finetune(task, cfg))


def _cmd_tune(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.tune import tune

    summary = tune(Path(args.config), overrides, trials=args.trials, timeout=args.timeout,
                   out_dir=Path(args.out) if args.out else None, storage=args.storage, study_name=args.study_name,
                   seed=args.seed)
    print(f"done: {summary['trials']} trials; results in {summary['out_dir']}")
    return 0


def _cmd_crossval(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.finetune.crossval import crossval
    from fromzero.finetune.recipe import load_finetune_config

    task, cfg = load_finetune_config(args.config, _finetune_overrides(args, overrides), task=args.task)
    crossval(task, cfg, args.folds)
    return 0


def parsers(with_pretrain_help: bool = True, with_finetune_help: bool = True) -> dict[str, Callable[..., None]]:
    """verb -> the function that adds its parser (cli.build_parser calls them in --help order).

    The recipe-option lists of pretrain (``with_pretrain_help``) and of finetune / crossval
    (``with_finetune_help``) are read from the config sources: built only when needed."""
    return {"pretrain": lambda sub: _add_pretrain(sub, with_pretrain_help),
            **{verb: (lambda sub, verb=verb: _add_finetune_like(sub, verb, with_finetune_help))
               for verb in _FINETUNE_LIKE},
            "distill": _add_distill, "tune": _add_tune, "runs": _add_runs}


def _add_runs(sub: argparse._SubParsersAction) -> None:
    rn = _add_parser(sub, "runs", "list the run directories: task, status, best validation metric, age",
                     description="One row per run under DIR (newest first; tune trials included): its task, "
                     "whether it finished, was stopped (and at which step: continue it with --resume) or is "
                     "running, its best value of the monitored validation metric, and when it last wrote. "
                     "runs/latest links to the run started last.\n\nexample:\n  fromzero runs\n"
                     "  fromzero generate --checkpoint runs/latest/checkpoints/best --prompt 'ROMEO:'",
                     func=_cmd_runs)
    rn.add_argument("--dir", default="runs", help="folder holding run directories")
    rn.add_argument("--json", action="store_true", help="print the rows as JSON (for scripts)")


def _cmd_runs(args: argparse.Namespace) -> int:
    from fromzero.evaluation.runs import format_runs, list_runs, runs_json

    rows = list_runs(Path(args.dir))
    if args.json:
        print(runs_json(rows))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"no runs in {args.dir} (pretrain or finetune write them there)")
    return 0
