"""torch.compile and bf16 autocast in the trainer: same numbers as eager, graceful fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fromzero.config import load_pretrain_config
from fromzero import devices as trainer_mod
from fromzero.training.pretrain import PretrainRun


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train(make_recipe, name: str, **train) -> tuple[PretrainRun, list[float]]:
    recipe = make_recipe(name, train={"max_steps": 6, "log_interval": 1, "eval_every": 6, **train})
    cfg = load_pretrain_config(recipe)
    pre = PretrainRun(cfg)
    pre.fit(progress=False)
    return pre, _losses(pre.run_dir)


def test_compiled_bf16_training_matches_eager_bf16(make_recipe):
    """Compiling changes kernels, not the maths: losses agree to bf16 precision, and the
    compiled attention (math backend, fp32 core) trains the same model."""
    _, eager = _train(make_recipe, "eager", dtype="bfloat16", compile=False)
    pre, compiled = _train(make_recipe, "compiled", dtype="bfloat16", compile=True)
    assert pre.trainer.net is not pre.model, "the model was not compiled"
    assert len(eager) == len(compiled) == 6
    for a, b in zip(eager, compiled):
        assert a == pytest.approx(b, abs=3e-2)
    assert compiled[-1] < compiled[0]


def test_compile_without_cpp_compiler_falls_back_to_eager(make_recipe, monkeypatch):
    monkeypatch.setattr(trainer_mod, "_cpp_compiler_available", lambda: False)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        pre, losses = _train(make_recipe, "nocxx", compile=True)
    assert pre.trainer.net is pre.model
    assert len(losses) == 6


def test_compile_failure_at_first_step_continues_without_compile(make_recipe, monkeypatch, capsys):
    class BackendFailed(RuntimeError):
        pass

    BackendFailed.__module__ = "torch._dynamo.exc"  # what torch.compile's own errors look like

    def broken_compile(model, mode=None):
        def forward(*args, **kwargs):
            raise BackendFailed("inductor: C++ compile error")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    pre, losses = _train(make_recipe, "broken", compile=True)
    assert pre.trainer.net is pre.model
    assert len(losses) == 6 and all(l == l for l in losses)
    assert "torch.compile failed (inductor: C++ compile error)" in capsys.readouterr().err


def test_model_errors_are_not_mistaken_for_compile_failures(make_recipe, monkeypatch):
    def compile_that_breaks_the_model(model, mode=None):
        def forward(*args, **kwargs):
            raise ValueError("a bug in the model")

        return forward

    monkeypatch.setattr(torch, "compile", compile_that_breaks_the_model)
    with pytest.raises(ValueError, match="a bug in the model"):
        _train(make_recipe, "bug", compile=True)


def test_dtype_auto_resolves_by_hardware():
    cpu = torch.device("cpu")
    expected = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    assert trainer_mod.resolve_dtype(cpu, "auto") == expected
    assert trainer_mod.resolve_dtype(cpu, "float32") == "float32"
