"""Which weights a fine-tune trains: ``full``, ``frozen`` (head only, or the top N layers too), ``lora``.

* ``full``: every weight.
* ``frozen``: ``requires_grad=False`` everywhere but the task head (and, with ``unfreeze_top``
  = N, the last N layers plus the final norm). Frozen layers run in eval mode, so dropout and
  BatchNorm statistics stay those of the pretrained model.
* ``lora``: the base weights stay frozen; low-rank adapters are added to the target Linear
  layers by ``peft`` (see :mod:`fromzero.finetune.lora`) and the task head trains in full.

Each model family's heads and layer stack are its facts (:class:`fromzero.models.FamilyFacts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from fromzero.errors import FromzeroError

METHODS = ("full", "frozen", "lora")


@dataclass
class MethodConfig:
    """How much of the model a fine-tune trains (the fields every fine-tuning task shares)."""

    # where each field goes in a recipe (a field not listed is a train. setting)
    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "method": "method.name", "unfreeze_top": "method.unfreeze_top", "lora_rank": "method.lora_rank",
        "lora_alpha": "method.lora_alpha", "lora_dropout": "method.lora_dropout", "lora_targets":
        "method.lora_targets"}

    method: str = "full"
    """full (every weight) | frozen (the head, plus unfreeze_top layers) | lora (low-rank adapters + head)."""
    unfreeze_top: int = 0
    """method frozen: also train the last N transformer layers (0 = the head only)."""
    lora_rank: int = 8
    """method lora: rank r of each adapter (B @ A with A: r x in, B: out x r)."""
    lora_alpha: float = 16.0
    """method lora: scaling numerator; the update is (alpha / r) * B @ A."""
    lora_dropout: float = 0.1
    """method lora: dropout on the adapter's input (training only)."""
    lora_targets: list[str] | None = None
    """method lora: names of the Linear layers to adapt (last name part or full name); None = the family default."""


def layer_stack(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(layers in order, modules after the last layer), for unfreezing from the top: the model
    family's fact (models.FamilyFacts.layer_stack)."""
    from fromzero.models import family_facts

    return family_facts(model).layer_stack(model)


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The task head: what a new task must train even when everything else is frozen (the
    model family's fact, models.FamilyFacts.head_modules)."""
    from fromzero.models import family_facts

    head = family_facts(model).head_modules(model)
    if not head:
        raise FromzeroError(f"cannot find the task head of {type(model).__name__}")
    return head


def freeze(model: nn.Module, unfreeze_top: int = 0) -> list[nn.Module]:
    """Freeze everything but the head and the top ``unfreeze_top`` layers; return the trained modules."""
    layers, final = layer_stack(model)
    if unfreeze_top < 0:
        raise FromzeroError(f"unfreeze_top must be >= 0, got {unfreeze_top}")
    if unfreeze_top > len(layers):
        raise FromzeroError(f"unfreeze_top {unfreeze_top} is more than the model's {len(layers)} layers")
    trained = head_modules(model) + (layers[len(layers) - unfreeze_top:] + final if unfreeze_top else [])
    for p in model.parameters():
        p.requires_grad_(False)
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    return trained


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
