"""Knowledge distillation (fromzero.finetune.distill, `fromzero distill`): the loss, the
student's initialisation from the teacher's layers, and whole runs for a classifier and a GPT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fromzero.finetune.distill import distillation_loss, evenly_spaced_layers, init_student
from fromzero.finetune.text import finetune_text_classification
from fromzero.models.bert import Bert, BertConfig

from .conftest import text_config


def test_layers_are_spread_evenly_with_first_and_last_kept() -> None:
    assert evenly_spaced_layers(6, 2) == [0, 5]
    assert evenly_spaced_layers(6, 3) == [0, 2, 5]
    assert evenly_spaced_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(4, 1) == [3]


def test_distillation_loss_matches_its_formula() -> None:
    torch.manual_seed(0)
    s, t, task = torch.randn(5, 3), torch.randn(5, 3), torch.tensor(0.7)
    T, alpha = 2.0, 0.3
    p_t = F.softmax(t / T, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=-1))).sum(-1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * task
    torch.testing.assert_close(distillation_loss(s, t, task, T, alpha), expected)
    assert float(distillation_loss(s, s, task, T, 1.0)) == pytest.approx(0.0, abs=1e-6)  # a perfect student
    assert float(distillation_loss(s, t, task, T, 0.0)) == pytest.approx(0.7)  # labels only
    # With a mask only the kept positions count (sequence logits (B, T, V)).
    seq_s, seq_t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    torch.testing.assert_close(distillation_loss(seq_s, seq_t, task, T, 1.0, mask=mask),
                               distillation_loss(seq_s[mask], seq_t[mask], task, T, 1.0))


def test_student_layers_are_copies_of_the_chosen_teacher_layers() -> None:
    config = dict(vocab_size=30, hidden_size=16, num_attention_heads=2, intermediate_size=24, head="classification",
                  num_labels=2)
    teacher = Bert(BertConfig(num_hidden_layers=4, **config))
    student = Bert(BertConfig(num_hidden_layers=2, **config))
    fresh = init_student(student, teacher, "fromzero-bert", [0, 3])
    assert fresh == []
    t, s = teacher.state_dict(), student.state_dict()
    for name in s:
        origin = name.replace("layers.1.", "layers.3.") if name.startswith("layers.1.") else name
        torch.testing.assert_close(s[name], t[origin], msg=name)


@pytest.fixture(scope="module")
def teacher(bert_base: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer classifier fine-tuned on the sentiment task: the teacher."""
    run = finetune_text_classification(text_config(bert_base, sentiment_csv, tmp_path_factory.mktemp("t") / "run",
                                                   epochs=10))
    assert run["test"]["accuracy"] >= 0.9
    return Path(run["checkpoint"])


def test_cli_distills_a_classifier_into_one_layer(cli, teacher: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = cli("distill", "--teacher", str(teacher), "--data", str(sentiment_csv), "--student-layers", "1",
                 "--out_dir", str(out), "--epochs", "10", "--lr", "1e-3", "--batch_size", "16", "--device", "cpu",
                 "--dtype", "float32", "--temperature", "2", "--alpha", "0.7", "--quiet")
    assert result.code == 0, result
    assert "1 of the teacher's 2 layers (copied from teacher layers [1])" in result.out
    config = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    info = json.loads((out / "checkpoints" / "best" / "info.json").read_text())
    assert config["num_hidden_layers"] == 1 and info["distilled_from"] == str(teacher.resolve())
    assert info["student_params"] < info["teacher_params"]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.9  # it learnt the task
    predicted = cli("predict", "--checkpoint", str(out / "checkpoints" / "best"), "--text", "the film was great")
    assert predicted.code == 0 and json.loads(predicted.out)["label"] == "pos"


def test_cli_distills_a_gpt_on_sft_data(cli, gpt_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = cli("distill", "--teacher", str(gpt_base), "--data", str(sft_jsonl), "--student_layers", "1",
                 "--out_dir", str(out), "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--dtype", "float32",
                 "--quiet")
    assert result.code == 0, result
    best = out / "checkpoints" / "best"
    assert json.loads((best / "config.json").read_text())["n_layer"] == 1
    assert json.loads((best / "info.json").read_text())["task"] == "sft"
    student, teacher = load_file(str(best / "model.safetensors")), load_file(str(gpt_base / "model.safetensors"))
    assert not any(k.startswith("transformer.h.1.") for k in student)
    assert student["transformer.h.0.attn.c_attn.weight"].shape == teacher["transformer.h.1.attn.c_attn.weight"].shape


def test_bad_distillation_settings_are_one_line_errors(cli, one_line_error, teacher: Path, bert_base: Path,
                                                       sentiment_csv: Path, tmp_path: Path) -> None:
    common = ["--data", str(sentiment_csv), "--device", "cpu", "--quiet"]
    one_line_error(cli("distill", "--teacher", str(teacher), "--alpha", "1.5", "--out_dir", str(tmp_path / "a"),
                       *common), "alpha must be in [0, 1]")
    one_line_error(cli("distill", "--teacher", str(teacher), "--student_layers", "5", "--out_dir",
                       str(tmp_path / "b"), *common), "student_layers must be between 1 and the teacher's 2 layers")
    one_line_error(cli("distill", "--teacher", str(bert_base), "--task", "text-classification", "--out_dir",
                       str(tmp_path / "c"), *common), "must be a text classifier")
    one_line_error(cli("distill", "--teacher", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "d"), *common),
                   "not found")
    assert not any((tmp_path / name).exists() for name in "abcd")
