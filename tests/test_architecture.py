"""The structure stays true: imports only go down the layers (import-linter, the contract in
pyproject.toml), checkpoints of every kind load through one registry, and checkpoints written by
the previous layout still load and compute what they did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fromzero.checkpoint import CheckpointKind, checkpoint_kind, load_model, register_checkpoint_kind

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = Path(__file__).parent / "fixtures" / "previous_format"


def test_imports_only_go_down_the_layers() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The same contract on a copy of the package with one planted upward import (models ->
    training) is broken: the check above cannot pass vacuously."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "fromzero", copy / "fromzero", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "fromzero" / "models" / "cnn.py", "a") as f:
        f.write("\n\ndef _planted():\n    from fromzero.training.trainer import prepare_run_dir  # noqa: F401\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "fromzero.models.cnn -> fromzero.training.trainer" in result.stdout


@pytest.mark.parametrize("name", ["gpt", "gpt-int8"])
def test_checkpoints_of_the_previous_layout_still_load(name: str) -> None:
    expected = json.loads((PREVIOUS / "expected.json").read_text())[name]
    model = load_model(PREVIOUS / name)
    with torch.no_grad():
        logits = model(torch.arange(12)[None] % 32)[0][0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected), rtol=0, atol=1e-6)
    assert checkpoint_kind(PREVIOUS / name).name == {"gpt": "plain", "gpt-int8": "quantized"}[name]


def test_a_new_checkpoint_kind_registers_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kind registered first wins over the built-in ones; its loader is found by import path."""
    import types

    import fromzero.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "_KINDS", list(ckpt._KINDS))
    loaded = []
    monkeypatch.setitem(sys.modules, "toy_loader", types.SimpleNamespace(
        load=lambda directory, device: loaded.append((directory, device)) or torch.nn.Identity()))
    (tmp_path / "marker.txt").write_text("x")
    assert checkpoint_kind(tmp_path).name == "plain"
    register_checkpoint_kind(CheckpointKind("toy", lambda d: (d / "marker.txt").is_file(), "toy_loader:load"),
                             first=True)
    assert checkpoint_kind(tmp_path).name == "toy"
    assert isinstance(load_model(tmp_path), torch.nn.Identity) and loaded == [(tmp_path, "cpu")]


# ---------------------------------------------------------------------------------------------
# A thin CLI: help without importing torch


def _config_classes() -> list[tuple[str, type]]:
    from fromzero.config import PretrainConfig
    from fromzero.tasks import finetuning_tasks

    return [("fromzero.config:PretrainConfig", PretrainConfig)] + [
        (task.config, task.config_class()) for task in finetuning_tasks().values()]


@pytest.mark.parametrize("target,cls", _config_classes(), ids=lambda x: x if isinstance(x, str) else "")
def test_help_read_from_source_equals_help_from_the_classes(target: str, cls: type) -> None:
    """--help reads the config dataclasses' source (no import); it must say exactly what the
    imported classes say: every key, default and docstring, inheritance and hidden keys included."""
    from fromzero.config import options_help
    from fromzero.options import static_options_help

    assert static_options_help(target) == options_help(cls)


@pytest.mark.parametrize("argv", [[], ["pretrain"], ["finetune"], ["crossval"], ["generate"], ["serve"],
                                  ["quantize"], ["tune"], ["convert"], ["predict"], ["explain"], ["ui"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    code = ("import sys\nfrom fromzero.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\nheavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    assert "usage:" in result.stdout


# ---------------------------------------------------------------------------------------------
# The task registry


def test_every_finetuning_task_names_its_config_and_training_function() -> None:
    import dataclasses
    import inspect

    from fromzero.finetune.engine import FinetuneConfig
    from fromzero.tasks import finetuning_tasks

    assert set(finetuning_tasks()) == {"text-classification", "sft", "dpo", "image-classification", "recommendation",
                                        "translation", "question-answering", "object-detection",
                                        "image-generation"}
    for task in finetuning_tasks().values():
        cls = task.config_class()
        assert dataclasses.is_dataclass(cls) and issubclass(cls, FinetuneConfig), task.name
        assert task.data_key in {f.name for f in dataclasses.fields(cls)}, task.name
        assert "resume" in inspect.signature(task.run_function()).parameters, task.name


def test_consumers_act_on_task_facts_not_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task registered with some facts is treated by them: distillation runs as its
    distill_as, crossval refuses a non-classifier, finetune names it as unknown with a hint."""
    import fromzero.tasks as tasks
    from fromzero.errors import FromzeroError
    from fromzero.finetune.crossval import crossval
    from fromzero.finetune.distill import distill_task

    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    tasks.register_task(tasks.Task("toy-chat", "generator", distill_as="sft"))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "fromzero-gpt"}')
    (teacher / "info.json").write_text('{"task": "toy-chat"}')
    assert distill_task(teacher, None) == "sft"
    with pytest.raises(FromzeroError, match="crossval is for classification tasks, not 'toy-chat'"):
        crossval("toy-chat", object(), 3)
    with pytest.raises(FromzeroError, match="unknown task 'txt-classification'.*did you mean text-classification"):
        tasks.finetuning_task("txt-classification")


# ---------------------------------------------------------------------------------------------
# Per-family facts live next to each model


def test_every_model_family_declares_its_facts() -> None:
    """LoRA targets, layer layout and head come from the family's FACTS (models/<family>.py):
    a tiny model of each family answers them, so freezing, LoRA and distillation need no
    per-family code of their own."""
    from fromzero.finetune.lora import default_targets, resolve_targets
    from fromzero.finetune.methods import freeze, head_modules, layer_stack
    from fromzero.models import MODEL_REGISTRY, FamilyFacts, build_model, family_facts
    from fromzero.models.cnn import build_cnn

    for model_type in MODEL_REGISTRY:
        assert isinstance(family_facts(model_type), FamilyFacts), model_type
    gpt = build_model({"model_type": "fromzero-gpt", "vocab_size": 32, "block_size": 16, "n_layer": 3, "n_head": 2,
                       "n_embd": 16})
    assert len(resolve_targets(gpt, default_targets({"model_type": "fromzero-gpt"}))) == 6  # 2 per layer
    layers, after = layer_stack(gpt)
    assert len(layers) == 3 and after == [gpt.transformer.ln_f] and head_modules(gpt) == [gpt.lm_head]
    trained = freeze(gpt, unfreeze_top=1)
    assert trained == [gpt.lm_head, gpt.transformer.h[2], gpt.transformer.ln_f]
    resnet = build_cnn("resnet18", 3)
    assert len(layer_stack(resnet)[0]) == 4 and head_modules(resnet) == [resnet.fc]
    assert family_facts(resnet) is family_facts("fromzero-cnn")


# ---------------------------------------------------------------------------------------------
# info.json: typed and versioned


def test_info_json_is_stamped_checked_and_versioned(tmp_path: Path) -> None:
    """Writers stamp the format version; readers refuse a newer format and wrongly typed
    fields with one line naming the field; checkpoints written before versioning still read."""
    from fromzero.checkpoint import INFO_FORMAT, checkpoint_info, write_info
    from fromzero.errors import FromzeroError

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "fromzero-cnn"}')
    write_info(ckpt / "info.json", {"task": "image-classification", "image_size": 8, "channels": 1})
    info = checkpoint_info(ckpt)
    assert info["format"] == INFO_FORMAT and info["image_size"] == 8 and "fromzero_version" in info
    for bad, message in (({"format": INFO_FORMAT + 1}, "info format 2; this fromzero reads up to 1"),
                         ({"task": "image-classification", "image_size": "big"}, "image_size must be int, got 'big'"),
                         ({"channels": True}, "channels must be int, got True"),
                         ([1, 2], "must hold a JSON object")):
        (ckpt / "info.json").write_text(json.dumps(bad))
        with pytest.raises(FromzeroError, match=message.replace("(", r"\(")):
            checkpoint_info(ckpt)
    assert json.loads((PREVIOUS / "gpt" / "info.json").read_text()).get("format") is None  # written before
    assert checkpoint_info(PREVIOUS / "gpt")["task"] == "language-model"
