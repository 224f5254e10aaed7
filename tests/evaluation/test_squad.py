"""SQuAD v1.1 exact match and F1 on hand-made cases (the official script's normalisation and scoring)."""

from __future__ import annotations

import pytest

from fromzero.evaluation.squad import exact_match, f1, normalize_answer, squad_scores


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),            # lower-case, article dropped
    ("  a   cat,  an owl! ", "cat owl"),             # articles a / an, punctuation, whitespace
    ("the-theory", "thetheory"),                     # punctuation goes before articles are looked for
    ("Theatre", "theatre"),                          # "the" inside a word stays
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_and_punctuation() -> None:
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


def test_f1_counts_shared_tokens_with_multiplicity() -> None:
    # prediction "denver broncos won", gold "broncos": precision 1/3, recall 1 -> F1 0.5
    assert f1("Denver Broncos won", "the Broncos") == pytest.approx(0.5)
    # bag overlap: prediction "x y y", gold "y y z": common {y: 2} -> P 2/3, R 2/3
    assert f1("x y y", "y y z") == pytest.approx(2 / 3)
    assert f1("nothing shared", "else") == 0.0
    assert f1("", "something") == 0.0
    assert f1("the", "a") == 0.0  # both normalise to nothing: no shared token (as the official script)


def test_corpus_scores_take_the_best_gold_answer_and_are_percentages() -> None:
    predictions = ["Denver Broncos", "Santa Clara", "1990s", "Levi's Stadium"]
    golds = [["Denver Broncos", "The Broncos"],       # exact
             ["Santa Clara, California", "Levi's"],   # F1 max(2*1*(2/3)/(1+2/3)=0.8, 0) = 0.8
             ["the 1980s"],                            # no shared token
             ["Levi's Stadium in the San Francisco Bay Area", "Levi's Stadium"]]  # exact with the 2nd
    scores = squad_scores(predictions, golds)
    assert scores["questions"] == 4
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 1) / 4)


def test_mismatched_lengths_and_empty() -> None:
    with pytest.raises(ValueError):
        squad_scores(["a"], [])
    assert squad_scores([], []) == {"exact_match": 0.0, "f1": 0.0, "questions": 0}
