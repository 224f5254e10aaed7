"""The pretraining loop: one place, easy to find.

    data (memmap) -> batches -> model -> loss -> backward -> clip -> optimizer step
                  -> metrics rows / progress bar -> eval + checkpoints every eval_every

Run it through the CLI (``fromzero pretrain --config recipes/shakespeare-char.yaml``) or
from Python with :func:`pretrain`. A run stopped at any point resumes with
``--resume RUN_DIR`` and produces bit-for-bit the weights of an uninterrupted run on CPU: the
trainer state saves the optimizer, the step, the batch sampler's generator and the global RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import torch

from fromzero.files import temp_dir_beside
from fromzero import __version__
from fromzero.config import PretrainConfig, save_yaml, to_dict
from fromzero.errors import FromzeroError, first_line
from fromzero.models.gpt import GPT
import fromzero.checkpoint as ckpt
from fromzero.training.callbacks import (MetricsLogger, NullLogger, TrainingProgress, announce_evaluation, now,
                                        write_plots)
from fromzero.training.distributed import (SHARDED_DIR, barrier, broadcast_text, check_sharded, full_model_state,
                                           full_optimizer_state, init_distributed, is_collective_failure,
                                           load_full_optimizer_state, load_sharded, lost_rank_error,
                                           mean_across_ranks, rank_rows, save_sharded, shard_model, shutdown)
from fromzero.devices import (autocast_context, compile_model, configure_backends,
                              is_compile_failure, resolve_device, resolve_dtype)
from fromzero.training.optim import build_optimizer, lr_at

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.json", "tb", "checkpoints", "plots")


# ---------------------------------------------------------------------------------------------
# Run directory


def default_run_dir(cfg: PretrainConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def default_finetune_dir(task: str) -> Path:
    """runs/<task>-<timestamp>/ for a fine-tune without out_dir."""
    return Path("runs") / f"{task}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


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


# ---------------------------------------------------------------------------------------------
# Stopping cleanly on Ctrl-C / SIGTERM


class StopRequest:
    """First SIGINT/SIGTERM asks the loop to stop after the current step and save a
    checkpoint; a second SIGINT interrupts at once."""

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
# The trainer


@dataclasses.dataclass
class PretrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    last_val_loss: float
    stopped_early: bool


class Pretrainer:
    """Owns the model, optimizer, data and run directory of one pretraining run."""

    def __init__(
        self,
        cfg: PretrainConfig,
        run_dir: Path | None = None,
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
    ) -> None:
        from fromzero.data.text import load_split

        self.cfg = cfg
        t = cfg.train
        self.ctx, self.device = init_distributed(cfg.dist.strategy, resolve_device(t.device))
        configure_backends(self.device)
        self.dtype = resolve_dtype(self.device, t.dtype)
        self.autocast = autocast_context(self.device, self.dtype)
        # Every rank must agree on the (timestamped) run directory: rank 0's.
        self.run_dir = Path(broadcast_text(str(run_dir or cfg.out_dir or default_run_dir(cfg)), self.ctx))
        self.progress_enabled = progress
        self.resumed = resume

        # Data: memory-mapped token files; vocabulary size from meta.json.
        data_dir = Path(cfg.data.dir)
        self.train_data = load_split(data_dir, "train")
        self.val_data = load_split(data_dir, "val")
        meta = ckpt.read_json(data_dir / "meta.json", "dataset metadata")
        vocab = int(meta["vocab_size"])
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise FromzeroError(
                f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary ({vocab})"
            )
        self.tokenizer_file = data_dir / ckpt.TOKENIZER_FILE
        if not self.tokenizer_file.is_file():
            self.tokenizer_file = None
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            if len(data) <= cfg.model.block_size:
                raise FromzeroError(
                    f"model.block_size {cfg.model.block_size} is longer than the {split} data "
                    f"({len(data)} tokens); use a smaller block_size or more data"
                )

        # Model and optimizer. Seeding first makes initialisation reproducible.
        torch.manual_seed(t.seed)
        self.model = GPT(cfg.model).to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        resume_sharded = False
        if resume:
            ckpt.recover_directory(self.last_dir)
            if not self.last_dir.is_dir():
                raise FromzeroError(f"nothing to resume: {self.last_dir} does not exist")
            resume_sharded = (self.last_dir / SHARDED_DIR).is_dir()
            if resume_sharded:
                check_sharded(self.last_dir / SHARDED_DIR)  # loaded below, once the model is sharded
            else:  # full weights into the unsharded model: a checkpoint of any world size resumes
                ckpt.load_weights(self.model, self.last_dir / ckpt.MODEL_FILE)
        self.fsdp = cfg.dist.strategy == "fsdp"
        self.sharded_checkpoints = self.fsdp and cfg.dist.checkpoint == "sharded"
        if self.fsdp:
            shard_model(self.model, self.device, self.ctx, self.dtype)
        self.optimizer = build_optimizer(self.model, t, self.device, fused=not self.fsdp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == "float16")
        # DDP averages gradients across ranks during backward; self.model stays the plain module
        # (checkpoints, evaluation), self.forward is what the training step calls. FSDP2 shards
        # the model in place (self.model is the sharded module).
        self.ddp = None
        if self.ctx.world_size > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        net = self.ddp or self.model
        self.forward = compile_model(net, t.compile_mode, self.device) if t.compile else net
        self.batch_generator = torch.Generator().manual_seed(t.seed)
        self.step = 0
        self.best_val_loss = math.inf
        self.last_val_loss = math.nan

        if resume:
            self._load_resume_state(resume_sharded)
            if self.step >= t.max_steps:
                raise FromzeroError(
                    f"{self.run_dir} already finished at step {self.step}; pass a larger "
                    "--train.max_steps to train longer"
                )
        elif self.ctx.is_main:
            prepare_run_dir(self.run_dir, force)
        # The resolved config, with the run directory filled in; a resume records its overrides.
        cfg.out_dir = str(self.run_dir)
        if self.ctx.is_main:  # only rank 0 writes the run directory
            save_yaml(to_dict(cfg), self.run_dir / "config.yaml")
            self.logger: Any = MetricsLogger(self.run_dir, resume_step=self.step if resume else None)
        else:
            self.logger = NullLogger()
        barrier(self.ctx)

    # --- state -----------------------------------------------------------------------------

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def trainer_state(self) -> dict[str, Any]:
        if self.sharded_checkpoints:  # the optimizer state is in the sharded files
            optimizer, optimizer_format = {}, ("sharded" if self.optimizer.state else "none")
        elif self.fsdp:
            optimizer, optimizer_format = full_optimizer_state(self.model, self.optimizer), "fqn"
        else:
            optimizer, optimizer_format = self.optimizer.state_dict(), "torch"
        state = {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "optimizer": optimizer,
            "optimizer_format": optimizer_format,
            "scaler": self.scaler.state_dict(),
            "batch_generator": self.batch_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "fromzero_version": __version__,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _load_resume_state(self, sharded: bool) -> None:
        """Optimizer, RNG and step of checkpoints/last (full weights were loaded before sharding;
        sharded ones are loaded here, into the model as this run lays it out)."""
        state = ckpt.load_trainer_state(self.last_dir)
        if sharded:
            with_optimizer = state.get("optimizer_format") == "sharded"
            load_sharded(self.model, self.optimizer if with_optimizer else None, self.last_dir / SHARDED_DIR)
        try:
            if state.get("optimizer_format") == "fqn":  # written by an FSDP run: keyed by parameter name
                load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
            elif state.get("optimizer_format") in ("sharded", "none"):
                pass  # loaded above, or saved before the first step (a fresh optimizer is the same)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.batch_generator.set_state(state["batch_generator"])
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.step = int(state["step"])
            self.best_val_loss = float(state["best_val_loss"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise FromzeroError(f"trainer state in {self.last_dir} does not fit this run: {e}") from None

    def save(self, directory: Path, with_trainer_state: bool, val_loss: float | None) -> None:
        """Rank 0 writes the checkpoint; under FSDP every rank first helps gather the full
        (unsharded) weights and optimizer state, so any world size can resume from it."""
        info = {"step": self.step, "val_loss": val_loss, "fromzero_version": __version__}
        if self.sharded_checkpoints:
            self._save_sharded(directory, with_trainer_state, info)
            return
        state = full_model_state(self.model, self.cfg.model.tie_embeddings) if self.fsdp else None
        trainer_state = self.trainer_state() if with_trainer_state else None
        if not self.ctx.is_main:
            return
        ckpt.save_checkpoint(
            directory,
            self.model,
            self.cfg.model.to_dict(),
            tokenizer_file=self.tokenizer_file,
            info=info,
            trainer_state=trainer_state,
            state=state,
        )

    def _save_sharded(self, directory: Path, with_trainer_state: bool, info: dict) -> None:
        """Every rank writes its shards into one temp directory (on a filesystem all ranks
        share) that rank 0 completes with config, tokenizer and trainer state, then renames
        into place: a crash on any rank leaves the previous checkpoint as it was."""
        tmp = ""
        if self.ctx.is_main:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = str(temp_dir_beside(directory, f".tmp-{directory.name}-"))
        tmp_dir = Path(broadcast_text(tmp, self.ctx))
        trainer_state = self.trainer_state() if with_trainer_state else None
        optimizer = self.optimizer if with_trainer_state and self.optimizer.state else None
        try:
            save_sharded(self.model, optimizer, tmp_dir / SHARDED_DIR)
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

    # --- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over eval_batches global batches (the same batches at every eval)."""
        from fromzero.data.text import sample_batch

        t = self.cfg.train
        self.model.eval()
        generator = torch.Generator().manual_seed(t.seed + 1)
        losses = torch.zeros(t.eval_batches, device=self.device)
        for i in range(t.eval_batches):
            # As in training: every rank draws the global batch and scores its own rows.
            x, y = sample_batch(self.val_data, t.batch_size * self.ctx.world_size, self.cfg.model.block_size,
                                generator)
            x, y = rank_rows(x, self.ctx, 1), rank_rows(y, self.ctx, 1)
            with self.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            losses[i] = loss.float()
        self.model.train()
        return float(mean_across_ranks(losses.mean(), self.ctx))

    # --- training --------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One (x, y) per optimizer step holding all grad_accum micro-batches.

        Drawing the whole step at once means k micro-batches of b are the same samples as one
        batch of k*b: gradient accumulation changes memory use, not the data.
        """
        from fromzero.data.text import sample_batch

        t = self.cfg.train
        non_blocking = self.device.type == "cuda"
        while True:
            # Every rank draws the same global batch and keeps its own rows of each micro-batch.
            x, y = sample_batch(
                self.train_data, t.batch_size * self.ctx.world_size * t.grad_accum,
                self.cfg.model.block_size, self.batch_generator,
            )
            x, y = rank_rows(x, self.ctx, t.grad_accum), rank_rows(y, self.ctx, t.grad_accum)
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad_norm)
        as device tensors (no host sync here)."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for j, (xm, ym) in enumerate(zip(x.chunk(t.grad_accum), y.chunk(t.grad_accum))):
            # DDP: only the last micro-step's backward communicates (the others accumulate locally).
            last = j == t.grad_accum - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)  # reduce-scatter only on the last micro-step
            with sync:
                with self.autocast:
                    _, loss = self.forward(xm, ym)
                loss = loss / t.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        total = mean_across_ranks(total, self.ctx)  # the global batch's loss
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip, foreach=True)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
                grad_norm = grad_norm.full_tensor()
        else:
            grad_norm = torch.zeros((), device=self.device)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def fit(self) -> PretrainResult:
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.block_size
        start_step = self.step
        resumed = self.resumed
        progress = TrainingProgress(t.max_steps, start_step, enabled=self.progress_enabled)
        progress.print(
            f"run {self.run_dir} | {self.cfg.model.n_layer} layers, "
            f"{self.model.num_params() / 1e6:.2f}M params | device {self.device}, {self.dtype}"
            f"{', compiled' if t.compile else ''} | {tokens_per_step} tokens/step"
            + (f" | resuming at step {start_step}" if resumed else "")
        )
        pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # (step, loss, norm, lr)
        window_start, window_steps = now(), 0
        run_start = now()
        elapsed_before = self._elapsed_from_metrics()
        stopped = False
        batches = self.batches()

        def flush_pending() -> None:
            """Sync the losses since the last row: stop on NaN/inf, write a metrics row."""
            nonlocal window_start, window_steps
            if not pending:
                return
            losses = torch.stack([p[1] for p in pending]).float().cpu().tolist()
            for (step, _, _, _), value in zip(pending, losses):
                if not math.isfinite(value):
                    self._fail_nonfinite(step, value)
            elapsed = now() - window_start
            rate = window_steps * tokens_per_step / max(elapsed, 1e-9)
            last_step, _, norm, lr = pending[-1]
            row = {
                "step": last_step,
                "loss": sum(losses) / len(losses),
                "lr": lr,
                "grad_norm": float(norm),
                "tokens_per_sec": rate,
                "elapsed_s": elapsed_before + now() - run_start,
            }
            self.logger.log(row)
            progress.set_metrics(row["loss"], lr, f"{rate / 1000:.1f}k tok/s")
            pending.clear()
            window_start, window_steps = now(), 0

        with progress, StopRequest() as stop:
            while self.step < t.max_steps:
                if self.step % t.eval_every == 0 and not (resumed and self.step == start_step):
                    flush_pending()
                    self._evaluate_and_checkpoint(progress, elapsed_before + now() - run_start)
                    window_start = now()
                if self._stop_everywhere(stop.requested):
                    break
                x, y = next(batches)
                lr = lr_at(self.step, t)
                if self.forward is not self.model and self.step == start_step:
                    loss, norm = self._first_compiled_step(x, y, lr, progress)
                else:
                    loss, norm = self.train_step(x, y, lr)
                self.step += 1
                window_steps += 1
                pending.append((self.step, loss, norm, lr))
                progress.advance(self.step)
                if self.step % t.log_interval == 0:
                    flush_pending()
            flush_pending()
            if self._stop_everywhere(stop.requested) and self.step < t.max_steps:
                stopped = True
                self.save(self.last_dir, with_trainer_state=True, val_loss=None)
                progress.print(
                    f"stopped at step {self.step}; checkpoint saved. Continue with: "
                    f"fromzero pretrain --resume {self.run_dir}"
                )
            else:
                self._evaluate_and_checkpoint(progress, elapsed_before + now() - run_start)
        self.logger.close()
        if self.ctx.is_main:
            write_plots(self.logger.rows, self.run_dir / "plots")
        barrier(self.ctx)
        return PretrainResult(self.run_dir, self.step, self.best_val_loss, self.last_val_loss, stopped)

    def _first_compiled_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, progress: TrainingProgress
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first compiled step compiles (tens of seconds the first time, cached on disk
        afterwards). If compiling fails, say why and continue without compile."""
        progress.print("compiling the model (first step; later runs reuse the cache)...")
        start = now()
        try:
            result = self.train_step(x, y, lr)
        except Exception as e:  # noqa: BLE001 - only compile failures are handled
            if not is_compile_failure(e):
                raise
            reason = first_line(e)[:200]
            progress.print(f"warning: torch.compile failed ({reason}); continuing without compile")
            self.forward = self.model
            self.optimizer.zero_grad(set_to_none=True)
            return self.train_step(x, y, lr)
        progress.print(f"compiled in {now() - start:.1f} s")
        return result

    def _evaluate_and_checkpoint(self, progress: TrainingProgress, elapsed: float) -> None:
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            self._fail_nonfinite(self.step, val_loss, what="validation loss")
        self.last_val_loss = val_loss
        improved = val_loss < self.best_val_loss
        self.logger.log({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                         "elapsed_s": elapsed})
        if improved:
            self.best_val_loss = val_loss
            self.save(self.best_dir, with_trainer_state=False, val_loss=val_loss)
        self.save(self.last_dir, with_trainer_state=True, val_loss=val_loss)
        progress.print(
            f"step {self.step}: val loss {val_loss:.4f}" + (" (best, saved)" if improved else "")
        )
        announce_evaluation(self.step, {"val_loss": val_loss})  # e.g. fromzero tune's pruner; may end the run
        if self.ctx.is_main:
            write_plots(self.logger.rows, self.run_dir / "plots")

    def _stop_everywhere(self, requested: bool) -> bool:
        """A stop asked of any rank stops all of them at the same step (else the others would
        wait in the next gradient all-reduce until the timeout)."""
        if self.ctx.world_size == 1:
            return requested
        flag = torch.tensor(float(requested), device=self.device)
        return bool(mean_across_ranks(flag, self.ctx) > 0)

    def _fail_nonfinite(self, step: int, value: float, what: str = "training loss") -> None:
        info_path = self.last_dir / ckpt.INFO_FILE
        if info_path.is_file():
            good = json.loads(info_path.read_text()).get("step")
            where = f"the last good checkpoint is {self.last_dir} (step {good})"
        else:
            where = "no checkpoint was written"
        self.logger.close()
        raise FromzeroError(
            f"{what} became {value} at step {step}; training stopped, {where}. "
            "Try a lower train.lr, grad_clip, or float32"
        )

    def _elapsed_from_metrics(self) -> float:
        rows = [r for r in self.logger.rows if "elapsed_s" in r]
        return float(rows[-1]["elapsed_s"]) if rows else 0.0


def pretrain(
    cfg: PretrainConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> PretrainResult:
    """Run (or resume) pretraining described by ``cfg``; returns where and how it ended."""
    trainer = Pretrainer(cfg, run_dir=run_dir, resume=resume, force=force, progress=progress)
    try:
        return trainer.fit()
    except Exception as e:
        if trainer.ctx.world_size > 1 and is_collective_failure(e):
            raise lost_rank_error(e, trainer.ctx) from None
        raise
    finally:
        shutdown(trainer.ctx)


def load_run_config(run_dir: Path) -> dict:
    """The resolved config.yaml of an existing run (for --resume)."""
    from fromzero.config import load_yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FromzeroError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_yaml(path)


def load_resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """The config an existing run continues with (``pretrain --resume RUN_DIR``): its resolved
    config.yaml with ``--section.key VALUE`` overrides applied on top, validated."""
    from fromzero.config import deep_merge, from_dict, parse_overrides, validate_pretrain

    data = deep_merge(load_run_config(Path(run_dir)), parse_overrides(list(overrides or []), PretrainConfig))
    cfg = from_dict(PretrainConfig, data)
    validate_pretrain(cfg)
    return cfg


