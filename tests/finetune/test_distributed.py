"""Fine-tuning under torchrun (DDP, gloo, 2 CPU processes): the same steps as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_ddp_text_classification_equals_one_process_with_accumulation(bert_base, sentiment_csv, tmp_path) -> None:
    """2 ranks x batch 4 take micro-batches (0, 1), (2, 3), ... of the same shuffled order, and
    DDP averages their gradients: the same steps as one process with grad_accum 2."""
    args = ["finetune", "--task", "text-classification", "--init_from", str(bert_base), "--data", str(sentiment_csv),
            "--epochs", "2", "--batch_size", "4", "--lr", "1e-3", "--dropout", "0", "--dtype", "float32",
            "--device", "cpu", "--log_interval", "1", "--seed", "0", "--quiet"]
    single = _run([sys.executable, "-m", "fromzero", *args, "--out_dir", str(tmp_path / "single"), "--grad_accum", "2"])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", *args,
                "--out_dir", str(tmp_path / "ddp"), "--dist.strategy", "ddp"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("done: run directory") == 1  # rank 1 prints nothing

    a, b = _rows(tmp_path / "single"), _rows(tmp_path / "ddp")
    steps_a = {r["step"]: r["loss"] for r in a if "loss" in r}
    steps_b = {r["step"]: r["loss"] for r in b if "loss" in r}
    assert sorted(steps_a) == sorted(steps_b) and len(steps_a) >= 40
    for step in steps_a:
        assert steps_a[step] == pytest.approx(steps_b[step], abs=1e-5), step
    val_a = [r["val_f1_macro"] for r in a if "val_f1_macro" in r]
    val_b = [r["val_f1_macro"] for r in b if "val_f1_macro" in r]
    assert val_a == pytest.approx(val_b, abs=1e-6) and len(val_a) == 2
    wa = load_file(str(tmp_path / "single" / "checkpoints" / "best" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "checkpoints" / "best" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["accuracy"] == pytest.approx(
        json.loads((tmp_path / "single" / "metrics.json").read_text())["accuracy"])


def test_fsdp_is_refused_for_fine_tuning(cli, one_line_error, bert_base, sentiment_csv, tmp_path) -> None:
    result = cli("finetune", "--task", "text-classification", "--init_from", str(bert_base), "--data",
                 str(sentiment_csv), "--out_dir", str(tmp_path / "x"), "--dist.strategy", "fsdp", "--quiet")
    one_line_error(result, "dist_strategy", "fsdp is for pretraining")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_ddp_run_resumes_where_it_stopped(bert_base, sentiment_csv, tmp_path) -> None:
    """A 2-rank run stopped by Ctrl-C (SIGINT to torchrun, which passes a SIGTERM to every rank;
    the ranks agree on the step to stop after) and resumed under torchrun: every rank skips the
    micro-batches it already trained on and takes up its own RNG (dropout on: the ranks' draws
    differ), and the run ends with the weights of a 2-rank run never stopped."""
    import signal
    import time

    args = ["finetune", "--task", "text-classification", "--init_from", str(bert_base), "--data", str(sentiment_csv),
            "--epochs", "3", "--batch_size", "4", "--lr", "1e-3", "--dropout", "0.1", "--dtype", "float32",
            "--device", "cpu", "--log_interval", "1", "--seed", "0", "--quiet", "--dist.strategy", "ddp"]
    launch = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero"]
    straight = _run([*launch, *args, "--out_dir", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cut = subprocess.Popen([*launch, *args, "--out_dir", str(tmp_path / "cut")], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and cut.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    cut.send_signal(signal.SIGINT)
    out, err = cut.communicate(timeout=300)
    assert "stopped: interrupted at step" in out, out + err[-3000:]
    resumed = _run([*launch, "finetune", "--resume", str(tmp_path / "cut"), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming at step") == 1  # said once, by rank 0
    steps_a = {r["step"]: r["loss"] for r in _rows(tmp_path / "straight") if "loss" in r}
    steps_b = {r["step"]: r["loss"] for r in _rows(tmp_path / "cut") if "loss" in r}
    assert steps_a == steps_b and len(steps_a) >= 60
    wa = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "training_weights.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "training_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
