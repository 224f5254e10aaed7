"""DDP under torchrun on CPU (gloo, 2 processes): the same samples, losses and weights as one
process with the whole batch; gradient accumulation with no_sync; launching errors."""

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
COMMON = ["--train.max_steps", "12", "--train.decay_steps", "12", "--train.log_interval", "1",
          "--train.eval_every", "6", "--train.eval_batches", "4", "--train.dtype", "float32",
          "--train.compile", "false", "--train.device", "cpu", "--quiet"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


def run_single(recipe: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "fromzero", "pretrain", "--config", str(recipe), "--out_dir", str(out),
           *COMMON, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def run_ddp(recipe: Path, out: Path, *extra: str) -> None:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", "pretrain",
           "--config", str(recipe), "--out_dir", str(out), "--dist.strategy", "ddp", *COMMON, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def assert_same_run(a: Path, b: Path, same_val_batches: bool = True) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5), step
    if same_val_batches:  # validation batches are micro-batch sized: equal only without accumulation
        assert val_losses(a) == pytest.approx(val_losses(b), abs=1e-5)
    wa = load_file(str(a / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=0)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(make_recipe, tmp_path: Path) -> None:
    recipe = make_recipe()
    run_single(recipe, tmp_path / "single", "--train.batch_size", "4")
    run_ddp(recipe, tmp_path / "ddp", "--train.batch_size", "2")
    assert_same_run(tmp_path / "single", tmp_path / "ddp")
    # Only rank 0 wrote the run directory; it is complete.
    assert (tmp_path / "ddp" / "config.yaml").is_file() and (tmp_path / "ddp" / "plots" / "loss.png").is_file()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_ddp_with_gradient_accumulation_equals_one_big_batch(make_recipe, tmp_path: Path) -> None:
    recipe = make_recipe()
    run_single(recipe, tmp_path / "single", "--train.batch_size", "4")
    run_ddp(recipe, tmp_path / "ddp", "--train.batch_size", "1", "--train.grad_accum", "2")
    assert_same_run(tmp_path / "single", tmp_path / "ddp", same_val_batches=False)


def test_ddp_without_torchrun_says_how_to_launch(cli, one_line_error, make_recipe, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    result = cli("pretrain", "--config", make_recipe(), "--dist.strategy", "ddp", "--quiet")
    one_line_error(result, "torchrun --nproc_per_node")


def test_unknown_strategy_is_refused(cli, one_line_error, make_recipe) -> None:
    result = cli("pretrain", "--config", make_recipe(), "--dist.strategy", "horovod", "--quiet")
    one_line_error(result, "dist.strategy", "ddp")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_ddp_run_resumed_continues_with_identical_losses(make_recipe, tmp_path: Path) -> None:
    recipe = make_recipe()
    run_ddp(recipe, tmp_path / "straight", "--train.batch_size", "2")
    run_ddp(recipe, tmp_path / "cut", "--train.batch_size", "2", "--train.max_steps", "6")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", "pretrain",
           "--resume", str(tmp_path / "cut"), "--train.max_steps", "12", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "cut")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_fsdp_two_ranks_equal_one_process_and_resume_at_another_world_size(make_recipe, tmp_path: Path) -> None:
    """FSDP2 shards parameters, gradients and optimizer state; the checkpoint is the full,
    unsharded state, so a run cut at step 6 resumes in one plain process and ends as the
    straight 1-process run does."""
    recipe = make_recipe()
    run_single(recipe, tmp_path / "single", "--train.batch_size", "4")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", "pretrain",
           "--config", str(recipe), "--out_dir", str(tmp_path / "fsdp"), "--dist.strategy", "fsdp", *COMMON,
           "--train.batch_size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "fsdp")

    cut = [c if c != "12" else "6" for c in cmd[:-2]]  # the same run, max_steps 6 (lr schedule still to 12)
    cut[cut.index(str(tmp_path / "fsdp"))] = str(tmp_path / "cut")
    cut[cut.index("--train.decay_steps") + 1] = "12"
    result = subprocess.run([*cut, "--train.batch_size", "2"], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resume = [sys.executable, "-m", "fromzero", "pretrain", "--resume", str(tmp_path / "cut"),
              "--train.max_steps", "12", "--dist.strategy", "none", "--train.batch_size", "4", "--quiet"]
    result = subprocess.run(resume, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "cut")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_fsdp_sharded_checkpoint_resumes_in_one_process_and_a_missing_shard_is_refused(
        make_recipe, tmp_path: Path) -> None:
    """dist.checkpoint sharded: each rank writes its own shard files (nothing gathered); one
    plain process resumes from them and ends as the straight 1-process run; load_model reads
    them; a checkpoint that lost a shard is refused with one line, not half loaded."""
    import shutil

    from fromzero.checkpoint import load_model

    recipe = make_recipe()
    run_single(recipe, tmp_path / "single", "--train.batch_size", "4")
    cut = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", "pretrain",
           "--config", str(recipe), "--out_dir", str(tmp_path / "cut"), "--dist.strategy", "fsdp",
           "--dist.checkpoint", "sharded", *COMMON, "--train.batch_size", "2", "--train.max_steps", "6"]
    result = subprocess.run(cut, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "cut" / "checkpoints" / "last"
    shards = sorted(p.name for p in (last / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (last / "model.safetensors").exists()
    model = load_model(last)
    assert model.transformer.wte.weight.abs().sum() > 0 and model.lm_head.weight is model.transformer.wte.weight

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "cut", broken)
    (broken / "checkpoints" / "last" / "sharded" / "__1_0.distcp").unlink()
    resume = [sys.executable, "-m", "fromzero", "pretrain", "--train.max_steps", "12", "--dist.strategy", "none",
              "--train.batch_size", "4", "--quiet", "--resume"]
    result = subprocess.run([*resume, str(broken)], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing shard __1_0.distcp" in lines[0], lines

    result = subprocess.run([*resume, str(tmp_path / "cut")], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "single", tmp_path / "cut")
