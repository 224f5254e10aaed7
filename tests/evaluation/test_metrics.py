"""Evaluation metrics against hand-computed values, JSON round trip and the confusion-matrix PNG."""

from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction as F

import numpy as np
import pytest
from PIL import Image

from fromzero.errors import FromzeroError
from fromzero.evaluation.metrics import (
    aggregate_folds,
    classification_metrics,
    format_report,
    language_model_metrics,
    write_metrics_json,
)
from fromzero.evaluation.plots import plot_confusion_matrix

# 3 classes, 10 samples. By hand, rows = true, columns = predicted:
#            pred cat dog bird
#   true cat      2   1   0      support 3
#   true dog      0   4   0      support 4
#   true bird     1   0   2      support 3
#   column sums   3   5   2
Y_TRUE = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 1, 1, 2, 2, 0]
NAMES = ["cat", "dog", "bird"]
CONFUSION = [[2, 1, 0], [0, 4, 0], [1, 0, 2]]


def _f1(p: F, r: F) -> F:
    return 2 * p * r / (p + r) if p + r else F(0)


# precision = diagonal / column sum, recall = diagonal / row sum
PREC = [F(2, 3), F(4, 5), F(2, 2)]
REC = [F(2, 3), F(4, 4), F(2, 3)]
F1 = [_f1(p, r) for p, r in zip(PREC, REC)]  # 2/3, 8/9, 4/5
SUPPORT = [3, 4, 3]


def test_hand_computed_example() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, labels=NAMES)
    assert F1 == [F(2, 3), F(8, 9), F(4, 5)]  # the hand arithmetic itself
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["labels"] == NAMES
    assert m["confusion_matrix"] == CONFUSION
    assert m["precision_macro"] == pytest.approx(float(sum(PREC) / 3))
    assert m["recall_macro"] == pytest.approx(float(sum(REC) / 3))
    assert m["f1_macro"] == pytest.approx(float((F(2, 3) + F(8, 9) + F(4, 5)) / 3))  # = 0.785185...
    weighted = lambda xs: float(sum(x * s for x, s in zip(xs, SUPPORT)) / 10)  # noqa: E731
    assert m["precision_weighted"] == pytest.approx(weighted(PREC))
    assert m["recall_weighted"] == pytest.approx(weighted(REC))  # equals accuracy
    assert m["recall_weighted"] == pytest.approx(0.8)
    assert m["f1_weighted"] == pytest.approx(float((3 * F(2, 3) + 4 * F(8, 9) + 3 * F(4, 5)) / 10))
    for i, name in enumerate(NAMES):
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(float(PREC[i]))
        assert row["recall"] == pytest.approx(float(REC[i]))
        assert row["f1"] == pytest.approx(float(F1[i]))
        assert row["support"] == SUPPORT[i]
    assert "log_loss" not in m
    json.dumps(m)  # plain Python types only


def test_string_labels_match_int_labels_and_numpy_input() -> None:
    t = [NAMES[i] for i in Y_TRUE]
    p = [NAMES[i] for i in Y_PRED]
    by_name = classification_metrics(t, p, labels=NAMES)
    by_index = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED), labels=NAMES)
    assert by_name == by_index


def test_without_labels_classes_are_sorted_union() -> None:
    t = [NAMES[i] for i in Y_TRUE]
    p = [NAMES[i] for i in Y_PRED]
    m = classification_metrics(t, p)
    assert m["labels"] == ["bird", "cat", "dog"]
    # same numbers, rows/columns permuted to the sorted order
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [0, 0, 4]]
    assert m["f1_macro"] == pytest.approx(float((F(2, 3) + F(8, 9) + F(4, 5)) / 3))
    ints = classification_metrics([5, 7, 7], [7, 7, 5])
    assert ints["labels"] == ["5", "7"]


def test_label_order_permutes_rows_and_columns() -> None:
    order = ["bird", "dog", "cat"]
    t = [NAMES[i] for i in Y_TRUE]
    p = [NAMES[i] for i in Y_PRED]
    m = classification_metrics(t, p, labels=order)
    assert m["labels"] == order
    assert list(m["per_class"]) == order
    perm = [NAMES.index(x) for x in order]
    expected = [[CONFUSION[i][j] for j in perm] for i in perm]
    assert m["confusion_matrix"] == expected
    assert m["f1_macro"] == pytest.approx(classification_metrics(t, p, labels=NAMES)["f1_macro"])


def test_zero_division_classes_count_as_zero_without_warnings() -> None:
    # "c" never occurs; "b" occurs but is never predicted.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(["a", "a", "b"], ["a", "a", "a"], labels=["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # a: precision 2/3, recall 1, f1 0.8; macro over all three classes
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.8)
    assert m["f1_macro"] == pytest.approx(0.8 / 3)
    assert m["f1_weighted"] == pytest.approx(0.8 * 2 / 3)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 0, 0], [0, 0, 0]]


def test_log_loss_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5], [0.6, 0.3, 0.1]])
    y_true = [0, 1, 2, 1]
    y_pred = probs.argmax(axis=1)
    m = classification_metrics(y_true, y_pred, labels=NAMES, probs=probs)
    expected = -(math.log(0.7) + math.log(0.8) + math.log(0.5) + math.log(0.3)) / 4
    assert m["log_loss"] == pytest.approx(expected)
    # ints without labels: one class per column, even a column no sample uses
    m2 = classification_metrics([0, 1, 1, 1], [0, 1, 0, 1], probs=probs)
    assert m2["labels"] == ["0", "1", "2"]
    assert m2["per_class"]["2"]["support"] == 0


def test_language_model_metrics() -> None:
    m = language_model_metrics(math.log(50.0))
    assert m["loss"] == pytest.approx(math.log(50.0))
    assert m["perplexity"] == pytest.approx(50.0)
    assert language_model_metrics(0.0)["perplexity"] == 1.0
    assert language_model_metrics(1e6)["perplexity"] == math.inf  # no OverflowError
    for bad in (float("nan"), -0.1, "abc"):
        with pytest.raises(FromzeroError):
            language_model_metrics(bad)  # type: ignore[arg-type]


def test_aggregate_folds_mean_and_sample_std() -> None:
    folds = [
        {"accuracy": 0.8, "f1_macro": 0.5, "n": 10, "labels": ["a"], "per_class": {}, "note": "x", "ok": True},
        {"accuracy": 0.6, "f1_macro": 0.7, "n": 10, "labels": ["a"], "per_class": {}, "note": "y", "ok": True},
        {"accuracy": 0.7, "f1_macro": np.float64(0.9), "n": 11, "labels": ["a"], "per_class": {}},
    ]
    agg = aggregate_folds(folds)
    assert agg["n_folds"] == 3
    assert set(agg["metrics"]) == {"accuracy", "f1_macro", "n"}  # no lists, dicts, strings, bools
    acc = agg["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.7)
    # sample std: sqrt(((0.1)^2 + (0.1)^2 + 0) / (3 - 1)) = 0.1
    assert acc["std"] == pytest.approx(0.1)
    assert acc["values"] == pytest.approx([0.8, 0.6, 0.7])
    f1 = agg["metrics"]["f1_macro"]
    assert f1["mean"] == pytest.approx(0.7)
    assert f1["std"] == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert agg["metrics"]["n"]["mean"] == pytest.approx(31 / 3)
    one = aggregate_folds([{"accuracy": 0.9}])
    assert one["metrics"]["accuracy"] == {"mean": 0.9, "std": 0.0, "values": [0.9]}
    # a key missing from one fold is not aggregated
    assert set(aggregate_folds([{"a": 1.0, "b": 2.0}, {"a": 3.0}])["metrics"]) == {"a"}
    with pytest.raises(FromzeroError):
        aggregate_folds([])


def test_metrics_json_round_trip(tmp_path) -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, labels=NAMES)
    extra = {
        **m,
        "np_int": np.int64(3),
        "np_float": np.float32(0.5),
        "np_array": np.arange(3),
        "np_bool": np.bool_(True),
        "perplexity": math.inf,
        "bad": float("nan"),
    }
    path = tmp_path / "sub" / "metrics.json"
    write_metrics_json(extra, path)
    back = json.loads(path.read_text())
    for key in m:
        assert back[key] == m[key]
    assert back["np_int"] == 3 and back["np_float"] == 0.5 and back["np_array"] == [0, 1, 2]
    assert back["np_bool"] is True
    assert back["perplexity"] is None and back["bad"] is None  # strict JSON: no NaN/Infinity
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    with pytest.raises(FromzeroError):
        write_metrics_json({"x": object()}, tmp_path / "bad.json")


def test_format_report() -> None:
    probs = np.eye(3)[Y_PRED] * 0.8 + 0.2 / 3
    m = classification_metrics(Y_TRUE, Y_PRED, labels=NAMES, probs=probs)
    text = format_report(m)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    cat = next(line for line in lines if line.split()[:1] == ["cat"])
    assert cat.split() == ["cat", "0.6667", "0.6667", "0.6667", "3"]
    dog = next(line for line in lines if line.split()[:1] == ["dog"])
    assert dog.split() == ["dog", "0.8000", "1.0000", "0.8889", "4"]
    assert next(line for line in lines if "accuracy" in line).split() == ["accuracy", "0.8000", "10"]
    assert "macro avg" in text and "weighted avg" in text and "log loss" in text
    with pytest.raises(FromzeroError):
        format_report({"loss": 1.0})


@pytest.mark.parametrize(
    ("y_true", "y_pred", "kwargs"),
    [
        ([], [], {}),
        ([0, 1], [0], {}),
        ([0, 1], ["a", "b"], {}),
        ([0, "a"], [0, 1], {}),
        ([0.5, 1.0], [0, 1], {}),
        ([0, 3], [0, 1], {"labels": ["a", "b"]}),
        (["a", "z"], ["a", "b"], {"labels": ["a", "b"]}),
        ([0, 1], [0, 1], {"labels": ["a", "a"]}),
        ([0, 1], [0, 1], {"labels": []}),
        ("ab", "ab", {}),
        ([[0], [1]], [[0], [1]], {}),
        (3, 3, {}),
        ([0, 1], [0, 1], {"probs": [[0.5, 0.5]]}),  # wrong N
        ([0, 1], [0, 1], {"probs": [[2.0, -1.0], [0.5, 0.5]]}),  # negative
        ([0, 1], [0, 1], {"probs": [[3.0, 1.0], [0.5, 0.5]]}),  # logits, rows do not sum to 1
        ([0, 1], [0, 1], {"probs": [[0.5, 0.5], [0.5, 0.5]], "labels": ["a", "b", "c"]}),  # C mismatch
        (["a", "b"], ["a", "b"], {"probs": [[0.5, 0.5], [0.5, 0.5]]}),  # strings need labels
    ],
)
def test_bad_input_raises(y_true, y_pred, kwargs) -> None:
    with pytest.raises(FromzeroError):
        classification_metrics(y_true, y_pred, **kwargs)


def _check_png(path, min_side: int = 300) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert min_side <= w <= 3000 and min_side <= h <= 3000
    assert 2_000 < path.stat().st_size < 2_000_000
    return w, h


def test_confusion_matrix_png_3_and_10_classes(tmp_path) -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, labels=NAMES)
    out = plot_confusion_matrix(m["confusion_matrix"], m["labels"], tmp_path / "plots" / "cm.png")
    assert out == tmp_path / "plots" / "cm.png"
    w3, h3 = _check_png(out)

    rng = np.random.default_rng(0)
    t = rng.integers(0, 10, 200)
    p = np.where(rng.random(200) < 0.7, t, rng.integers(0, 10, 200))
    names = [f"class_{i}" for i in range(10)]
    m10 = classification_metrics(t, p, labels=names)
    out10 = plot_confusion_matrix(m10["confusion_matrix"], names, tmp_path / "cm10.png", normalize=True)
    w10, h10 = _check_png(out10)
    assert w10 > w3 and h10 > h3  # the figure grows with the class count
    # an empty true-class row normalises to zeros instead of dividing by zero
    _check_png(plot_confusion_matrix([[0, 0], [1, 2]], ["a", "b"], tmp_path / "z.png", normalize=True))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cm10.png", "plots", "z.png"]  # no temp files


def test_confusion_matrix_bad_input(tmp_path) -> None:
    with pytest.raises(FromzeroError):
        plot_confusion_matrix([[1, 2, 3]], ["a"], tmp_path / "x.png")
    with pytest.raises(FromzeroError):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(FromzeroError):
        plot_confusion_matrix([[1, -1], [0, 1]], ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
