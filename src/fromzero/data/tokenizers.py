"""Tokenizers: text <-> token ids, always stored as one Hugging Face ``tokenizer.json``.

Two kinds are trained here, both saved in the `tokenizers` JSON format so that
``tokenizers.Tokenizer.from_file`` (and transformers' ``PreTrainedTokenizerFast``) read them:

* ``char`` -- one token per character, like nanoGPT's shakespeare_char. The vocabulary is the
  sorted set of characters of the corpus, so ids equal nanoGPT's ``stoi``. Built as a WordLevel
  model over single characters (a pre-tokenizer isolates every character, newlines included,
  and the ``Fuse`` decoder joins them back with nothing in between). It has no unknown token:
  encoding a character outside the vocabulary is an error that names the characters.
* ``bpe``  -- byte-level BPE as in GPT-2: any text encodes (bytes are the base alphabet) and
  decodes back exactly. ``<|endoftext|>`` is a special token, used between documents.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from fromzero.errors import FromzeroError, first_line

if TYPE_CHECKING:
    from fromzero.data.corpora import Corpus

__all__ = [
    "EOS_TOKEN", "MIN_BPE_VOCAB", "TextTokenizer", "train_char_tokenizer", "train_bpe_tokenizer",
    "build_tokenizer", "TOKENIZER_SPEC_HELP",
]

EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 byte tokens + <|endoftext|>
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_SPEC_HELP = (
    "char, bpe:N (byte-level BPE with N >= 257 tokens, e.g. bpe:8192), "
    "or a path to a tokenizer.json file (or a folder holding one)"
)
# The (never used) unknown token named in the char model: WordLevel needs a name for it, but it
# is deliberately not in the vocabulary so ids stay == sorted characters. Unknown characters are
# caught before they reach the model.
_CHAR_UNK = "<unk>"
_MAX_LISTED_UNKNOWN = 10


class TextTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the few methods fromzero needs.

    ``kind`` is ``"char"`` (WordLevel over single characters), ``"bpe"``, or the lower-cased
    model type for other tokenizer.json files (e.g. ``"wordpiece"``). ``backend`` is the wrapped
    ``tokenizers.Tokenizer`` for anything else.
    """

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        model_type = type(backend.model).__name__.lower()  # "bpe", "wordlevel", "wordpiece", ...
        vocab = backend.get_vocab(with_added_tokens=True)
        if model_type == "wordlevel" and vocab and all(len(t) == 1 for t in vocab):
            self.kind = "char"
        else:
            self.kind = model_type or "unknown"
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        eos = backend.token_to_id(EOS_TOKEN)
        self.eos_id: int | None = None if self.kind == "char" else eos
        self._lookup: np.ndarray | None = None  # char kind: code point -> id (-1: unknown)
        if self.kind == "char" and backend.normalizer is None:  # ours never has one
            table = np.full(max(ord(c) for c in vocab) + 1, -1, dtype=np.int64)
            for ch, i in vocab.items():
                table[ord(ch)] = i
            self._lookup = table

    # -- encoding ------------------------------------------------------------------------------

    def encode_array(self, text: str) -> np.ndarray:
        """Encode ``text`` to a 1-D ``int64`` numpy array (the fast path for big texts).

        For ``char`` this is a numpy table lookup on code points, giving exactly the ids the
        Rust tokenizer would (a test checks both agree) at a fraction of the cost.
        """
        if self._lookup is None:
            try:
                ids = self.backend.encode(text, add_special_tokens=False).ids
            except Exception as e:  # e.g. a WordLevel model meeting an unknown word
                raise FromzeroError(f"cannot encode text: {first_line(e)}") from None
            return np.asarray(ids, dtype=np.int64)
        # "surrogatepass": a lone surrogate is just another unknown character, not a crash.
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        table = self._lookup
        in_table = cps < len(table)
        ids = table[np.where(in_table, cps, 0)]
        ids[~in_table] = -1
        unknown = ids < 0
        if unknown.any():
            self._raise_unknown(np.unique(cps[unknown]))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (BPE encodes them in parallel in Rust)."""
        if self._lookup is not None:
            return [self.encode(t) for t in texts]
        try:
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        except Exception as e:
            raise FromzeroError(f"cannot encode text: {first_line(e)}") from None
        return [e.ids for e in encodings]

    def _raise_unknown(self, code_points: np.ndarray) -> None:
        chars = [chr(int(c)) for c in code_points]
        listed = ", ".join(repr(c) for c in chars[:_MAX_LISTED_UNKNOWN])
        more = f" (and {len(chars) - _MAX_LISTED_UNKNOWN} more)" if len(chars) > _MAX_LISTED_UNKNOWN else ""
        noun = "character" if len(chars) == 1 else "characters"
        raise FromzeroError(
            f"text contains {len(chars)} {noun} not in the tokenizer's vocabulary: {listed}{more}"
        )

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept, so ``decode(encode(s)) == s``.

        Ids outside the vocabulary are skipped (what the Rust tokenizer does), which matters
        when a model's output layer is padded beyond the vocabulary.
        """
        if hasattr(ids, "tolist"):  # a numpy array or torch tensor
            ids = ids.tolist()  # type: ignore[union-attr]
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` atomically (temp file, fsync, rename); returns the path.

        ``path`` is the file to write; an existing folder means ``folder/tokenizer.json``.
        """
        from fromzero.checkpoint import atomic_write_text  # imports torch: not at module import

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self.backend.to_str(pretty=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Read a ``tokenizer.json`` file, or a folder that holds one."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            where = f"folder {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} not found"
            raise FromzeroError(f"cannot load tokenizer: {where}")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise FromzeroError(f"{file} is not a valid tokenizer.json: {first_line(e)}") from None
        return cls(backend)

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"



# ----------------------------------------------------------------------------------------------
# Training


def char_tokenizer_from_chars(chars: Iterable[str]) -> TextTokenizer:
    """A char tokenizer over exactly ``chars``; ids follow sorted character order."""
    vocab = {ch: i for i, ch in enumerate(sorted(set(chars)))}
    if not vocab:
        raise FromzeroError("cannot build a char tokenizer from empty text")
    if any(len(ch) != 1 for ch in vocab):
        raise ValueError("char tokenizer vocabulary entries must be single characters")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=_CHAR_UNK))
    # [\s\S] matches any one code point, newline included (Oniguruma has no (?s) flag).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return TextTokenizer(backend)


def train_char_tokenizer(chunks: Iterable[str]) -> TextTokenizer:
    """Character-level tokenizer: the vocabulary is the sorted set of characters seen."""
    seen: set[str] = set()
    for chunk in chunks:
        seen.update(chunk)
    return char_tokenizer_from_chars(seen)


def train_bpe_tokenizer(chunks: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style) with ``vocab_size`` tokens including ``<|endoftext|>``.

    A small corpus may yield fewer tokens than asked for (no more merges to learn).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise FromzeroError(f"BPE vocab size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_BPE_VOCAB:
        raise FromzeroError(f"BPE vocab size {vocab_size} is too small: byte-level BPE needs at least "
                            f"{MIN_BPE_VOCAB} (256 bytes + {EOS_TOKEN})")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen_text = False

    def texts() -> Iterable[str]:
        nonlocal seen_text
        for chunk in chunks:
            if chunk:
                seen_text = True
                yield chunk

    backend.train_from_iterator(texts(), trainer=trainer)
    if not seen_text:
        raise FromzeroError("cannot train a BPE tokenizer on empty text")
    return TextTokenizer(backend)


_BPE_SPEC = re.compile(r"bpe:(\d+)", re.IGNORECASE)


def build_tokenizer(
    spec: str, corpus: Corpus, chunks: Iterable[str] | None = None
) -> TextTokenizer:
    """The tokenizer for ``--tokenizer char|bpe:N|FILE``, trained on ``corpus`` if needed.

    ``chunks`` (optional) replaces ``corpus.iter_chunks()`` as the training text, e.g. to wrap
    it in a progress bar.
    """
    spec = str(spec).strip()
    lowered = spec.lower()
    text = chunks if chunks is not None else corpus.iter_chunks()
    if lowered == "char":
        return train_char_tokenizer(text)
    m = _BPE_SPEC.fullmatch(spec)
    if m:
        return train_bpe_tokenizer(text, int(m.group(1)))
    path = Path(spec).expanduser()
    if spec and path.exists():
        return TextTokenizer.load(path)
    if lowered.startswith("bpe") or not spec:
        raise FromzeroError(f"bad tokenizer spec {spec!r}: expected {TOKENIZER_SPEC_HELP}")
    raise FromzeroError(f"tokenizer {spec!r} not found: expected {TOKENIZER_SPEC_HELP}")
