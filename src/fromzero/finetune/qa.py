"""Fine-tune an encoder (BERT / MiniLM) for extractive question answering (task ``question-answering``).

Data: the built-in ``shakespeare-qa`` (synthetic questions on the plays' real text, see
:mod:`fromzero.data.shakespeare_qa`), SQuAD JSON or JSON lines, or a folder of train / val /
test files (:mod:`fromzero.data.qa`: checks, splits, windows, spans). Model: a fromzero-bert
checkpoint or ``all-MiniLM-L6-v2`` with the span head of HF's ``BertForQuestionAnswering``
(``head: qa``: a start and an end logit per token), so the result exports with ``convert to-hf``.

Each question becomes one or more windows ``[CLS] question [SEP] context [SEP]`` (``max_length``
tokens, consecutive windows sharing ``doc_stride`` context tokens); the loss is the mean
cross-entropy of the answer's start and end token (the [CLS] position where the answer is not
in the window). Metrics: SQuAD v1.1 exact match and F1 (in percent, :mod:`fromzero.evaluation.squad`)
of the best span over all windows of a question, and the windows' loss. Try it::

    fromzero finetune --config recipes/qa-minilm.yaml --out_dir runs/qa
    fromzero predict --checkpoint runs/qa/checkpoints/best --question 'Who says "Speak, if you can"?' \\
        --context-file scene.txt
    fromzero evaluate --checkpoint runs/qa/checkpoints/best --data dev-v1.1.json
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from fromzero.checkpoint import CONFIG_FILE, read_json
from fromzero.data.qa import QAExample, Window
from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.training.trainer import FitResult

TASK = "question-answering"
MONITORS = ("val_f1", "val_exact_match", "val_loss")
PREDICTIONS_FILE = "test_predictions.jsonl"


@dataclass
class QuestionAnsweringConfig(FinetuneConfig):
    """Fine-tuning an encoder to answer questions with a span of a context."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data": "data.source", "val_fraction": "data.val_fraction", "test_fraction": "data.test_fraction",
        "max_length": "data.max_length", "doc_stride": "data.doc_stride",
        "max_question_tokens": "data.max_question_tokens", "max_train_questions": "data.max_train_questions",
        "dropout": "model.dropout"}

    init_from: str = "all-MiniLM-L6-v2"
    """Encoder to start from: all-MiniLM-L6-v2 (built in) or a fromzero-bert checkpoint directory."""
    data: str = "shakespeare-qa"
    """shakespeare-qa (built in) | a SQuAD .json / .jsonl file | a folder with train.* (+ val.*, test.*)."""
    val_fraction: float = 0.1
    """Share of the contexts carved out for validation when the data has no val file (by a hash of the context)."""
    test_fraction: float = 0.1
    """Share of the contexts carved out for test when the data has no test file (by a hash of the context)."""
    max_length: int = 256
    """Tokens per window: [CLS] question [SEP] context [SEP]; longer contexts continue in more windows."""
    doc_stride: int = 64
    """Context tokens that consecutive windows of one context share (as HF run_qa's --doc_stride)."""
    max_question_tokens: int = 64
    """Questions longer than this many tokens are cut (and counted)."""
    max_train_questions: int = 0
    """Train on a random sample of this many training questions (drawn with seed; 0 = all)."""
    max_answer_tokens: int = 30
    """Longest answer span, in tokens, that post-processing considers."""
    n_best: int = 20
    """Start and end candidates per window that post-processing pairs up."""
    eval_limit: int = 0
    """Score only the first N val questions at each evaluation (0 = all; test is always scored whole)."""
    eval_batch_size: int = 64
    """Windows per batch when evaluating."""
    pad_to_multiple_of: int = 8
    """Pad each batch to a multiple of this many tokens (tensor-core / kernel friendly)."""
    monitor: str = "val_f1"
    """Metric that picks the best weights and drives early stopping: val_f1 | val_exact_match | val_loss."""
    dropout: float | None = None
    """Override the encoder's hidden and attention dropout (None = keep the checkpoint's)."""
    epochs: int = 2
    """Maximum passes over the training windows."""
    lr: float = 5e-5
    """Peak learning rate (after warmup)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with linear warmup from 0 to lr."""

    def validate(self) -> None:
        self.validate_common()
        if self.monitor not in MONITORS:
            raise FromzeroError(f"monitor {self.monitor!r} is not supported (supported: {', '.join(MONITORS)})")
        for name in ("max_length", "doc_stride", "max_question_tokens", "max_answer_tokens", "n_best",
                     "eval_batch_size", "pad_to_multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FromzeroError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_train_questions", "eval_limit"):
            if getattr(self, name) < 0:
                raise FromzeroError(f"{name} must be >= 0, got {getattr(self, name)}")
        room = self.max_length - self.max_question_tokens - 3  # [CLS], [SEP], [SEP]
        if room <= self.doc_stride:
            raise FromzeroError(f"max_length {self.max_length} leaves {room} context tokens after a question of "
                                f"max_question_tokens {self.max_question_tokens}: doc_stride ({self.doc_stride}) "
                                "must be smaller (raise max_length or lower doc_stride / max_question_tokens)")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FromzeroError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise FromzeroError("val_fraction + test_fraction must leave some data for training")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise FromzeroError(f"dropout must be in [0, 1), got {self.dropout}")


def qa_config(base: dict, dropout: float | None = None) -> dict:
    """The base encoder's config with the span head (HF BertForQuestionAnswering: no pooler)."""
    if base.get("model_type") != "fromzero-bert":
        raise FromzeroError(f"question answering needs an encoder (fromzero-bert), not {base.get('model_type')!r}")
    config = dict(base, head="qa", pooler=False, labels=None)
    if dropout is not None:
        config.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return config


# ---------------------------------------------------------------------------------------------
# Windows through the model


class WindowBatches:
    """Windows served as length-bucketed, per-batch-padded batches (input_ids, token types, mask, labels)."""

    def __init__(self, windows: list[Window], batch_size: int, shuffle: bool, seed: int, pad_id: int,
                 pad_to_multiple_of: int, num_workers: int = 0) -> None:
        from torch.utils.data import DataLoader

        from fromzero.data.classification import LengthBucketSampler

        self.windows = windows
        self.sampler = LengthBucketSampler([len(w.input_ids) for w in windows], batch_size, shuffle=shuffle, seed=seed)
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of
        self.loader = DataLoader(range(len(windows)), batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=self.collate)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.windows[i] for i in indices]
        T = max(len(w.input_ids) for w in rows)
        T = -(-T // self.multiple) * self.multiple
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, w in enumerate(rows):
            n = len(w.input_ids)
            ids[r, :n], types[r, :n], mask[r, :n] = torch.tensor(w.input_ids), torch.tensor(w.type_ids), 1
        labels = torch.tensor([[w.start, w.end] for w in rows], dtype=torch.long)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels,
                "index": torch.tensor(indices)}

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Any:
        self.sampler.set_epoch(epoch)
        return iter(self.loader)


@torch.no_grad()
def window_logits(model: nn.Module, batches: WindowBatches, device: torch.device, autocast: Any
                  ) -> tuple[list[Any], list[Any], float]:
    """(start logits, end logits) of every window (float32 numpy, its own length), in window order,
    and the mean loss of their labels."""
    model.eval()
    starts: list[Any] = [None] * len(batches.windows)
    ends: list[Any] = [None] * len(batches.windows)
    total = 0.0
    for batch in batches.epoch(0):
        with autocast():
            logits, loss = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 batch["token_type_ids"].to(device), labels=batch["labels"].to(device))
        total += float(loss) * len(batch["index"])
        logits = logits.float().cpu().numpy()
        for r, i in enumerate(batch["index"].tolist()):
            n = len(batches.windows[i].input_ids)
            starts[i], ends[i] = logits[r, :n, 0], logits[r, :n, 1]
    return starts, ends, total / max(1, len(batches.windows))


def answer_windows(model: nn.Module, windows: list[Window], examples: list[QAExample], device: torch.device,
                   autocast: Any, pad_id: int, batch_size: int = 64, n_best: int = 20, max_answer_tokens: int = 30
                   ) -> tuple[list[dict[str, Any]], float]:
    """The best span of each example (see :func:`fromzero.data.qa.best_spans`) and the windows' mean loss."""
    from fromzero.data.qa import best_spans

    batches = WindowBatches(windows, batch_size, False, 0, pad_id, 8)
    starts, ends, loss = window_logits(model, batches, device, autocast)
    return best_spans(windows, starts, ends, examples, n_best, max_answer_tokens), loss


def score_answers(answers: list[dict[str, Any]], examples: list[QAExample], loss: float) -> dict[str, Any]:
    """SQuAD exact match / F1 (percent) of the answers, the windows' loss and the question count."""
    from fromzero.evaluation.squad import squad_scores

    return {"loss": loss, **squad_scores([a["answer"] for a in answers], [ex.answer_texts for ex in examples])}


# ---------------------------------------------------------------------------------------------
# The run


def finetune_question_answering(cfg: QuestionAnsweringConfig, resume: bool = False) -> dict[str, Any]:
    """Run a QuestionAnsweringTask (train, keep the best val weights, test once); returns its summary."""
    return run_finetune_task(QuestionAnsweringTask, cfg, resume)


class QuestionAnsweringTask(FinetuneTask):
    """One extractive-QA fine-tune (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = TASK

    def __init__(self, cfg: QuestionAnsweringConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        from fromzero.data.qa import encode_windows, load_qa_splits
        from fromzero.finetune.lora import apply_lora, load_base
        from fromzero.finetune.methods import count_parameters, freeze
        from fromzero.finetune.text import resolve_checkpoint
        from fromzero.models import build_model
        from fromzero.models.bert import BertConfig, encoder_limit, load_encoder_tokenizer

        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        self.monitor, self.higher_is_better = cfg.monitor, cfg.monitor != "val_loss"
        splits, self.unanswerable = load_qa_splits(cfg.data, cfg.val_fraction, cfg.test_fraction)
        if self.unanswerable:
            print(f"note: {self.unanswerable} unanswerable (SQuAD v2) questions skipped: this task answers with a span")
        empty = [split for split in ("train", "val", "test") if not splits[split]]
        if empty:
            raise FromzeroError(f"{cfg.data}: no answerable questions in {', '.join(empty)} (got "
                                + ", ".join(f"{len(v)} {k}" for k, v in splits.items()) + ")")
        if cfg.max_train_questions and cfg.max_train_questions < len(splits["train"]):
            splits["train"] = random.Random(cfg.seed).sample(splits["train"], cfg.max_train_questions)
        if cfg.eval_limit:
            splits["val"] = splits["val"][:cfg.eval_limit]
        self.examples = splits

        init_dir = resolve_checkpoint(cfg.init_from)
        self.init_dir = init_dir
        config = qa_config(read_json(init_dir / CONFIG_FILE, "model config"), cfg.dropout)
        bert_config = BertConfig.from_dict(config)
        self.pad_id = bert_config.pad_token_id or 0
        self.max_length = min(cfg.max_length, encoder_limit(init_dir, bert_config))
        if self.max_length < cfg.max_length:
            print(f"note: max_length {cfg.max_length} lowered to the model's limit of {self.max_length} tokens")
        if self.max_length - cfg.max_question_tokens - 3 <= cfg.doc_stride:
            raise FromzeroError(f"the model's limit of {self.max_length} tokens leaves no room for doc_stride "
                                f"{cfg.doc_stride} after max_question_tokens {cfg.max_question_tokens}")
        tokenizer = load_encoder_tokenizer(init_dir, bert_config)
        self.windows: dict[str, list[Window]] = {}
        self.stats = {}
        for split, examples in splits.items():
            self.windows[split], stats = encode_windows(tokenizer, examples, self.max_length, cfg.doc_stride,
                                                        cfg.max_question_tokens)
            self.stats[split] = stats
            if stats.questions_truncated:
                print(f"note: {stats.questions_truncated} {split} questions are longer than "
                      f"{cfg.max_question_tokens} tokens and were cut")
            if stats.answers_outside:
                print(f"note: {stats.answers_outside} {split} answers fit in no window of {self.max_length} tokens "
                      "(they are learned as 'not in this window'; raise doc_stride to keep them)")

        torch.manual_seed(cfg.seed)
        model = build_model(config)
        load_base(model, init_dir)
        if cfg.method == "frozen":
            self.trained_modules = freeze(model, cfg.unfreeze_top)
        elif cfg.method == "lora":
            model = apply_lora(model, config, cfg, modules_to_save=["qa_outputs"])
        self.config = config
        self.trainable, self.total = count_parameters(model)
        self.model = model.to(device)

    def start(self, run_dir: Path) -> None:
        cfg = self.cfg
        self.train = WindowBatches(self.windows["train"], cfg.batch_size, True, cfg.seed, self.pad_id,
                                   cfg.pad_to_multiple_of, cfg.num_workers)
        self.evals = {split: WindowBatches(self.windows[split], cfg.eval_batch_size, False, 0, self.pad_id,
                                           cfg.pad_to_multiple_of) for split in ("val", "test")}
        counts = "/".join(f"{len(self.examples[s]):,}" for s in ("train", "val", "test"))
        windows = "/".join(f"{len(self.windows[s]):,}" for s in ("train", "val", "test"))
        print(f"question answering: train/val/test {counts} questions in {windows} windows of up to "
              f"{self.max_length} tokens (stride {cfg.doc_stride}); method {cfg.method}: trains {self.trainable:,} "
              f"of {self.total:,} parameters; device {self.device}, {self.dtype}")
        self.base_info = {"task": TASK, "max_length": self.max_length, "doc_stride": cfg.doc_stride,
                          "max_question_tokens": cfg.max_question_tokens, "max_answer_tokens": cfg.max_answer_tokens,
                          "n_best": cfg.n_best, "method": cfg.method, "trainable_params": self.trainable}

    def batches(self) -> tuple[Any, int]:
        return self.train.epoch, len(self.train)

    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        ids, types, mask, labels = (batch[k].to(self.device, non_blocking=True)
                                    for k in ("input_ids", "token_type_ids", "attention_mask", "labels"))
        _, loss = net(ids, mask, types, labels=labels)
        return loss, ids.size(0), int(mask.sum())

    def _answers(self, split: str) -> tuple[list[dict[str, Any]], float]:
        from fromzero.data.qa import best_spans

        starts, ends, loss = window_logits(self.forward, self.evals[split], self.device, self.autocast)
        return best_spans(self.windows[split], starts, ends, self.examples[split], self.cfg.n_best,
                          self.cfg.max_answer_tokens), loss

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        answers, loss = self._answers("val")
        return score_answers(answers, self.examples["val"], loss)

    def save_best(self, info: dict[str, Any]) -> None:
        """checkpoints/best from the model as it is now (full weights, or the LoRA adapter)."""
        adapter_base = self.init_dir if self.cfg.method == "lora" else None
        self.save_model(self.best_dir, {**self.base_info, **info}, adapter_base, self.init_dir / "tokenizer.json")

    def test(self) -> dict[str, Any]:
        self.test_answers, loss = self._answers("test")
        return score_answers(self.test_answers, self.examples["test"], loss)

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The final checkpoints/best, metrics.json, the test predictions and the report."""
        from fromzero.checkpoint import atomic_write_text
        from fromzero.evaluation.metrics import write_metrics_json

        self.save_best({"best_step": fit.best_step, "best_epoch": fit.best_epoch, "val": fit.best_metrics,
                        "test": test})
        report = {**test, "split": "test", "best_step": fit.best_step, "epochs_run": fit.epochs_run,
                  "stopped_early": fit.stopped_early, **{f"val_{k}": v for k, v in fit.best_metrics.items()}}
        write_metrics_json(report, self.run_dir / "metrics.json")
        lines = [json.dumps({"id": ex.id, "question": ex.question, "prediction": a["answer"],
                             "answers": ex.answer_texts, "probability": round(a["probability"], 6)},
                            ensure_ascii=False) for ex, a in zip(self.examples["test"], self.test_answers)]
        atomic_write_text(self.run_dir / PREDICTIONS_FILE, "\n".join(lines) + "\n")
        print(f"test (best step {fit.best_step}): exact match {test['exact_match']:.2f}, F1 {test['f1']:.2f} "
              f"over {test['questions']:,} questions (loss {test['loss']:.4f}); predictions in "
              f"{self.run_dir / PREDICTIONS_FILE}")
        print(f"checkpoint: {self.best_dir}")
        return self.summary(fit, test, unanswerable_skipped=self.unanswerable, trainable_params=self.trainable,
                            total_params=self.total, windows={s: len(w) for s, w in self.windows.items()})


# ---------------------------------------------------------------------------------------------
# Using a checkpoint


class Reader:
    """A question-answering checkpoint, ready to answer questions about contexts."""

    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        from fromzero.checkpoint import checkpoint_info, load_model
        from fromzero.devices import resolve_device
        from fromzero.models.bert import BertConfig, load_encoder_tokenizer

        self.directory = Path(directory).expanduser()
        self.info = checkpoint_info(self.directory)
        if self.info.get("task") != TASK:
            raise FromzeroError(f"{self.directory} is a {self.info.get('task')} checkpoint, not {TASK}")
        config = BertConfig.from_dict(read_json(self.directory / CONFIG_FILE, "model config"))
        self.tokenizer = load_encoder_tokenizer(self.directory, config)
        self.pad_id = config.pad_token_id or 0
        self.device = resolve_device(device)
        self.model = load_model(self.directory, self.device)
        self.max_length = int(self.info.get("max_length") or config.max_position_embeddings)
        self.doc_stride = int(self.info.get("doc_stride", 64))
        self.max_question_tokens = int(self.info.get("max_question_tokens", 64))
        self.n_best = int(self.info.get("n_best", 20))
        self.max_answer_tokens = int(self.info.get("max_answer_tokens", 30))

    def _autocast(self) -> Any:
        from fromzero.devices import autocast_context, resolve_dtype

        return autocast_context(self.device, resolve_dtype(self.device, "auto"))

    def answer(self, examples: list[QAExample], batch_size: int = 64) -> tuple[list[dict[str, Any]], float]:
        """The best span of every example and the windows' mean loss (of the first gold answers)."""
        from fromzero.data.qa import encode_windows

        if batch_size <= 0:
            raise FromzeroError(f"batch size must be positive, got {batch_size}")
        windows, _ = encode_windows(self.tokenizer, examples, self.max_length, self.doc_stride,
                                    self.max_question_tokens)
        return answer_windows(self.model, windows, examples, self.device, self._autocast, self.pad_id, batch_size,
                              self.n_best, self.max_answer_tokens)
