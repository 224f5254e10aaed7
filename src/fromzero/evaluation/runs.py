"""What is in ``runs/``: one row per run directory (``fromzero runs``), and the ``runs/latest`` link.

A run directory is what ``pretrain``, ``finetune`` and ``tune`` write: ``config.yaml`` (its
task), ``metrics.jsonl`` (training and validation rows), ``checkpoints/{best,last}`` and, for a
finished fine-tune, ``metrics.json``. The listing reads only those files, so it is cheap, works on
runs of any age and never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

LATEST = "latest"
RUNNING_FILE = ".running"  # "<pid> <host>" while a training loop works in the run directory


@dataclass
class RunRow:
    name: str
    task: str
    status: str  # finished | stopped at step N | running | started
    step: int | None
    metric: str  # the monitored validation metric ("" when nothing was evaluated yet)
    best: float | None
    age_s: float


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _step(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / "info.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl ([] if it cannot be read)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
    except OSError:
        pass
    return rows


def describe_run(run_dir: Path, now: float | None = None) -> RunRow | None:
    """The row of one run directory (None if ``run_dir`` is not one)."""
    config = _read_yaml(run_dir / "config.yaml")
    if not config:
        return None
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    task = str(config.get("task") or ("pretrain" if "model" in config and train else "?"))
    metric = str(train.get("monitor") or config.get("monitor") or "val_loss")
    higher = metric != "val_loss" and "loss" not in metric
    rows = read_rows(run_dir / "metrics.jsonl")
    values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
    best = (max(values) if higher else min(values)) if values else None
    step = _step(run_dir / "checkpoints" / "last")
    logged = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    if step is None and logged:
        step = max(logged)
    stamp = max((p.stat().st_mtime for p in (run_dir / "metrics.jsonl", run_dir / "config.yaml") if p.exists()),
                default=run_dir.stat().st_mtime)
    age = (now or time.time()) - stamp
    if task == "pretrain":
        target = train.get("max_steps") or train.get("max_iters")
        finished = step is not None and isinstance(target, int) and step >= target
    else:
        finished = (run_dir / "metrics.json").is_file()
    if finished:
        status = "finished"
    elif is_running(run_dir):
        status = "running"
    elif step is not None and (run_dir / "checkpoints" / "last").is_dir():
        status = f"stopped at step {step}"
    else:
        status = "started"
    return RunRow(run_dir.name, task, status, step, metric if values else "", best, age)


@contextlib.contextmanager
def mark_running(run_dir: Path | None) -> Iterator[None]:
    """``.running`` (pid and host) in ``run_dir`` while the block runs, so ``fromzero runs`` can
    tell a running run from one that was stopped or killed (kill -9 leaves the file, but its
    process is gone)."""
    marker = Path(run_dir) / RUNNING_FILE if run_dir is not None else None
    if marker is not None:
        try:
            marker.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError:
            marker = None
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def is_running(run_dir: Path) -> bool:
    """Whether the process that marked ``run_dir`` as running is alive (on another host: assumed)."""
    try:
        pid, host = (run_dir / RUNNING_FILE).read_text().split()
        if host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def list_runs(root: Path) -> list[RunRow]:
    """Every run directory directly under ``root`` (and one level down, as tune's trials are),
    newest first; the ``latest`` link is not listed twice."""
    found: list[RunRow] = []
    if not root.is_dir():
        return found
    now = time.time()
    for child in sorted(root.iterdir()):
        if child.name == LATEST or not child.is_dir():
            continue
        row = describe_run(child, now)
        if row is not None:
            found.append(row)
            continue
        for grandchild in sorted(child.iterdir()):  # e.g. runs/tune-<recipe>/trial-003
            if grandchild.is_dir() and (row := describe_run(grandchild, now)) is not None:
                row.name = f"{child.name}/{grandchild.name}"
                found.append(row)
    return sorted(found, key=lambda r: r.age_s)


def format_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def format_runs(rows: list[RunRow]) -> str:
    """An aligned table (plain text: readable in a terminal, a log or a pipe)."""
    table = [("run", "task", "status", "best", "age")]
    for r in rows:
        best = f"{r.metric} {r.best:.4f}" if r.best is not None else "-"
        table.append((r.name, r.task, r.status, best, format_age(r.age_s)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def runs_json(rows: list[RunRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


def point_latest(run_dir: Path) -> None:
    """Make ``runs/latest`` point at ``run_dir`` when it is a run under a ``runs`` folder, so the
    docs and a user's next command can say ``runs/latest`` instead of a timestamped name. Replaced
    atomically; where symlinks are not allowed, nothing happens."""
    run_dir = Path(run_dir)
    if run_dir.parent.name != "runs" or run_dir.name == LATEST:
        return
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
