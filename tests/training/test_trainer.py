"""The pretraining loop: exact resume, clean stops, gradient accumulation, determinism, NaN.

All runs use the tiny recipe from tests/conftest.py (2 layers, 32 wide, block 16) on the tiny
char dataset, through ``fromzero.cli.main`` in-process, so what is tested is what a user runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fromzero.config import load_pretrain_config
from fromzero.models.gpt import GPT
from fromzero.checkpoint import load_model
from fromzero.training.pretrain import PretrainRun
from fromzero.training.trainer import Trainer

# Resume tests: dropout > 0 (so the global RNG state matters), 2 micro-batches per step, a row
# per step (so every step's loss can be compared), eval every 10 steps.
N_STEPS = 20
RESUME_SECTIONS = {
    "model": {"dropout": 0.1},
    "train": {"max_steps": N_STEPS, "grad_accum": 2, "log_interval": 1, "eval_every": 10},
}


def _main(*argv) -> int:
    from fromzero.cli import main

    return main([os.fspath(a) for a in argv])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in _rows(run_dir) if "loss" in r]


def _eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in _rows(run_dir) if "val_loss" in r]


def _weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / "model.safetensors"))


def _info(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / "info.json").read_text())


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ between {a} and {b}: {different[:5]}"


def assert_rows_equal_after(reference: Path, resumed: Path, k: int) -> None:
    """Train rows (loss, lr, grad_norm) and eval rows after step k are identical."""
    keys = ("step", "loss", "lr", "grad_norm")
    ref = [tuple(r[x] for x in keys) for r in _train_rows(reference) if r["step"] > k]
    got = [tuple(r[x] for x in keys) for r in _train_rows(resumed) if r["step"] > k]
    assert ref and got == ref
    ref_val = [(r["step"], r["val_loss"]) for r in _eval_rows(reference) if r["step"] > k]
    got_val = [(r["step"], r["val_loss"]) for r in _eval_rows(resumed) if r["step"] > k]
    assert ref_val and got_val == ref_val


def assert_train_rows_ordered(run_dir: Path) -> None:
    steps = [r["step"] for r in _train_rows(run_dir)]
    assert steps == sorted(set(steps)), f"duplicate or out-of-order train rows: {steps}"
    evals = [r["step"] for r in _eval_rows(run_dir)]
    assert evals == sorted(set(evals)), f"duplicate or out-of-order eval rows: {evals}"


@pytest.fixture(scope="module")
def reference_run(recipe_writer, tmp_path_factory) -> Path:
    """An uninterrupted N_STEPS run with the resume settings."""
    write = recipe_writer(tmp_path_factory.mktemp("reference"))
    recipe = write("reference", **RESUME_SECTIONS)
    assert _main("pretrain", "--config", recipe, "--quiet") == 0
    run_dir = recipe.parent / "runs" / "reference"
    assert _info(run_dir / "checkpoints" / "last")["step"] == N_STEPS
    return run_dir


# ---------------------------------------------------------------------------------------------
# Exact resume


def test_resume_after_shorter_run_is_bit_exact(make_recipe, cli, reference_run):
    k = 10
    recipe = make_recipe("short", **RESUME_SECTIONS)
    run_dir = recipe.parent / "runs" / "short"
    assert cli("pretrain", "--config", recipe, "--quiet", "--train.max_steps", str(k)).code == 0
    assert _info(run_dir / "checkpoints" / "last")["step"] == k

    result = cli("pretrain", "--resume", run_dir, "--train.max_steps", str(N_STEPS), "--quiet")
    assert result.code == 0, result
    assert "resuming at step 10" in result.err
    assert f"done: step {N_STEPS}" in result.out

    assert_same_weights(reference_run / "checkpoints" / "last", run_dir / "checkpoints" / "last")
    assert_rows_equal_after(reference_run, run_dir, k)
    assert_train_rows_ordered(run_dir)
    # The resumed run logs every step once: 1..N with no gap and no repeat.
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(1, N_STEPS + 1))


def _interrupt_after(monkeypatch, k: int, times: int = 1) -> None:
    """Send ourselves SIGINT ``times`` times (as Ctrl-C would) right after optimizer step k."""
    original = Trainer.train_step

    def train_step_then_interrupt(self, micro_batches):
        out = original(self, micro_batches)
        if self.progress.step + 1 == k:  # the loop counts the step after train_step returns
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step_then_interrupt)


def test_stop_request_mid_training_saves_and_resumes_exactly(make_recipe, cli, reference_run, monkeypatch):
    """A SIGINT after step 7 (not an eval or checkpoint step) stops the run cleanly; resuming
    reproduces the uninterrupted run bit for bit (RNG for dropout and batches restored)."""
    k = 7
    recipe = make_recipe("stopped", **RESUME_SECTIONS)
    run_dir = recipe.parent / "runs" / "stopped"

    with monkeypatch.context() as m:
        _interrupt_after(m, k)
        result = cli("pretrain", "--config", recipe, "--quiet")
    assert result.code == 130, result  # told apart from a finished run by scripts, as finetune is
    assert f"stopped: interrupted at step {k}" in result.out
    assert f"fromzero pretrain --resume {run_dir}" in result.err
    last = run_dir / "checkpoints" / "last"
    assert _info(last)["step"] == k
    assert (last / "trainer_state.pt").is_file()
    assert _info(run_dir / "checkpoints" / "best")["step"] == 0  # best is only written at evals
    assert max(r["step"] for r in _train_rows(run_dir)) == k

    # A crash after the checkpoint would have left rows beyond step k, and maybe a cut line:
    # resuming must drop them, not keep them next to the new ones.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "loss": 99.0, "lr": 0.0, "grad_norm": 0.0,
                            "tokens_per_sec": 1.0, "elapsed_s": 1.0}) + "\n")
        f.write('{"step": 10, "lo')

    result = cli("pretrain", "--resume", run_dir, "--quiet")
    assert result.code == 0, result
    assert f"done: step {N_STEPS}" in result.out

    assert_same_weights(reference_run / "checkpoints" / "last", last)
    assert_rows_equal_after(reference_run, run_dir, k)
    assert_train_rows_ordered(run_dir)
    assert all(r["loss"] != 99.0 for r in _train_rows(run_dir))
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(1, N_STEPS + 1))
    # best/ holds the better of the evals at steps 10 and 20, as in the reference run.
    assert _info(run_dir / "checkpoints" / "best") == _info(reference_run / "checkpoints" / "best")
    assert_same_weights(reference_run / "checkpoints" / "best", run_dir / "checkpoints" / "best")


def test_second_ctrl_c_interrupts_and_resume_continues_from_last_checkpoint(
        make_recipe, cli, reference_run, monkeypatch):
    """Two SIGINTs after step 13 abort at once (exit 130, no new checkpoint): the run resumes
    from the step-10 checkpoint, drops the rows logged after it and ends bit-identical."""
    recipe = make_recipe("crashed", **RESUME_SECTIONS)
    run_dir = recipe.parent / "runs" / "crashed"
    with monkeypatch.context() as m:
        _interrupt_after(m, 13, times=2)
        result = cli("pretrain", "--config", recipe, "--quiet")
    assert result.code == 130, result
    assert result.err_lines[-1] == "interrupted"
    assert "Traceback" not in result.err
    last = run_dir / "checkpoints" / "last"
    assert _info(last)["step"] == 10
    assert max(r["step"] for r in _train_rows(run_dir)) == 12  # rows written after the checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"]

    result = cli("pretrain", "--resume", run_dir, "--quiet")
    assert result.code == 0, result
    assert_same_weights(reference_run / "checkpoints" / "last", last)
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(1, N_STEPS + 1))
    assert_rows_equal_after(reference_run, run_dir, 0)
    assert_train_rows_ordered(run_dir)


def test_resume_recovers_an_interrupted_checkpoint_commit(reference_run, cli, tmp_path):
    """A crash between the two renames of commit_directory leaves checkpoints/.old-last (complete)
    and no last/; a crash while writing leaves a .tmp-last-* folder. --resume copes with both."""
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last").rename(checkpoints / ".old-last")
    partial = checkpoints / ".tmp-last-abc123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    result = cli("pretrain", "--resume", run_dir, "--train.max_steps", str(N_STEPS + 2), "--quiet")
    assert result.code == 0, result
    assert f"resuming at step {N_STEPS}" in result.err
    assert _info(checkpoints / "last")["step"] == N_STEPS + 2
    assert not (checkpoints / ".old-last").exists()


def test_refused_resume_writes_nothing(reference_run, cli, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert cli("pretrain", "--resume", run_dir, "--quiet").code == 2
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


def test_resume_overrides_are_remembered_by_the_next_resume(make_recipe, cli, monkeypatch):
    """Train to 10, resume to 20 but get interrupted at 15, resume again without options: the
    run should finish at 20, the max_steps it was last given. config.yaml ("the fully resolved
    config") still says 10, so the second resume claims the run already finished."""
    recipe = make_recipe("twice", train={"max_steps": 10})
    run_dir = recipe.parent / "runs" / "twice"
    assert cli("pretrain", "--config", recipe, "--quiet").code == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 15)
        result = cli("pretrain", "--resume", run_dir, "--train.max_steps", "20", "--quiet")
    assert result.code == 130 and "stopped: interrupted at step 15" in result.out, result
    result = cli("pretrain", "--resume", run_dir, "--quiet")
    assert result.code == 0, result
    assert _info(run_dir / "checkpoints" / "last")["step"] == 20


def test_resume_of_finished_run_keeps_files_untouched(reference_run, cli, one_line_error, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    weights_before = (run_dir / "checkpoints" / "last" / "model.safetensors").read_bytes()
    line = one_line_error(cli("pretrain", "--resume", run_dir, "--quiet"), "already finished", "max_steps")
    assert f"step {N_STEPS}" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").read_bytes() == weights_before


# ---------------------------------------------------------------------------------------------
# Gradient accumulation


def _first_steps(make_recipe, name: str, batch_size: int, accum: int, steps: int = 3):
    recipe = make_recipe(name, train={"batch_size": batch_size, "grad_accum": accum})
    cfg = load_pretrain_config(recipe)
    run = PretrainRun(cfg)
    try:
        trainer = run.make_trainer(progress=False)
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e-3
        init = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        batches = run.stream()(1)
        losses = []
        for step in range(steps):
            micro_batches = [next(batches) for _ in range(accum)]
            assert all(x.shape == (batch_size, cfg.model.block_size) for x, _ in micro_batches)
            loss, *_ = trainer.train_step(micro_batches)
            losses.append(float(loss))
        return losses, init, {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    finally:
        run.logger.close()


def test_gradient_accumulation_equals_large_batch(make_recipe):
    """2 micro-batches of 4 see the same samples as one batch of 8 and give the same update."""
    losses_accum, init_accum, weights_accum = _first_steps(make_recipe, "accum", batch_size=4, accum=2)
    losses_big, init_big, weights_big = _first_steps(make_recipe, "big", batch_size=8, accum=1)
    for name, tensor in init_big.items():  # same seed, same initialisation
        assert torch.equal(init_accum[name], tensor), name
    assert losses_accum == pytest.approx(losses_big, abs=1e-5)
    for name, tensor in weights_big.items():
        torch.testing.assert_close(weights_accum[name], tensor, atol=1e-5, rtol=0)
    # ... and the weights did move (a no-op step would pass the comparison trivially).
    moved = max((weights_big[k] - init_big[k]).abs().max().item() for k in init_big)
    assert moved > 1e-3


# ---------------------------------------------------------------------------------------------
# Determinism


def _metric_values(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss"))
            for r in _rows(run_dir)]


def test_same_seed_same_metrics_other_seed_differs(make_recipe, cli):
    sections = {"model": {"dropout": 0.1}, "train": {"max_steps": 10, "log_interval": 2, "eval_every": 5}}
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        recipe = make_recipe(name, **sections)
        assert cli("pretrain", "--config", recipe, "--quiet", "--seed", str(seed)).code == 0
        runs[name] = recipe.parent / "runs" / name
    assert _metric_values(runs["a"]) == _metric_values(runs["b"])
    assert_same_weights(runs["a"] / "checkpoints" / "last", runs["b"] / "checkpoints" / "last")
    a_losses = [r["loss"] for r in _train_rows(runs["a"])]
    c_losses = [r["loss"] for r in _train_rows(runs["c"])]
    assert len(a_losses) == len(c_losses) >= 5
    assert a_losses != c_losses
    assert _weights(runs["a"] / "checkpoints" / "last")["transformer.wte.weight"].ne(
        _weights(runs["c"] / "checkpoints" / "last")["transformer.wte.weight"]).any()


# ---------------------------------------------------------------------------------------------
# Non-finite loss


def _assert_stopped_on_nan(result, run_dir: Path, nan_step: int | None) -> int:
    assert result.code == 2, result
    assert "Traceback" not in result.err
    errors = [line for line in result.err_lines if line.startswith("error:")]
    assert len(errors) == 1 and result.err_lines[-1] == errors[0], result
    m = re.search(r"training loss became (nan|inf|-inf) at step (\d+)", errors[0])
    assert m, errors[0]
    step = int(m.group(2))
    if nan_step is not None:
        assert step == nan_step
    assert "checkpoints/last (step 0)" in errors[0]
    # The last good checkpoint (step 0, written before the NaN) is intact and loadable; nothing
    # was checkpointed after the NaN.
    for name in ("last", "best"):
        directory = run_dir / "checkpoints" / name
        assert _info(directory)["step"] == 0
        model = load_model(directory)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (run_dir / "checkpoints" / "last" / "trainer_state.pt").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"]
    # No metrics row at or after the bad step, and every logged loss is finite.
    rows = _rows(run_dir)
    assert all(r["step"] < step for r in rows if "loss" in r)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    return step


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(make_recipe, cli, monkeypatch):
    """The loss turns NaN at step 7 (between checkpoints): exit 2, the error names step 7."""
    recipe = make_recipe("nan", train={"max_steps": 20})
    run_dir = recipe.parent / "runs" / "nan"
    calls = {"train": 0}
    original = GPT.forward

    def forward(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        if self.training and loss is not None:
            calls["train"] += 1
            if calls["train"] >= 7:  # the 7th optimizer step and after
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    result = cli("pretrain", "--config", recipe, "--quiet")
    _assert_stopped_on_nan(result, run_dir, nan_step=7)
    assert [r["step"] for r in _train_rows(run_dir)] == [5]


def test_nan_from_huge_learning_rate(make_recipe, cli):
    recipe = make_recipe("huge-lr")
    run_dir = recipe.parent / "runs" / "huge-lr"
    result = cli("pretrain", "--config", recipe, "--quiet", "--train.lr", "1e30", "--train.min_lr", "0")
    step = _assert_stopped_on_nan(result, run_dir, nan_step=None)
    assert 1 <= step <= 10


# ---------------------------------------------------------------------------------------------
# Run directory naming


def test_default_run_dir_is_named_after_recipe(make_recipe, cli, tmp_path, monkeypatch):
    recipe = make_recipe("my-recipe", out_dir="", train={"max_steps": 2, "eval_every": 2})
    monkeypatch.chdir(tmp_path)
    result = cli("pretrain", "--config", recipe, "--quiet")
    assert result.code == 0, result
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and re.fullmatch(r"my-recipe-\d{8}-\d{6}", runs[0].name), runs
    assert (tmp_path / "runs" / "latest").resolve() == runs[0].resolve()  # runs/latest: the run just started
    assert (runs[0] / "checkpoints" / "last" / "model.safetensors").is_file()
    assert f"run directory {runs[0].relative_to(tmp_path)}" in result.out
