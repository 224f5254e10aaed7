"""Metrics for classifiers, language models and pronunciations (G2P), cross-validation summaries, metrics.json.

scikit-learn does the counting (``precision_recall_fscore_support``, ``confusion_matrix``,
``log_loss``); this module decides class order and names, checks the input and shapes the
result into one plain dict that serialises to JSON (:func:`write_metrics_json`).

Classes
-------
``y_true`` / ``y_pred`` hold either ints or label strings (not a mix).

- With ``labels``: it fixes the class order and the names. Ints are indices into ``labels``;
  strings must be members of ``labels``. Classes that never occur still get a row (support 0).
- Without ``labels``: the classes are the sorted union of the values seen (scikit-learn's
  convention), named ``str(value)``. If ``probs`` is given with int targets, the classes are
  ``0 .. C-1`` (one per column of ``probs``); string targets with ``probs`` need ``labels``,
  because nothing else says which column is which class.

Undefined precision/recall (a class never predicted / never present) count as 0
(``zero_division=0``), so macro averages are pulled down by such classes rather than hidden.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from fromzero.errors import FromzeroError
from fromzero.checkpoint import atomic_write_text

__all__ = [
    "classification_metrics",
    "language_model_metrics",
    "edit_distance",
    "pronunciation_error_rates",
    "aggregate_folds",
    "write_metrics_json",
    "to_jsonable",
    "format_report",
]

# Scalar keys written by classification_metrics, in report order.
_AVERAGES = ("macro", "weighted")


def _as_list(values: Any, name: str) -> list[Any]:
    """A flat Python list from a list/tuple, numpy array or torch tensor of labels."""
    if isinstance(values, (str, bytes)):
        raise FromzeroError(f"{name} must be a sequence of labels, not a single string")
    # numpy arrays and torch tensors: .tolist() gives Python ints/strs. Plain lists are *not*
    # passed through np.asarray, which would silently turn [0, "cat"] into ["0", "cat"].
    try:
        out = values.tolist() if hasattr(values, "tolist") else list(values)
    except TypeError:
        raise FromzeroError(f"{name} must be a sequence of labels, got {type(values).__name__}") from None
    if not isinstance(out, list) or any(isinstance(v, (list, tuple)) for v in out):
        raise FromzeroError(f"{name} must be a 1-D sequence of labels")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _kind(values: list[Any], name: str) -> str:
    """'int' or 'str' — the type of every element of a non-empty label list."""
    for v in values:
        if not (isinstance(v, str) or _is_int(v)):
            raise FromzeroError(f"{name} must hold ints or label strings, found {v!r} ({type(v).__name__})")
    if all(_is_int(v) for v in values):
        return "int"
    if all(isinstance(v, str) for v in values):
        return "str"
    raise FromzeroError(f"{name} mixes ints and label strings")


def _encode(
    y_true: Any, y_pred: Any, labels: list[str] | None, n_prob_cols: int | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Map both label lists to class indices 0..C-1 and return the class names."""
    t = _as_list(y_true, "y_true")
    p = _as_list(y_pred, "y_pred")
    if len(t) == 0:
        raise FromzeroError("no samples: y_true and y_pred are empty")
    if len(t) != len(p):
        raise FromzeroError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    kind_t, kind_p = _kind(t, "y_true"), _kind(p, "y_pred")
    if kind_t != kind_p:
        raise FromzeroError(f"y_true holds {kind_t}s but y_pred holds {kind_p}s")

    if labels is not None:
        names = [str(x) for x in labels]
        if not names:
            raise FromzeroError("labels is empty")
        if len(set(names)) != len(names):
            dup = sorted({x for x in names if names.count(x) > 1})
            raise FromzeroError(f"labels has duplicates: {dup}")
        if kind_t == "int":
            for name, vals in (("y_true", t), ("y_pred", p)):
                bad = [v for v in vals if not 0 <= v < len(names)]
                if bad:
                    raise FromzeroError(
                        f"{name} has class index {bad[0]} outside 0..{len(names) - 1} (labels has {len(names)} names)"
                    )
            return np.asarray(t, dtype=np.int64), np.asarray(p, dtype=np.int64), names
        index = {x: i for i, x in enumerate(names)}
        for name, vals in (("y_true", t), ("y_pred", p)):
            bad = [v for v in vals if v not in index]
            if bad:
                raise FromzeroError(f"{name} has label {bad[0]!r} which is not in labels {names}")
    elif n_prob_cols is not None:
        if kind_t == "str":
            raise FromzeroError("probs with string labels needs `labels` to say which column is which class")
        return _encode(t, p, [str(i) for i in range(n_prob_cols)], None)
    else:
        classes = sorted(set(t) | set(p))
        index, names = {c: i for i, c in enumerate(classes)}, [str(c) for c in classes]
    return (np.asarray([index[v] for v in t], dtype=np.int64),
            np.asarray([index[v] for v in p], dtype=np.int64), names)


def _check_probs(probs: Any, n: int) -> np.ndarray:
    try:
        arr = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FromzeroError(f"probs is not a numeric (N, C) array: {e}") from None
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
        raise FromzeroError(f"probs must have shape (N={n}, C), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise FromzeroError("probs must be finite and non-negative")
    sums = arr.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise FromzeroError(
            f"probs rows must sum to 1 (row {worst} sums to {sums[worst]:.4g}); pass softmax outputs, not logits"
        )
    return arr / sums[:, None]  # exact sums for scikit-learn (float32 softmax is off by ~1e-7)


def classification_metrics(
    y_true: Sequence[int] | Sequence[str] | np.ndarray,
    y_pred: Sequence[int] | Sequence[str] | np.ndarray,
    labels: list[str] | None = None,
    probs: Any = None,
) -> dict[str, Any]:
    """Accuracy, macro/weighted precision/recall/F1, per-class report, confusion matrix, n.

    Returns a JSON-ready dict::

        {"n": 10, "accuracy": 0.8,
         "precision_macro": ..., "recall_macro": ..., "f1_macro": ...,
         "precision_weighted": ..., "recall_weighted": ..., "f1_weighted": ...,
         "log_loss": ...,                         # only when probs (N, C) is given
         "labels": ["cat", "dog", "bird"],        # class order used everywhere below
         "per_class": {"cat": {"precision": .., "recall": .., "f1": .., "support": 3}, ...},
         "confusion_matrix": [[2, 1, 0], ...]}    # rows = true class, columns = predicted

    Raises FromzeroError for empty input, a length mismatch, unknown labels or bad ``probs``.
    """
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

    prob_arr = n_cols = None
    if probs is not None:
        n_rows = len(_as_list(y_true, "y_true"))
        if n_rows == 0:
            raise FromzeroError("no samples: y_true and y_pred are empty")
        prob_arr = _check_probs(probs, n_rows)
        n_cols = prob_arr.shape[1]
    t, p, names = _encode(y_true, y_pred, labels, n_cols)
    if prob_arr is not None and prob_arr.shape[1] != len(names):
        raise FromzeroError(f"probs has {prob_arr.shape[1]} columns but there are {len(names)} classes {names}")

    class_ids = list(range(len(names)))
    out: dict[str, Any] = {"n": int(len(t)), "accuracy": float(np.mean(t == p))}
    for avg in _AVERAGES:
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, labels=class_ids, average=avg, zero_division=0)
        out[f"precision_{avg}"] = float(prec)
        out[f"recall_{avg}"] = float(rec)
        out[f"f1_{avg}"] = float(f1)
    if prob_arr is not None:
        out["log_loss"] = float(log_loss(t, prob_arr, labels=class_ids))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=class_ids, average=None, zero_division=0)
    out["labels"] = names
    out["per_class"] = {
        name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, name in enumerate(names)
    }
    out["confusion_matrix"] = confusion_matrix(t, p, labels=class_ids).astype(int).tolist()
    return out


def language_model_metrics(mean_loss: float) -> dict[str, float]:
    """``{"loss": L, "perplexity": exp(L)}`` for a mean cross-entropy in nats per token.

    A loss too large for ``exp`` gives perplexity ``inf`` (not an OverflowError). A negative or
    NaN loss cannot be a cross-entropy and raises FromzeroError.
    """
    try:
        loss = float(mean_loss)
    except (TypeError, ValueError):
        raise FromzeroError(f"mean_loss must be a number, got {mean_loss!r}") from None
    if math.isnan(loss) or loss < 0:
        raise FromzeroError(f"mean_loss must be a non-negative cross-entropy, got {loss}")
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"loss": loss, "perplexity": ppl}


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a``
    into ``b`` (one row of the dynamic-programming table at a time)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def pronunciation_error_rates(predictions: Sequence[Sequence[str]],
                              references: Sequence[Sequence[Sequence[str]]]) -> dict[str, float]:
    """Word and phoneme error rates of grapheme-to-phoneme output, as the G2P literature counts
    them: a word is right if its prediction equals any of its reference pronunciations (WER);
    phoneme errors are the edit distance to the closest reference, summed over words and divided
    by the summed length of those references (PER). Each prediction is a list of phonemes; each
    word's references a list of such lists."""
    if len(predictions) != len(references) or not predictions:
        raise FromzeroError(f"need one or more predictions, one per word: got {len(predictions)} predictions "
                            f"for {len(references)} words")
    wrong_words = errors = length = 0
    for predicted, options in zip(predictions, references):
        distance, closest = min((edit_distance(predicted, ref), len(ref)) for ref in options)
        wrong_words += distance > 0
        errors += distance
        length += closest
    return {"wer": wrong_words / len(predictions), "per": errors / max(length, 1), "words": len(predictions)}


def _is_scalar_number(v: Any) -> bool:
    return isinstance(v, (Real, np.number)) and not isinstance(v, (bool, np.bool_))


def aggregate_folds(fold_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of every numeric scalar metric across cross-validation folds.

    Only top-level int/float values are aggregated (nested dicts, lists and strings such as
    ``per_class`` or ``confusion_matrix`` are skipped), and only keys present in every fold.
    The std is the **sample** std (``ddof=1``), the usual choice for a "mean +- std" over K folds
    drawn from the data; with a single fold it is 0. Returns::

        {"n_folds": K, "metrics": {"accuracy": {"mean": .., "std": .., "values": [..]}, ...}}
    """
    if not fold_metrics:
        raise FromzeroError("aggregate_folds needs at least one fold")
    if not all(isinstance(m, dict) for m in fold_metrics):
        raise FromzeroError("aggregate_folds takes a list of metric dicts, one per fold")
    first = fold_metrics[0]
    keys = [k for k in first if all(k in m and _is_scalar_number(m[k]) for m in fold_metrics)]
    result: dict[str, Any] = {}
    for key in keys:
        values = np.asarray([float(m[key]) for m in fold_metrics], dtype=np.float64)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        result[key] = {"mean": float(np.mean(values)), "std": std, "values": values.tolist()}
    return {"n_folds": len(fold_metrics), "metrics": result}


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> Python, tuples -> lists, Paths -> str, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (Integral, np.integer)):
        return int(obj)
    if isinstance(obj, (Real, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise FromzeroError(f"cannot write {type(obj).__name__} value {obj!r} to metrics JSON")


def write_metrics_json(metrics: dict[str, Any], path: Path) -> None:
    """Write ``metrics`` as pretty JSON via temp file + fsync + rename.

    numpy types become Python ones; NaN/inf become ``null`` so the file is strict JSON that any
    reader (not only Python's) accepts.
    """
    text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n"
    atomic_write_text(Path(path), text)


def format_report(metrics: dict[str, Any]) -> str:
    """A text table like scikit-learn's ``classification_report`` from classification_metrics()."""
    required = ("per_class", "accuracy", "n")
    missing = [k for k in required if k not in metrics]
    if missing:
        raise FromzeroError(f"format_report needs classification metrics; missing {missing}")
    per_class: dict[str, dict[str, Any]] = metrics["per_class"]
    row_names = list(per_class) + ["accuracy", "macro avg", "weighted avg"]
    width = max(12, *(len(str(n)) for n in row_names))
    n = int(metrics["n"])

    def row(name: str, precision: float, recall: float, f1: float, support: int) -> str:
        return f"{name:>{width}} {precision:>10.4f} {recall:>10.4f} {f1:>10.4f} {support:>10d}"

    def total(name: str, value: float) -> str:  # a row with one value: accuracy, log loss
        return f"{name:>{width}} {'':>10} {'':>10} {value:>10.4f} {n:>10d}"

    lines = [f"{'':>{width}} {'precision':>10} {'recall':>10} {'f1-score':>10} {'support':>10}", ""]
    lines += [row(name, r["precision"], r["recall"], r["f1"], int(r["support"])) 
              for name, r in per_class.items()]
    lines += ["", total("accuracy", metrics["accuracy"])]
    lines += [row(f"{a} avg", metrics[f"precision_{a}"], metrics[f"recall_{a}"], metrics[f"f1_{a}"], n)
              for a in _AVERAGES if f"f1_{a}" in metrics]
    if "log_loss" in metrics:
        lines += ["", total("log loss", metrics["log_loss"])]
    return "\n".join(lines) + "\n"
