"""The fine-tuning loop every task shares: optimise, evaluate, keep the best, stop early, resume.

A task (text classification, SFT, DPO, image classification, recommendation; distillation is a
loss of the first two) supplies the model, ``batches(epoch)``, a ``loss_fn(model, batch) ->
(loss, samples, tokens)`` and an ``evaluate(model) -> metrics`` on the validation split; the
:class:`Finetuner` does the rest:

* AdamW (decay on matrices only) or SGD; linear warmup then cosine decay to lr * min_lr_ratio;
* gradient accumulation weighted by samples or tokens, global-norm clipping, an optional L1
  penalty on trained matrices (``l1 * sum |w|``, added to the loss) next to L2 (decoupled weight
  decay);
* bf16/fp16 autocast (fp16 with a GradScaler) and torch.compile where they help;
* evaluation after every epoch (or every ``eval_every`` steps), early stopping when the monitored
  metric has not improved for ``patience`` evaluations, ``checkpoints/best`` written by the task
  at each improvement (``save_best``), the best weights restored at the end;
* ``checkpoints/last`` after every evaluation, on Ctrl-C / SIGTERM and at the end: trained and
  best weights, optimizer, schedule, scaler, every rank's RNG and the position in the epoch, so
  ``fromzero finetune --resume RUN_DIR`` continues bit for bit;
* metrics.jsonl + TensorBoard rows, a rich progress bar, NaN/inf loss as a one-line error;
* DP-SGD as a plug-in (``private=``: Opacus' optimizer, noise-only steps for empty batches);
* under ``torchrun`` (``dist_strategy: ddp``): DistributedDataParallel, each rank taking every
  N-th micro-batch of the same shuffled order (N ranks x grad_accum k is the same step as one
  process with grad_accum N*k), ``no_sync`` on all but the last micro-batch, losses averaged
  across ranks, every rank evaluating the (small) validation split so all make the same
  early-stopping decision; rank 0 alone writes the run directory (:func:`run_task`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError, first_line
from fromzero.evaluation.metrics import to_jsonable  # plain values: what weights_only loading accepts
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


def start_run_dir(cfg: Any, task: str, ctx: DistContext, resume: bool = False) -> Path:
    """The run directory every rank agrees on (rank 0's timestamped default, or out_dir); rank 0
    creates it (refusing a used one unless force) or, to resume, checks it holds
    checkpoints/last, and writes config.yaml (with the task, so ``--resume`` can rebuild it)."""
    import dataclasses

    import yaml

    from fromzero.checkpoint import atomic_write_text
    from fromzero.training.distributed import broadcast_text
    from fromzero.training.trainer import default_finetune_dir, prepare_run_dir

    run_dir = Path(broadcast_text(str(Path(cfg.out_dir) if cfg.out_dir else default_finetune_dir(task)), ctx))

    def start() -> None:
        if resume:
            if resume_step(run_dir) is None:
                raise FromzeroError(f"nothing to resume in {run_dir}: no checkpoints/last with training state")
        else:
            prepare_run_dir(run_dir, cfg.force, resumable=True)
        saved = dict(dataclasses.asdict(cfg), out_dir=str(run_dir), task=task)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))

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


def run_task(body: Callable[..., dict[str, Any]], cfg: Any, resume: bool = False) -> dict[str, Any]:
    """The frame every fine-tuning task runs in: validate the config, join torchrun's process
    group (dist_strategy ddp; else one process), run ``body(cfg, ctx, device, t_start, resume)``,
    and leave the group however it ends."""
    from fromzero.training.distributed import shutdown

    t_start = time.perf_counter()
    cfg.validate()
    ctx, device = start_distributed(cfg)
    try:
        return body(cfg, ctx, device, t_start, resume)
    finally:
        shutdown(ctx)


def start_distributed(cfg: FinetuneConfig) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group when dist_strategy is ddp (else one process); ranks other
    than 0 print nothing, so the console shows one run."""
    from fromzero.training.distributed import init_distributed
    from fromzero.devices import resolve_device

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
        last_dir: Path | None = None,
        resume: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        private: Any = None,
        save_best: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """forward: what the training step calls (e.g. the compiled model; default ``model``);
        loss_fn receives it (wrapped in DistributedDataParallel under ddp).

        weight_by: what a step's loss is the mean over, across its micro-batches and ranks:
        ``samples`` (classification, preference pairs) or ``tokens`` (SFT: the reply tokens).
        loss_fn returns a mean over its micro-batch; each micro-batch's gradient is weighted by
        its count of samples (tokens) and the sum divided by the step's total, so a step with
        gradient accumulation (or N ranks) is the step one big batch would take, even when
        micro-batches hold different numbers of tokens or the last one is short. (A plain
        ``loss / grad_accum`` would give every micro-batch the same weight.)

        last_dir: where the loop keeps ``checkpoints/last`` (the trained weights, the best ones so
        far, optimizer, schedule, RNG and position in the data; written after every evaluation,
        on Ctrl-C / SIGTERM and at the end); resume: continue from it, bit for bit on CPU.
        optimizer: use this one instead of AdamW/SGD built from cfg (e.g. Opacus' DPOptimizer).
        private: a :class:`fromzero.training.privacy.PrivateTraining` when training with DP-SGD:
        its optimizer clips and noises per-example gradients of the batch-mean loss, so the loop
        skips its own weighting and clipping, and an empty Poisson batch is a noise-only step.
        save_best: called on rank 0 with ``{"best_step", "best_epoch", "val"}`` each time the
        monitored metric improves, while the model holds those weights: the task writes
        checkpoints/best, so a usable best checkpoint exists however the run ends."""
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
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg, device)
        self.last_dir, self.resume, self.private, self.save_best = last_dir, resume, private, save_best
        # float16 autocast (CUDA): scale the loss so small gradients do not flush to zero; steps
        # whose gradients overflowed are skipped and the scale lowered (a no-op for bf16 / fp32).
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
        if private is not None and (cfg.grad_accum != 1 or (ctx is not None and ctx.world_size > 1)):
            raise FromzeroError("privacy: DP-SGD runs in one process with grad_accum 1")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.ctx = ctx or DistContext()
        self.net: nn.Module = forward if forward is not None else model
        self.ddp: nn.Module | None = None
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = self.net = DistributedDataParallel(
                self.net, device_ids=[device] if device.type == "cuda" else None)

    def autocast(self) -> Any:
        from fromzero.devices import autocast_context

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
        """Train over ``batches(epoch)`` (micro-batches, the same on every rank, a function of
        the epoch alone so a resumed run sees the same ones); returns what happened, best weights
        loaded. A final incomplete accumulation group is dropped."""
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
        p = self._load_last(scheduler) if self.resume else _Progress()
        stopped_early = interrupted = False
        t0 = time.perf_counter() - p.elapsed_s

        def run_eval(epoch: int, bar: TrainingProgress) -> bool:
            """Evaluate, keep the best weights; True when early stopping says stop."""
            metrics = self.evaluate(self.model)
            value = float(metrics[self.monitor.removeprefix("val_")])
            row = {"step": p.step, "epoch": epoch, "elapsed_s": time.perf_counter() - t0}
            row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            if self.private is not None:
                row["epsilon"] = self.private.epsilon()  # spent so far (at privacy.delta)
            self.logger.log(row)
            announce_evaluation(p.step, row)
            improved = self._improved(value, p.best_value)
            if improved:
                p.best_value, p.best_metrics, p.best_step, p.best_epoch, p.stale = value, metrics, p.step, epoch, 0
                self.best_state = self._snapshot()
                if self.save_best is not None and self.ctx.is_main:
                    self.save_best({"best_step": p.step, "best_epoch": epoch, "val": to_jsonable(metrics)})
            else:
                p.stale += 1
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            bar.print(f"step {p.step} (epoch {epoch}): val {shown}" + (" (best)" if improved else ""))
            p.evaluated_at = p.step
            if cfg.patience and p.stale >= cfg.patience:
                bar.print(f"early stop: no better {self.monitor} for {cfg.patience} evaluation(s); "
                          f"best at step {p.best_step}")
                return True
            set_train_mode(self.model, self.trained_modules)
            return False

        with StopRequest() as stop, TrainingProgress(total, enabled=cfg.progress) as bar:
            bar.advance(min(p.step, total))
            done = False
            if p.step >= total or p.epoch > cfg.epochs:  # resumed with max_steps / epochs at or below where it was
                bar.print(f"the run already took {p.step} steps (of {total}): finishing it without training")
                if p.evaluated_at != p.step:
                    run_eval(min(p.epoch, cfg.epochs), bar)
                    self._save_last(scheduler, p, t0)
            for epoch in range(p.epoch, cfg.epochs + 1):
                if p.step >= total:
                    break
                p.epoch = epoch
                set_train_mode(self.model, self.trained_modules)
                self.optimizer.zero_grad(set_to_none=True)  # nothing left over from an incomplete group
                group_loss, group_weight, group_samples = 0.0, 0, 0
                for batch in self._epoch_stream(batches, epoch, p):
                    micro_loss, n_samples, n_tokens = self._micro_step(batch, p.micro, p.step)
                    weight = n_tokens if self.weight_by == "tokens" else n_samples
                    group_loss += micro_loss * weight
                    group_weight += weight
                    group_samples += n_samples
                    p.micro += 1
                    p.samples += n_samples * world
                    if p.micro % cfg.grad_accum:
                        continue
                    loss = group_loss / max(group_weight, 1)  # the step's mean loss (this rank's weights)
                    self._scale_gradients(group_weight)
                    group_loss, group_weight = 0.0, 0
                    self._optimizer_step(empty=group_samples == 0)
                    lr = self.optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    p.step += 1
                    rate = p.samples / max(time.perf_counter() - t0, 1e-9)
                    logged = group_samples > 0  # a noise-only DP step (empty Poisson batch) has no loss
                    group_samples = 0
                    if logged and (p.step % cfg.log_interval == 0 or p.step == total):
                        self.logger.log({"step": p.step, "epoch": epoch, "loss": loss, "lr": lr,
                                         "samples_per_sec": rate, "elapsed_s": time.perf_counter() - t0})
                    bar.set_metrics(loss, lr, f"{rate:.1f} samples/s")
                    bar.advance(p.step)
                    if cfg.eval_every and p.step % cfg.eval_every == 0:
                        stopped_early = done = run_eval(epoch, bar)
                        self._save_last(scheduler, p, t0)
                        if done:
                            break
                    if self._stop_everywhere(stop.requested):
                        interrupted = done = True
                        self._save_last(scheduler, p, t0)
                        bar.print(f"stopping at step {p.step} as asked; continue the run with "
                                  "fromzero finetune --resume RUN_DIR")
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
                    self._save_last(scheduler, p, t0)
                    if done:
                        break
                    continue
                # stopped inside the epoch: max_steps, early stopping or Ctrl-C
                p.epochs_run = epoch
                if not interrupted and p.evaluated_at != p.step:
                    stopped_early = run_eval(epoch, bar)
                    self._save_last(scheduler, p, t0)
                break
        train_s = time.perf_counter() - t0
        if self.best_state is None:
            if interrupted:
                return FitResult({}, 0, 0, p.step, p.epochs_run, False, True, train_s, 0.0)
            raise FromzeroError("training stopped before the first evaluation: nothing to keep")
        self.model.load_state_dict(self.best_state, strict=False)
        stopped_early = stopped_early and p.step < total
        return FitResult(p.best_metrics, p.best_step, p.best_epoch, p.step, p.epochs_run, stopped_early,
                         interrupted, train_s, p.samples / max(train_s, 1e-9))

    def _epoch_stream(self, batches: Callable[[int], Iterable[Any]], epoch: int, p: "_Progress") -> Iterator[Any]:
        """This rank's micro-batches of ``epoch``; when resuming inside it, the ones already
        trained on are drawn again (so data-loading randomness repeats) and skipped, and the RNG
        is put back to where the interrupted run was after its last step."""
        data_state = getattr(batches, "set_state", None)  # a ShuffledEpochs' generator
        if p.micro == 0 or p.epoch_rng is None:
            if p.epoch_data is not None and data_state is not None:  # resuming at the start of an epoch
                data_state(p.epoch_data)
            p.epoch_rng = _rng_state()
            p.epoch_data = batches.get_state() if data_state is not None else None  # type: ignore[attr-defined]
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

    def _save_last(self, scheduler: Any, p: "_Progress", t0: float) -> None:
        """Write checkpoints/last atomically (rank 0): trained weights + buffers, the best ones so
        far, optimizer and schedule state, RNG, and the position in the data."""
        if self.last_dir is None or self.private is not None:
            return
        rank_rngs = self._gather_rng_states(p)  # every rank takes part; rank 0 writes
        if not self.ctx.is_main:
            return
        from fromzero.checkpoint import TRAINER_STATE_FILE, atomic_directory, write_safetensors

        weights = {f"current/{k}": v for k, v in self._snapshot().items()}
        if self.best_state is not None:
            weights.update({f"best/{k}": v for k, v in self.best_state.items()})
        state = {"format": 1, "step": p.step, "epoch": p.epoch, "micro": p.micro, "samples": p.samples,
                 "best_value": p.best_value, "best_metrics": to_jsonable(p.best_metrics), "best_step": p.best_step,
                 "best_epoch": p.best_epoch, "stale": p.stale, "evaluated_at": p.evaluated_at,
                 "epochs_run": p.epochs_run, "elapsed_s": time.perf_counter() - t0,
                 "optimizer": self.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(),
                 "rng": _rng_state(), "epoch_rng": p.epoch_rng, "epoch_data": p.epoch_data,
                 "rank_rngs": rank_rngs}
        with atomic_directory(self.last_dir) as tmp:
            write_safetensors(weights, tmp / LAST_WEIGHTS_FILE)
            torch.save(state, tmp / TRAINER_STATE_FILE)
            (tmp / LAST_INFO_FILE).write_text(json.dumps({"step": p.step, "epoch": p.epoch}) + "\n")

    def _gather_rng_states(self, p: "_Progress") -> list[dict[str, Any]] | None:
        """Under DDP, every rank's RNG (now and at the start of the epoch): dropout draws differ
        between ranks that see different batches, so each resumes from its own."""
        if self.ctx.world_size == 1:
            return None
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, {"rng": _rng_state(), "epoch_rng": p.epoch_rng})
        return gathered

    def _load_last(self, scheduler: Any) -> "_Progress":
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
        expected = set(self._snapshot())
        if set(current) != expected:
            raise FromzeroError(f"{weights_file} does not fit this run's model (was the recipe changed?): "
                                f"{len(set(current) ^ expected)} tensor names differ")
        try:
            self.model.load_state_dict(current, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.best_state = best or None
            own = state.get("rank_rngs")  # this rank's RNG when the run had as many ranks as this one
            own = own[self.ctx.rank] if isinstance(own, list) and len(own) == self.ctx.world_size else \
                {"rng": state["rng"], "epoch_rng": state["epoch_rng"]}
            p = _Progress(step=int(state["step"]), epoch=int(state["epoch"]), micro=int(state["micro"]),
                          samples=int(state["samples"]), best_value=state["best_value"],
                          best_metrics=dict(state["best_metrics"]), best_step=int(state["best_step"]),
                          best_epoch=int(state["best_epoch"]), stale=int(state["stale"]),
                          evaluated_at=int(state["evaluated_at"]), epochs_run=int(state["epochs_run"]),
                          elapsed_s=float(state["elapsed_s"]), epoch_rng=own["epoch_rng"],
                          epoch_data=state.get("epoch_data"))
            _set_rng_state(own["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise FromzeroError(f"trainer state in {self.last_dir} does not fit this run: {first_line(e)}") from None
        print(f"resuming at step {p.step} (epoch {p.epoch}) from {self.last_dir}")
        return p

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
        if self.private is not None:
            return self._private_forward_backward(batch, step)
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
        self.scaler.scale(loss * (n_tokens if self.weight_by == "tokens" else n_samples)).backward()
        return value, n_samples, n_tokens

    def _private_forward_backward(self, batch: Any, step: int) -> tuple[float, int, int]:
        """DP-SGD: backward of the batch's mean loss (Opacus scales per-example gradients from
        it); an empty batch does nothing here and becomes a noise-only step."""
        n = _batch_size(batch)
        if n == 0:
            return 0.0, 0, 0
        loss, n_samples, n_tokens = self.loss_fn(self.net, batch)
        loss = loss.float()
        value = loss.item()
        if not math.isfinite(value):
            raise FromzeroError(f"loss became {value} at step {step + 1}: lower lr (now {self.cfg.lr}) or check the data")
        loss.backward()
        return value, n_samples, n_tokens

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
        scale = 1.0 / total
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)

    def _optimizer_step(self, empty: bool = False) -> None:
        if self.private is not None:  # DP-SGD: the DPOptimizer clips per example and adds the noise
            if empty:
                self.private.empty_step()  # Poisson sampling drew no example: a noise-only step
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler.is_enabled():
            if not any(p.grad is not None for p in self.params):  # a step with nothing to learn
                self.optimizer.zero_grad(set_to_none=True)
                return
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


LAST_WEIGHTS_FILE = "training_weights.safetensors"
LAST_INFO_FILE = "info.json"


@dataclass
class _Progress:
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
    epoch_data: torch.Tensor | None = None  # the shuffling generator's state at the start of ``epoch``

    def __post_init__(self) -> None:
        if self.best_metrics is None:
            self.best_metrics = {}


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
