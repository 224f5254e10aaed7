"""The shared fine-tuning loop: evaluation schedule, early stopping with best restore, NaN loss,
gradient accumulation, the LR schedule and the L1 penalty, on a toy model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig
from fromzero.training.trainer import Trainer, l1_penalty


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)


def toy(cfg: FinetuneConfig, scores: list[float] | None = None, loss_value: float | None = None):
    """A Linear model, 8 micro-batches per epoch, and an evaluate() that replays ``scores``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    evaluations: list[dict] = []

    def loss_fn(m: nn.Module, batch):
        loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        if loss_value is not None:
            loss = loss * 0 + loss_value
        return loss, 8, 8

    def evaluate(m: nn.Module) -> dict:
        score = scores[len(evaluations)] if scores else 0.5
        evaluations.append({"weight": m.weight.detach().clone(), "score": score})
        return {"f1_macro": score, "loss": 1.0 - score}

    logger = Rows()
    trainer = Trainer(model, cfg, torch.device("cpu"), "float32", loss_fn, evaluate, "val_f1_macro",
                          higher_is_better=True, logger=logger)
    return trainer, (lambda epoch: iter(batches)), evaluations, logger


def test_evaluates_every_n_steps_and_once_at_the_end_without_repeats() -> None:
    cfg = FinetuneConfig(epochs=2, eval_every=3, progress=False, lr=1e-2, log_interval=1)
    trainer, batches, evaluations, logger = toy(cfg)
    result = trainer.fit(batches, 8)
    eval_steps = [r["step"] for r in logger.rows if "val_f1_macro" in r]
    assert eval_steps == [3, 6, 9, 12, 15, 16]  # every 3 steps, plus the final step; no epoch-8 duplicate
    assert result.steps == 16 and len(evaluations) == 6


def test_early_stopping_restores_the_best_weights() -> None:
    cfg = FinetuneConfig(epochs=10, patience=2, progress=False, lr=1e-1)
    trainer, batches, evaluations, _ = toy(cfg, scores=[0.5, 0.9, 0.7, 0.6, 0.95])
    result = trainer.fit(batches, 8)
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    assert result.best_metrics["f1_macro"] == 0.9
    torch.testing.assert_close(trainer.model.weight, evaluations[1]["weight"], rtol=0, atol=0)


def test_nan_loss_is_a_one_line_error() -> None:
    trainer, batches, _, _ = toy(FinetuneConfig(epochs=1, progress=False), loss_value=math.nan)
    with pytest.raises(FromzeroError, match="loss became nan at step 1"):
        trainer.fit(batches, 8)


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    cfg = FinetuneConfig(epochs=1, grad_accum=4, progress=False)
    trainer, batches, _, _ = toy(cfg)
    assert trainer.fit(batches, 8).steps == 2  # 8 micro-batches per epoch / grad_accum 4


def test_warmup_then_cosine_to_the_floor() -> None:
    factor = FinetuneConfig(warmup_ratio=0.1, min_lr_ratio=0.1).lr_schedule(100)
    assert factor(0) < factor(5) < factor(9) <= 1.0
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert factor(100) == pytest.approx(0.1)


def test_l1_penalty_is_the_sum_of_absolute_values() -> None:
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[-3.0], [0.5]])
    assert float(l1_penalty([a, b])) == pytest.approx(6.5)
