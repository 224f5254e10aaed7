"""What the web interface shows of a runs folder: the table, one run in detail, its metric rows
read incrementally, and files inside it -- never a file outside it.

Everything is read from the run directory's own files (config.yaml, metrics.jsonl, metrics.json,
checkpoints/*/info.json, plots/*.png) through :mod:`fromzero.evaluation.runs`, so a run of any age
shows, and a run being trained by another process shows its new rows at the next poll.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fromzero.evaluation.runs import describe_run, list_runs

# Files a browser may fetch from a run directory: what runs write for people to look at.
SERVABLE = {".png": "image/png", ".jpg": "image/jpeg", ".svg": "image/svg+xml", ".json": "application/json",
            ".jsonl": "application/jsonl", ".yaml": "text/plain; charset=utf-8", ".csv": "text/plain; charset=utf-8",
            ".txt": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8"}
MAX_ROWS_PER_READ = 20000  # metrics rows one poll returns at most (the next poll continues)


def inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it names an existing file inside ``root`` after every symlink is
    followed; None for anything else (``..``, absolute paths, links leading out, folders)."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")):
        return None
    parts = relative.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    base = root.resolve()
    try:
        target = (base / "/".join(parts)).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


def _model_name(config: dict) -> str:
    """A short name for the model of a run's config.yaml (its base checkpoint, arch or size)."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    for key in ("init_from", "name", "base", "checkpoint", "arch"):
        value = model.get(key)
        if isinstance(value, str) and value:
            parts = Path(value).parts
            if "checkpoints" in parts[1:]:  # runs/NAME/checkpoints/best -> NAME:best
                i = parts.index("checkpoints", 1)
                return f"{parts[i - 1]}:{parts[i + 1]}" if i + 1 < len(parts) else parts[i - 1]
            return Path(value).name if "/" in value else value
    if "n_layer" in model:
        return f"GPT {model.get('n_layer')}L x {model.get('n_embd')}"
    return "-"


def _read_config(run_dir: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_elapsed(path: Path) -> float | None:
    """elapsed_s of the last row of metrics.jsonl (reads only its tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            value = json.loads(line).get("elapsed_s")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            return float(value)
    return None


def simple_status(status: str, run_dir: Path) -> str:
    """running | finished | stopped | failed (a run that started but left no checkpoint)."""
    if status in ("running", "finished"):
        return status
    if status.startswith("stopped"):
        return "stopped"
    return "failed" if (run_dir / "metrics.jsonl").exists() or time.time() - run_dir.stat().st_mtime > 600 \
        else "starting"


def run_table(root: Path) -> list[dict[str, Any]]:
    """One dict per run under ``root`` (the Runs page), newest first."""
    rows = []
    for row in list_runs(root):
        run_dir = root / row.name
        config = _read_config(run_dir)
        rows.append({
            "name": row.name, "task": row.task, "model": _model_name(config),
            "status": simple_status(row.status, run_dir), "detail": row.status, "step": row.step,
            "metric": row.metric, "best": row.best, "duration_s": _last_elapsed(run_dir / "metrics.jsonl"),
            "age_s": row.age_s,
        })
    return rows


def run_names(root: Path) -> set[str]:
    return {row.name for row in list_runs(root)}


def run_dir_of(root: Path, name: str) -> Path | None:
    """The directory of the run listed as ``name`` (None when no listed run has that name)."""
    return root / name if name in run_names(root) else None


def _checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    base = run_dir / "checkpoints"
    if not base.is_dir():
        return out
    for child in sorted(base.iterdir()):
        if not child.is_dir():
            continue
        try:
            info = json.loads((child / "info.json").read_text())
        except (OSError, ValueError):
            info = {}
        size = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
        out.append({"name": child.name, "step": info.get("step"), "task": info.get("task"),
                    "path": str(child), "size_bytes": size})
    return out


def run_detail(root: Path, name: str) -> dict[str, Any] | None:
    """The Run page: the row, config (text and parsed), checkpoints, plots and test metrics."""
    run_dir = run_dir_of(root, name)
    if run_dir is None:
        return None
    row = describe_run(run_dir)
    if row is None:
        return None
    try:
        config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        config_text = ""
    plots = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "plots").glob("*.png")) \
        if (run_dir / "plots").is_dir() else []
    try:
        test_metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        test_metrics = None
    return {
        "name": name, "task": row.task, "status": simple_status(row.status, run_dir), "detail": row.status,
        "step": row.step, "metric": row.metric, "best": row.best, "model": _model_name(_read_config(run_dir)),
        "duration_s": _last_elapsed(run_dir / "metrics.jsonl"), "config_text": config_text,
        "config": _read_config(run_dir), "checkpoints": _checkpoints(run_dir), "plots": plots,
        "test_metrics": test_metrics if isinstance(test_metrics, dict) else None,
    }


def read_metrics(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Rows of metrics.jsonl from byte ``offset`` on, and the offset to continue from (a line still
    being written is left for the next read). An offset past the end (a restarted run) starts over."""
    path = run_dir / "metrics.jsonl"
    rows: list[dict] = []
    try:
        size = path.stat().st_size
    except OSError:
        return rows, 0
    if offset > size or offset < 0:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) >= MAX_ROWS_PER_READ:
                break
    return rows, offset


def config_diff(configs: dict[str, dict]) -> list[dict[str, Any]]:
    """The dotted keys whose values differ between the configs, with each run's value."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix.rstrip("."): d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    flats = {name: flat(c) for name, c in configs.items()}
    keys = sorted(set().union(*flats.values())) if flats else []
    rows = []
    for key in keys:
        values = {name: f.get(key, None) for name, f in flats.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            rows.append({"key": key, "values": values})
    return rows
