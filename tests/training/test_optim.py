"""Tests for fromzero.training.optim: parameter groups, optimizers, LR schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fromzero.config import TrainConfig
from fromzero.models.gpt import GPT, GPTConfig
from fromzero.training.optim import build_optimizer, lr_at, param_groups

CPU = torch.device("cpu")


def tiny_model(bias: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=bias))


def names_of(model: torch.nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ----------------------------------------------------------------------------------------
# Parameter groups


def test_param_groups_split_matrices_from_vectors() -> None:
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    d, nd = names_of(model, decay["params"]), names_of(model, no_decay["params"])
    assert "transformer.wte.weight" in d and "transformer.wpe.weight" in d
    assert "transformer.h.0.attn.c_attn.weight" in d and "transformer.h.1.mlp.c_proj.weight" in d
    assert "transformer.h.0.attn.c_attn.bias" in nd and "transformer.h.0.ln_1.weight" in nd
    assert "transformer.ln_f.weight" in nd and "transformer.ln_f.bias" in nd
    assert not d & nd
    assert d | nd == {n for n, _ in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    # The tied embedding/head appears once.
    assert sum(p is model.transformer.wte.weight for p in decay["params"]) == 1
    assert len(decay["params"]) == 2 + 2 * 4  # wte, wpe + 4 matrices per block


def test_param_groups_skip_frozen_parameters() -> None:
    model = tiny_model()
    model.transformer.wpe.weight.requires_grad_(False)
    model.transformer.ln_f.bias.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert "transformer.wpe.weight" not in names_of(model, decay["params"])
    assert "transformer.ln_f.bias" not in names_of(model, no_decay["params"])


def test_param_groups_without_bias_keeps_layernorm_gains_undecayed() -> None:
    model = tiny_model(bias=False)
    decay, no_decay = param_groups(model, 0.5)
    nd = names_of(model, no_decay["params"])
    assert nd == {n for n, p in model.named_parameters() if n.endswith(("ln_1.weight",
                  "ln_2.weight", "ln_f.weight"))}


# ----------------------------------------------------------------------------------------
# Optimizers


def test_build_adamw() -> None:
    model = tiny_model()
    cfg = TrainConfig(lr=3e-4, beta1=0.8, beta2=0.95, weight_decay=0.05)
    opt = build_optimizer(model, cfg, CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["lr"] == 3e-4
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    # One step runs and changes the weights.
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    _, loss = model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_build_sgd_with_momentum() -> None:
    model = tiny_model()
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.7, weight_decay=0.01)
    opt = build_optimizer(model, cfg, CPU)
    assert isinstance(opt, torch.optim.SGD)
    for group in opt.param_groups:
        assert group["momentum"] == 0.7 and group["lr"] == 0.05
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    p = model.transformer.ln_f.bias
    _, loss = model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    loss.backward()
    before, grad = p.detach().clone(), p.grad.clone()
    opt.step()  # first momentum step: plain SGD, and no decay on a bias
    torch.testing.assert_close(p.detach(), before - 0.05 * grad)


def test_adamw_decays_only_matrices() -> None:
    """With zero gradients, AdamW changes only the decayed (>= 2-D) parameters."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.fill_(0.5)
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5), CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[n]), n


# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def sched(**kw) -> TrainConfig:
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, max_steps=200)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_is_linear_and_peaks_at_warmup_end() -> None:
    cfg = sched()
    warm = [lr_at(s, cfg) for s in range(cfg.warmup_steps)]
    diffs = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d > 0 for d in diffs)
    assert max(diffs) - min(diffs) < 1e-12  # linear
    assert warm[0] > 0  # step 0 already learns
    assert all(lr < cfg.lr for lr in warm)
    assert lr_at(cfg.warmup_steps, cfg) == pytest.approx(cfg.lr)
    assert max(lr_at(s, cfg) for s in range(300)) == pytest.approx(cfg.lr)


def test_cosine_decay_reaches_min_lr_and_stays() -> None:
    cfg = sched()
    mid = cfg.warmup_steps + (cfg.decay_steps - cfg.warmup_steps) // 2
    assert lr_at(mid, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    quarter = cfg.warmup_steps + (cfg.decay_steps - cfg.warmup_steps) // 4
    expect = cfg.min_lr + 0.5 * (1 + math.cos(math.pi / 4)) * (cfg.lr - cfg.min_lr)
    assert lr_at(quarter, cfg) == pytest.approx(expect)
    decay = [lr_at(s, cfg) for s in range(cfg.warmup_steps, cfg.decay_steps + 1)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))  # monotone
    assert lr_at(cfg.decay_steps, cfg) == pytest.approx(cfg.min_lr)
    assert lr_at(cfg.decay_steps - 1, cfg) > cfg.min_lr
    for s in (cfg.decay_steps + 1, 150, 10_000):
        assert lr_at(s, cfg) == cfg.min_lr


def test_decay_iters_default_to_max_iters() -> None:
    cfg = sched(decay_steps=0, max_steps=60)
    assert lr_at(60, cfg) == pytest.approx(cfg.min_lr)
    assert lr_at(59, cfg) > cfg.min_lr
    assert lr_at(35, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2)


def test_no_warmup_starts_at_peak() -> None:
    cfg = sched(warmup_steps=0)
    assert lr_at(0, cfg) == pytest.approx(cfg.lr)
    assert lr_at(1, cfg) < cfg.lr


def test_decay_lr_false_is_constant() -> None:
    cfg = sched(decay_lr=False)
    assert {lr_at(s, cfg) for s in (0, 5, 10, 60, 110, 1000)} == {cfg.lr}


def test_min_lr_equal_to_lr_is_constant_after_warmup() -> None:
    cfg = dataclasses.replace(sched(), min_lr=1e-3)
    assert {round(lr_at(s, cfg), 12) for s in range(10, 300)} == {1e-3}
