"""Genre baseline on shakespeare-genre: TF-IDF + logistic regression (scikit-learn).

    .venv/bin/python benchmarks/genre_baseline.py

The reference point for fine-tuned models on ``fromzero.data.datasets.shakespeare_genre``
(passages of ~500 characters labelled comedy / history / tragedy, split by play). Features:
word 1-2 grams, char 2-5 grams (``char_wb``), or both (hstack), all ``sublinear_tf``, fitted on
the training split. The feature set and the inverse regularisation ``C`` of a multinomial
logistic regression are chosen by validation macro-F1 only; the test split is scored once,
with the chosen setting. Prints a table and writes benchmarks/results/genre_baseline.json.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import sklearn  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from fromzero.data.datasets import LABELS, SPLIT_PLAYS, shakespeare_genre  # noqa: E402

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def vectorizers() -> dict[str, list[TfidfVectorizer]]:
    word = dict(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    char = dict(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True)
    return {
        "word 1-2": [TfidfVectorizer(**word)],
        "char 2-5": [TfidfVectorizer(**char)],
        "word 1-2 + char 2-5": [TfidfVectorizer(**word), TfidfVectorizer(**char)],
    }


def scores(y_true, y_pred) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(LABELS))),
    }


def main() -> None:
    t0 = time.perf_counter()
    data = shakespeare_genre()
    texts = {k: [r["text"] for r in rows] for k, rows in data.items()}
    ys = {k: np.array([r["label"] for r in rows]) for k, rows in data.items()}

    grid = []
    best = None  # (val macro-F1, features, C, model, test features)
    for name, vecs in vectorizers().items():
        feats = {
            k: sp.hstack([v.fit_transform(texts[k]) if k == "train" else v.transform(texts[k])
                          for v in vecs]).tocsr()
            for k in ("train", "val", "test")
        }
        for C in C_GRID:
            clf = LogisticRegression(C=C, max_iter=2000)
            clf.fit(feats["train"], ys["train"])
            val = scores(ys["val"], clf.predict(feats["val"]))
            grid.append({"features": name, "C": C, "val": val})
            print(f"  {name:<20} C={C:<5} val acc {val['accuracy']:.3f}"
                  f"  macro-F1 {val['macro_f1']:.3f}")
            if best is None or val["macro_f1"] > best[0]:
                best = (val["macro_f1"], name, C, clf, feats)

    _, name, C, clf, feats = best
    result = {
        split: scores(ys[split], clf.predict(feats[split])) for split in ("train", "val", "test")
    }
    print()
    print(f"chosen on validation: {name}, C={C}")
    print(f"{'split':<6} {'n':>5} {'accuracy':>9} {'macro-F1':>9}")
    for split in ("val", "test"):
        r = result[split]
        print(f"{split:<6} {len(ys[split]):>5} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f}")

    out = {
        "benchmark": "genre_baseline",
        "dataset": "fromzero.data.datasets.shakespeare_genre()",
        "passages": {k: len(v) for k, v in data.items()},
        "held_out_plays": {k: list(v) for k, v in SPLIT_PLAYS.items()},
        "model": "TfidfVectorizer(sublinear_tf, min_df=2) + LogisticRegression(multinomial)",
        "selection": "feature set and C by validation macro-F1; test scored once",
        "chosen": {"features": name, "C": C},
        "scores": result,
        "grid": grid,
        "seconds": round(time.perf_counter() - t0, 1),
        "env": {"python": platform.python_version(), "sklearn": sklearn.__version__},
    }
    path = ROOT / "benchmarks" / "results" / "genre_baseline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
