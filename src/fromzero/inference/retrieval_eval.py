"""Retrieval QA measured on Shakespeare: "Who speaks the line ... and in which play?"

The protocol (what benchmarks/retrieval_qa.py runs):

* **Index**: every speech of the built-in ``shakespeare`` corpus, ``fromzero index shakespeare
  --chunking speeches`` (one passage per speech, with its speaker line; a speech longer than 150
  words is cut into windows that repeat the speaker line). The questions' lines stay in the index:
  the task is finding the source of a quotation, not guessing an unseen line.
* **Questions** (:func:`shakespeare_line_questions`): lines drawn at random (seeded) from the
  speeches of the 36 First Folio plays, among the lines that have at least ``min_words`` words,
  occur exactly once in the whole corpus (so the answer is unambiguous), are not a stage direction
  (``[...]``) and do not start with an all-capitals name and a period (where the corpus's layout
  runs a speaker into the previous speech, so the parsed speaker may be wrong). The question
  quotes the line exactly: ``Who speaks the line "..." and in which play?``. The gold answer is
  the speech's speaker as the play writes it (``HAM`` for ``Ham.``) and the play.
* **Retrieval** is right at k when one of the top k passages is from the line's file and its line
  range holds the line (recall@k).
* **Answers**: a chat model's reply is right when it names the speaker and the play
  (:func:`speaker_named`, :func:`play_named`); the "read off the top passage" baseline answers with
  the top passage's speaker and file, an upper bound for a reader that trusts the retriever.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from fromzero.data.chunking import Chunk, read_documents

__all__ = ["LineQuestion", "shakespeare_line_questions", "question_text", "play_aliases", "speaker_named",
           "play_named", "retrieved_right", "read_off_right"]

QUESTION = 'Who speaks the line "{line}" and in which play?'
_RUN_IN_SPEAKER = re.compile(r"^[A-Z][A-Z'&\- ]+\.(\s|$)")
_TITLE_PREFIXES = ("the tragedy of ", "the life and death of ", "the life of ", "the history of ",
                   "history of ", "the ", "a ")


@dataclass
class LineQuestion:
    """One held-out line and its answer."""

    line: str
    """The line as the play writes it (stripped)."""
    source: str
    """The play's file as the index cites it (shakespeare/hamlet_gut.txt)."""
    line_no: int
    """Its line number in that file (1-based)."""
    speaker: str
    """Who speaks it, upper case, as the play writes the name ("HAM")."""
    play: str
    """The play's name from its file name ("hamlet", "henry iv part 1")."""
    title: str
    """The play's title line ("HAMLET, PRINCE OF DENMARK")."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def question_text(q: LineQuestion) -> str:
    return QUESTION.format(line=q.line)


def _normalise(text: str) -> str:
    """Lower case, apostrophes dropped ("night's" -> "nights"), other punctuation a space."""
    text = re.sub(r"['\u2019]", "", text.lower())
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def play_name(source: str) -> str:
    """hamlet_gut.txt -> "hamlet"; henry_iv_part_1_gut.txt -> "henry iv part 1"."""
    stem = source.rsplit("/", 1)[-1].removesuffix(".txt").removesuffix("_gut")
    return stem.replace("_", " ")


def shakespeare_line_questions(n: int = 1000, seed: int = 0, min_words: int = 6) -> list[LineQuestion]:
    """``n`` questions drawn as the module docstring says, in corpus order (deterministic)."""
    from fromzero.data.datasets import GENRES
    from fromzero.data.sft import speech_scenes

    documents = read_documents(["shakespeare"])
    seen: dict[str, int] = {}
    for doc in documents:
        for line in doc.text.split("\n"):
            key = _normalise(line)
            if key:
                seen[key] = seen.get(key, 0) + 1
    candidates = []
    for doc in documents:
        name = doc.path.rsplit("/", 1)[-1].removesuffix("_gut.txt")
        if name not in GENRES:
            continue
        lines = doc.text.split("\n")
        title = next(line.strip() for line in lines if line.strip())
        for scene in speech_scenes(lines):
            for speech in scene:
                for i in range(speech.first + 1, speech.last + 1):
                    text = lines[i].strip()
                    if (len(text.split()) < min_words or text.startswith("[") or _RUN_IN_SPEAKER.match(text)
                            or seen.get(_normalise(text)) != 1):
                        continue
                    candidates.append(LineQuestion(text, doc.path, i + 1, speech.speaker, play_name(doc.path),
                                                   title))
    if n > len(candidates):
        raise ValueError(f"only {len(candidates)} lines qualify; asked for {n}")
    picked = sorted(random.Random(seed).sample(range(len(candidates)), n))
    return [candidates[i] for i in picked]


def play_aliases(q: LineQuestion) -> set[str]:
    """Normalised names a reply may use for the play: its file name ("henry iv part 1"), its title
    line, the title without "The Tragedy of" and the like, and the title before a comma or
    semicolon ("hamlet", "twelfth night") unless what follows names a part (Henry IV, VI)."""
    title = _normalise(q.title)
    names = {q.play, title}
    head = re.split(r"[,;]", q.title, maxsplit=1)[0]
    if "PART" not in q.title:
        names.add(_normalise(head))
    for name in list(names):
        for prefix in _TITLE_PREFIXES:
            if name.startswith(prefix):
                names.add(name[len(prefix):])
    return {n for n in names if n}


def play_named(reply: str, q: LineQuestion) -> bool:
    text = f" {_normalise(reply)} "
    return any(f" {alias} " in text for alias in play_aliases(q))


def speaker_named(reply: str, q: LineQuestion) -> bool:
    """The reply names the speaker: its words in order, the last one possibly as the start of a
    longer word ("Ber" is answered by "Bernardo"), case and punctuation ignored."""
    want = _normalise(q.speaker).split()
    words = _normalise(reply).split()
    k = len(want)
    return any(words[i:i + k - 1] == want[:-1] and words[i + k - 1].startswith(want[-1])
               for i in range(len(words) - k + 1))


def retrieved_right(chunk: Chunk, q: LineQuestion) -> bool:
    """The passage holds the question's line."""
    return chunk.source == q.source and chunk.start_line <= q.line_no <= chunk.end_line


def read_off_right(chunk: Chunk, q: LineQuestion) -> bool:
    """The passage's speaker and play are the question's (answering by reading them off it)."""
    return chunk.source == q.source and (chunk.speaker or "") == q.speaker


def recall_at(hits: Sequence[Sequence[Chunk]], questions: Sequence[LineQuestion], k: int) -> float:
    """Fraction of questions with a right passage among the first ``k``."""
    right = sum(any(retrieved_right(c, q) for c in chunks[:k]) for chunks, q in zip(hits, questions))
    return right / len(questions) if questions else 0.0
