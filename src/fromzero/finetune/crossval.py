"""``fromzero crossval``: stratified K-fold cross-validation of a classification recipe.

The train and val splits are pooled and cut into K stratified folds (seeded); fold k fine-tunes
on the others and validates on fold k, and every fold's model scores the (never pooled) test
split. ``<out_dir>`` holds ``fold-K/`` (a complete run each), ``folds/`` (each fold's data: JSONL
for texts, symlinks for images) and ``crossval.json`` (per-fold metrics, mean / std of each).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError
from fromzero.tasks import get_task


def _fold_indices(labels: list[str], folds: int, seed: int) -> list[list[int]]:
    from sklearn.model_selection import StratifiedKFold

    smallest = min(labels.count(c) for c in set(labels))
    if smallest < folds:
        raise FromzeroError(f"--folds {folds} is more than the {smallest} examples of the rarest class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [list(held) for _, held in splitter.split([[0]] * len(labels), labels)]


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows),
                    encoding="utf-8")


def _text_folds(cfg: Any, folds: int, data_root: Path) -> list[str]:
    from fromzero.data.classification import load_text_classification

    splits = load_text_classification(cfg.data, cfg.text_column, cfg.label_column, cfg.val_fraction,
                                      cfg.test_fraction, cfg.seed)
    pool = splits["train"] + splits["val"]
    held = _fold_indices([lab for _, lab in pool], folds, cfg.seed)
    sources = []
    for k, rows in enumerate(held, start=1):
        fold_dir = data_root / f"fold-{k}"
        inside = set(rows)
        _write_jsonl(fold_dir / "train.jsonl", [r for i, r in enumerate(pool) if i not in inside])
        _write_jsonl(fold_dir / "val.jsonl", [pool[i] for i in rows])
        _write_jsonl(fold_dir / "test.jsonl", splits["test"])
        sources.append(str(fold_dir))
    return sources


def _image_folds(cfg: Any, folds: int, data_root: Path) -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from fromzero.finetune.images import MEMORY_DATASETS, builtin_image_data

    if cfg.data_dir in MEMORY_DATASETS:
        raise FromzeroError(f"cross-validation reads image folders: export the built-in {cfg.data_dir} first "
                            f"(fromzero data export-images {cfg.data_dir} DIR) and give DIR as data.source")
    root = builtin_image_data(cfg.data_dir)
    pool: list[tuple[Path, str]] = []
    for split in ("train", "val"):
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            pool += [(f, class_dir.name) for f in sorted(class_dir.iterdir()) if f.suffix.lower() in IMG_EXTENSIONS]
    held = _fold_indices([c for _, c in pool], folds, cfg.seed)
    sources = []
    for k, rows in enumerate(held, start=1):
        fold_dir = data_root / f"fold-{k}"
        inside = set(rows)
        for i, (path, label) in enumerate(pool):
            split = "val" if i in inside else "train"
            link = fold_dir / split / label / f"{i:06d}{path.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), link)
        os.symlink((root / "test").resolve(), fold_dir / "test")
        sources.append(str(fold_dir))
    return sources


def crossval(task: str, cfg: Any, folds: int) -> dict[str, Any]:
    """Run the K folds; write and return {"folds": [...], "mean": {...}, "std": {...}}."""
    import shutil

    from fromzero.evaluation.metrics import aggregate_folds, write_metrics_json
    from fromzero.finetune.recipe import run_finetune
    from fromzero.training.trainer import default_run_dir

    if folds < 2:
        raise FromzeroError(f"--folds must be at least 2, got {folds}")
    about = get_task(task)
    if about is None or not about.is_classifier:
        raise FromzeroError(f"crossval is for classification tasks, not {task!r}")
    out = Path(cfg.out_dir) if cfg.out_dir else default_run_dir(f"crossval-{task}")
    if out.exists() and any(out.iterdir()):
        if not cfg.force:
            raise FromzeroError(f"{out} already exists; pass --force to start over")
        shutil.rmtree(out)
    data_root = out / "folds"
    sources = (_text_folds if about.inputs == "text" else _image_folds)(cfg, folds, data_root)
    results = []
    for k, source in enumerate(sources, start=1):
        print(f"fold {k}/{folds}")
        fold_cfg = copy.deepcopy(cfg)
        setattr(fold_cfg, about.data_key, source)  # data (texts) or data_dir (images)
        fold_cfg.out_dir, fold_cfg.force = str(out / f"fold-{k}"), True
        summary = run_finetune(task, fold_cfg)
        if summary.get("interrupted"):  # Ctrl-C / SIGTERM: stop the whole cross-validation (exit 130)
            print(f"stopped: fold {k}/{folds} interrupted at step {summary.get('steps')}; cross-validation "
                  f"does not resume: run it again with --force")
            raise KeyboardInterrupt
        val = summary["val"]
        row = {"fold": k, **{f"val_{m}": val[m] for m in ("accuracy", "f1_macro", "loss") if m in val}}
        row.update({f"test_{m}": summary["test"][m] for m in ("accuracy", "f1_macro", "f1_weighted", "loss")})
        results.append(row)
    aggregate = aggregate_folds([{k: v for k, v in r.items() if k != "fold"} for r in results])
    report = {"task": task, "folds": results, **aggregate}
    write_metrics_json(report, out / "crossval.json")
    for key, stats in aggregate["metrics"].items():
        print(f"{key}: {stats['mean']:.4f} +- {stats['std']:.4f}")
    print(f"crossval: {out / 'crossval.json'}")
    return report
