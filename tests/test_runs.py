"""``fromzero runs`` and ``runs/latest``: what a user sees of the runs they made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from fromzero.evaluation.runs import RUNNING_FILE, describe_run, list_runs


def _interrupt_at(monkeypatch, k: int) -> None:
    """Ctrl-C (a real SIGINT) right after optimizer step k."""
    from fromzero.training.trainer import Trainer

    original = Trainer.train_step

    def step_then_interrupt(self, micro_batches):
        out = original(self, micro_batches)
        if self.progress.step + 1 == k:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)


def test_runs_lists_finished_stopped_and_killed_runs_with_their_best_metric(make_recipe, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    done = make_recipe("done", out_dir="runs/done", train={"max_steps": 10, "eval_every": 5})
    assert cli("pretrain", "--config", done, "--quiet").code == 0
    assert os.readlink(tmp_path / "runs" / "latest") == "done"

    cut = make_recipe("cut", out_dir="runs/cut", train={"max_steps": 20, "eval_every": 5})
    with monkeypatch.context() as m:
        _interrupt_at(m, 7)
        assert cli("pretrain", "--config", cut, "--quiet").code == 130
    assert os.readlink(tmp_path / "runs" / "latest") == "cut"
    assert not (tmp_path / "runs" / "cut" / RUNNING_FILE).exists()  # the loop's marker goes when it ends

    # A run killed with SIGKILL leaves its marker behind, naming a process that is gone.
    killed = tmp_path / "runs" / "killed"
    subprocess.run(["cp", "-r", str(tmp_path / "runs" / "cut"), str(killed)], check=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (killed / RUNNING_FILE).write_text(f"{dead.pid} {os.uname().nodename}\n")
    # ... and a live one is running.
    live = tmp_path / "runs" / "live"
    subprocess.run(["cp", "-r", str(tmp_path / "runs" / "cut"), str(live)], check=True)
    (live / RUNNING_FILE).write_text(f"{os.getpid()} {os.uname().nodename}\n")

    rows = {r.name: r for r in list_runs(tmp_path / "runs")}
    assert set(rows) == {"done", "cut", "killed", "live"}  # the latest link is not a second row
    assert rows["done"].status == "finished" and rows["done"].step == 10
    assert rows["cut"].status == "stopped at step 7" and rows["killed"].status == "stopped at step 7"
    assert rows["live"].status == "running"
    val = [json.loads(x)["val_loss"] for x in (tmp_path / "runs/done/metrics.jsonl").read_text().splitlines()
           if "val_loss" in x]
    assert rows["done"].metric == "val_loss" and rows["done"].best == min(val)

    result = cli("runs")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["run", "task", "status", "best", "age"]
    assert any(line.startswith("done ") and "finished" in line and f"val_loss {min(val):.4f}" in line for line in lines)
    listed = json.loads(cli("runs", "--json").out)
    assert {r["name"]: r["status"] for r in listed}["cut"] == "stopped at step 7"


def test_a_finished_fine_tune_reports_its_monitored_metric(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "genre"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: text-classification\ntrain: {monitor: val_f1_macro}\n")
    rows = [{"step": 5, "val_f1_macro": 0.5, "val_loss": 0.9}, {"step": 10, "val_f1_macro": 0.7, "val_loss": 1.1},
            {"step": 15, "val_f1_macro": 0.6, "val_loss": 0.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16, "lo')
    (run / "metrics.json").write_text("{}")
    row = describe_run(run)
    assert (row.task, row.status, row.metric, row.best) == ("text-classification", "finished", "val_f1_macro", 0.7)


def test_latest_never_replaces_a_folder_of_the_user(tmp_path: Path) -> None:
    from fromzero.evaluation.runs import point_latest

    (tmp_path / "runs" / "latest").mkdir(parents=True)
    (tmp_path / "runs" / "latest" / "mine.txt").write_text("keep")
    (tmp_path / "runs" / "a").mkdir()
    point_latest(tmp_path / "runs" / "a")
    assert (tmp_path / "runs" / "latest" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "latest"]


def test_no_runs_says_so(cli, tmp_path: Path) -> None:
    result = cli("runs", "--dir", str(tmp_path / "nothing"))
    assert result.code == 0 and "no runs in" in result.out
