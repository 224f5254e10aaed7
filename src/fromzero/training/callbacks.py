"""What a run reports while it trains: metrics.jsonl, TensorBoard, plots and a progress bar.

Only these helpers touch the run directory's logs, so the trainer stays about training.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


# Listeners told about every evaluation of a run (e.g. `fromzero tune` reporting to optuna's
# pruner). A listener may raise to end the run early (optuna.TrialPruned).
_EVALUATION_LISTENERS: list[Callable[[int, dict[str, Any]], None]] = []


@contextlib.contextmanager
def listen_to_evaluations(listener: Callable[[int, dict[str, Any]], None]) -> Iterator[None]:
    """Call ``listener(step, metrics)`` after each evaluation of runs started inside the block."""
    _EVALUATION_LISTENERS.append(listener)
    try:
        yield
    finally:
        _EVALUATION_LISTENERS.remove(listener)


def announce_evaluation(step: int, metrics: dict[str, Any]) -> None:
    """What trainers call after an evaluation (metrics keyed as in metrics.jsonl: val_loss, ...)."""
    for listener in list(_EVALUATION_LISTENERS):
        listener(step, metrics)


class MetricsLogger:
    """Appends one JSON object per row to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume from step k, rows after k (written by the interrupted run after its last
    checkpoint) are dropped, and TensorBoard is told to purge them too; so is the test row of a
    run resumed after it finished (it is scored again at the new end).
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            from fromzero.checkpoint import atomic_write_text
            from fromzero.evaluation.runs import read_rows  # skips a line cut short by the crash

            # A finished run's test row goes too: the resumed run scores test again at its end.
            self.rows = [row for row in read_rows(self.path)
                         if row.get("step", 0) <= resume_step and not any(k.startswith("test_") for k in row)]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(clean)
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """The logger of ranks other than 0 under torchrun: they compute, rank 0 writes."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def write_plots(rows: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """plots/loss.png (train + val loss) and plots/lr.png from metrics rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    series = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "val_loss", "lr")}
    written = []
    # file, height, y label, title, curves (metric, line style, legend label, line width)
    for name, height, ylabel, title, curves in (
        ("loss.png", 4.2, "cross-entropy (nats)", "loss", [("loss", "-", "train loss", 1.2),
                                                          ("val_loss", "o-", "val loss", 1.5)]),
        ("lr.png", 3.0, "learning rate", None, [("lr", "-", None, 1.2)]),
    ):
        if not any(series[key] for key, *_ in curves):
            continue
        fig, ax = plt.subplots(figsize=(7, height), dpi=110)
        for key, style, label, width in curves:
            if series[key]:
                ax.plot(*zip(*series[key]), style, label=label, lw=width, ms=4)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots_dir / name)
        plt.close(fig)
        written.append(plots_dir / name)
    return written


class TrainingProgress:
    """A rich progress bar with step, loss, lr, tokens/s and ETA, on stderr."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", rate="-")

    def __enter__(self) -> "TrainingProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def set_metrics(self, loss: float, lr: float, rate: str) -> None:
        self.progress.update(self.task, loss=f"{loss:.4f}", lr=f"{lr:.2e}", rate=rate)

    def print(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)
