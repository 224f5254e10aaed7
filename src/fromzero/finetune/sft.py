"""Instruction tuning (SFT) of a decoder: loss only on response tokens; full, frozen, LoRA or QLoRA.

Data: ``shakespeare-dialogue``, ``rotten-tomatoes`` or JSONL ``{"prompt","response"}`` /
``{"messages"}`` (:mod:`fromzero.data.sft`). Model: ``init_from`` a fromzero-gpt checkpoint (a
pretraining run's best, a converted GPT-2 or chat model, a built-in name).

``chat_template: auto`` renders with the starting model's own template when it has one (the text
it was tuned on, so the fine-tune continues it) and copies its template files, with
``tokenizer.json``, into the fine-tuned checkpoint, so ``chat``, ``serve`` and ``evaluate`` use
the same template; otherwise fromzero's simple template (the ``*_prefix`` / ``turn_end``
settings, recorded in info.json). ``method: qlora`` trains LoRA adapters on a 4-bit base
(:mod:`fromzero.finetune.qlora`). ``packing`` concatenates examples into full rows of
``max_length`` tokens (no padding; examples may attend to earlier ones in the row).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from fromzero.checkpoint import CONFIG_FILE, TOKENIZER_FILE, read_json
from fromzero.errors import FromzeroError
from fromzero.evaluation.metrics import write_metrics_json
from fromzero.finetune.distill import (DistillOptions, build_student, distill_info, distillation_loss,
                                       load_teacher)
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.finetune.lora import apply_lora, load_base
from fromzero.finetune.methods import count_parameters, freeze
from fromzero.models import build_model
from fromzero.training.trainer import FitResult, ShuffledEpochs

CHAT_TEMPLATES = ("auto", "simple")
# Files of a model's own chat template, carried from init_from into the fine-tuned checkpoint.
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json")
# How many training examples are checked for segment-vs-whole tokenization (see data/sft.py).
BOUNDARY_CHECK_EXAMPLES = 1000


@dataclass
class SFTConfig(FinetuneConfig, DistillOptions):
    """Instruction tuning of a decoder LM on prompt/response pairs or chats."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data": "data.source", "chat_template": "data.chat_template", "system_prompt": "data.system_prompt",
        "val_fraction": "data.val_fraction", "test_fraction": "data.test_fraction", "max_length":
        "data.max_length", "packing": "data.packing", "user_prefix": "data.user_prefix", "assistant_prefix":
        "data.assistant_prefix", "system_prefix": "data.system_prefix", "turn_end": "data.turn_end",
        "max_eval_examples": "data.max_eval_examples", "qlora_group_size": "method.qlora_group_size"}

    method: str = "full"
    """full (every weight) | frozen (the head, plus unfreeze_top layers) | lora (low-rank adapters) | qlora (LoRA adapters on a 4-bit base, see qlora_group_size)."""
    init_from: str = ""
    """fromzero-gpt checkpoint to start from (a pretraining run: runs/<run>/checkpoints/best), a .gguf file or a built-in name (smollm2-135m-instruct)."""
    data: str = "shakespeare-dialogue"
    """shakespeare-dialogue | rotten-tomatoes | a .jsonl file | a directory with train.jsonl (+ val.jsonl, test.jsonl)."""
    chat_template: str = "auto"
    """auto (the init checkpoint's own Jinja chat template if it has one, else the simple one below) | simple (fromzero's: the *_prefix / turn_end settings)."""
    system_prompt: str = ""
    """System message put before every example that has none ("" = none; a model's own template may then write its default)."""
    qlora_group_size: int = 64
    """method qlora: input features per 4-bit group (one fp16 scale + minimum each)."""
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
    max_eval_examples: int = 0
    """Score only the first N val / test examples at each evaluation (0 = all; for quick trial runs)."""
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""

    def validate(self) -> None:
        if self.method == "qlora":  # SFT alone knows qlora: the shared checks see it as lora
            replace(self, method="lora").validate_common()
            g = self.qlora_group_size
            if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
                raise FromzeroError(f"qlora_group_size must be a positive even number (e.g. 32, 64, 128), got {g!r}")
            if self.teacher:
                raise FromzeroError("method qlora cannot be combined with distillation (teacher)")
        else:
            self.validate_common()
        self.validate_distill()
        if not self.init_from and not self.teacher:
            raise FromzeroError("model.init_from is required (--model.init_from DIR): "
                                "a fromzero-gpt checkpoint directory to fine-tune")
        if self.max_length < 0 or self.eval_batch_size <= 0 or self.max_eval_examples < 0:
            raise FromzeroError("max_length and max_eval_examples must be >= 0 and eval_batch_size positive")
        if self.chat_template not in CHAT_TEMPLATES:
            raise FromzeroError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {self.chat_template!r}")


def choose_template(cfg: SFTConfig, init_dir: Path) -> tuple[Any, Path | None]:
    """(template, directory whose template files the fine-tuned checkpoint carries, or None).

    ``chat_template: auto`` takes the init checkpoint's own Jinja template when it has one;
    otherwise (or with ``simple``) fromzero's :class:`~fromzero.data.sft.ChatTemplate`."""
    from fromzero.data.chat_template import load_jinja_template
    from fromzero.data.sft import ChatTemplate

    if cfg.chat_template == "auto":
        jinja = load_jinja_template(init_dir)
        if jinja is not None:
            return jinja, init_dir
    return ChatTemplate(system_prefix=cfg.system_prefix, user_prefix=cfg.user_prefix,
                        assistant_prefix=cfg.assistant_prefix, turn_end=cfg.turn_end), None


def save_with_template_files(directory: Path, write: Any, template_dir: Path | None) -> None:
    """Write a checkpoint with ``write(dir)`` and, when ``template_dir`` is given, its chat
    template files next to it; the whole directory appears at once (atomic)."""
    import os
    import shutil

    from fromzero.checkpoint import atomic_directory

    if template_dir is None:
        write(directory)
        return
    with atomic_directory(directory) as tmp:
        staged = tmp / "checkpoint"
        write(staged)
        for path in staged.iterdir():
            os.replace(path, tmp / path.name)
        staged.rmdir()
        for name in TEMPLATE_FILES:
            if (template_dir / name).is_file():
                shutil.copyfile(template_dir / name, tmp / name)


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
            _, loss = model(x, y, target_logits_only=True)
        total += float(loss) * n
        count += n
    if count == 0:
        raise FromzeroError("the evaluation split has no response tokens")
    return language_model_metrics(total / count)


def decoder_checkpoint(init_dir: Path, what: str, max_length: int) -> tuple[dict, Any, int]:
    """(config, tokenizer, max_length: 0 = block_size) of the fromzero-gpt checkpoint ``what`` starts from."""
    from fromzero.data.tokenizers import TextTokenizer

    config = read_json(init_dir / CONFIG_FILE, "model config")
    if config.get("model_type") != "fromzero-gpt":
        raise FromzeroError(f"{what} needs a decoder (fromzero-gpt) checkpoint, {init_dir} holds "
                            f"{config.get('model_type')!r}")
    if not (init_dir / TOKENIZER_FILE).is_file():
        raise FromzeroError(f"{init_dir} has no {TOKENIZER_FILE}: cannot turn text into token ids")
    block_size = int(config.get("block_size", 0))
    max_length = max_length or block_size
    if max_length > block_size:
        raise FromzeroError(f"max_length {max_length} is more than the model's block_size {block_size}")
    return config, TextTokenizer.load(init_dir / TOKENIZER_FILE), max_length


class DecoderTask(FinetuneTask):
    """What SFT and DPO share: seeded loaders, scores per split, checkpoints with template files."""

    monitor, higher_is_better = "val_loss", False
    adapter_base: Path | None = None
    """The base checkpoint the saved adapter sits on (None: full weights are saved)."""

    def make_loaders(self, train_set: Any, collate: Any) -> None:
        cfg = self.cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                       generator=self.generator, num_workers=cfg.num_workers)
        self.eval_loaders = {s: DataLoader(self.sets[s], batch_size=cfg.eval_batch_size, collate_fn=collate)
                             for s in ("val", "test")}

    def batches(self) -> tuple[Any, int]:
        return ShuffledEpochs(self.train_loader, self.generator), len(self.train_loader)

    def split_metrics(self, split: str) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        return self.split_metrics("val")

    def test(self) -> dict[str, Any]:
        return self.split_metrics("test")

    def save_best(self, info: dict[str, Any]) -> None:
        """checkpoints/best from the model as it is now (full weights or the adapter, + template files)."""
        info, tokenizer_file = {**self.base_info, **info}, self.init_dir / TOKENIZER_FILE
        write = lambda d: self.save_model(d, info, self.adapter_base, tokenizer_file)  # noqa: E731
        save_with_template_files(self.best_dir, write, self.template_dir)

    def final_files(self, fit: FitResult, test: dict[str, Any], **metrics: Any) -> None:
        """The final checkpoints/best and metrics.json (test, the best val and ``metrics``)."""
        self.save_best({"best_step": fit.best_step, "val": fit.best_metrics, "test": test})
        write_metrics_json({**test, "split": "test", "best_step": fit.best_step,
                            **{f"val_{k}": v for k, v in fit.best_metrics.items()}, **metrics},
                           self.run_dir / "metrics.json")


def finetune_sft(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """Run an SFTTask (train, keep the best val weights, test once); returns its summary."""
    return run_finetune_task(SFTTask, cfg, resume)


class SFTTask(DecoderTask):
    """One SFT fine-tune (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "sft"
    weight_by = "tokens"  # the loss is a mean over reply tokens

    def __init__(self, cfg: SFTConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        from fromzero.data.sft import add_system_prompt, load_sft_examples, pack_sft, segment_mismatches, tokenize_sft
        from fromzero.models.builtin import resolve_model

        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        self.init_dir = init_dir = resolve_model(cfg.teacher or cfg.init_from)  # distillation: the teacher's tokenizer
        config, tokenizer, max_length = decoder_checkpoint(init_dir, "SFT", cfg.max_length)
        template, self.template_dir = choose_template(cfg, init_dir)
        splits = load_sft_examples(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        splits = {split: add_system_prompt(examples, cfg.system_prompt) for split, examples in splits.items()}
        if cfg.max_eval_examples:
            splits.update({s: splits[s][: cfg.max_eval_examples] for s in ("val", "test")})
        if self.template_dir is not None:  # the model's own template: do pieces tokenize as the whole text?
            checked = splits["train"][:BOUNDARY_CHECK_EXAMPLES]
            bad = segment_mismatches(checked, tokenizer, template)
            if bad:
                print(f"note: for {len(bad)} of {len(checked)} training examples the reply-by-reply tokenization "
                      f"differs from the tokenization of the whole chat (a token merges across a template "
                      f"boundary): training sees slightly different ids than inference would")
        self.sets = sets = {}
        for split, examples in splits.items():
            sets[split] = tokenize_sft(examples, tokenizer, template, max_length)
            if sets[split].n_truncated or sets[split].n_dropped:
                print(f"note: {split}: {sets[split].n_truncated} of {len(examples)} examples longer than "
                      f"{max_length} tokens were truncated; {sets[split].n_dropped} left without a response token "
                      f"were dropped")
            if len(sets[split]) == 0:
                raise FromzeroError(f"the {split} split has no usable example (all dropped)")
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.train_set = pack_sft(sets["train"], max_length, self.pad_id) if cfg.packing else sets["train"]

        torch.manual_seed(cfg.seed)
        self.teacher = None
        if cfg.teacher:  # distillation: the student starts from the teacher's layers
            self.teacher, config, _ = load_teacher(init_dir, device)
            model, config = build_student(cfg, config, self.teacher)
        else:
            model = build_model(config)
            load_base(model, init_dir)
        self.base_bytes: dict[str, int] = {}
        if cfg.method == "frozen":
            self.trained_modules = freeze(model, cfg.unfreeze_top)
        elif cfg.method == "lora":
            model = apply_lora(model, config, cfg, modules_to_save=[])
        elif cfg.method == "qlora":
            from fromzero.finetune.qlora import apply_qlora, linear_weight_bytes

            float_params = count_parameters(model)[1]  # the 4-bit base packs two weights per stored element
            model = apply_qlora(model, config, cfg, cfg.qlora_group_size)
            self.base_bytes = linear_weight_bytes(model)
            print(f"qlora: the base's Linear weights take {self.base_bytes['stored_bytes']:,} bytes in 4 bits "
                  f"({100 * self.base_bytes['stored_bytes'] / self.base_bytes['bf16_bytes']:.1f}% of bf16; group "
                  f"{cfg.qlora_group_size}, fp16 scales and minimums); the tied embedding/head stays float")
        self.config, self.adapter_base = config, init_dir if cfg.method in ("lora", "qlora") else None
        self.trainable, self.total = count_parameters(model)
        if cfg.method == "qlora":
            self.total = float_params + self.trainable
        self.model = model.to(device)

    def start(self, run_dir: Path) -> None:
        from fromzero.data.sft import collate_sft

        cfg, sets = self.cfg, self.sets
        self.make_loaders(self.train_set, functools.partial(collate_sft, pad_id=self.pad_id))
        print(f"sft: train/val/test {len(sets['train'])}/{len(sets['val'])}/{len(sets['test'])} examples "
              f"({sets['train'].n_target_tokens:,} response tokens in train); method {cfg.method}: trains "
              f"{self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%); "
              f"device {self.device}, {self.dtype}")
        self.before = self.split_metrics("test")  # the base model's, for comparison
        # A model's own template travels as its files (chat_template.jinja, ...); fromzero's as fields.
        template_info = ({"chat_template": "chat_template.jinja"} if self.template_dir is not None else
                         {"template": {"system_prefix": cfg.system_prefix, "user_prefix": cfg.user_prefix,
                                       "assistant_prefix": cfg.assistant_prefix, "turn_end": cfg.turn_end}})
        self.base_info = {
            "task": "sft", "test_before": self.before, "method": cfg.method, "data": cfg.data,
            **(distill_info(cfg, self.init_dir, self.teacher, self.total) if self.teacher is not None
               else {}),
            **({"system_prompt": cfg.system_prompt} if cfg.system_prompt else {}),
            **({"qlora": {"group_size": cfg.qlora_group_size, "scale_dtype": "float16",
                          "base_linear_bytes": self.base_bytes}} if cfg.method == "qlora" else {}),
            **template_info}

    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        if self.teacher is None:  # the LM head only where the reply is (see GPT.forward)
            return net(x, y, target_logits_only=True)[1], x.size(0), int((y != -100).sum())
        logits, loss = net(x, y)
        with torch.no_grad():  # match the teacher's next-token distribution on response tokens
            teacher_logits, _ = self.teacher(x, y)
        loss = distillation_loss(logits, teacher_logits, loss, self.cfg.temperature, self.cfg.alpha, mask=y != -100)
        return loss, x.size(0), int((y != -100).sum())

    def split_metrics(self, split: str) -> dict[str, float]:
        return response_loss(self.forward, self.eval_loaders[split], self.device, self.autocast)

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        before = self.before
        self.final_files(fit, test)
        print(f"test: response loss {test['loss']:.4f}, perplexity {test['perplexity']:.2f} "
              f"(before fine-tuning: {before['loss']:.4f}, {before['perplexity']:.2f}) "
              f"(best step {fit.best_step}); checkpoint: {self.best_dir}")
        return self.summary(fit, test, trainable_params=self.trainable, total_params=self.total,
                            test_before=before)
