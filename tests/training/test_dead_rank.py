"""A rank that dies mid-run: the survivors stop with a clear error instead of hanging, and the
last checkpoint stays whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _rank_pid(out_dir: Path, rank: int) -> int | None:
    """The pid of the worker process with RANK=rank that trains into out_dir."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if str(out_dir).encode() in cmdline and b"torchrun" not in cmdline[0] and b"\0RANK=%d\0" % rank in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not TORCHRUN.exists() or not Path("/proc/self/environ").exists(),
                    reason="needs torchrun and /proc")
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_rank_ends_the_run_with_an_error_not_a_hang(make_recipe, tmp_path: Path, how: str) -> None:
    """Rank 1 is killed (its sockets close) or frozen with SIGSTOP (it just stops answering, as
    a hung node does): rank 0 fails within FROMZERO_DIST_TIMEOUT with one clear line, and the
    last checkpoint is still whole."""
    from fromzero.checkpoint import load_model

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), FROMZERO_DIST_TIMEOUT="15")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", "pretrain",
           "--config", str(make_recipe()), "--out_dir", str(out), "--dist.strategy", "ddp",
           "--train.max_steps", "100000", "--train.eval_every", "20", "--train.eval_batches", "2",
           "--train.device", "cpu", "--train.compile", "false", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim = None
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "last" / "info.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        victim = _rank_pid(out, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        _, err = proc.communicate(timeout=180)  # a hang would end here, failing the test
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim is not None and how == "hung":
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    rank0 = [line for line in err.splitlines() if "error: rank 0 lost contact" in line]
    assert rank0 and "--resume" in rank0[0], err[-3000:]
    assert "Traceback" not in "\n".join(line for line in err.splitlines() if line.startswith("[rank0]"))
    assert load_model(out / "checkpoints" / "last").transformer.wte.weight.isfinite().all()
