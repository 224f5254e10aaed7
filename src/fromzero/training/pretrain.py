"""Language-model pretraining: a task of the one training loop (:class:`~fromzero.training.trainer.Trainer`).

What it adds for pretraining: the token stream (random windows of the memmapped train split,
drawn a whole optimizer step at a time so that k micro-batches of b, or N ranks, see the samples
of one batch of k*b; seekable, so a resume seeks instead of replaying), the validation loss, and
a checkpoints/last that is a loadable checkpoint (full weights, or FSDP shards) plus the trainer
state. Run it with ``fromzero pretrain --config RECIPE`` or :func:`pretrain`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import fromzero.checkpoint as ckpt
from fromzero import __version__
from fromzero.config import PretrainConfig, save_yaml, to_dict
from fromzero.errors import FromzeroError, first_line
from fromzero.files import temp_dir_beside
from fromzero.models.gpt import GPT
from fromzero.training.callbacks import MetricsLogger, NullLogger, write_plots
from fromzero.training.distributed import (SHARDED_DIR, DistContext, barrier, broadcast_text, check_sharded,
                                           full_model_state, full_optimizer_state, load_full_optimizer_state,
                                           load_sharded, mean_across_ranks, rank_rows, save_sharded, shard_model)
from fromzero.training.trainer import Progress, Trainer, default_run_dir, prepare_run_dir, run_task


@dataclasses.dataclass
class PretrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    last_val_loss: float
    stopped_early: bool  # stopped by Ctrl-C / SIGTERM (checkpoints/last holds where)


class TokenWindows:
    """The training stream: per optimizer step, one global batch of ``batch_size x world x
    grad_accum`` random windows, yielded as world x grad_accum micro-batches in the order the
    loop deals them out (micro-step j, rank r: global rows [(j*world + r)*b, ...)), so every
    rank sees the rows a one-process run with grad_accum world*k would. Seekable: the generator
    state after a step is the position (``tell`` / ``seek``)."""

    def __init__(self, data: np.ndarray, cfg: PretrainConfig, world: int) -> None:
        self.data, self.cfg, self.world = data, cfg, world
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from fromzero.data.text import sample_batch

        t = self.cfg.train
        while True:
            x, y = sample_batch(self.data, t.batch_size * self.world * t.grad_accum, self.cfg.model.block_size,
                                self.generator)
            yield from zip(x.chunk(self.world * t.grad_accum), y.chunk(self.world * t.grad_accum))

    def tell(self) -> torch.Tensor:
        return self.generator.get_state()

    def seek(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class PretrainRun:
    """One pretraining run on this rank: data, model, run directory, checkpoints."""

    def __init__(self, cfg: PretrainConfig, ctx: DistContext | None = None, device: torch.device | None = None,
                 run_dir: Path | None = None, resume: bool = False, force: bool = False) -> None:
        from fromzero.data.text import load_split
        from fromzero.devices import autocast_context, configure_backends, resolve_device, resolve_dtype

        ctx, device = ctx or DistContext(), device or resolve_device(cfg.train.device)
        self.cfg, self.ctx, self.device, t = cfg, ctx, device, cfg.train
        configure_backends(device)
        self.dtype = resolve_dtype(device, t.dtype)
        autocast_context(device, self.dtype)  # refuses float16 without CUDA before anything is written
        # Every rank must agree on the (timestamped) run directory: rank 0's.
        self.run_dir = Path(broadcast_text(str(run_dir or cfg.out_dir or default_run_dir(cfg.name)), ctx))
        self.last_dir = self.run_dir / "checkpoints" / "last"
        self.best_dir = self.run_dir / "checkpoints" / "best"

        # Data: memory-mapped token files; vocabulary size from meta.json.
        data_dir = Path(cfg.data.dir)
        self.train_data, self.val_data = load_split(data_dir, "train"), load_split(data_dir, "val")
        vocab = int(ckpt.read_json(data_dir / "meta.json", "dataset metadata")["vocab_size"])
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise FromzeroError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary ({vocab})")
        self.tokenizer_file: Path | None = data_dir / ckpt.TOKENIZER_FILE
        if not self.tokenizer_file.is_file():
            self.tokenizer_file = None
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            if len(data) <= cfg.model.block_size:
                raise FromzeroError(f"model.block_size {cfg.model.block_size} is longer than the {split} data "
                                    f"({len(data)} tokens); use a smaller block_size or more data")

        # Model. Seeding first makes initialisation reproducible. Full weights to resume from go
        # into the unsharded model (a checkpoint of any world size resumes); shards load later.
        torch.manual_seed(t.seed)
        self.model = GPT(cfg.model).to(device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.resume_step: int | None = None
        if resume:
            self._check_resumable()
            if not (self.last_dir / SHARDED_DIR).is_dir():
                ckpt.load_weights(self.model, self.last_dir / ckpt.MODEL_FILE)
        elif ctx.is_main:
            prepare_run_dir(self.run_dir, force)
        self.fsdp = cfg.dist.strategy == "fsdp"
        self.sharded_checkpoints = self.fsdp and cfg.dist.checkpoint == "sharded"
        if self.fsdp:
            shard_model(self.model, device, ctx, self.dtype)
        self.best_val_loss, self.last_val_loss = math.inf, math.nan
        cfg.out_dir = str(self.run_dir)  # the resolved config; a resume records its overrides
        if ctx.is_main:
            save_yaml({"task": "pretrain", **to_dict(cfg)}, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, self.resume_step) if ctx.is_main else NullLogger()
        barrier(ctx)

    def _check_resumable(self) -> None:
        ckpt.recover_directory(self.last_dir)
        if not self.last_dir.is_dir():
            raise FromzeroError(f"nothing to resume: {self.last_dir} does not exist")
        if (self.last_dir / SHARDED_DIR).is_dir():
            check_sharded(self.last_dir / SHARDED_DIR)
        self.resume_step = int(ckpt.read_json(self.last_dir / ckpt.INFO_FILE, "checkpoint info").get("step", 0))
        if self.resume_step >= self.cfg.train.max_steps:
            raise FromzeroError(f"{self.run_dir} already finished at step {self.resume_step}; pass a larger "
                                "--train.max_steps to train longer")

    # --- what the loop asks of the task ---------------------------------------------------

    def loss(self, net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        x, y = batch
        if self.device.type == "cuda":  # pinned host memory: the copy overlaps the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        non_blocking = self.device.type == "cuda"
        _, loss = net(x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking))
        return loss, x.size(0), x.numel()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean validation loss over eval_batches global batches (the same batches at every
        evaluation); every rank scores its rows of each."""
        from fromzero.data.text import sample_batch
        from fromzero.devices import autocast_context

        t = self.cfg.train
        model.eval()
        generator = torch.Generator().manual_seed(t.seed + 1)
        losses = torch.zeros(t.eval_batches, device=self.device)
        for i in range(t.eval_batches):
            x, y = sample_batch(self.val_data, t.batch_size * self.ctx.world_size, self.cfg.model.block_size, generator)
            x, y = rank_rows(x, self.ctx, 1), rank_rows(y, self.ctx, 1)
            with autocast_context(self.device, self.dtype):
                _, loss = model(x.to(self.device), y.to(self.device))
            losses[i] = loss.float()
        val_loss = float(mean_across_ranks(losses.mean(), self.ctx))
        self.last_val_loss = val_loss
        return {"loss": val_loss, "ppl": math.exp(min(val_loss, 50.0))}

    def save_best(self, info: dict[str, Any]) -> None:
        self.best_val_loss = float(info["val"]["loss"])
        self._save(self.best_dir, None, {"step": info["best_step"], "val_loss": self.best_val_loss})

    def save_last(self, trainer: Trainer, p: Progress) -> None:
        """checkpoints/last: a loadable checkpoint (so ``generate`` can use any run's latest
        weights) plus trainer_state.pt with the optimizer and the loop's state."""
        state = trainer.loop_state(p)
        if self.sharded_checkpoints:  # the optimizer state is in the sharded files
            state.update(optimizer={}, optimizer_format="sharded" if trainer.optimizer.state else "none")
        elif self.fsdp:
            state.update(optimizer=full_optimizer_state(self.model, trainer.optimizer), optimizer_format="fqn")
        else:
            state.update(optimizer=trainer.optimizer.state_dict(), optimizer_format="torch")
        state.update(best_val_loss=self.best_val_loss, fromzero_version=__version__)
        val = self.last_val_loss if p.evaluated_at == p.step else None
        self._save(self.last_dir, state, {"step": p.step, "val_loss": val}, trainer.optimizer)

    def load_last(self, trainer: Trainer) -> Progress:
        state = ckpt.load_trainer_state(self.last_dir)
        fmt = state.get("optimizer_format")
        try:
            if (self.last_dir / SHARDED_DIR).is_dir():
                load_sharded(self.model, trainer.optimizer if fmt == "sharded" else None, self.last_dir / SHARDED_DIR)
            if fmt == "fqn":  # written by an FSDP run: keyed by parameter name
                load_full_optimizer_state(self.model, trainer.optimizer, state["optimizer"])
            elif fmt == "torch":
                trainer.optimizer.load_state_dict(state["optimizer"])
            # "sharded" was loaded above; "none": saved before the first step (a fresh optimizer is the same)
        except (KeyError, ValueError, RuntimeError) as e:
            raise FromzeroError(f"trainer state in {self.last_dir} does not fit this run: {first_line(e)}") from None
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        if "epoch" not in state:  # written before pretraining ran in the shared loop
            state = _previous_format_state(state, trainer)
        return trainer.restore_loop_state(state, self.last_dir)

    # --- checkpoint files -------------------------------------------------------------------

    def _save(self, directory: Path, trainer_state: dict | None, info: dict, optimizer: Any = None) -> None:
        """Rank 0 writes the checkpoint; under FSDP every rank first helps gather the full
        (unsharded) weights and optimizer state, so any world size can resume from it."""
        info = {**info, "fromzero_version": __version__}
        if self.sharded_checkpoints:
            self._save_sharded(directory, trainer_state, info, optimizer)
            return
        state = full_model_state(self.model, self.cfg.model.tie_embeddings) if self.fsdp else None
        if self.ctx.is_main:
            ckpt.save_checkpoint(directory, self.model, self.cfg.model.to_dict(), tokenizer_file=self.tokenizer_file,
                                 info=info, trainer_state=trainer_state, state=state)

    def _save_sharded(self, directory: Path, trainer_state: dict | None, info: dict, optimizer: Any) -> None:
        """Every rank writes its shards into one temp directory (on a filesystem all ranks
        share) that rank 0 completes with config, tokenizer and trainer state, then renames
        into place: a crash on any rank leaves the previous checkpoint as it was."""
        tmp = ""
        if self.ctx.is_main:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = str(temp_dir_beside(directory, f".tmp-{directory.name}-"))
        tmp_dir = Path(broadcast_text(tmp, self.ctx))
        with_optimizer = optimizer if trainer_state is not None and optimizer is not None and optimizer.state else None
        try:
            save_sharded(self.model, with_optimizer, tmp_dir / SHARDED_DIR)
            if self.ctx.is_main:
                ckpt.write_checkpoint_files(tmp_dir, self.cfg.model.to_dict(), self.tokenizer_file, info)
                if trainer_state is not None:
                    torch.save(trainer_state, tmp_dir / ckpt.TRAINER_STATE_FILE)
                ckpt.commit_directory(tmp_dir, directory)
        except Exception as e:
            if self.ctx.is_main:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise FromzeroError(f"cannot write sharded checkpoint {directory}: {first_line(e)}") from None
        barrier(self.ctx)

    # --- the run ----------------------------------------------------------------------------

    def make_trainer(self, progress: bool) -> Trainer:
        """The loop, set up for this run (compiled forward, FSDP, checkpoints, step-0 eval)."""
        from fromzero.devices import compile_model

        t = self.cfg.train
        forward = compile_model(self.model, t.compile_mode, self.device) if t.compile else self.model
        self.trainer = Trainer(self.model, t, self.device, self.dtype, self.loss, self.evaluate, "val_loss",
                               higher_is_better=False, logger=self.logger, forward=forward, ctx=self.ctx,
                               last_dir=self.last_dir, resume=self.resume_step is not None, save_best=self.save_best,
                               store=self, fsdp=self.fsdp, eval_at_start=True, restore_best=False,
                               command="pretrain", progress=progress)
        return self.trainer

    def stream(self) -> TokenWindows:
        return TokenWindows(self.train_data, self.cfg, self.ctx.world_size)

    def fit(self, progress: bool = True) -> PretrainResult:
        t = self.cfg.train
        trainer = self.make_trainer(progress)
        if self.ctx.is_main:
            tokens = t.batch_size * t.grad_accum * self.ctx.world_size * self.cfg.model.block_size
            print(f"run {self.run_dir} | {self.cfg.model.n_layer} layers, {self.model.num_params() / 1e6:.2f}M params"
                  f" | device {self.device}, {self.dtype}{', compiled' if t.compile else ''} | {tokens} tokens/step"
                  + (f" | resuming at step {self.resume_step}" if self.resume_step is not None else ""),
                  file=sys.stderr)
        micro_batches = t.max_steps * t.grad_accum * self.ctx.world_size  # the stream is endless: max_steps sets the length
        try:
            fit = trainer.fit(self.stream(), micro_batches)
        finally:
            self.logger.close()
        if self.ctx.is_main:  # not after a failure: a lost rank must be reported at once
            write_plots(self.logger.rows, self.run_dir / "plots")
        barrier(self.ctx)
        return PretrainResult(self.run_dir, fit.steps, self.best_val_loss, self.last_val_loss, fit.interrupted)


def _previous_format_state(state: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
    """The loop state of a checkpoints/last written by the previous pretraining loop (step,
    best_val_loss, batch_generator, torch_rng): same position, same data stream, same RNG."""
    step = int(state["step"])
    best = float(state.get("best_val_loss", math.inf))
    with warnings.catch_warnings():  # the schedule at `step`, without replaying it
        warnings.simplefilter("ignore")
        trainer.scheduler.last_epoch = step - 1
        trainer.scheduler.step()
    return {"step": step, "epoch": 1, "micro": 0, "samples": 0,
            "best_value": best if math.isfinite(best) else None, "best_metrics": {"loss": best},
            "best_step": 0, "best_epoch": 1, "stale": 0, "evaluated_at": -1, "epochs_run": 0, "elapsed_s": 0.0,
            "epoch_rng": None, "epoch_data": state["batch_generator"], "scheduler": trainer.scheduler.state_dict(),
            "scaler": state.get("scaler"), "rng": {"torch": state["torch_rng"]}}


def pretrain(cfg: PretrainConfig, run_dir: Path | None = None, resume: bool = False, force: bool = False,
             progress: bool = True) -> PretrainResult:
    """Run (or resume) the pretraining described by ``cfg``; returns where and how it ended."""

    def body(cfg: PretrainConfig, ctx: DistContext, device: torch.device, t_start: float, resume: bool) -> PretrainResult:
        return PretrainRun(cfg, ctx, device, run_dir, resume, force).fit(progress)

    return run_task(body, cfg, resume)


def load_resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """The config an existing run continues with (``pretrain --resume RUN_DIR``): its resolved
    config.yaml with ``--section.key VALUE`` overrides applied on top, validated."""
    from fromzero.config import deep_merge, from_dict, load_yaml, parse_overrides, pretraining_recipe

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FromzeroError(f"{run_dir} is not a run directory (no config.yaml)")
    data = deep_merge(pretraining_recipe(load_yaml(path), path), parse_overrides(list(overrides or []), PretrainConfig))
    cfg = from_dict(PretrainConfig, data)
    cfg.validate()
    return cfg
