"""Helpers for the exact-resume tests of every fine-tuning task: stop a run after step k as
Ctrl-C would, continue it with ``resume=True``, and compare with a run that was never stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file


def stop_after_step(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Make the fine-tuning loop see a stop request (as from Ctrl-C / SIGTERM) after its k-th step."""
    from fromzero.training.trainer import Trainer

    calls = {"n": 0}

    def stop(self: Any, requested: bool) -> bool:
        calls["n"] += 1
        return requested or calls["n"] == k

    monkeypatch.setattr(Trainer, "_stop_everywhere", stop)


def training_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights at the last step and the best weights so far (checkpoints/last)."""
    return load_file(str(Path(run_dir) / "checkpoints" / "last" / "training_weights.safetensors"))


def loss_rows(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_resume_is_exact(run: Callable[..., dict], make_cfg: Callable[[Path], Any], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch, stop_at: int) -> tuple[dict, dict]:
    """run(cfg[, resume=True]) a task three ways: straight through; stopped after ``stop_at``
    steps; resumed from there. The resumed run must end with bit-identical weights (the last
    step's and the best), the same logged losses, and the same best checkpoint tensors."""
    straight = run(make_cfg(tmp_path / "straight"))
    assert not straight.get("interrupted")
    with monkeypatch.context() as m:
        stop_after_step(m, stop_at)
        cut = run(make_cfg(tmp_path / "cut"))
    assert cut["interrupted"] and cut["steps"] == stop_at, cut
    assert (tmp_path / "cut" / "checkpoints" / "last" / "trainer_state.pt").is_file()
    # After an evaluation the best weights so far are a usable checkpoint already (written at
    # each improvement), without test scores: those come when the run finishes.
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("val_") for r in rows for k in r), "the test should stop after an evaluation"
    cut_info = json.loads((tmp_path / "cut" / "checkpoints" / "best" / "info.json").read_text())
    assert cut_info["best_step"] <= stop_at and not {"test", "test_accuracy", "test_f1_macro"} & cut_info.keys()
    resumed = run(make_cfg(tmp_path / "cut"), resume=True)
    assert not resumed.get("interrupted") and resumed["steps"] == straight["steps"] > stop_at
    a, b = training_state(tmp_path / "straight"), training_state(tmp_path / "cut")
    assert a.keys() == b.keys() and any(k.startswith("best/") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert loss_rows(tmp_path / "straight") == loss_rows(tmp_path / "cut")
    best_a, best_b = Path(straight["checkpoint"]), Path(resumed["checkpoint"])
    for file in sorted(p.name for p in best_a.glob("*.safetensors")):
        x, y = load_file(str(best_a / file)), load_file(str(best_b / file))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), file
    return straight, resumed
