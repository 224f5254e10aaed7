"""What every fine-tuning task shares besides the loop (:class:`fromzero.training.trainer.Trainer`).

A task (text classification, SFT, DPO, image classification, recommendation) extends
:class:`FinetuneConfig` and is one class implementing :class:`FinetuneTask`: its data, model,
loss, metrics and report. :func:`run_finetune_task` runs every task the same way: its run
directory (config.yaml names the task, so ``--resume`` can rebuild it), the metrics logger, the
Trainer, Ctrl-C / SIGTERM, the test score and the ranks' endings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol

import torch
import torch.nn as nn

from fromzero.config import TrainSettings
from fromzero.errors import FromzeroError
from fromzero.finetune.methods import MethodConfig
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


class FinetuneTask(Protocol):
    """One fine-tuning run of a task on this rank. :func:`run_finetune_task` calls, in order:

    1. ``Task(cfg, ctx, device, dtype)``: load the data and build the model (on ``device``),
       refusing what cannot work *before* the run directory is touched (bad input leaves nothing);
    2. ``start(run_dir)`` once the run directory exists; ``wrap_logger``; ``batches()``;
    3. the Trainer calls ``loss``, ``evaluate`` and ``save_best``; ``end_training(fit)`` when the
       fit returns (an interrupted run ends there: checkpoints/last holds what resuming needs);
    4. ``test()`` on every rank, its ``test_row`` logged;
    5. ``finish(...)`` on rank 0, ``worker_summary(...)`` on the others.

    Tasks subclass it explicitly, which gives them the defaults of its optional members.
    """

    name: ClassVar[str]
    """config.yaml's task (what ``--resume`` rebuilds) and the default run directory's prefix."""
    cfg: Any
    ctx: DistContext
    device: torch.device
    dtype: str
    model: nn.Module
    """What the Trainer optimises and checkpoints hold."""
    config: dict
    """The model's config.json."""
    forward: nn.Module | None = None
    """What the training step calls (None: the runner sets ``model``, compiled with cfg.compile)."""
    monitor: str
    """The val metric that picks the best weights and drives early stopping (``val_<key of evaluate()>``)."""
    higher_is_better: bool
    trained_modules: list[nn.Module] | None = None
    """Method frozen: the modules that train (the rest stays in eval mode); None: the whole model."""
    weight_by: str = "samples"
    """What a step's loss is a mean over: samples or tokens (see Trainer)."""
    optimizer: torch.optim.Optimizer | None = None
    """The task's own optimizer (DP-SGD's); None: the Trainer builds one from cfg."""
    private: Any = None
    """A :class:`fromzero.training.privacy.PrivateTraining` when training with DP-SGD."""
    run_dir: Path
    best_dir: Path
    """The run directory and its checkpoints/best (set by the runner before ``start``)."""

    @classmethod
    def dtype_setting(cls, cfg: Any) -> str:
        """The dtype setting resolved for the run, before the task is built."""
        return str(cfg.dtype)

    def autocast(self) -> Any:
        """The autocast context of the run's device and dtype."""
        from fromzero.devices import autocast_context

        return autocast_context(self.device, self.dtype)

    def start(self, run_dir: Path) -> None:
        """The run directory exists: build what the loop needs, print the run's description."""

    def wrap_logger(self, logger: Any) -> Any:
        """The logger the Trainer writes to, made from the run's (DPO adds its step metrics)."""
        return logger

    def batches(self) -> tuple[Callable[[int], Iterable[Any]], int]:
        """(epoch -> micro-batches, micro-batches per epoch): depending on the epoch alone (or a
        ``ShuffledEpochs``), so a resumed run sees the same batches."""

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int, int]:
        """(mean loss of the micro-batch, samples, tokens); ``net`` is what the step calls."""

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Validation metrics (metrics.jsonl's val_* columns)."""

    def save_best(self, info: dict[str, Any]) -> None:
        """Write checkpoints/best from the model as it is now (rank 0, at each improvement of the
        monitored metric); info: ``{"best_step", "best_epoch", "val"}``."""

    def end_training(self, fit: FitResult) -> None:
        """The fit returned (also when interrupted): release what only training needed."""

    def test(self) -> dict[str, Any]:
        """Score the test split with the best weights (every rank)."""

    def test_row(self, fit: FitResult, test: dict[str, Any]) -> dict[str, Any]:
        """The metrics.jsonl row of the test score (default: every metric, as test_<name>)."""
        return {"step": fit.steps, **{f"test_{k}": v for k, v in test.items()}}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank 0, at the end (the runner has written plots/loss.png and lr.png from ``rows``): the
        final checkpoints/best, metrics.json, the task's plots and the printed report; returns the
        run's summary (the runner adds ``wall_s``)."""

    def save_model(self, directory: Path, info: dict[str, Any], adapter_base: Path | None,
                   tokenizer_file: Path | None = None) -> None:
        """Write the model as it is now: its LoRA adapter on ``adapter_base``, or (None) its weights."""
        from fromzero.checkpoint import save_checkpoint
        from fromzero.finetune.lora import save_adapter

        if adapter_base is not None:
            save_adapter(directory, self.model, self.config, adapter_base, tokenizer_file, info)
        else:
            save_checkpoint(directory, self.model, self.config, tokenizer_file=tokenizer_file, info=info)

    def summary(self, fit: FitResult, test: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """What every task's summary holds (for ``finish``): where the run went, the fit, the scores;
        ``extra`` adds or replaces keys."""
        return {"run_dir": str(self.run_dir), "checkpoint": str(self.best_dir), "best_step": fit.best_step,
                "best_epoch": fit.best_epoch, "steps": fit.steps, "epochs_run": fit.epochs_run,
                "stopped_early": fit.stopped_early, "interrupted": fit.interrupted, "val": fit.best_metrics,
                "test": test, "train_s": fit.train_s, "samples_per_sec": fit.samples_per_sec, **extra}

    def worker_summary(self, run_dir: Path, test: dict[str, Any]) -> dict[str, Any]:
        """What a rank other than 0 returns (rank 0 writes the run's files)."""
        return {"run_dir": str(run_dir), "rank": self.ctx.rank}


def run_finetune_task(task_type: type[FinetuneTask], cfg: Any, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``task_type`` with ``cfg``: train, keep the best val weights, score test once,
    write the run directory (under torchrun with dist_strategy ddp: every rank trains, rank 0
    writes); resume: continue the run in out_dir from its checkpoints/last. Returns the task's
    summary (a short one, with ``interrupted``, when Ctrl-C / SIGTERM stopped the fit)."""
    import functools

    from fromzero.training.trainer import run_task

    return run_task(functools.partial(_run, task_type), cfg, resume)


def _run(task_type: type[FinetuneTask], cfg: Any, ctx: DistContext, device: Any, t_start: float,
         resume: bool) -> dict[str, Any]:
    import time

    from fromzero.devices import autocast_context, compile_model, resolve_dtype
    from fromzero.training.callbacks import MetricsLogger, NullLogger, write_plots
    from fromzero.training.distributed import barrier
    from fromzero.training.trainer import Trainer

    dtype = resolve_dtype(device, task_type.dtype_setting(cfg))
    autocast_context(device, dtype)  # refuses float16 off CUDA before any work
    task = task_type(cfg, ctx, device, dtype)  # data and model, all checked before the run directory is touched
    run_dir = start_run_dir(cfg, task.name, ctx, resume)  # rank 0 alone writes it
    task.run_dir, task.best_dir = run_dir, run_dir / "checkpoints" / "best"
    if task.forward is None:
        task.forward = compile_model(task.model, "default", device) if cfg.compile else task.model
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
        if fit.interrupted:  # no test score, no final checkpoints/best; checkpoints/last holds what resuming needs
            return {"run_dir": str(run_dir), "interrupted": True, "steps": fit.steps, "best_step": fit.best_step,
                    "val": fit.best_metrics, "train_s": fit.train_s}
        test = task.test()
        logger.log(task.test_row(fit, test))
    finally:
        logger.close()
    if not ctx.is_main:  # rank 0 writes the checkpoint and the report
        barrier(ctx)
        return task.worker_summary(run_dir, test)
    write_plots(logger.rows, run_dir / "plots")  # loss and lr (finish adds the task's own)
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


