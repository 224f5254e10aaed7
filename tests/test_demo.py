"""`make demo`'s driver: Shakespeare when it can be fetched, the stdlib corpus when offline."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import fromzero.demo as demo
from fromzero.errors import FromzeroError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_repo_copy(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "shakespeare-char.yaml").write_text(
        (ROOT / "recipes" / "shakespeare-char.yaml").read_text()
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fake(monkeypatch, shakespeare_ok: bool):
    calls: list[list[str]] = []
    trained: list = []

    def cli(argv):
        calls.append(list(argv))
        if argv[:2] == ["data", "prepare"] and "shakespeare" in argv and not shakespeare_ok:
            return 2
        return 0

    def pretrain(cfg):
        trained.append(cfg)
        return SimpleNamespace(run_dir=Path("runs") / cfg.name)

    monkeypatch.setattr(demo, "cli", cli)
    monkeypatch.setattr("fromzero.training.pretrain.pretrain", pretrain)
    monkeypatch.setattr("fromzero.data.corpora.shakespeare_available_offline", lambda: False)
    return calls, trained


def test_demo_uses_shakespeare_when_available(in_repo_copy, monkeypatch, capsys):
    calls, trained = _fake(monkeypatch, shakespeare_ok=True)
    assert demo.main([]) == 0
    assert calls[0][:4] == ["data", "prepare", "--corpus", "shakespeare"]
    assert trained[0].data.dir == "data/shakespeare-char"
    assert trained[0].model.n_layer == 4 and trained[0].train.max_steps == 2000
    gen = calls[-1]
    assert gen[0] == "generate" and gen[gen.index("--prompt") + 1] == "ROMEO:"


def test_demo_falls_back_to_stdlib_offline_and_says_so(in_repo_copy, monkeypatch, capsys):
    calls, trained = _fake(monkeypatch, shakespeare_ok=False)
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert "falling back to the python-stdlib corpus" in out
    assert ["--corpus", "python-stdlib"] == calls[1][2:4]
    assert trained[0].data.dir == "data/python-stdlib-char"
    assert trained[0].name == "python-stdlib-char"


def test_demo_reports_training_errors_as_one_line(in_repo_copy, monkeypatch, capsys):
    _fake(monkeypatch, shakespeare_ok=True)

    def failing(cfg):
        raise FromzeroError("loss became nan at step 7")

    monkeypatch.setattr("fromzero.training.pretrain.pretrain", failing)
    assert demo.main([]) == 2
    assert capsys.readouterr().err.strip() == "error: loss became nan at step 7"


def test_demo_outside_the_repo_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo.main([]) == 2
    assert "run the demo from the repository root" in capsys.readouterr().err


def test_make_demo_runs_end_to_end_with_a_tiny_override(in_repo_copy, tmp_path) -> None:
    """The real `make demo` path, nothing stubbed: `python -m fromzero.demo` with recipe overrides
    (as `make demo ARGS=...` passes them) prepares the corpus, pretrains, samples and says where
    the run is; a bad override is one error line, exit 2."""
    import os
    import subprocess
    import sys

    args = ["--train.max_steps", "10", "--train.decay_steps", "10", "--train.warmup_steps", "2",
            "--train.eval_every", "5", "--train.eval_batches", "2", "--train.compile", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "fromzero.demo", *args], cwd=in_repo_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo: done. Run directory:" in proc.stdout and "demo: sample from" in proc.stdout
    runs = [p for p in (in_repo_copy / "runs").iterdir()
            if p.name != "latest" and (p / "checkpoints" / "best" / "model.safetensors").is_file()]
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").is_file()
    bad = subprocess.run([sys.executable, "-m", "fromzero.demo", "--train.max_itres", "10"], cwd=in_repo_copy,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
