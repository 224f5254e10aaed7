"""SQuAD exact match and F1, exactly as the official SQuAD v1.1 evaluation script computes them.

Both compare *normalised* answers: lower-cased, punctuation (``string.punctuation``) removed, the
articles a / an / the removed as whole words, whitespace collapsed. Exact match is 1 when the
normalised prediction equals the normalised gold answer; F1 is the harmonic mean of precision
and recall over the bags of whitespace tokens of the two (0 when they share none). A question
with several gold answers scores the best of them; the corpus scores are the means, in percent
(the official script's scale: ``{"exact_match": 81.2, "f1": 88.5}``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, drop the articles a / an / the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-bag F1 of the normalised strings (0 when they share no token, or one is empty)."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def best_over_answers(metric, prediction: str, golds: Sequence[str]) -> float:
    """The best score of ``prediction`` against any of the gold answers."""
    return max(metric(prediction, gold) for gold in golds)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent over questions (predictions[i] against golds[i]),
    and ``questions``: how many were scored."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0, "questions": 0}
    em = sum(best_over_answers(exact_match, p, g) for p, g in zip(predictions, golds))
    f = sum(best_over_answers(f1, p, g) for p, g in zip(predictions, golds))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f / n, "questions": n}
