"""Optimizers and the learning-rate schedule every run uses.

AdamW decays only matrices (embeddings and Linear weights, >= 2-D); biases and norm gains are
left alone, as in GPT-2/nanoGPT. The schedule is linear warmup then cosine decay to a floor.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: Any, device: torch.device,
                    fused: bool = True) -> torch.optim.Optimizer:
    """AdamW (fused kernel where PyTorch has one for the device, unless ``fused`` is false, as
    for FSDP's sharded DTensor parameters) or SGD with momentum, from a
    :class:`fromzero.config.TrainSettings`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               foreach=True)
    # The fused AdamW kernel exists for CUDA, MPS and CPU: one kernel over all parameters
    # instead of a dozen elementwise ops per tensor.
    fused = fused and device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True
    )


def warmup_cosine(warmup_steps: int, decay_steps: int, floor: float) -> Callable[[int], float]:
    """lr multiplier for optimizer step s (0-based): linear warmup over ``warmup_steps``, cosine
    decay to ``floor`` at ``decay_steps``, then ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step >= decay_steps:
            return floor
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lr_at(step: int, cfg: Any) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a run with settings ``cfg``."""
    return cfg.lr * cfg.lr_schedule(cfg.max_steps)(step)
