"""Fine-tuning recipes: a YAML file naming the ``task`` plus that task's flat settings.

    task: text-classification        # | sft | dpo | image-classification
    init_from: all-MiniLM-L6-v2
    data: shakespeare-genre
    method: lora
    lr: 5.0e-4

Any setting can be overridden on the command line (``--lr 1e-4 --method frozen``); unknown keys
are refused with the closest valid name. The settings of each task are the fields of its
config dataclass (named in :mod:`fromzero.tasks`); ``fromzero finetune --help`` lists them with
their defaults.
"""

from __future__ import annotations

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
    from fromzero.config import deep_merge, from_dict, load_yaml, parse_overrides

    data = load_yaml(recipe) if recipe is not None else {}
    task = task or data.pop("task", None)
    data.pop("task", None)
    if not task:
        raise FromzeroError(f"{recipe or 'the recipe'} has no 'task' (tasks: {', '.join(finetuning_tasks())})")
    cls = task_config_class(str(task))
    extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []), cls, command="finetune")
    cfg = from_dict(cls, deep_merge(data, extra))
    cfg.validate()
    return str(task), cfg


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[str, Any]:
    """(task, config) of an existing fine-tuning run (its config.yaml) + overrides, for --resume."""
    from fromzero.config import deep_merge, from_dict, load_yaml, parse_overrides

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FromzeroError(f"nothing to resume: {run_dir} has no config.yaml (not a fine-tuning run directory)")
    data = load_yaml(run_dir / "config.yaml")
    task = data.pop("task", None)
    if task not in finetuning_tasks():
        raise FromzeroError(f"{run_dir / 'config.yaml'} names no fine-tuning task "
                            f"(tasks: {', '.join(finetuning_tasks())})")
    cls = task_config_class(task)
    extra = parse_overrides(list(overrides or []), cls, command="finetune")
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
