"""The registry of tasks: what each one is, so consumers ask instead of comparing task strings.

A *task* is what a model was trained to do: the ``task`` of a recipe and of a checkpoint's
``info.json``. Consumers look it up (:func:`get_task`) and act on its facts, so a new task is one
entry here plus its module (docs/architecture.md, "Tasks"). This module imports nothing heavy:
``--help`` reads it, and so does every layer.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from fromzero.errors import FromzeroError


@dataclass(frozen=True)
class Task:
    """Facts about one task."""

    name: str
    kind: str
    """classifier | generator (a causal LM: sft, dpo, pretraining) | recommender | translator (seq2seq) |
    reader (extractive question answering: answers are spans of a context) | detector (boxes and labels) |
    image-generator (diffusion: images from a label or a prompt)."""
    inputs: str = ""
    """What ``predict`` feeds a classifier: text | image ("" for other kinds)."""
    config: str = ""
    """``module:Class`` of its fine-tuning recipe config ("" when it is not fine-tuned: pretraining)."""
    run: str = ""
    """``module:function(cfg, resume=False) -> summary`` that fine-tunes it."""
    data_key: str = "data"
    """The recipe key that names its data."""
    eval_split: str = "test"
    """The split ``evaluate`` and ``quantize --eval`` score when none is given."""
    distill_as: str = ""
    """The fine-tuning task a distillation from a teacher of this task runs as ("" = cannot)."""

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"

    @property
    def is_generator(self) -> bool:
        return self.kind == "generator"

    @property
    def is_reader(self) -> bool:
        return self.kind == "reader"

    @property
    def finetunable(self) -> bool:
        return bool(self.config)

    def config_class(self) -> type:
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def run_function(self) -> Any:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Add (or replace) a task."""
    _TASKS[task.name] = task


for _task in (
    Task("text-classification", "classifier", inputs="text",
         config="fromzero.finetune.text:TextClassificationConfig",
         run="fromzero.finetune.text:finetune_text_classification", distill_as="text-classification"),
    Task("sft", "generator", config="fromzero.finetune.sft:SFTConfig", run="fromzero.finetune.sft:finetune_sft",
         eval_split="val", distill_as="sft"),
    Task("dpo", "generator", config="fromzero.finetune.dpo:DPOConfig", run="fromzero.finetune.dpo:finetune_dpo",
         eval_split="val", distill_as="sft"),
    Task("image-classification", "classifier", inputs="image",
         config="fromzero.finetune.images:ImageFinetuneConfig", run="fromzero.finetune.images:finetune_images",
         data_key="data_dir"),
    Task("recommendation", "recommender", config="fromzero.finetune.recsys:RecommendationConfig",
         run="fromzero.finetune.recsys:finetune_recommendation"),
    Task("translation", "translator", config="fromzero.finetune.translation:TranslationConfig",
         run="fromzero.finetune.translation:finetune_translation"),
    Task("question-answering", "reader", config="fromzero.finetune.qa:QuestionAnsweringConfig",
         run="fromzero.finetune.qa:finetune_question_answering"),
    Task("object-detection", "detector", inputs="image", config="fromzero.finetune.detection:DetectionConfig",
         run="fromzero.finetune.detection:finetune_detection", data_key="data_dir"),
    Task("image-generation", "image-generator", config="fromzero.finetune.diffusion:ImageGenerationConfig",
         run="fromzero.finetune.diffusion:finetune_image_generation", data_key="data_dir"),
    Task("language-model", "generator", eval_split="val", distill_as="sft"),  # pretraining (fromzero pretrain)
):
    register_task(_task)


def get_task(name: str | None) -> Task | None:
    """The task called ``name`` (None for an unknown one, e.g. a converted encoder's "unknown")."""
    return _TASKS.get(str(name))


def finetuning_tasks() -> dict[str, Task]:
    """The tasks ``fromzero finetune`` trains, by name, in registration order."""
    return {name: task for name, task in _TASKS.items() if task.finetunable}


def finetuning_task(name: str) -> Task:
    """The fine-tuning task ``name``, or a one-line error naming the closest one."""
    task = _TASKS.get(str(name))
    if task is None or not task.finetunable:
        names = list(finetuning_tasks())
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise FromzeroError(f"unknown task {name!r} (tasks: {', '.join(names)}){hint}")
    return task
