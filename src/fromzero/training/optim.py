"""Optimizers and learning-rate schedules.

AdamW decays only matrices (embeddings and Linear weights, >= 2-D); biases and norm gains are
left alone, as in GPT-2/nanoGPT. The schedule is linear warmup then cosine decay to min_lr.
"""

from __future__ import annotations

import math

import torch

from fromzero.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool = True) -> torch.optim.Optimizer:
    """AdamW (fused kernel where PyTorch has one for the device, unless ``fused`` is false, as
    for FSDP's sharded DTensor parameters) or SGD with momentum."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    # The fused AdamW kernel exists for CUDA, MPS and CPU: one kernel over all parameters
    # instead of a dozen elementwise ops per tensor.
    fused = fused and device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup, cosine decay, floor."""
    if not cfg.decay_lr:
        return cfg.lr
    decay_iters = cfg.decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_iters - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
