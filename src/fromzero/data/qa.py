"""Extractive question answering data: SQuAD files, windows of a context, spans back to text.

**Input.** SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}]}]}]}]}``, v1.1 layout) or JSON lines in the Hugging Face
``datasets`` layout (``{"id", "context", "question", "answers": {"text": [...], "answer_start":
[...]}}``). Every answer must sit at its offset: ``context[start:start + len(text)] == text``; a
row whose answer does not, or that lacks a field, is a one-line error naming the file and the
row. SQuAD v2's unanswerable questions (``is_impossible: true``, or empty answers in JSON lines)
are *skipped* and counted: this task answers every question with a span (SQuAD v1.1).

**Splits** (:func:`load_qa_splits`): the built-in ``shakespeare-qa``
(:mod:`fromzero.data.shakespeare_qa`), a folder with ``train`` / ``val`` (or ``validation``,
``dev``) / ``test`` files (``.json`` or ``.jsonl``; a split without a file is carved out of train),
or one file, split by a hash of the context so all questions on one context stay together.

**Windows** (:func:`encode_windows`), as BERT's SQuAD recipe and HF's ``run_qa`` build them: the
tokenizer encodes ``[CLS] question [SEP] context [SEP]``, truncating only the context; a context
longer than one window continues in further windows that repeat ``doc_stride`` of its tokens.
A window is labelled with the token positions of the answer's first and last token, or with
the [CLS] position (0) when the answer is not wholly inside it.

**Answers** (:func:`best_spans`): over all windows of a question, the ``n_best`` highest start
and end logits of context tokens are paired (end >= start, at most ``max_answer_tokens``),
scored by start + end logit, and the best pair is mapped back through the tokens' character
offsets to a span of the original context.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError

SPLITS = ("train", "val", "test")
SPLIT_FILES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}
SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class QAExample:
    """One question on one context, with its gold answers ``(text, character start)``."""

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...] = ()
    where: str = ""
    """``file:row`` (for messages)."""

    @property
    def answer_texts(self) -> list[str]:
        return [text for text, _ in self.answers]


@dataclass
class QAFile:
    """The examples of one file and how many unanswerable (SQuAD v2) questions it skipped."""

    examples: list[QAExample] = field(default_factory=list)
    unanswerable: int = 0


# ---------------------------------------------------------------------------------------------
# Reading


def _text(row: dict, key: str, where: str, allow_blank: bool = False) -> str:
    if key not in row:
        raise FromzeroError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str) or (not allow_blank and not value.strip()):
        raise FromzeroError(f"{where}: {key!r} must be a non-empty string")
    return value


def _checked_answers(pairs: list[tuple[Any, Any]], context: str, where: str) -> tuple[tuple[str, int], ...]:
    """(text, start) pairs that sit at their offsets in ``context``, else a one-line error."""
    out = []
    for n, (text, start) in enumerate(pairs):
        if not isinstance(text, str) or not text.strip():
            raise FromzeroError(f"{where}: answer {n} text must be a non-empty string, got {text!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise FromzeroError(f"{where}: answer {n} answer_start must be an integer >= 0, got {start!r}")
        found = context[start:start + len(text)]
        if found != text:
            raise FromzeroError(f"{where}: answer {n} {_short(text)} at offset {start} does not match the context "
                                f"(context[{start}:{start + len(text)}] is {_short(found)})")
        out.append((text, start))
    return tuple(out)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _example(row: dict, context: str, where: str, fallback_id: str, require_answers: bool,
             answers: list[tuple[Any, Any]] | None, impossible: bool) -> QAExample | None:
    """A checked example, or None for an unanswerable question (skipped)."""
    question = _text(row, "question", where)
    qid = row.get("id", fallback_id)
    if impossible:
        return None
    if answers is None:
        if require_answers:
            raise FromzeroError(f"{where}: missing field 'answers'")
        answers = []
    checked = _checked_answers(answers, context, where)
    if require_answers and not checked:
        raise FromzeroError(f"{where}: no answers (and not marked is_impossible)")
    return QAExample(str(qid), question, context, checked, where)


def _read_squad_json(path: Path, data: Any, require_answers: bool) -> QAFile:
    out = QAFile()
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise FromzeroError(f"{path}: expected SQuAD JSON, an object with a 'data' list of articles")
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise FromzeroError(f"{path}: data[{a}]: missing field 'paragraphs' (a list)")
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise FromzeroError(f"{where}: expected an object with context and qas")
            context = _text(paragraph, "context", where)
            qas = paragraph.get("qas")
            if not isinstance(qas, list):
                raise FromzeroError(f"{where}: missing field 'qas' (a list)")
            for q, qa in enumerate(qas):
                here = f"{where}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise FromzeroError(f"{here}: expected an object with question and answers")
                raw = qa.get("answers")
                if raw is not None and not isinstance(raw, list):
                    raise FromzeroError(f"{here}: 'answers' must be a list of {{text, answer_start}}")
                pairs = None
                if raw is not None:
                    for n, ans in enumerate(raw):
                        if not isinstance(ans, dict) or "text" not in ans or "answer_start" not in ans:
                            raise FromzeroError(f"{here}: answer {n} must be an object with text and answer_start")
                    pairs = [(ans["text"], ans["answer_start"]) for ans in raw]
                example = _example(qa, context, here, f"{a}.{p}.{q}", require_answers, pairs,
                                   qa.get("is_impossible") is True)
                if example is None:
                    out.unanswerable += 1
                else:
                    out.examples.append(example)
    return out


def _read_jsonl(path: Path, text: str, require_answers: bool) -> QAFile:
    out = QAFile()
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FromzeroError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise FromzeroError(f"{where}: expected an object with context, question and answers")
        context = _text(row, "context", where)
        raw = row.get("answers")
        pairs = None
        if raw is not None:
            if not isinstance(raw, dict) or not isinstance(raw.get("text"), list) \
                    or not isinstance(raw.get("answer_start"), list):
                raise FromzeroError(f"{where}: 'answers' must be {{\"text\": [...], \"answer_start\": [...]}}")
            if len(raw["text"]) != len(raw["answer_start"]):
                raise FromzeroError(f"{where}: answers has {len(raw['text'])} texts but "
                                    f"{len(raw['answer_start'])} answer_start values")
            pairs = list(zip(raw["text"], raw["answer_start"]))
        impossible = row.get("is_impossible") is True or (pairs is not None and not pairs and require_answers)
        example = _example(row, context, where, f"line {number}", require_answers, pairs, impossible)
        if example is None:
            out.unanswerable += 1
        else:
            out.examples.append(example)
    return out


def read_qa_file(path: Path | str, require_answers: bool = True) -> QAFile:
    """The questions of a SQuAD ``.json`` or a ``.jsonl`` file (layouts in the module docstring).
    ``require_answers`` False: answers are optional (questions to answer, not to score)."""
    path = Path(path).expanduser()
    if path.suffix not in SUFFIXES:
        raise FromzeroError(f"{path}: expected a SQuAD .json or a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FromzeroError(f"question-answering data not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FromzeroError(f"cannot read {path}: {e}") from None
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text, require_answers)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FromzeroError(f"{path}: invalid JSON: {e.msg} (line {e.lineno})") from None
    return _read_squad_json(path, data, require_answers)


def split_of_context(context: str, val_fraction: float, test_fraction: float) -> str:
    """train | val | test for a context, from a sha256 of its text (stable across runs and machines)."""
    u = int.from_bytes(hashlib.sha256(context.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def load_qa_splits(source: str, val_fraction: float = 0.1, test_fraction: float = 0.1
                   ) -> tuple[dict[str, list[QAExample]], int]:
    """``({train, val, test}: examples, unanswerable questions skipped)`` of a data source (see
    the module docstring)."""
    from fromzero.data import shakespeare_qa

    if source == shakespeare_qa.NAME:
        return shakespeare_qa.load_shakespeare_qa(), 0
    path = Path(source).expanduser()
    if path.is_dir():
        found: dict[str, QAFile] = {}
        for split in SPLITS:
            files = [path / f"{stem}{suffix}" for stem in SPLIT_FILES[split] for suffix in SUFFIXES]
            files = [f for f in files if f.is_file()]
            if len(files) > 1:
                raise FromzeroError(f"{path} has several {split} files ({', '.join(f.name for f in files)}): keep one")
            if files:
                found[split] = read_qa_file(files[0])
        if "train" not in found:
            raise FromzeroError(f"{path} has no train.json or train.jsonl")
        splits = {split: list(f.examples) for split, f in found.items()}
        carve = [s for s in ("val", "test") if s not in found]
        if carve:  # a missing split comes out of train, by context
            fractions = {"val": val_fraction if "val" in carve else 0.0,
                         "test": test_fraction if "test" in carve else 0.0}
            rows, splits["train"] = splits["train"], []
            for split in carve:
                splits[split] = []
            for ex in rows:
                splits[split_of_context(ex.context, fractions["val"], fractions["test"])].append(ex)
        return splits, sum(f.unanswerable for f in found.values())
    if not path.exists():
        raise FromzeroError(f"question-answering data {source!r} not found: expected shakespeare-qa, a SQuAD "
                            ".json / .jsonl file or a folder of them")
    read = read_qa_file(path)
    splits = {split: [] for split in SPLITS}
    for ex in read.examples:
        splits[split_of_context(ex.context, val_fraction, test_fraction)].append(ex)
    return splits, read.unanswerable


# ---------------------------------------------------------------------------------------------
# Windows


@dataclass
class Window:
    """One window of one question's context, as the model reads it."""

    example: int
    """Index of its question in the example list."""
    input_ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int] | None]
    """Character span in the context of each context token; None for the question and specials."""
    start: int = 0
    end: int = 0
    """Labels: token positions of the answer's first and last token (0, 0: not in this window)."""


@dataclass
class WindowStats:
    windows: int = 0
    questions_truncated: int = 0
    answers_outside: int = 0
    """Questions whose (first) answer lies wholly inside none of their windows (learned as no span)."""


def configure_tokenizer(tokenizer: Any, max_length: int, doc_stride: int) -> None:
    """Truncate the second text (the context) only, overflowing into windows sharing ``doc_stride`` tokens."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, stride=doc_stride, strategy="only_second")


def _truncated_questions(tokenizer: Any, questions: list[str], max_question_tokens: int) -> tuple[list[str], int]:
    """Questions cut after ``max_question_tokens`` tokens (at a character offset: text stays text)."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(questions, add_special_tokens=False)
    out, cut = [], 0
    for question, enc in zip(questions, encodings):
        if len(enc.ids) > max_question_tokens:
            question, cut = question[:enc.offsets[max_question_tokens - 1][1]], cut + 1
        out.append(question)
    return out, cut


def encode_windows(tokenizer: Any, examples: list[QAExample], max_length: int, doc_stride: int,
                   max_question_tokens: int, label: bool = True) -> tuple[list[Window], WindowStats]:
    """The windows of every example, labelled with their first answer's tokens when ``label``."""
    stats = WindowStats()
    questions, stats.questions_truncated = _truncated_questions(
        tokenizer, [ex.question for ex in examples], max_question_tokens)
    configure_tokenizer(tokenizer, max_length, doc_stride)
    windows: list[Window] = []
    for i0 in range(0, len(examples), 512):  # bounded memory of overflowing encodings
        chunk = examples[i0:i0 + 512]
        try:
            encodings = tokenizer.encode_batch([(q, ex.context) for q, ex in zip(questions[i0:i0 + 512], chunk)])
        except Exception as e:  # the Rust side raises a bare Exception (e.g. no room left for the context)
            raise FromzeroError(f"cannot fit question + context into {max_length} tokens: {e}") from None
        for j, (ex, first) in enumerate(zip(chunk, encodings)):
            found = False
            for enc in [first, *first.overflowing]:
                offsets = [off if sid == 1 else None for off, sid in zip(enc.offsets, enc.sequence_ids)]
                window = Window(i0 + j, list(enc.ids), list(enc.type_ids), offsets)
                if label and ex.answers:
                    window.start, window.end = _label(offsets, *ex.answers[0])
                    found = found or window.start > 0
                windows.append(window)
            if label and ex.answers and not found:
                stats.answers_outside += 1
    stats.windows = len(windows)
    return windows, stats


def _label(offsets: list[tuple[int, int] | None], text: str, start: int) -> tuple[int, int]:
    """Token positions of the answer's first and last token, or (0, 0) when it is not wholly inside."""
    end = start + len(text)
    context = [i for i, off in enumerate(offsets) if off is not None]
    if not context or offsets[context[0]][0] > start or offsets[context[-1]][1] < end:
        return 0, 0
    first = next(i for i in context if offsets[i][1] > start)
    last = max(i for i in context if offsets[i][0] < end)
    return (first, last) if last >= first else (0, 0)


# ---------------------------------------------------------------------------------------------
# Answers


def best_spans(windows: list[Window], start_logits: list[Any], end_logits: list[Any], examples: list[QAExample],
               n_best: int = 20, max_answer_tokens: int = 30) -> list[dict[str, Any]]:
    """Per example (in order): ``{"answer", "start", "end", "score", "probability"}`` of the best span
    over all its windows (``start_logits[w]`` / ``end_logits[w]``: sequences of floats for window w).

    ``score`` is start + end logit; ``probability`` its softmax over the n-best spans of the
    question (as HF's ``run_qa`` reports it). No valid span (every candidate ends before it
    starts or is too long): an empty answer at -1.
    """
    import numpy as np

    candidates: list[list[tuple[float, int, int]]] = [[] for _ in examples]
    for w, window in enumerate(windows):
        starts, ends = np.asarray(start_logits[w], dtype=np.float64), np.asarray(end_logits[w], dtype=np.float64)
        context = np.array([off is not None for off in window.offsets[:len(starts)]])
        if not context.any():
            continue
        starts, ends = np.where(context, starts, -np.inf), np.where(context, ends, -np.inf)
        top_starts = [int(i) for i in np.argsort(-starts, kind="stable")[:n_best] if context[i]]
        top_ends = [int(i) for i in np.argsort(-ends, kind="stable")[:n_best] if context[i]]
        for s in top_starts:
            for e in top_ends:
                if e < s or e - s + 1 > max_answer_tokens:
                    continue
                begin, finish = window.offsets[s][0], window.offsets[e][1]
                candidates[window.example].append((float(starts[s] + ends[e]), begin, finish))
    out = []
    for ex, found in zip(examples, candidates):
        if not found:
            out.append({"answer": "", "start": -1, "end": -1, "score": float("-inf"), "probability": 0.0})
            continue
        found.sort(key=lambda c: -c[0])
        seen: set[tuple[int, int]] = set()
        best = []  # the same span seen from two overlapping windows counts once, at its best score
        for candidate in found:
            if candidate[1:] not in seen and len(best) < n_best:
                seen.add(candidate[1:])
                best.append(candidate)
        top = best[0][0]
        weights = [math.exp(score - top) for score, _, _ in best]
        score, begin, finish = best[0]
        out.append({"answer": ex.context[begin:finish], "start": begin, "end": finish, "score": score,
                    "probability": weights[0] / sum(weights)})
    return out
