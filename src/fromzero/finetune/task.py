"""What a fine-tuning task supplies to the shared run: the :class:`FinetuneTask` protocol.

One object of a task's class is one fine-tuning run of that task on this rank.
:func:`fromzero.finetune.engine.run_finetune_task` drives it, the same way for every task:

1. ``Task(cfg, ctx, device, dtype)``: load the data and build the model, refusing anything that
   cannot work *before* the run directory is touched (bad input leaves nothing behind);
2. the runner creates the run directory (``start_run_dir``) and calls ``start(run_dir)``;
3. the runner makes the metrics logger (rank 0; the other ranks a ``NullLogger``) and the
   :class:`~fromzero.training.trainer.Trainer` from the task's ``model``, ``forward``, ``loss``,
   ``evaluate``, ``save_best``, ... and fits on ``batches()``;
4. interrupted: the run stops there (checkpoints/last holds everything needed to continue);
   else every rank scores ``test()`` and rank 0 logs ``test_row(...)``;
5. ranks other than 0 return ``worker_summary(...)``; rank 0 returns ``finish(...)``: the final
   checkpoints/best, metrics.json, plots and the printed report.

So a task's module holds only its own knowledge (data, model, loss, metrics, report); the
order of the steps, the logger, the ranks and the interruption are the runner's.

Tasks subclass the protocol explicitly, which gives them the defaults of the optional members
(``trained_modules``, ``weight_by``, ``optimizer``, ``private``, ``dtype_setting``,
``wrap_logger``, ``end_training``, ``worker_summary``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol

import torch
import torch.nn as nn

from fromzero.training.distributed import DistContext
from fromzero.training.trainer import FitResult


class FinetuneTask(Protocol):
    """One fine-tuning run of a task on this rank (see the module docstring for the order of calls).

    The constructor takes ``(cfg, ctx, device, dtype)`` (``dtype`` already resolved from
    :meth:`dtype_setting` and checked to work on ``device``) and does everything that can be
    refused: data loaded, model built, moved to ``device``.
    """

    name: ClassVar[str]
    """The task's name: written to config.yaml (so ``--resume`` can rebuild the run) and the
    default run directory's prefix (runs/<name>-<timestamp>)."""

    cfg: Any
    ctx: DistContext
    model: nn.Module
    """The model being trained (what checkpoints hold and the Trainer optimises)."""
    forward: nn.Module
    """What the training step calls: ``model``, or its compiled version (set by ``start`` at the latest)."""
    monitor: str
    """The val metric that picks the best weights and drives early stopping (``val_<key of evaluate()>``)."""
    higher_is_better: bool
    trained_modules: list[nn.Module] | None = None
    """Method frozen: the modules trained (the rest stays in eval mode); None: the whole model trains."""
    weight_by: str = "samples"
    """What a step's loss is a mean over: ``samples`` or ``tokens`` (see Trainer)."""
    optimizer: torch.optim.Optimizer | None = None
    """An optimizer of the task's own (DP-SGD's); None: the Trainer builds AdamW / SGD from cfg."""
    private: Any = None
    """A :class:`fromzero.training.privacy.PrivateTraining` when training with DP-SGD."""

    @classmethod
    def dtype_setting(cls, cfg: Any) -> str:
        """The dtype setting the run resolves (before the task is built): ``cfg.dtype`` by default."""
        return str(cfg.dtype)

    def start(self, run_dir: Path) -> None:
        """The run directory exists (rank 0 wrote config.yaml): keep it, build what the loop needs
        from here on, and print the run's one-line description."""
        ...

    def batches(self) -> tuple[Callable[[int], Iterable[Any]], int]:
        """(``epoch -> micro-batches``, micro-batches per epoch). The stream must depend on the
        epoch alone (or be a ``ShuffledEpochs``), so a resumed run sees the same batches."""
        ...

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int, int]:
        """(mean loss over the micro-batch, samples, tokens); ``net`` is what the step calls."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Validation metrics (the keys of metrics.jsonl's val_* columns)."""
        ...

    def save_best(self, info: dict[str, Any]) -> None:
        """Write checkpoints/best from the model as it is now (rank 0, at each improvement);
        ``info``: ``{"best_step", "best_epoch", "val"}``."""
        ...

    def wrap_logger(self, logger: Any) -> Any:
        """The logger the Trainer writes to, made from the run's (DPO adds its step metrics)."""
        return logger

    def end_training(self, fit: FitResult) -> None:
        """Called once ``fit`` returns, interrupted or not: release what only training needs."""

    def test(self) -> dict[str, Any]:
        """Score the test split with the best weights (every rank)."""
        ...

    def test_row(self, fit: FitResult, test: dict[str, Any]) -> dict[str, Any]:
        """The metrics.jsonl row of the test score."""
        ...

    def worker_summary(self, run_dir: Path, test: dict[str, Any]) -> dict[str, Any]:
        """What a rank other than 0 returns (rank 0 writes the run's files)."""
        return {"run_dir": str(run_dir), "rank": self.ctx.rank}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank 0, at the end: the final checkpoints/best, metrics.json, plots and the printed report;
        returns the run's summary (the runner adds ``wall_s``)."""
        ...
