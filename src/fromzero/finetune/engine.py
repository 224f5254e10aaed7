"""What every fine-tuning task shares besides the loop: its settings and its run directory.

The loop itself is :class:`fromzero.training.trainer.Trainer` (pretraining uses it too). A
fine-tuning task (text classification, SFT, DPO, image classification, recommendation;
distillation is a loss of the first two) extends :class:`FinetuneConfig` and implements
:class:`fromzero.finetune.task.FinetuneTask`; :func:`run_finetune_task` runs it: in
:func:`fromzero.training.trainer.run_task`, with its run directory from :func:`start_run_dir`
(config.yaml names the task, so ``fromzero finetune --resume RUN_DIR`` can rebuild it), the
metrics logger, the Trainer, the test score and the ranks' endings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from fromzero.config import TrainSettings
from fromzero.errors import FromzeroError
from fromzero.finetune.methods import MethodConfig
from fromzero.finetune.task import FinetuneTask
from fromzero.training.distributed import DistContext
from fromzero.training.trainer import LAST_INFO_FILE, FitResult, on_main_rank


@dataclass
class FinetuneConfig(MethodConfig, TrainSettings):
    """Settings every fine-tuning task shares (the task configs add data and model fields)."""

    # where each field goes in a recipe (a field not listed is a train. setting)
    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "init_from": "model.init_from", "dist_strategy": "dist.strategy", "out_dir": "out_dir", "force":
        "force", "progress": "progress"}

    init_from: str = ""
    """The model to start from: a fromzero checkpoint directory (pretraining run: runs/<run>/checkpoints/best)."""
    epochs: int = 3
    """Maximum passes over the training split."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr (cosine decay); 1.0 keeps it constant."""
    warmup_ratio: float = 0.06
    """Fraction of the steps with linear warmup from 0 to lr."""
    l1: float = 0.0
    """L1 regularisation: l1 * sum(|w|) of the trained matrices is added to the loss (0 = off)."""
    patience: int = 0
    """Stop after this many evaluations without a better monitored metric (0 = never stop early)."""
    dist_strategy: str = "none"
    """none (one process) | ddp (launch with torchrun --nproc_per_node N -m fromzero finetune ...: batch_size is per process, a step sees batch_size x N x grad_accum examples)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""
    out_dir: str = ""
    """Run directory ("" = runs/<task>-<timestamp>); refused if it exists and is not empty, unless force."""
    force: bool = False
    """Replace the files of an existing run directory."""
    progress: bool = True
    """Show a rich progress bar on stderr."""

    def lr_schedule(self, total: int) -> Callable[[int], float]:
        """lr multiplier per step: warmup over warmup_ratio of the steps, cosine to min_lr_ratio at the end."""
        from fromzero.training.optim import warmup_cosine

        return warmup_cosine(int(round(self.warmup_ratio * total)), total, self.min_lr_ratio)

    def validate_common(self) -> None:
        """Raise FromzeroError for shared settings that cannot work."""
        from fromzero.finetune.methods import METHODS

        if self.method not in METHODS:
            raise FromzeroError(f"method {self.method!r} is not supported (supported: {', '.join(METHODS)})")
        self.validate_settings()
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs <= 0:
            raise FromzeroError(f"epochs must be a positive integer, got {self.epochs!r}")
        for name in ("patience", "num_workers", "unfreeze_top"):
            if getattr(self, name) < 0:
                raise FromzeroError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, low, high in (("min_lr_ratio", 0, 1), ("warmup_ratio", 0, 1)):
            if not low <= getattr(self, name) <= high:
                raise FromzeroError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        if not self.l1 >= 0:
            raise FromzeroError(f"l1 must be >= 0, got {self.l1}")
        if self.dist_strategy not in ("none", "ddp"):
            raise FromzeroError(f"dist_strategy {self.dist_strategy!r} is not supported for fine-tuning "
                                "(none | ddp; fsdp is for pretraining)")


def run_finetune_task(task_type: type[FinetuneTask], cfg: Any, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``task_type`` with ``cfg``: train, keep the best val weights, score test once,
    write the run directory (under torchrun with dist_strategy ddp: every rank trains, rank 0
    writes); resume: continue the run in out_dir from its checkpoints/last. Returns the task's
    summary (``interrupted_summary`` when Ctrl-C / SIGTERM stopped the fit)."""
    from fromzero.training.trainer import run_task

    def body(cfg: Any, ctx: DistContext, device: Any, t_start: float, resume: bool) -> dict[str, Any]:
        return _run(task_type, cfg, ctx, device, t_start, resume)

    return run_task(body, cfg, resume)


def _run(task_type: type[FinetuneTask], cfg: Any, ctx: DistContext, device: Any, t_start: float,
         resume: bool) -> dict[str, Any]:
    import time

    from fromzero.devices import autocast_context, resolve_dtype
    from fromzero.training.callbacks import MetricsLogger, NullLogger
    from fromzero.training.distributed import barrier
    from fromzero.training.trainer import Trainer

    dtype = resolve_dtype(device, task_type.dtype_setting(cfg))
    autocast_context(device, dtype)  # refuses float16 off CUDA before any work
    task = task_type(cfg, ctx, device, dtype)  # data and model, all checked before the run directory is touched
    run_dir = start_run_dir(cfg, task.name, ctx, resume)  # rank 0 alone writes it
    task.start(run_dir)
    logger = task.wrap_logger(MetricsLogger(run_dir, resume_step(run_dir) if resume else None)
                              if ctx.is_main else NullLogger())
    try:
        trainer = Trainer(task.model, cfg, device, dtype, task.loss, task.evaluate, task.monitor,
                          higher_is_better=task.higher_is_better, logger=logger,
                          trained_modules=task.trained_modules, forward=task.forward, ctx=ctx,
                          weight_by=task.weight_by, last_dir=run_dir / "checkpoints" / "last", resume=resume,
                          optimizer=task.optimizer, private=task.private, save_best=task.save_best)
        fit = trainer.fit(*task.batches())
        task.end_training(fit)
        if fit.interrupted:
            return interrupted_summary(run_dir, fit)
        test = task.test()
        logger.log(task.test_row(fit, test))
    finally:
        logger.close()
    if not ctx.is_main:  # rank 0 writes the checkpoint and the report
        barrier(ctx)
        return task.worker_summary(run_dir, test)
    summary = task.finish(fit, test, logger.rows)
    summary["wall_s"] = time.perf_counter() - t_start
    barrier(ctx)
    return summary


def start_run_dir(cfg: Any, task: str, ctx: DistContext, resume: bool = False) -> Path:
    """The run directory every rank agrees on (rank 0's timestamped default, or out_dir); rank 0
    creates it (refusing a used one unless force) or, to resume, checks it holds
    checkpoints/last, and writes config.yaml (with the task, so ``--resume`` can rebuild it)."""
    import dataclasses

    import yaml

    from fromzero.checkpoint import atomic_write_text
    from fromzero.config import section_recipe
    from fromzero.training.distributed import broadcast_text
    from fromzero.training.trainer import default_run_dir, prepare_run_dir

    run_dir = Path(broadcast_text(str(Path(cfg.out_dir) if cfg.out_dir else default_run_dir(task)), ctx))

    def start() -> None:
        if resume:
            if resume_step(run_dir) is None:
                raise FromzeroError(f"nothing to resume in {run_dir}: no checkpoints/last with training state")
        else:
            prepare_run_dir(run_dir, cfg.force, resumable=True)
        saved = section_recipe(type(cfg), dict(dataclasses.asdict(cfg), out_dir=str(run_dir)))
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({"task": task, **saved}, sort_keys=False))

    on_main_rank(ctx, start)
    return run_dir


def interrupted_summary(run_dir: Path, fit: FitResult) -> dict[str, Any]:
    """What a task returns when Ctrl-C / SIGTERM stopped its fit: no test score and no best
    checkpoint yet; checkpoints/last holds everything needed to continue."""
    return {"run_dir": str(run_dir), "interrupted": True, "steps": fit.steps, "best_step": fit.best_step,
            "val": fit.best_metrics, "train_s": fit.train_s}


def resume_step(run_dir: Path) -> int | None:
    """The step checkpoints/last of a fine-tuning run was saved at (None: nothing to resume)."""
    import json

    from fromzero.checkpoint import recover_directory

    last = Path(run_dir) / "checkpoints" / "last"
    recover_directory(last)
    try:
        return int(json.loads((last / LAST_INFO_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


