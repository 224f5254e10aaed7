"""The fine-tuning loop every text task shares: optimise, evaluate, keep the best, stop early.

A task (text classification, SFT) supplies the model, batches, a ``loss_fn(model, batch) ->
(loss, samples, tokens)`` and an ``evaluate(model) -> metrics`` on the validation split; the
:class:`Finetuner` does the rest:

* AdamW (decay on matrices only) or SGD; linear warmup then cosine decay to lr * min_lr_ratio;
* gradient accumulation, global-norm clipping, an optional L1 penalty on trained matrices
  (``l1 * sum |w|``, added to the loss) next to L2 (decoupled weight decay);
* bf16/fp16 autocast and torch.compile where they help;
* evaluation after every epoch (or every ``eval_every`` steps), early stopping when the monitored
  metric has not improved for ``patience`` evaluations, and the best weights restored at the end;
* metrics.jsonl + TensorBoard rows, a rich progress bar, NaN/inf loss as a one-line error,
  Ctrl-C / SIGTERM stopping after the current step with the best weights kept;
* under ``torchrun`` (``dist_strategy: ddp``): DistributedDataParallel, each rank taking every
  N-th micro-batch of the same shuffled order (N ranks x grad_accum k is the same step as one
  process with grad_accum N*k), ``no_sync`` on all but the last micro-batch, losses averaged
  across ranks, every rank evaluating the (small) validation split so all make the same
  early-stopping decision; rank 0 alone writes the run directory (:func:`start_distributed`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.finetune.methods import MethodConfig, set_train_mode
from fromzero.training.distributed import DistContext, mean_across_ranks

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class FinetuneConfig(MethodConfig):
    """Settings every fine-tuning task shares (the task configs add data and model fields)."""

    init_from: str = ""
    """The model to start from: a fromzero checkpoint directory (pretraining run: runs/<run>/checkpoints/best)."""
    epochs: int = 3
    """Maximum passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run every epoch)."""
    batch_size: int = 16
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr (cosine decay); 1.0 keeps it constant."""
    warmup_ratio: float = 0.06
    """Fraction of the steps with linear warmup from 0 to lr."""
    optimizer: str = "adamw"
    """adamw | sgd (momentum 0.9, Nesterov)."""
    weight_decay: float = 0.01
    """L2 regularisation: decoupled weight decay on matrices (not biases / norms)."""
    l1: float = 0.0
    """L1 regularisation: l1 * sum(|w|) of the trained matrices is added to the loss (0 = off)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    patience: int = 0
    """Stop after this many evaluations without a better monitored metric (0 = never stop early)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0 = after every epoch)."""
    log_interval: int = 10
    """Write a metrics row every N optimizer steps."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (under torchrun with ddp: each rank its own cuda:LOCAL_RANK)."""
    dist_strategy: str = "none"
    """none (one process) | ddp (launch with torchrun --nproc_per_node N -m fromzero finetune ...: batch_size is per process, a step sees batch_size x N x grad_accum examples)."""
    dtype: str = "auto"
    """auto (bf16 where fast) | float32 | bfloat16 | float16 (autocast; weights stay float32)."""
    compile: bool = False
    """torch.compile the model (first steps are slow while it compiles)."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""
    out_dir: str = ""
    """Run directory ("" = runs/<task>-<timestamp>); refused if it exists and is not empty, unless force."""
    force: bool = False
    """Replace the files of an existing run directory."""
    progress: bool = True
    """Show a rich progress bar on stderr."""

    def validate_common(self) -> None:
        """Raise FromzeroError for shared settings that cannot work."""
        from fromzero.finetune.methods import METHODS

        if self.method not in METHODS:
            raise FromzeroError(f"method {self.method!r} is not supported (supported: {', '.join(METHODS)})")
        if self.optimizer not in OPTIMIZERS:
            raise FromzeroError(f"optimizer {self.optimizer!r} is not supported (supported: {', '.join(OPTIMIZERS)})")
        for name in ("epochs", "batch_size", "grad_accum", "log_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise FromzeroError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_steps", "patience", "eval_every", "num_workers", "unfreeze_top"):
            if getattr(self, name) < 0:
                raise FromzeroError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FromzeroError(f"lr must be positive, got {self.lr}")
        for name, low, high in (("min_lr_ratio", 0, 1), ("warmup_ratio", 0, 1)):
            if not low <= getattr(self, name) <= high:
                raise FromzeroError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")
        for name in ("weight_decay", "l1", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise FromzeroError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dist_strategy not in ("none", "ddp"):
            raise FromzeroError(f"dist_strategy {self.dist_strategy!r} is not supported for fine-tuning "
                                "(none | ddp; fsdp is for pretraining)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise FromzeroError(f"dtype {self.dtype!r} is not supported (auto, float32, bfloat16, float16)")


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


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    from fromzero.training.optim import param_groups

    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cuda", "cpu", "mps"))


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier for step s: linear warmup over warmup_ratio * total, then cosine to min_lr_ratio."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def start_distributed(cfg: FinetuneConfig) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group when dist_strategy is ddp (else one process); ranks other
    than 0 print nothing, so the console shows one run."""
    from fromzero.training.distributed import init_distributed
    from fromzero.training.trainer import resolve_device

    ctx, device = init_distributed(cfg.dist_strategy, resolve_device(cfg.device))
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this worker process
    return ctx, device


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


def rank_micro_batches(batches: Iterable[Any], ctx: DistContext) -> Iterable[Any]:
    """This rank's share of a stream of micro-batches all ranks produce in the same order:
    of each run of world_size micro-batches, the rank-th; an incomplete final run is dropped so
    every rank takes the same number of steps."""
    if ctx.world_size == 1:
        yield from batches
        return
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == ctx.world_size:
            yield group[ctx.rank]
            group = []


def l1_penalty(params: list[nn.Parameter]) -> torch.Tensor:
    """sum |w| over the trained matrices (biases and norm gains are not penalised, as with L2)."""
    return torch.stack([p.abs().sum(dtype=torch.float32) for p in params]).sum()


class Finetuner:
    """Runs the optimisation with evaluation, early stopping and best-weight restore."""

    def __init__(
        self,
        model: nn.Module,
        cfg: FinetuneConfig,
        device: torch.device,
        dtype: str,
        loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int, int]],
        evaluate: Callable[[nn.Module], dict[str, Any]],
        monitor: str,
        higher_is_better: bool,
        logger: Any,
        trained_modules: list[nn.Module] | None = None,
        forward: nn.Module | None = None,
        ctx: DistContext | None = None,
        weight_by: str = "samples",
    ) -> None:
        """forward: what the training step calls (e.g. the compiled model; default ``model``);
        loss_fn receives it (wrapped in DistributedDataParallel under ddp).

        weight_by: what a step's loss is the mean over, across its micro-batches and ranks:
        ``samples`` (classification, preference pairs) or ``tokens`` (SFT: the reply tokens).
        loss_fn returns a mean over its micro-batch; each micro-batch's gradient is weighted by
        its count of samples (tokens) and the sum divided by the step's total, so a step with
        gradient accumulation (or N ranks) is the step one big batch would take, even when
        micro-batches hold different numbers of tokens or the last one is short. (A plain
        ``loss / grad_accum`` would give every micro-batch the same weight.)"""
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
        self.optimizer = build_optimizer(model, cfg, device)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.ctx = ctx or DistContext()
        self.net: nn.Module = forward if forward is not None else model
        self.ddp: nn.Module | None = None
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.net = DistributedDataParallel(
                self.net, device_ids=[device] if device.type == "cuda" else None)

    def autocast(self) -> Any:
        from fromzero.training.trainer import autocast_context

        return autocast_context(self.device, self.dtype)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copy of what training changes: trained parameters and all buffers (BatchNorm)."""
        trained = {id(p) for p in self.params}
        named = dict(self.model.named_parameters())
        keep = {n for n, p in named.items() if id(p) in trained} | {n for n, _ in self.model.named_buffers()}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items() if k in keep}

    def _improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def fit(self, batches: Callable[[int], Iterable[Any]], micro_batches_per_epoch: int) -> FitResult:
        """Train over ``batches(epoch)`` (micro-batches, the same on every rank); returns what
        happened, best weights loaded. A final incomplete accumulation group is dropped."""
        from fromzero.training.callbacks import TrainingProgress, announce_evaluation
        from fromzero.training.trainer import StopRequest

        cfg = self.cfg
        world = self.ctx.world_size
        steps_per_epoch = max(1, micro_batches_per_epoch // (cfg.grad_accum * world))
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, cfg.warmup_ratio, cfg.min_lr_ratio))
        best_value: float | None = None
        best_metrics: dict[str, Any] = {}
        best_step = best_epoch = step = epochs_run = stale = 0
        stopped_early = interrupted = False
        samples = 0
        t0 = time.perf_counter()

        def run_eval(epoch: int, bar: TrainingProgress) -> bool:
            """Evaluate, keep the best weights; True when early stopping says stop."""
            nonlocal best_value, best_metrics, best_step, best_epoch, stale
            metrics = self.evaluate(self.model)
            value = float(metrics[self.monitor.removeprefix("val_")])
            row = {"step": step, "epoch": epoch, "elapsed_s": time.perf_counter() - t0}
            row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            self.logger.log(row)
            announce_evaluation(step, row)
            improved = self._improved(value, best_value)
            if improved:
                best_value, best_metrics, best_step, best_epoch, stale = value, metrics, step, epoch, 0
                self.best_state = self._snapshot()
            else:
                stale += 1
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            bar.print(f"step {step} (epoch {epoch}): val {shown}" + (" (best)" if improved else ""))
            if cfg.patience and stale >= cfg.patience:
                bar.print(f"early stop: no better {self.monitor} for {cfg.patience} evaluation(s); "
                          f"best at step {best_step}")
                return True
            set_train_mode(self.model, self.trained_modules)
            return False

        with StopRequest() as stop, TrainingProgress(total, enabled=cfg.progress) as bar:
            done = False
            for epoch in range(1, cfg.epochs + 1):
                set_train_mode(self.model, self.trained_modules)
                self.optimizer.zero_grad(set_to_none=True)  # nothing left over from an incomplete group
                micro, group_loss, group_weight = 0, 0.0, 0
                evaluated_at = -1
                for batch in rank_micro_batches(batches(epoch), self.ctx):
                    micro_loss, n_samples, n_tokens = self._micro_step(batch, micro, step)
                    weight = n_tokens if self.weight_by == "tokens" else n_samples
                    group_loss += micro_loss * weight
                    group_weight += weight
                    micro += 1
                    samples += n_samples * world
                    if micro % cfg.grad_accum:
                        continue
                    loss = group_loss / max(group_weight, 1)  # the step's mean loss (this rank's weights)
                    self._scale_gradients(group_weight)
                    group_loss, group_weight = 0.0, 0
                    self._optimizer_step()
                    lr = self.optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    step += 1
                    rate = samples / max(time.perf_counter() - t0, 1e-9)
                    if step % cfg.log_interval == 0 or step == total:
                        self.logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                                         "samples_per_sec": rate, "elapsed_s": time.perf_counter() - t0})
                    bar.set_metrics(loss, lr, f"{rate:.1f} samples/s")
                    bar.advance(step)
                    if cfg.eval_every and step % cfg.eval_every == 0:
                        evaluated_at = step
                        if run_eval(epoch, bar):
                            stopped_early = done = True
                            break
                    if self._stop_everywhere(stop.requested):
                        interrupted = done = True
                        bar.print(f"stopping at step {step} as asked; keeping the best weights so far")
                        break
                    if step >= total:
                        done = True
                        break
                epochs_run = epoch
                # With eval_every the epoch boundary needs no extra evaluation, except at the very end.
                last = done or epoch == cfg.epochs
                if evaluated_at != step and (not cfg.eval_every or last) and not (interrupted and step == 0):
                    if run_eval(epoch, bar):
                        stopped_early = True
                        done = True
                if done:
                    break
        train_s = time.perf_counter() - t0
        if self.best_state is None:
            raise FromzeroError("training stopped before the first evaluation: nothing to keep")
        self.model.load_state_dict(self.best_state, strict=False)
        stopped_early = stopped_early and step < total
        return FitResult(best_metrics, best_step, best_epoch, step, epochs_run, stopped_early, interrupted,
                         train_s, samples / max(train_s, 1e-9))

    def _stop_everywhere(self, requested: bool) -> bool:
        """A stop asked of any rank (Ctrl-C, SIGTERM) stops all of them after the same step."""
        if self.ctx.world_size == 1:
            return requested
        return bool(mean_across_ranks(torch.tensor(float(requested), device=self.device), self.ctx) > 0)

    def _micro_step(self, batch: Any, micro: int, step: int) -> tuple[float, int, int]:
        # DDP: only the last micro-batch of a step all-reduces the gradients.
        syncs = self.ddp is None or (micro + 1) % self.cfg.grad_accum == 0
        with contextlib.nullcontext() if syncs else self.ddp.no_sync():  # type: ignore[union-attr]
            return self._forward_backward(batch, step)

    def _forward_backward(self, batch: Any, step: int) -> tuple[float, int, int]:
        with self.autocast():
            loss, n_samples, n_tokens = self.loss_fn(self.net, batch)
        loss = loss.float()
        # The mean over ranks: what is logged, and every rank sees a NaN (and stops) together.
        value = mean_across_ranks(loss.detach(), self.ctx).item()
        if not math.isfinite(value):
            raise FromzeroError(f"loss became {value} at step {step + 1}: lower lr (now {self.cfg.lr}) or check the data")
        if self.cfg.l1 and self.l1_params:
            loss = loss + self.cfg.l1 * l1_penalty(self.l1_params)
        # A sum weighted by the micro-batch's count; _scale_gradients divides by the step's total.
        (loss * (n_tokens if self.weight_by == "tokens" else n_samples)).backward()
        return value, n_samples, n_tokens

    def _scale_gradients(self, local_weight: int) -> None:
        """Turn the accumulated weighted sum of gradients into the step's mean: divide by the
        total weight of the step's micro-batches on every rank. DDP has already averaged the
        gradients over ranks (divided by N), hence the factor N over the global total."""
        total = float(local_weight)
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor(total, device=self.device, dtype=torch.float64)
            dist.all_reduce(t)
            total = float(t) / self.ctx.world_size
        if total <= 0:  # nothing carried loss (e.g. every reply truncated away): no update
            self.optimizer.zero_grad(set_to_none=True)
            return
        scale = 1.0 / total
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
