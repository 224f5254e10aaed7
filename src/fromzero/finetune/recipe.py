"""Fine-tuning recipes: a ``task`` and the sections ``model``, ``data``, ``train``, ``method``,
``dist`` (as pretraining's). A task's config is one flat dataclass whose fields say where they go
in a recipe (``RECIPE_KEYS``, :func:`fromzero.config.recipe_keys`). Any setting can be overridden
with its dotted key (``--train.lr 1e-4``) or the bare field name; unknown keys are refused with
the closest valid one.
"""

from __future__ import annotations

import difflib

from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError
from fromzero.tasks import finetuning_task, finetuning_tasks


def task_config_class(task: str) -> type:
    """The recipe config dataclass of fine-tuning task ``task`` (one-line error if unknown)."""
    return finetuning_task(task).config_class()


def load_finetune_config(recipe: str | Path | None, overrides: list[str] | dict | None = None,
                         task: str | None = None) -> tuple[str, Any]:
    """Recipe YAML + overrides -> (task, validated task config)."""
    from fromzero.config import deep_merge, flatten_recipe, from_dict, load_yaml

    data = load_yaml(recipe) if recipe is not None else {}
    task = task or data.pop("task", None)
    data.pop("task", None)
    if not task:
        raise FromzeroError(f"{recipe or 'the recipe'} has no 'task' (tasks: {', '.join(finetuning_tasks())})")
    if task == "pretrain":
        raise FromzeroError(f"{recipe or 'the recipe'} is a pretraining recipe (task: pretrain): run it with fromzero pretrain")
    cls = task_config_class(str(task))
    flat = flatten_recipe(cls, data, str(recipe)) if recipe is not None else {}
    extra = overrides if isinstance(overrides, dict) else parse_recipe_overrides(list(overrides or []), cls)
    cfg = from_dict(cls, deep_merge(flat, extra))
    cfg.validate()
    return str(task), cfg


def parse_recipe_overrides(tokens: list[str], cls: type, command: str = "finetune") -> dict:
    """``--train.lr 1e-4 --method.name lora`` (or the short ``--lr 1e-4``) as flat field values of
    ``cls``; an unknown dotted key is refused with the closest valid one."""
    from fromzero.config import parse_overrides, recipe_keys

    keys = recipe_keys(cls)
    flat_of = {dotted: name for name, dotted in keys.items()}
    sections = {dotted.partition(".")[0] for dotted in keys.values() if "." in dotted} - set(keys)
    out = []
    for tok in tokens:
        key, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in flat_of:
            tok = f"--{flat_of[key]}{eq}{value}"
        elif key.partition(".")[0] in sections:
            close = difflib.get_close_matches(key, list(flat_of), n=1, cutoff=0.6)
            hint = f"; did you mean '--{close[0]}'?" if close else ""
            raise FromzeroError(f"unknown option '--{key}'{hint} (fromzero {command} --help lists them)")
        out.append(tok)
    return parse_overrides(out, cls, command=command)


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[str, Any]:
    """(task, config) of an existing fine-tuning run (its config.yaml) + overrides, for --resume."""
    from fromzero.config import deep_merge, flatten_recipe, from_dict, load_yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FromzeroError(f"nothing to resume: {run_dir} has no config.yaml (not a fine-tuning run directory)")
    data = load_yaml(run_dir / "config.yaml")
    task = data.pop("task", None)
    if task not in finetuning_tasks():
        raise FromzeroError(f"{run_dir / 'config.yaml'} names no fine-tuning task "
                            f"(tasks: {', '.join(finetuning_tasks())})")
    cls = task_config_class(task)
    data = flatten_recipe(cls, data, str(run_dir / "config.yaml"), notes=False)
    extra = parse_recipe_overrides(list(overrides or []), cls)
    for key in ("out_dir", "force"):
        if key in extra:
            raise FromzeroError(f"--{key} cannot change when resuming: the run continues in {run_dir}")
    data.update(out_dir=str(run_dir), force=False)
    cfg = from_dict(cls, deep_merge(data, extra))
    cfg.validate()
    return str(task), cfg


def run_finetune(task: str, cfg: Any, resume: bool = False) -> dict[str, Any]:
    """Run the task's fine-tune (resume: continue the run in cfg.out_dir from its
    checkpoints/last); returns its summary (run_dir, checkpoint, val, test, ...)."""
    run = finetuning_task(task).run_function()
    return run(cfg, resume=True) if resume else run(cfg)
