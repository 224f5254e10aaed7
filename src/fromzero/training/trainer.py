"""The training loop every task shares: pretraining, fine-tuning, distillation, DP-SGD.

A task (LM pretraining in :mod:`fromzero.training.pretrain`; the fine-tuning tasks in
:mod:`fromzero.finetune`) supplies the model, ``batches(epoch)``, a ``loss_fn(model, batch) ->
(loss, samples, tokens)`` and an ``evaluate(model) -> metrics``; the :class:`Trainer` does the
rest: schedule, accumulation, autocast, compile, clipping, evaluation and early stopping,
``checkpoints/last`` with exact resume, metrics rows, DP-SGD (``private=``) and DDP / FSDP2 under
torchrun, where :func:`run_task` is the frame that joins and leaves the process group. The
full list of what it does and why: docs/architecture.md ("The training loop").
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError, first_line
from fromzero.evaluation.metrics import to_jsonable  # plain values: what weights_only loading accepts
from fromzero.training.distributed import DistContext, mean_across_ranks

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.json", "tb", "checkpoints", "plots", ".running")
LAST_WEIGHTS_FILE = "training_weights.safetensors"
LAST_INFO_FILE = "info.json"


# ---------------------------------------------------------------------------------------------
# Run directories and the process frame


def default_run_dir(name: str) -> Path:
    """runs/<name>-<timestamp>/ for a run without out_dir."""
    return Path("runs") / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, force: bool, resumable: bool = True) -> None:
    """Create ``run_dir``; an existing non-empty one is refused unless ``force``.

    With force only the files a run writes are removed: other files a user keeps there stay.
    resumable: the command has --resume, so the refusal can suggest it (when there is a
    checkpoints/last to resume from).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise FromzeroError(f"run directory {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            resumable = resumable and (run_dir / "checkpoints" / "last").is_dir()
            if resumable and (run_dir / "metrics.json").is_file():  # a finished fine-tune
                raise FromzeroError(f"run directory {run_dir} holds a finished run; pass --force to start over "
                                    f"(or --resume {run_dir} with more epochs / max_steps to train further)")
            resume = f"pass --resume {run_dir} to continue it or " if resumable else "pass "
            raise FromzeroError(f"run directory {run_dir} already exists; {resume}--force to start over")
        for name in RUN_FILES:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    from fromzero.evaluation.runs import point_latest

    point_latest(run_dir)  # runs/latest -> the run just started


def run_task(body: Callable[..., Any], cfg: Any, resume: bool = False) -> Any:
    """The frame every task runs in: validate the config, join torchrun's process group
    (``cfg.dist_strategy`` ddp / fsdp; else one process), run ``body(cfg, ctx, device, t_start,
    resume)``, and leave the group however it ends (a lost rank becomes a one-line error)."""
    from fromzero.devices import resolve_device
    from fromzero.training.distributed import (init_distributed, is_collective_failure, lost_rank_error,
                                               shutdown)

    t_start = time.perf_counter()
    cfg.validate()
    ctx, device = init_distributed(cfg.dist_strategy, resolve_device(cfg.device))
    if not ctx.is_main:  # ranks other than 0 print nothing, so the console shows one run
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this worker process
    try:
        return body(cfg, ctx, device, t_start, resume)
    except Exception as e:
        if ctx.world_size > 1 and is_collective_failure(e):
            raise lost_rank_error(e, ctx) from None
        raise
    finally:
        shutdown(ctx)


def on_main_rank(ctx: DistContext, work: Callable[[], Any]) -> None:
    """Run ``work`` on rank 0 only (e.g. create the run directory); if it fails, every rank
    raises the same one-line error instead of the others waiting for rank 0 forever."""
    from fromzero.training.distributed import broadcast_text

    message = ""
    if ctx.is_main:
        try:
            work()
        except FromzeroError as e:
            message = str(e) or "failed"
            if ctx.world_size == 1:
                raise
    message = broadcast_text(message, ctx)
    if message:
        raise FromzeroError(message)


class StopRequest:
    """First SIGINT/SIGTERM asks the loop to stop after the current step and save
    checkpoints/last; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not in the main thread: leave signals alone
            self._previous.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Data streams


class ShuffledEpochs:
    """``batches(epoch)`` for a DataLoader shuffled by ``generator`` (one generator for the whole
    run, so epoch e's order follows from the seed and the epochs before it). The loop saves the
    generator's state at the start of an epoch with checkpoints/last (``get_state``) and puts it
    back to resume inside that epoch (``set_state``), so a resumed run draws the same batches."""

    def __init__(self, loader: Any, generator: torch.Generator) -> None:
        self.loader, self.generator = loader, generator

    def __call__(self, epoch: int) -> Iterable[Any]:
        return iter(self.loader)

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def rank_micro_batches(batches: Iterable[Any], ctx: DistContext) -> Iterable[Any]:
    """This rank's share of a stream of micro-batches all ranks produce in the same order:
    of each run of world_size micro-batches, the rank-th; an incomplete final run is dropped so
    every rank takes the same number of steps."""
    stream = iter(batches)
    for group in zip(*[stream] * ctx.world_size):  # world_size at a time; zip drops a short last run
        yield group[ctx.rank]


def set_train_mode(model: nn.Module, trained: list[nn.Module] | None) -> None:
    """model.train(), except that frozen parts stay in eval mode (no dropout, fixed BatchNorm)."""
    if trained is None:
        model.train()
        return
    model.eval()
    for module in trained:
        module.train()


def l1_penalty(params: list[nn.Parameter]) -> torch.Tensor:
    """sum |w| over the trained matrices (biases and norm gains are not penalised, as with L2)."""
    return torch.stack([p.abs().sum(dtype=torch.float32) for p in params]).sum()


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    best_metrics: dict[str, Any]
    best_step: int
    best_epoch: int
    steps: int
    epochs_run: int
    stopped_early: bool
    interrupted: bool
    train_s: float
    samples_per_sec: float


@dataclass
class Progress:
    """Where a fit stands: what checkpoints/last records and a resumed fit starts from."""

    step: int = 0
    epoch: int = 1
    micro: int = 0  # this rank's micro-batches of ``epoch`` already trained on
    samples: int = 0
    best_value: float | None = None
    best_metrics: dict[str, Any] | None = None
    best_step: int = 0
    best_epoch: int = 0
    stale: int = 0
    evaluated_at: int = -1
    epochs_run: int = 0
    elapsed_s: float = 0.0
    epoch_rng: dict[str, Any] | None = None  # RNG at the start of ``epoch`` (the data loader draws from it)
    epoch_data: Any = None  # the data stream's state: at the start of ``epoch``, or now for a seekable stream
    window: list[tuple] = field(default_factory=list)  # steps since the last metrics row (see Trainer.fit)

    def __post_init__(self) -> None:
        if self.best_metrics is None:
            self.best_metrics = {}

    def state(self) -> dict[str, Any]:
        """What checkpoints/last records of the position (plain values and tensors)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "best_metrics": to_jsonable(self.best_metrics), "window": list(self.window)}

    @classmethod
    def from_state(cls, state: dict[str, Any], epoch_rng: Any) -> "Progress":
        window = [tuple(q) for q in state.get("window", [])]
        special = {"best_metrics": dict(state["best_metrics"]), "epoch_rng": epoch_rng,
                   "epoch_data": state.get("epoch_data"), "window": window}
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name not in special}, **special)


class Trainer:
    """Runs the optimisation with evaluation, early stopping, checkpoints and exact resume."""

    def __init__(
        self, model: nn.Module, cfg: Any, device: torch.device, dtype: str,
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int, int]],
        evaluate: Callable[[nn.Module], dict[str, Any]], monitor: str, higher_is_better: bool, logger: Any,
        trained_modules: list[nn.Module] | None = None, forward: nn.Module | None = None,
        ctx: DistContext | None = None, weight_by: str = "samples", last_dir: Path | None = None,
        resume: bool = False, optimizer: torch.optim.Optimizer | None = None, private: Any = None,
        save_best: Callable[[dict[str, Any]], None] | None = None, store: Any = None, fsdp: bool = False,
        eval_at_start: bool = False, restore_best: bool = True, command: str = "finetune",
        progress: bool | None = None,
    ) -> None:
        """cfg: the task's settings (:class:`fromzero.config.TrainSettings` fields, ``epochs``,
        ``patience``, ``l1``, ``lr_schedule(total)``, ``progress``).

        forward: what the training step calls (e.g. the compiled model; default ``model``);
        loss_fn receives it (wrapped in DistributedDataParallel under ddp).

        weight_by: what a step's loss is the mean over, across its micro-batches and ranks:
        ``samples`` (classification, preference pairs, LM windows) or ``tokens`` (SFT: the reply
        tokens), so that a step with accumulation (or N ranks) is the step one big batch would take.

        last_dir / resume: where checkpoints/last lives and whether to continue from it.
        optimizer: use this one instead of AdamW/SGD built from cfg (e.g. Opacus' DPOptimizer).
        private: a :class:`fromzero.training.privacy.PrivateTraining` when training with DP-SGD:
        its optimizer clips and noises per-example gradients of the batch-mean loss, so the loop
        skips its own weighting and clipping, and an empty Poisson batch is a noise-only step.
        save_best: called with ``{"best_step", "best_epoch", "val"}`` each time the monitored
        metric improves, while the model holds those weights (on rank 0; on every rank under
        FSDP, which gathers the weights): the task writes checkpoints/best.
        store: writes and reads checkpoints/last (``save_last(trainer, state)``,
        ``load_last(trainer) -> state``); default: :meth:`save_last` / :meth:`load_last`.
        fsdp: the task sharded ``model`` with FSDP2 (no DDP wrapper; gradient sync on the last
        micro-batch only). eval_at_start: also evaluate before the first step (pretraining's
        step-0 validation loss). restore_best: load the best weights at the end (pretraining
        keeps the last ones; best is on disk). command: the verb the resume hints name.
        progress: show the progress bar (default: ``cfg.progress``).
        """
        if weight_by not in ("samples", "tokens"):
            raise ValueError(f"weight_by must be samples or tokens, got {weight_by!r}")
        self.weight_by = weight_by
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        self.loss_fn, self.evaluate, self.logger = loss_fn, evaluate, logger
        self.monitor, self.higher_is_better = monitor, higher_is_better
        self.trained_modules = trained_modules
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise FromzeroError("nothing to train: every parameter is frozen")
        self.l1_params = [p for p in self.params if p.dim() >= 2]
        if optimizer is None:
            from fromzero.training.optim import build_optimizer

            optimizer = build_optimizer(model, cfg, device, fused=not fsdp)
        self.optimizer = optimizer
        self.last_dir, self.resume, self.private, self.save_best = last_dir, resume, private, save_best
        self.store = store or self
        self.fsdp, self.eval_at_start, self.restore_best, self.command = fsdp, eval_at_start, restore_best, command
        self.show_progress = cfg.progress if progress is None else progress
        # float16 autocast (CUDA): scale the loss so small gradients do not flush to zero; steps
        # whose gradients overflowed are skipped and the scale lowered (a no-op for bf16 / fp32).
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
        if private is not None and (cfg.grad_accum != 1 or (ctx is not None and ctx.world_size > 1)):
            raise FromzeroError("privacy: DP-SGD runs in one process with grad_accum 1")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.ctx = ctx or DistContext()
        self.net: nn.Module = forward if forward is not None else model
        # the first step of a compiled model may fall back to eager (not under DDP: its wrapper holds the graph)
        self.compiled = self.net is not model and not (self.ctx.world_size > 1 and not fsdp)
        self.ddp: nn.Module | None = None
        if self.ctx.world_size > 1 and not fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.net = DistributedDataParallel(
                self.net, device_ids=[device] if device.type == "cuda" else None)
        self.progress = Progress()
        self.scheduler: Any = None
        self._batches: Any = None

    def autocast(self) -> Any:
        from fromzero.devices import autocast_context

        return autocast_context(self.device, self.dtype)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copy of what training changes: trained parameters and all buffers (BatchNorm)."""
        trained = {id(p) for p in self.params}
        named = dict(self.model.named_parameters())
        keep = {n for n, p in named.items() if id(p) in trained} | {n for n, _ in self.model.named_buffers()}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items() if k in keep}

    # -- one optimizer step

    def train_step(self, micro_batches: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """One optimizer step over ``micro_batches`` (this rank's); returns the step's mean
        loss across ranks and the gradient norm before clipping as device tensors (no host sync),
        and the samples and tokens it saw on this rank."""
        total_loss = torch.zeros((), device=self.device)
        weight = samples = tokens = 0
        for j, batch in enumerate(micro_batches):
            loss, n_samples, n_tokens = self._forward_backward(batch, last=j == len(micro_batches) - 1)
            w = n_tokens if self.weight_by == "tokens" else n_samples
            total_loss += loss * w
            weight += w
            samples += n_samples
            tokens += n_tokens
        loss = mean_across_ranks(total_loss / max(weight, 1), self.ctx)  # the step's mean loss
        self._scale_gradients(weight)
        norm = self._optimizer_step(empty=samples == 0)
        return loss, norm, samples, tokens

    def _forward_backward(self, batch: Any, last: bool) -> tuple[torch.Tensor, int, int]:
        if self.private is not None:
            return self._private_forward_backward(batch)
        # DDP: only the last micro-batch of a step all-reduces the gradients (FSDP: reduce-scatters).
        sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()  # type: ignore[operator]
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
        with sync:
            with self.autocast():
                loss, n_samples, n_tokens = self.loss_fn(self.net, batch)
            loss = loss.float()
            penalised = loss + self.cfg.l1 * l1_penalty(self.l1_params) if self.cfg.l1 and self.l1_params else loss
            # A sum weighted by the micro-batch's count; _scale_gradients divides by the step's total.
            self.scaler.scale(penalised * (n_tokens if self.weight_by == "tokens" else n_samples)).backward()
        return loss.detach(), n_samples, n_tokens

    def _private_forward_backward(self, batch: Any) -> tuple[torch.Tensor, int, int]:
        """DP-SGD: backward of the batch's mean loss (Opacus scales per-example gradients from
        it); an empty batch does nothing here and becomes a noise-only step."""
        if _batch_size(batch) == 0:
            return torch.zeros((), device=self.device), 0, 0
        loss, n_samples, n_tokens = self.loss_fn(self.net, batch)
        loss = loss.float()
        value = loss.item()
        if not math.isfinite(value):  # before Opacus clips and noises it into the weights
            self._fail_nonfinite(self.progress.step + 1, value)
        loss.backward()
        return loss.detach(), n_samples, n_tokens

    def _scale_gradients(self, local_weight: int) -> None:
        """Turn the accumulated weighted sum of gradients into the step's mean: divide by the
        total weight of the step's micro-batches on every rank. DDP has already averaged the
        gradients over ranks (divided by N), hence the factor N over the global total."""
        if self.private is not None:
            return  # the DPOptimizer divides by the expected batch size itself
        total = float(local_weight)
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor(total, device=self.device, dtype=torch.float64)
            dist.all_reduce(t)
            total = float(t) / self.ctx.world_size
        if total <= 0:  # nothing carried loss (e.g. every reply truncated away): no update
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.scaler.unscale_(self.optimizer)  # float16: back to true gradients (infs recorded)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / total)

    def _optimizer_step(self, empty: bool = False) -> torch.Tensor | None:
        """Clip, step, zero the gradients; returns the gradient norm (when clipping)."""
        norm = None
        if self.private is not None:  # DP-SGD: the DPOptimizer clips per example and adds the noise
            if empty:
                self.private.empty_step()  # Poisson sampling drew no example: a noise-only step
            else:
                self.optimizer.step()
        elif not any(p.grad is not None for p in self.params):
            pass  # a step with nothing to learn
        else:
            if self.cfg.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
                if hasattr(norm, "full_tensor"):  # FSDP: a DTensor over the shards
                    norm = norm.full_tensor()
            self.scaler.step(self.optimizer)  # float16: skipped when the gradients overflowed
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- the fit

    def fit(self, batches: Callable[[int], Iterable[Any]], micro_batches_per_epoch: int) -> FitResult:
        """Train over ``batches(epoch)`` (micro-batches, the same on every rank, a function of
        the epoch alone so a resumed run sees the same ones); returns what happened, best weights
        loaded (restore_best). A final incomplete accumulation group is dropped."""
        from fromzero.training.callbacks import TrainingProgress, announce_evaluation

        cfg = self.cfg
        world = self.ctx.world_size
        steps_per_epoch = max(1, micro_batches_per_epoch // (cfg.grad_accum * world))
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_schedule(total))
        self._batches = batches
        p = self.progress = self.store.load_last(self) if self.resume else Progress()
        start_step = p.step
        stopped_early = interrupted = False
        t0 = time.perf_counter() - p.elapsed_s
        # The steps since the last metrics row: (step, epoch, loss, grad norm, lr, had samples),
        # losses as device tensors until settle() syncs them. checkpoints/last keeps them, so a
        # resumed run writes the rows an uninterrupted one would.
        pending = p.window
        window = [time.perf_counter(), 0, 0]  # start, samples, tokens since the last row

        def settle() -> None:
            """Sync the pending losses to floats (one host sync); stop on NaN/inf."""
            unsettled = [i for i, q in enumerate(pending) if isinstance(q[2], torch.Tensor)]
            if not unsettled:
                return
            values = torch.stack([pending[i][2] for i in unsettled]).cpu().tolist()
            for i, value in zip(unsettled, values):
                if not math.isfinite(value):
                    self._fail_nonfinite(pending[i][0], value)
                step, epoch, _, norm, lr, had = pending[i]
                pending[i] = (step, epoch, value, None if norm is None else float(norm), lr, had)

        def flush(bar: TrainingProgress) -> None:
            """Write a metrics row for the pending steps (their mean loss)."""
            settle()
            if not pending:
                return
            # a noise-only DP step (empty Poisson batch) has no loss
            losses = [q[2] for q in pending if q[5]] or [math.nan]
            step, epoch, _, norm, lr, _ = pending[-1]
            elapsed = max(time.perf_counter() - window[0], 1e-9)
            row = {"step": step, "epoch": epoch, "loss": sum(losses) / len(losses), "lr": lr,
                   "samples_per_sec": window[1] / elapsed, "elapsed_s": time.perf_counter() - t0}
            if norm is not None:
                row["grad_norm"] = float(norm)
            if window[2]:
                row["tokens_per_sec"] = window[2] / elapsed
            if math.isfinite(row["loss"]):
                self.logger.log(row)
            rate = f"{row['tokens_per_sec'] / 1000:.1f}k tok/s" if window[2] else f"{row['samples_per_sec']:.1f} samples/s"
            bar.set_metrics(row["loss"], lr, rate)
            pending.clear()
            window[:] = [time.perf_counter(), 0, 0]

        def run_eval(epoch: int, bar: TrainingProgress) -> bool:
            """Evaluate, keep the best weights; True when early stopping says stop."""
            settle()
            metrics = self.evaluate(self.model)
            value = float(metrics[self.monitor.removeprefix("val_")])
            if not math.isfinite(value):
                self._fail_nonfinite(p.step, value, what=f"validation {self.monitor.removeprefix('val_')}")
            row = {"step": p.step, "epoch": epoch, "elapsed_s": time.perf_counter() - t0}
            row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            if self.private is not None:
                row["epsilon"] = self.private.epsilon()  # spent so far (at privacy.delta)
            self.logger.log(row)
            best = p.best_value
            improved = best is None or (value > best if self.higher_is_better else value < best)
            p.evaluated_at = p.step
            if improved:
                p.best_value, p.best_metrics, p.best_step, p.best_epoch, p.stale = value, metrics, p.step, epoch, 0
                if self.restore_best:
                    self.best_state = self.snapshot()
                if self.save_best is not None and (self.ctx.is_main or self.fsdp):
                    self.save_best({"best_step": p.step, "best_epoch": epoch, "val": to_jsonable(metrics)})
            else:
                p.stale += 1
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            where = f"step {p.step} (epoch {epoch})" if cfg.epochs > 1 else f"step {p.step}"
            bar.print(f"{where}: val {shown}" + (" (best, saved)" if improved else ""))
            announce_evaluation(p.step, row)  # e.g. fromzero tune's pruner; may end the run
            if cfg.patience and p.stale >= cfg.patience:
                bar.print(f"early stop: no better {self.monitor} for {cfg.patience} evaluation(s); "
                          f"best at step {p.best_step}")
                return True
            set_train_mode(self.model, self.trained_modules)
            return False

        def save_last() -> None:
            settle()  # a NaN step is reported, never saved
            p.elapsed_s = time.perf_counter() - t0
            self.store.save_last(self, p)

        from fromzero.evaluation.runs import mark_running

        run_dir = self.last_dir.parent.parent if self.last_dir is not None and self.ctx.is_main else None
        with mark_running(run_dir), StopRequest() as stop, \
                TrainingProgress(total, start=min(p.step, total), enabled=self.show_progress) as bar:
            done = False
            if self.resume and (p.step >= total or p.epoch > cfg.epochs):  # resumed with max_steps / epochs at or below
                bar.print(f"the run already took {p.step} steps (of {total}): finishing it without training")
                if p.evaluated_at != p.step:
                    run_eval(min(p.epoch, cfg.epochs), bar)
                    save_last()
            elif self.eval_at_start and p.step == 0:
                stopped_early = done = run_eval(p.epoch, bar)
                save_last()
            for epoch in range(p.epoch, cfg.epochs + 1):
                if p.step >= total or done:
                    break
                p.epoch = epoch
                set_train_mode(self.model, self.trained_modules)
                self.optimizer.zero_grad(set_to_none=True)  # nothing left over from an incomplete group
                group: list[Any] = []
                for batch in self._epoch_stream(batches, epoch, p):
                    group.append(batch)
                    p.micro += 1
                    if p.micro % cfg.grad_accum:
                        continue
                    lr = self.optimizer.param_groups[0]["lr"]
                    if p.step == start_step and self.compiled:
                        loss, norm, n, tokens = self._first_compiled_step(group, bar)
                    else:
                        loss, norm, n, tokens = self.train_step(group)
                    window[1] += n * world
                    window[2] += tokens * world
                    group = []
                    self.scheduler.step()
                    p.step += 1
                    p.samples += n * world
                    pending.append((p.step, epoch, loss, norm, lr, n > 0))
                    bar.advance(p.step)
                    if p.step % cfg.log_interval == 0 or p.step == total:
                        flush(bar)
                    if cfg.eval_every and p.step % cfg.eval_every == 0:
                        stopped_early = done = run_eval(epoch, bar)
                        save_last()
                        if done:
                            break
                    if self._stop_everywhere(stop.requested):
                        interrupted = done = True
                        save_last()
                        bar.print(f"stopped at step {p.step} as asked; checkpoint saved. Continue with: "
                                  f"fromzero {self.command} --resume {self.last_dir.parent.parent if self.last_dir else 'RUN_DIR'}")
                        break
                    if p.step >= total:
                        done = True
                        break
                else:  # the epoch's data is used up: evaluate (unless eval_every does), go on to the next
                    p.epochs_run = epoch
                    if p.evaluated_at != p.step and (not cfg.eval_every or epoch == cfg.epochs):
                        stopped_early = done = run_eval(epoch, bar)
                    p.epoch, p.micro, p.epoch_rng = epoch + 1, 0, None
                    p.epoch_data = batches.get_state() if hasattr(batches, "get_state") else None  # type: ignore[attr-defined]
                    save_last()
                    if done:
                        break
                    continue
                # stopped inside the epoch: max_steps, early stopping or Ctrl-C
                p.epochs_run = epoch
                if not interrupted and p.evaluated_at != p.step:
                    stopped_early = run_eval(epoch, bar)
                    save_last()
                break
            if not interrupted:
                flush(bar)
        train_s = time.perf_counter() - t0
        if p.best_value is None:
            if interrupted:
                return FitResult({}, 0, 0, p.step, p.epochs_run, False, True, train_s, 0.0)
            raise FromzeroError("training stopped before the first evaluation: nothing to keep")
        if self.restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)
        stopped_early = stopped_early and p.step < total
        return FitResult(p.best_metrics, p.best_step, p.best_epoch, p.step, p.epochs_run, stopped_early,
                         interrupted, train_s, p.samples / max(train_s, 1e-9))

    def _first_compiled_step(self, group: list[Any], bar: Any) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """The first compiled step compiles (tens of seconds the first time, cached on disk
        afterwards). If compiling fails, say why and continue without compile."""
        from fromzero.devices import is_compile_failure

        bar.print("compiling the model (first step; later runs reuse the cache)...")
        start = time.perf_counter()
        try:
            result = self.train_step(group)
        except Exception as e:  # noqa: BLE001 - only compile failures are handled
            if not is_compile_failure(e):
                raise
            bar.print(f"warning: torch.compile failed ({first_line(e)[:200]}); continuing without compile")
            self.net, self.compiled = self.model, False
            self.optimizer.zero_grad(set_to_none=True)
            return self.train_step(group)
        bar.print(f"compiled in {time.perf_counter() - start:.1f} s")
        return result

    def _epoch_stream(self, batches: Any, epoch: int, p: Progress) -> Iterator[Any]:
        """This rank's micro-batches of ``epoch``. When resuming inside it: a seekable stream
        (``seek``) is put back where it was; otherwise the micro-batches already trained on are
        drawn again (so data-loading randomness repeats) and skipped, and the RNG is put back to
        where the interrupted run was after its last step."""
        data_state = getattr(batches, "set_state", None)  # a ShuffledEpochs' generator
        if hasattr(batches, "seek"):  # the state saved with checkpoints/last is the position now
            if p.epoch_data is not None:
                batches.seek(p.epoch_data)
            return iter(rank_micro_batches(batches(epoch), self.ctx))
        if p.micro == 0 or p.epoch_rng is None:
            if p.epoch_data is not None and data_state is not None:  # resuming at the start of an epoch
                data_state(p.epoch_data)
            p.epoch_rng = _rng_state()
            p.epoch_data = batches.get_state() if data_state is not None else None
            return iter(rank_micro_batches(batches(epoch), self.ctx))
        resume_rng = _rng_state()
        _set_rng_state(p.epoch_rng)  # as at the start of the epoch: the loader draws its seeds now
        if p.epoch_data is not None and data_state is not None:
            data_state(p.epoch_data)
        stream = iter(rank_micro_batches(batches(epoch), self.ctx))
        for _ in range(p.micro):
            next(stream, None)
        _set_rng_state(resume_rng)
        return stream

    # -- checkpoints/last: what a resumed run needs to continue bit for bit

    def loop_state(self, p: Progress) -> dict[str, Any]:
        """The loop's part of checkpoints/last's trainer state (every rank takes part: under
        DDP each rank's RNG is gathered; dropout draws differ between ranks)."""
        if hasattr(self._batches, "seek"):
            p.epoch_data = self._batches.tell()
        rank_rngs = None
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            rank_rngs = [None] * self.ctx.world_size
            dist.all_gather_object(rank_rngs, {"rng": _rng_state(), "epoch_rng": p.epoch_rng})
        return {"format": 1, **p.state(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": _rng_state(), "rank_rngs": rank_rngs}

    def restore_loop_state(self, state: dict[str, Any], where: Path) -> Progress:
        """Put back schedule, scaler and this rank's RNG; returns the position."""
        try:
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            own = state.get("rank_rngs")  # this rank's RNG when the run had as many ranks as this one
            own = own[self.ctx.rank] if isinstance(own, list) and len(own) == self.ctx.world_size else \
                {"rng": state["rng"], "epoch_rng": state["epoch_rng"]}
            p = Progress.from_state(state, own["epoch_rng"])
            _set_rng_state(own["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise FromzeroError(f"trainer state in {where} does not fit this run: {first_line(e)}") from None
        if self.ctx.is_main:
            print(f"resuming at step {p.step} (epoch {p.epoch}) from {where}", file=sys.stderr)
        return p

    def save_last(self, trainer: "Trainer", p: Progress) -> None:
        """Write checkpoints/last atomically (rank 0): trained weights + buffers, the best ones so
        far, optimizer, the loop state."""
        if self.last_dir is None or self.private is not None:
            return
        state = self.loop_state(p)
        if not self.ctx.is_main:
            return
        from fromzero.checkpoint import TRAINER_STATE_FILE, atomic_directory, write_safetensors

        weights = {f"current/{k}": v for k, v in self.snapshot().items()}
        if self.best_state is not None:
            weights.update({f"best/{k}": v for k, v in self.best_state.items()})
        state["optimizer"] = self.optimizer.state_dict()
        with atomic_directory(self.last_dir) as tmp:
            write_safetensors(weights, tmp / LAST_WEIGHTS_FILE)
            torch.save(state, tmp / TRAINER_STATE_FILE)
            (tmp / LAST_INFO_FILE).write_text(json.dumps({"step": p.step, "epoch": p.epoch}) + "\n")

    def load_last(self, trainer: "Trainer") -> Progress:
        from safetensors.torch import load_file

        from fromzero.checkpoint import load_trainer_state, recover_directory

        if self.private is not None:
            raise FromzeroError("a differentially private run cannot be resumed (its privacy accounting "
                                "would restart): start it again")
        if self.last_dir is None:
            raise FromzeroError("nothing to resume from: no checkpoints/last directory given")
        recover_directory(self.last_dir)
        weights_file = self.last_dir / LAST_WEIGHTS_FILE
        if not weights_file.is_file():
            raise FromzeroError(f"nothing to resume: {self.last_dir} holds no saved training state "
                                "(the run stopped before its first evaluation?)")
        state = load_trainer_state(self.last_dir)
        try:
            weights = load_file(str(weights_file))
        except Exception as e:  # corrupt file
            raise FromzeroError(f"cannot read {weights_file}: {first_line(e)}") from None
        current = {k.removeprefix("current/"): v for k, v in weights.items() if k.startswith("current/")}
        best = {k.removeprefix("best/"): v for k, v in weights.items() if k.startswith("best/")}
        expected = set(self.snapshot())
        if set(current) != expected:
            raise FromzeroError(f"{weights_file} does not fit this run's model (was the recipe changed?): "
                                f"{len(set(current) ^ expected)} tensor names differ")
        try:
            self.model.load_state_dict(current, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise FromzeroError(f"trainer state in {self.last_dir} does not fit this run: {first_line(e)}") from None
        self.best_state = best or None
        return self.restore_loop_state(state, self.last_dir)

    def _stop_everywhere(self, requested: bool) -> bool:
        """A stop asked of any rank (Ctrl-C, SIGTERM) stops all of them after the same step."""
        if self.ctx.world_size == 1:
            return requested
        return bool(mean_across_ranks(torch.tensor(float(requested), device=self.device), self.ctx) > 0)

    def _fail_nonfinite(self, step: int, value: float, what: str = "training loss") -> None:
        info = self.last_dir / LAST_INFO_FILE if self.last_dir is not None else None
        if info is not None and info.is_file():
            good = json.loads(info.read_text()).get("step")
            where = f"the last good checkpoint is {self.last_dir} (step {good})"
        else:
            where = "no checkpoint was written"
        if hasattr(self.logger, "close"):
            self.logger.close()
        raise FromzeroError(f"{what} became {value} at step {step}; training stopped, {where}. "
                            f"Try a lower lr (now {self.cfg.lr}), grad_clip or float32, or check the data")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch_size(batch: Any) -> int:
    """Examples in a micro-batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0)
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 1

