"""Instruction tuning (SFT) of a decoder: loss only on response tokens; full, frozen or LoRA.

Data: ``shakespeare-dialogue`` (built in) or JSONL ``{"prompt","response"}`` / ``{"messages"}``
(see :mod:`fromzero.data.sft`), rendered with a plain chat template. Model: ``init_from`` any
fromzero-gpt checkpoint, e.g. the best checkpoint of a pretraining run
(``runs/<run>/checkpoints/best``) or a converted GPT-2. Try it::

    fromzero pretrain --config recipes/shakespeare-char.yaml --out_dir runs/char
    fromzero finetune --config recipes/sft-shakespeare.yaml --init_from runs/char/checkpoints/best

Validation loss (and perplexity) on the response tokens picks the best weights; the test
split is scored once at the end. ``packing`` concatenates examples into full rows of
``max_length`` tokens (no padding, faster; examples may attend to earlier ones in the row).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fromzero.compression.distill import DistillOptions
from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig


@dataclass
class SFTConfig(FinetuneConfig, DistillOptions):
    """Instruction tuning of a decoder LM on prompt/response pairs or chats."""

    init_from: str = ""
    """fromzero-gpt checkpoint to start from (a pretraining run: runs/<run>/checkpoints/best)."""
    data: str = "shakespeare-dialogue"
    """shakespeare-dialogue | a .jsonl file | a directory with train.jsonl (+ val.jsonl, test.jsonl)."""
    val_fraction: float = 0.1
    """Share of the examples carved out for validation when the data has no val split."""
    test_fraction: float = 0.1
    """Share of the examples carved out for test when the data has no test split."""
    max_length: int = 0
    """Tokens per example (longer ones are truncated and counted); 0 = the model's block_size."""
    packing: bool = False
    """Concatenate examples into full rows of max_length tokens instead of padding each."""
    user_prefix: str = "USER:\n"
    """Chat template: text before each user message."""
    assistant_prefix: str = "ASSISTANT:\n"
    """Chat template: text before each assistant message (the model writes what follows)."""
    system_prefix: str = ""
    """Chat template: text before a system message."""
    turn_end: str = "\n\n"
    """Chat template: text after every message (and, for char models, the stop sequence)."""
    eval_batch_size: int = 32
    """Examples per batch when evaluating."""
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""

    def validate(self) -> None:
        self.validate_common()
        self.validate_distill()
        if not self.init_from and not self.teacher:
            raise FromzeroError("init_from is required: a fromzero-gpt checkpoint directory to fine-tune")
        if self.max_length < 0 or self.eval_batch_size <= 0:
            raise FromzeroError("max_length must be >= 0 and eval_batch_size positive")


@torch.no_grad()
def response_loss(model: nn.Module, loader: Any, device: torch.device, autocast: Any) -> dict[str, float]:
    """Mean cross-entropy over the response tokens of every batch, and its perplexity."""
    from fromzero.evaluation.metrics import language_model_metrics

    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        n = int((y != -100).sum())
        if n == 0:
            continue
        with autocast():
            _, loss = model(x, y)
        total += float(loss) * n
        count += n
    if count == 0:
        raise FromzeroError("the evaluation split has no response tokens")
    return language_model_metrics(total / count)


def finetune_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train on response tokens, keep the best val loss, score test, write the run directory
    (under torchrun with dist_strategy ddp: every rank trains, rank 0 writes)."""
    from fromzero.finetune.engine import start_distributed
    from fromzero.training.distributed import shutdown

    t_start = time.perf_counter()
    cfg.validate()
    ctx, device = start_distributed(cfg)
    try:
        return _finetune_sft(cfg, ctx, device, t_start)
    finally:
        shutdown(ctx)


def _finetune_sft(cfg: SFTConfig, ctx: Any, device: torch.device, t_start: float) -> dict[str, Any]:
    import yaml
    from torch.utils.data import DataLoader

    from fromzero.data.sft import ChatTemplate, collate_sft, load_sft_examples, pack_sft, tokenize_sft
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.evaluation.metrics import write_metrics_json
    from fromzero.compression.distill import build_student, count_params, distillation_loss, load_teacher
    from fromzero.finetune.engine import Finetuner, on_main_rank
    from fromzero.finetune.lora import apply_lora, base_model, load_base, save_adapter
    from fromzero.finetune.methods import count_parameters, freeze
    from fromzero.models import build_model
    from fromzero.training.callbacks import MetricsLogger, NullLogger, write_plots
    from fromzero.training.distributed import barrier, broadcast_text
    from fromzero.training.checkpoint import CONFIG_FILE, TOKENIZER_FILE, atomic_write_text, read_json, save_checkpoint
    from fromzero.training.trainer import autocast_context, compile_model, default_finetune_dir, prepare_run_dir, resolve_dtype

    dtype = resolve_dtype(device, cfg.dtype)
    autocast_context(device, dtype)

    init_dir = Path(cfg.teacher or cfg.init_from).expanduser()  # distillation: the teacher's tokenizer
    config = read_json(init_dir / CONFIG_FILE, "model config")
    if config.get("model_type") != "fromzero-gpt":
        raise FromzeroError(f"SFT needs a decoder (fromzero-gpt) checkpoint, {init_dir} holds {config.get('model_type')!r}")
    if not (init_dir / TOKENIZER_FILE).is_file():
        raise FromzeroError(f"{init_dir} has no {TOKENIZER_FILE}: cannot turn text into token ids")
    tokenizer = TextTokenizer.load(init_dir / TOKENIZER_FILE)
    block_size = int(config.get("block_size", 0))
    max_length = cfg.max_length or block_size
    if max_length > block_size:
        raise FromzeroError(f"max_length {max_length} is more than the model's block_size {block_size}")
    template = ChatTemplate(system_prefix=cfg.system_prefix, user_prefix=cfg.user_prefix,
                            assistant_prefix=cfg.assistant_prefix, turn_end=cfg.turn_end)
    splits = load_sft_examples(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    sets = {}
    for split, examples in splits.items():
        sets[split] = tokenize_sft(examples, tokenizer, template, max_length)
        if sets[split].n_truncated or sets[split].n_dropped:
            print(f"note: {split}: {sets[split].n_truncated} of {len(examples)} examples longer than {max_length} "
                  f"tokens were truncated; {sets[split].n_dropped} left without a response token were dropped")
        if len(sets[split]) == 0:
            raise FromzeroError(f"the {split} split has no usable example (all dropped)")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    train_set = pack_sft(sets["train"], max_length, pad_id) if cfg.packing else sets["train"]

    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.teacher:  # distillation: the student starts from the teacher's layers
        teacher, config, _ = load_teacher(init_dir, device)
        model, config, described = build_student(cfg, config, teacher)
        print(f"distillation from {cfg.teacher} (T {cfg.temperature}, alpha {cfg.alpha}): {described}")
    else:
        model = build_model(config)
        load_base(model, init_dir)
    trained_modules = None
    if cfg.method == "frozen":
        trained_modules = freeze(model, cfg.unfreeze_top)
    elif cfg.method == "lora":
        model = apply_lora(model, config, cfg, modules_to_save=[])
    trainable, total = count_parameters(model)
    model.to(device)

    # Every rank agrees on rank 0's (timestamped) run directory; rank 0 alone writes it.
    run_dir = Path(broadcast_text(str(Path(cfg.out_dir) if cfg.out_dir else default_finetune_dir("sft")), ctx))

    def start_run() -> None:
        prepare_run_dir(run_dir, cfg.force, resumable=False)
        atomic_write_text(run_dir / "config.yaml",
                          yaml.safe_dump(dict(asdict(cfg), out_dir=str(run_dir), task="sft"), sort_keys=False))

    on_main_rank(ctx, start_run)

    collate = lambda batch: collate_sft(batch, pad_id)  # noqa: E731
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                              collate_fn=collate, num_workers=cfg.num_workers)
    eval_loaders = {s: DataLoader(sets[s], batch_size=cfg.eval_batch_size, collate_fn=collate) for s in ("val", "test")}
    forward = compile_model(model, "default", device) if cfg.compile else model

    def autocast() -> Any:
        return autocast_context(device, dtype)

    def loss_fn(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits, loss = net(x, y)
        if teacher is not None:  # match the teacher's next-token distribution on response tokens
            with torch.no_grad():
                teacher_logits, _ = teacher(x, y)
            loss = distillation_loss(logits, teacher_logits, loss, cfg.temperature, cfg.alpha, mask=y != -100)
        return loss, x.size(0), int((y != -100).sum())

    def evaluate(_: nn.Module) -> dict[str, Any]:
        return response_loss(forward, eval_loaders["val"], device, autocast)

    print(f"sft: train/val/test {len(sets['train'])}/{len(sets['val'])}/{len(sets['test'])} examples "
          f"({sets['train'].n_target_tokens:,} response tokens in train); method {cfg.method}: trains "
          f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%); device {device}, {dtype}")
    before = response_loss(forward, eval_loaders["test"], device, autocast)  # the base model's, for comparison
    logger = MetricsLogger(run_dir) if ctx.is_main else NullLogger()
    try:
        finetuner = Finetuner(model, cfg, device, dtype, loss_fn, evaluate, "val_loss", higher_is_better=False,
                              logger=logger, trained_modules=trained_modules, forward=forward, ctx=ctx)
        fit = finetuner.fit(lambda epoch: train_loader, len(train_loader))
        test = response_loss(forward, eval_loaders["test"], device, autocast)
        logger.log({"step": fit.steps, "test_loss": test["loss"], "test_perplexity": test["perplexity"]})
    finally:
        logger.close()
    if not ctx.is_main:  # rank 0 writes the checkpoint and the report
        barrier(ctx)
        return {"run_dir": str(run_dir), "rank": ctx.rank}

    info = {"task": "sft", "best_step": fit.best_step, "val": fit.best_metrics, "test": test, "test_before": before,
            "method": cfg.method,
            **({"distilled_from": str(init_dir.resolve()), "temperature": cfg.temperature, "alpha": cfg.alpha,
                "teacher_params": count_params(teacher), "student_params": total} if teacher is not None else {}),
            "template": {"system_prefix": cfg.system_prefix, "user_prefix": cfg.user_prefix,
                         "assistant_prefix": cfg.assistant_prefix, "turn_end": cfg.turn_end}}
    best_dir = run_dir / "checkpoints" / "best"
    if cfg.method == "lora":
        save_adapter(best_dir, model, config, init_dir, init_dir / TOKENIZER_FILE, info)
    else:
        save_checkpoint(best_dir, base_model(model), config, tokenizer_file=init_dir / TOKENIZER_FILE, info=info)
    write_metrics_json({**test, "split": "test", "best_step": fit.best_step,
                        **{f"val_{k}": v for k, v in fit.best_metrics.items()}}, run_dir / "metrics.json")
    write_plots(logger.rows, run_dir / "plots")
    print(f"test: response loss {test['loss']:.4f}, perplexity {test['perplexity']:.2f} "
          f"(before fine-tuning: {before['loss']:.4f}, {before['perplexity']:.2f}) "
          f"(best step {fit.best_step}); checkpoint: {best_dir}")
    barrier(ctx)
    return {"run_dir": str(run_dir), "checkpoint": str(best_dir), "best_step": fit.best_step, "steps": fit.steps,
            "val": fit.best_metrics, "test": test, "stopped_early": fit.stopped_early,
            "trainable_params": trainable, "total_params": total, "train_s": fit.train_s,
            "samples_per_sec": fit.samples_per_sec, "wall_s": time.perf_counter() - t_start,
            "test_before": before}
