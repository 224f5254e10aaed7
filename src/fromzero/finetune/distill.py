"""Knowledge distillation: train a small student to match a big teacher's softened predictions.

The student's loss mixes the teacher's knowledge with the task's own labels (Hinton et al. 2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

A temperature T > 1 softens both distributions so the student also learns how the teacher ranks
the wrong answers; T^2 keeps the gradient scale independent of T. The student is the teacher's
architecture with fewer layers (``student_layers``, spread evenly, weights copied, as DistilBERT
is initialised) and/or fields changed by ``student_config``; tensors whose shapes no longer match
start fresh. Distillation runs inside the text-classification and sft tasks, which own the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.errors import FromzeroError
from fromzero.tasks import get_task

def layer_layout(model_type: str) -> tuple[str, str]:
    """(config field holding the layer count, parameter-name prefix of layer i) of a teacher's
    family (see models.FamilyFacts), or a one-line error for a family without stacked layers."""
    from fromzero.models import facts_with

    facts = facts_with(model_type, "depth_field", "distillation supports {supported} teachers, not {model_type}")
    return facts.depth_field, facts.layer_prefix


@dataclass
class DistillOptions:
    """Distillation settings (mixed into the text-classification and sft task configs)."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "teacher": "distill.teacher", "student_layers": "distill.student_layers", "student_config":
        "distill.student_config", "temperature": "distill.temperature", "alpha": "distill.alpha"}

    teacher: str = ""
    """Distil from this checkpoint (a fine-tuned classifier for text-classification, a GPT for sft); "" = no distillation. The student replaces init_from."""
    student_layers: int = 0
    """Student depth: this many of the teacher's layers, evenly spaced (first and last kept), weights copied (0 = as many as the teacher)."""
    student_config: str = ""
    """YAML/JSON file of architecture fields that differ in the student (e.g. hidden_size: 256); mismatched tensors start fresh."""
    temperature: float = 2.0
    """Softmax temperature T of the teacher/student match (> 0; 1 = plain probabilities)."""
    alpha: float = 0.5
    """Weight of the teacher-matching term in [0, 1]; 1 - alpha weights the task's own loss on the labels."""

    def validate_distill(self) -> None:
        if not self.teacher:
            return
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise FromzeroError(f"temperature must be a positive number, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise FromzeroError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.student_layers < 0:
            raise FromzeroError(f"student_layers must be >= 0, got {self.student_layers}")


def evenly_spaced_layers(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layers a student of ``n_student`` layers copies: first and last kept, the
    rest spread evenly (6 -> 2: [0, 5]; 6 -> 3: [0, 2, 5]; 12 -> 6: [0, 2, 4, 7, 9, 11])."""
    if not 1 <= n_student <= n_teacher:
        raise FromzeroError(f"student_layers must be between 1 and the teacher's {n_teacher} layers, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_architecture(teacher_config: dict, options: DistillOptions) -> tuple[dict, list[int]]:
    """The student's config.json (the teacher's with the changes asked for) and the teacher
    layer each student layer starts from."""
    from fromzero.config import load_yaml

    depth_field = layer_layout(str(teacher_config.get("model_type")))[0]
    config = dict(teacher_config)
    if options.student_config:
        overrides = load_yaml(Path(options.student_config))
        unknown = sorted(set(overrides) - set(config) - {"head_dim", "intermediate_size", "n_kv_head"})
        if unknown or "model_type" in overrides:
            raise FromzeroError(f"student_config {options.student_config}: cannot set {unknown or ['model_type']} "
                                f"(fields of the teacher's config.json: {', '.join(sorted(config))})")
        config.update(overrides)
    n_teacher = int(teacher_config[depth_field])
    if options.student_layers:
        config[depth_field] = options.student_layers
    n_student = int(config[depth_field])  # a student is never deeper than its teacher
    return config, evenly_spaced_layers(n_teacher, n_student)


def init_student(student: nn.Module, teacher: nn.Module, model_type: str, layers: list[int]) -> list[str]:
    """Copy the teacher's weights into the student: student layer i <- teacher layer layers[i],
    everything outside the layers by name. Returns the student tensors left at their fresh
    initialisation (shapes that differ)."""
    _, prefix = layer_layout(model_type)
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    source = teacher.state_dict()
    fresh = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            match = pattern.match(name)
            origin = name
            if match:
                i = int(match.group(1))
                origin = f"{prefix}{layers[i]}." + name[match.end():] if i < len(layers) else ""
            if origin in source and source[origin].shape == tensor.shape:
                tensor.copy_(source[origin])
            else:
                fresh.append(name)
    return fresh


def load_teacher(path: str | Path, device: torch.device) -> tuple[nn.Module, dict, dict]:
    """The teacher model (eval mode, frozen), its config.json and its info.json."""
    from fromzero.checkpoint import checkpoint_info
    from fromzero.checkpoint import CONFIG_FILE, load_model, read_json

    path = Path(path).expanduser()
    info = checkpoint_info(path)
    config = read_json(path / CONFIG_FILE, "teacher config")
    teacher = load_model(path, device)  # a LoRA adapter directory loads as base + adapter, merged
    teacher.requires_grad_(False)
    return teacher.eval(), config, info


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, task_loss: torch.Tensor,
                      temperature: float, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task_loss.

    logits: (N, V) or (B, T, V); mask (same leading shape, bool): positions that count (e.g.
    response tokens), averaged over them; without a mask over all rows.
    """
    s = student_logits.float().flatten(0, -2)
    t = teacher_logits.float().flatten(0, -2)
    if mask is not None:
        keep = mask.flatten()
        s, t = s[keep], t[keep]
    if s.numel() == 0:
        return (1 - alpha) * task_loss
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl + (1 - alpha) * task_loss


def build_student(options: DistillOptions, teacher_config: dict, teacher: nn.Module,
                  adjust: Any = None) -> tuple[nn.Module, dict]:
    """Student model + its config (printing how it was made). ``adjust(config) -> config`` lets
    the task finish the config (e.g. the classification head's labels and dropout)."""
    from fromzero.models import build_model

    config, layers = student_architecture(teacher_config, options)
    if adjust is not None:
        config = adjust(config)
    student = build_model(config)
    model_type = str(teacher_config["model_type"])
    fresh = init_student(student, teacher, model_type, layers)
    depth_field, _ = layer_layout(model_type)
    described = (f"student: {config[depth_field]} of the teacher's {teacher_config[depth_field]} layers "
                 f"(copied from teacher layers {layers})")
    if fresh:
        described += f"; {len(fresh)} tensors start fresh (shapes differ), e.g. {fresh[0]}"
    print(f"distillation from {options.teacher} (T {options.temperature}, alpha {options.alpha}): "
          f"{described}")
    return student, config


def distill_info(options: DistillOptions, teacher_dir: Path, teacher: nn.Module, student_params: int) -> dict:
    """What info.json records of a distillation."""
    return {"distilled_from": str(Path(teacher_dir).resolve()), "temperature": options.temperature,
            "alpha": options.alpha, "teacher_params": count_params(teacher), "student_params": student_params}


def distill_task(teacher: str | Path, recipe: str | Path | None) -> str | None:
    """The fine-tuning task a distillation runs as: the recipe's, else by the teacher's kind."""
    from fromzero.config import load_yaml
    from fromzero.checkpoint import checkpoint_info

    if recipe is not None and load_yaml(Path(recipe)).get("task"):
        return None  # the recipe says
    task = checkpoint_info(Path(teacher).expanduser()).get("task")
    about = get_task(task)
    if about is not None and about.distill_as:
        return about.distill_as
    raise FromzeroError(f"cannot distil a {task!r} checkpoint ({teacher}): teachers are text classifiers or GPTs")


def count_params(model: nn.Module) -> int:
    """Parameters, a shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())
