"""``shakespeare-qa``: synthetic extractive questions on the real text of Shakespeare's plays.

Not SQuAD, and not written by people: the questions are generated from the text by a fixed
rule, so a program that knows the rule answers them all. What is real is the text the model
reads (Early Modern English verse, stage directions, speaker headings in each edition's own
style) and the work of the extractive pipeline (long contexts in several windows, spans back to
characters). The build is deterministic:

* Source: the 36 First Folio plays of the ``shakespeare`` corpus (``datasets.folio_plays``:
  header stripped), cut into *sections* at every ``ACT`` / ``SCENE`` / ``PROLOGUE`` /
  ``EPILOGUE`` / ``INDUCTION`` heading.
* Speeches: a speaker heading is a line of at most four capitalised words with an optional
  final period (``MACBETH.``, ``FIRST WITCH.``, ``Mar.``, ``Lady Montague.``, ``HERMIA``) after a
  blank line and before a line of text, whose name heads at least three speeches of the play;
  the speech is the lines below it up to the next blank line.
* Contexts: consecutive speeches of one section, the raw lines from the first heading to the
  end of the last speech (stage directions between them included), closed as soon as they
  reach ``CONTEXT_CHARS`` characters; a context needs two different speakers. A single long
  speech makes a context longer than one window.
* Questions: up to ``QUESTIONS_PER_CONTEXT`` speeches of a context are drawn (a
  ``random.Random`` seeded by the context's id), and from each one line of at least four words
  that occurs once in the context: ``Who says "<line>"?``. The answer is that speech's heading,
  without its period, at its offset in the context.
* Split by section: a sha256 of ``play/section`` puts 80% of the sections in train, 10% in val,
  10% in test, so no context and no scene is in two splits (speakers are: the task is reading,
  not remembering who is in a play).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter

from fromzero.data.qa import QAExample

NAME = "shakespeare-qa"
CONTEXT_CHARS = 400
QUESTIONS_PER_CONTEXT = 2
MIN_LINE_WORDS = 4
MIN_SPEECHES = 3
SPLIT = {"val": 0.1, "test": 0.1}

_SECTION = re.compile(r"^\s*(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b", re.IGNORECASE)
_HEADING = re.compile(r"^([A-Z][A-Za-z'\-]*(?:\.? [A-Za-z][A-Za-z'\-]*){0,3})\.?\s*$")


def speaker_name(line: str) -> str | None:
    """The name of a speaker heading line (without its final period), or None."""
    if len(line) > 40 or _SECTION.match(line):
        return None
    match = _HEADING.match(line)
    return match.group(1) if match else None


def _headings(lines: list[str]) -> dict[int, str]:
    """Line index -> speaker name of the play's speaker headings (see the module docstring)."""
    found = {}
    for i, line in enumerate(lines):
        if (i == 0 or not lines[i - 1].strip()) and i + 1 < len(lines) and lines[i + 1].strip():
            name = speaker_name(line)
            if name:
                found[i] = name
    counts = Counter(found.values())
    return {i: name for i, name in found.items() if counts[name] >= MIN_SPEECHES}


def _sections(lines: list[str]) -> list[list[tuple[int, str, int]]]:
    """Per section, its speeches as (heading line, speaker, last line of the speech)."""
    headings = _headings(lines)
    sections: list[list[tuple[int, str, int]]] = [[]]
    i = 0
    while i < len(lines):
        if _SECTION.match(lines[i]):
            sections.append([])
        elif i in headings:
            end = i + 1
            while end + 1 < len(lines) and lines[end + 1].strip():
                end += 1
            sections[-1].append((i, headings[i], end))
            i = end
        i += 1
    return [s for s in sections if s]


def split_of_section(key: str) -> str:
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < SPLIT["val"] else "test" if u < SPLIT["val"] + SPLIT["test"] else "train"


def _contexts(lines: list[str], speeches: list[tuple[int, str, int]]) -> list[list[tuple[int, str, int]]]:
    """Consecutive speeches grouped until their text reaches CONTEXT_CHARS (two speakers at least)."""
    groups, current = [], []
    for speech in speeches:
        current.append(speech)
        if len("\n".join(lines[current[0][0]:current[-1][2] + 1])) >= CONTEXT_CHARS:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [g for g in groups if len({name for _, name, _ in g}) >= 2]


def _questions(play: str, section: int, k: int, lines: list[str], group: list[tuple[int, str, int]]
               ) -> list[QAExample]:
    first = group[0][0]
    context = "\n".join(lines[first:group[-1][2] + 1])
    starts = [0]  # character offset of each line of the context
    for line in lines[first:group[-1][2]]:
        starts.append(starts[-1] + len(line) + 1)
    key = f"{play}/{section}/{k}"
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big"))
    quotable = []
    for heading, name, end in group:
        lines_ok = [j for j in range(heading + 1, end + 1)
                    if len(lines[j].split()) >= MIN_LINE_WORDS and not lines[j].strip().startswith("[")
                    and context.count(lines[j].strip()) == 1]
        if lines_ok:
            quotable.append((heading, name, lines_ok))
    out = []
    for n, (heading, name, lines_ok) in enumerate(rng.sample(quotable, min(QUESTIONS_PER_CONTEXT, len(quotable)))):
        line = lines[rng.choice(lines_ok)].strip()
        start = starts[heading - first] + (len(lines[heading]) - len(lines[heading].lstrip()))
        assert context[start:start + len(name)] == name
        out.append(QAExample(f"{key}/{n}", f'Who says "{line}"?', context, ((name, start),), f"{NAME} {key}/{n}"))
    return out


def load_shakespeare_qa() -> dict[str, list[QAExample]]:
    """``{train, val, test}``: the questions of the built-in set (downloads the corpus on first use)."""
    from fromzero.data.datasets import folio_plays

    splits: dict[str, list[QAExample]] = {"train": [], "val": [], "test": []}
    for play, _, lines in folio_plays():
        for section, speeches in enumerate(_sections(lines)):
            split = split_of_section(f"{play}/{section}")
            for k, group in enumerate(_contexts(lines, speeches)):
                splits[split].extend(_questions(play, section, k, lines, group))
    return splits


def first_speaker_baseline(example: QAExample) -> str:
    """A trivial baseline: the first speaker heading of the context (what a reader who ignores the
    question would answer)."""
    for line in example.context.split("\n"):
        name = speaker_name(line)
        if name:
            return name
    return ""
