"""Token datasets for language-model pretraining: ``train.bin`` / ``val.bin`` and batches.

``prepare_dataset`` turns a corpus into a data folder, as nanoGPT's ``prepare.py`` does::

    out/
      train.bin        # the first 90% of the corpus (by characters), flat token ids
      val.bin          # the last 10%
      tokenizer.json   # the tokenizer that produced them (Hugging Face tokenizers format)
      meta.json        # vocab_size, dtype (uint16 or uint32), token counts, provenance

The corpus is streamed twice (once to build the tokenizer and count characters, once to
encode) and ids are appended to the ``.bin`` files chunk by chunk, so neither the text nor
the ids ever need to fit in memory. Everything is written into a temporary folder next to
``out`` and renamed into place at the end: an interrupted run leaves no half dataset.

Training reads the ``.bin`` files back as memory maps (``load_split``) and draws random
windows from them (``sample_batch``)::

    data = load_split("out", "train")
    x, y = sample_batch(data, batch_size=64, block_size=256, generator=g)  # y = x shifted by 1
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from fromzero import __version__
from fromzero.checkpoint import atomic_write_text
from fromzero.files import temp_dir_beside
from fromzero.data.corpora import DEFAULT_CHUNK_CHARS, Corpus, iter_file_chunks, resolve_corpus
from fromzero.data.datasets import move_into_place
from fromzero.data.tokenizers import TOKENIZER_FILE, TextTokenizer, build_tokenizer
from fromzero.errors import FromzeroError

__all__ = [
    "prepare_dataset", "load_meta", "load_split", "sample_batch", "token_dtype", "META_FILE", "SPLITS",
]

META_FILE = "meta.json"
SPLITS = ("train", "val")
DATA_FORMAT = "fromzero-tokens-v1"
_PREPARE_HINT = "run `fromzero data prepare --corpus ... --tokenizer ... --out DIR` first"

# BPE texts are encoded in pieces of about this many characters (encode_batch runs them in
# parallel) and cut only where the cut cannot change the tokens (see _safe_cuts).
_BPE_PIECE_CHARS = 1 << 16
# Text without a safe cut is carried over at most this long before being cut anyway.
_BPE_MAX_CARRY = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise FromzeroError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


# ----------------------------------------------------------------------------------------------
# prepare


def prepare_dataset(corpus_specs: str | Sequence[str], tokenizer_spec: str, out_dir: str | os.PathLike[str],
                    val_fraction: float = 0.1, force: bool = False, progress: bool = True,
                    chunk_chars: int = DEFAULT_CHUNK_CHARS) -> dict[str, Any]:
    """Tokenize a corpus into ``out_dir`` (train.bin, val.bin, tokenizer.json, meta.json).

    ``corpus_specs`` and ``tokenizer_spec`` take what ``--corpus`` and ``--tokenizer`` take.
    The last ``val_fraction`` of the characters is the validation split. An existing non-empty
    ``out_dir`` is only replaced with ``force=True``, and only once the new data is complete.
    Returns the meta dict written to ``meta.json``.
    """
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not 0 < val_fraction < 1:
        raise FromzeroError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, force)
    corpus = resolve_corpus(list(corpus_specs) if not isinstance(corpus_specs, str) else corpus_specs)

    with _progress_bars(progress) as bars:
        # Pass 1: build the tokenizer, counting characters on the way.
        counter = _CharCounter(corpus.iter_chunks(chunk_chars))
        training_bpe = str(tokenizer_spec).strip().lower().startswith("bpe:")
        learning: list[Callable[[], None]] = []  # BPE merges are learnt after the last chunk
        chunks = bars.track(
            counter, corpus.total_bytes(), "bytes", f"reading {_short(corpus.name)}",
            on_end=(lambda: learning.append(bars.phase("learning BPE merges"))) if training_bpe
            else None,
        )
        tokenizer = build_tokenizer(tokenizer_spec, corpus, chunks=chunks)
        for done in learning:
            done()
        if not counter.exhausted:  # a ready-made tokenizer file: counting is a pass of its own
            counter = _CharCounter(corpus.iter_chunks(chunk_chars))
            for _ in bars.track(counter, corpus.total_bytes(), "bytes", "counting characters"):
                pass
        total_chars = counter.chars

        split_at = int(total_chars * (1 - val_fraction))  # nanoGPT: data[:int(n*0.9)]
        if split_at <= 0 or split_at >= total_chars:
            raise FromzeroError(
                f"corpus {corpus.name!r} is too small: {total_chars} characters leave an empty "
                f"{'train' if split_at <= 0 else 'validation'} split at val_fraction "
                f"{val_fraction}; use more text or another val_fraction"
            )
        dtype = token_dtype(tokenizer.vocab_size)

        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_dir_beside(out_dir, f".{out_dir.name}.tmp-")
        except OSError as e:
            raise FromzeroError(f"cannot create output folder {out_dir}: {e.strerror or e}") from None
        try:
            # Pass 2: encode, appending ids to train.bin / val.bin as we go.
            with _SplitWriter(tmp, dtype) as writer:
                _encode_corpus(corpus, tokenizer, writer, split_at, chunk_chars,
                               bars.task(total_chars, "chars", "tokenizing"))
            tokenizer.save(tmp / TOKENIZER_FILE)
            meta = {
                "format": DATA_FORMAT,
                "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name,
                "train_tokens": writer.counts["train"],
                "val_tokens": writer.counts["val"],
                "eos_id": tokenizer.eos_id,
                "tokenizer": tokenizer.kind,
                "tokenizer_spec": str(tokenizer_spec),
                "corpus": {
                    "specs": list(corpus.specs),
                    "files": len(corpus.files),
                    "chars": total_chars,
                    "train_chars": split_at,
                    "val_chars": total_chars - split_at,
                },
                "val_fraction": val_fraction,
                "fromzero_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            _check_out_dir(out_dir, force)  # again: something may have appeared meanwhile
            move_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        if out_dir.is_symlink():
            raise FromzeroError(f"{out_dir} is a broken symlink; choose another output folder")
        return
    if not out_dir.is_dir():
        raise FromzeroError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise FromzeroError(f"{out_dir} exists; pass --force to overwrite")
    if not (out_dir / META_FILE).is_file():
        # --force replaces a dataset, never an arbitrary folder (think `--out ~ --force`).
        raise FromzeroError(f"{out_dir} exists and is not a fromzero data folder (no {META_FILE}); "
                            "refusing to replace it even with --force: choose another folder or delete it")


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."


class _CharCounter:
    """Pass chunks through, counting characters; ``exhausted`` once the last one went by."""

    def __init__(self, chunks: Iterable[str]):
        self._chunks = chunks
        self.chars = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            self.chars += len(chunk)
            yield chunk
        self.exhausted = True


class _SplitWriter:
    """Appends token ids to ``train.bin`` / ``val.bin`` in ``dtype``; fsyncs on close."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.dtype = dtype
        self.limit = np.iinfo(dtype).max
        self.counts = {s: 0 for s in SPLITS}
        self._folder = folder

    def __enter__(self) -> _SplitWriter:
        self._files: dict[str, BinaryIO] = {s: open(self._folder / f"{s}.bin", "wb") for s in SPLITS}
        return self

    def write(self, split: str, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if ids.min() < 0 or ids.max() > self.limit:  # cannot happen with a sane tokenizer
            raise FromzeroError(f"token id out of range for {self.dtype.name}")
        self._files[split].write(ids.astype(self.dtype, copy=False).tobytes())
        self.counts[split] += len(ids)

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            if exc[0] is None:
                f.flush()
                os.fsync(f.fileno())
            f.close()


# A cut right after a "\n" that has non-space characters on both sides cannot change GPT-2
# style byte-level pre-tokens: the newline is a whitespace run of its own (no pre-token joins a
# letter, digit or symbol across a newline, and the whitespace rules only look one character
# ahead), so encoding the two halves gives the same ids as encoding the whole.
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def _safe_cuts(text: str) -> list[int]:
    """Positions (just after a newline) where ``text`` can be cut without changing tokens."""
    return [m.end() for m in _SAFE_CUT.finditer(text)]


class _BpeEncoder:
    """Encodes a stream of text pieces for one split, cutting only at safe newlines.

    The text after the last safe cut is carried over to the next call, so chunk boundaries
    (which fall anywhere) do not change tokenization; ``flush`` encodes what is left, at the
    end of a file or of a split.
    """

    def __init__(self, tokenizer: TextTokenizer, max_carry: int):
        self.tokenizer = tokenizer
        self.carry = ""
        self.max_carry = max_carry

    def feed(self, text: str) -> np.ndarray:
        buf = self.carry + text
        cuts = _safe_cuts(buf)
        if cuts:
            end = cuts[-1]
        elif len(buf) > self.max_carry:
            # No safe cut for a long stretch (e.g. a single huge line): cut at a newline or,
            # failing that, anywhere; this changes at most a token or two.
            end = buf.rfind("\n") + 1 or len(buf)
            cuts = [end]
        else:
            self.carry = buf
            return np.empty(0, dtype=np.int64)
        self.carry = buf[end:]
        return self._encode_pieces(buf[:end], cuts)

    def flush(self) -> np.ndarray:
        buf, self.carry = self.carry, ""
        return self._encode_pieces(buf, _safe_cuts(buf))

    def _encode_pieces(self, text: str, cuts: list[int]) -> np.ndarray:
        if not text:
            return np.empty(0, dtype=np.int64)
        pieces, start = [], 0
        for c in cuts:
            if c - start >= _BPE_PIECE_CHARS and c < len(text):
                pieces.append(text[start:c])
                start = c
        pieces.append(text[start:])
        encoded = self.tokenizer.encode_batch(pieces)
        n = sum(len(e) for e in encoded)
        return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=n)


def _encode_corpus(corpus: Corpus, tokenizer: TextTokenizer, writer: _SplitWriter, split_at: int,
                   chunk_chars: int, advance: Any) -> None:
    """Encode every file; chars [0, split_at) go to train, the rest to val.

    For BPE, ``<|endoftext|>`` separates files (it goes to the split of the text after it).
    """
    bpe = tokenizer.kind != "char"
    eos = tokenizer.eos_id if bpe else None
    pos = 0  # characters seen so far
    for path in corpus.files:
        encoder = _BpeEncoder(tokenizer, max_carry=max(4 * chunk_chars, _BPE_MAX_CARRY)) if bpe else None
        split = "train" if pos < split_at else "val"
        first = True
        for chunk in iter_file_chunks(path, chunk_chars):
            if first and pos > 0 and eos is not None:
                writer.write(split, np.array([eos], dtype=np.int64))
            first = False
            # A chunk that straddles the split point is cut exactly there.
            parts = [chunk]
            if pos < split_at < pos + len(chunk):
                parts = [chunk[: split_at - pos], chunk[split_at - pos :]]
            for part in parts:
                part_split = "train" if pos < split_at else "val"
                if encoder is not None:
                    if part_split != split:  # finish train before val starts
                        writer.write(split, encoder.flush())
                    writer.write(part_split, encoder.feed(part))
                else:
                    writer.write(part_split, tokenizer.encode_array(part))
                split = part_split
                pos += len(part)
            advance(len(chunk))
        if encoder is not None:
            writer.write(split, encoder.flush())


# ----------------------------------------------------------------------------------------------
# progress (rich)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class _Bars:
    def __init__(self, progress: Any | None):
        self._progress = progress

    def task(self, total: int, unit: str, description: str) -> Any:
        """Return an ``advance(n)`` callable for a new bar (a no-op when bars are off)."""
        if self._progress is None:
            return lambda n: None
        task_id = self._progress.add_task(description, total=total, unit=unit)
        return lambda n: self._progress.advance(task_id, n)

    def phase(self, description: str) -> Callable[[], None]:
        """Show an indeterminate bar; returns ``done()`` that completes it."""
        if self._progress is None:
            return lambda: None
        task_id = self._progress.add_task(description, total=None, unit="")
        return lambda: self._progress.update(task_id, total=1, completed=1)

    def track(self, chunks: Iterable[str], total: int, unit: str, description: str,
              on_end: Callable[[], None] | None = None) -> Iterator[str]:
        """Yield ``chunks``, advancing a bar by their size in ``unit`` (bytes or chars)."""
        advance = self.task(total, unit, description)
        for chunk in chunks:
            yield chunk
            advance(len(chunk.encode("utf-8")) if unit == "bytes" else len(chunk))
        if on_end is not None:
            on_end()


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[_Bars]:
    if not enabled:
        yield _Bars(None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class CountColumn(ProgressColumn):
        """ "1.2M/5.1M chars 3.4M/s" """

        def render(self, task: Any) -> Text:
            unit = task.fields.get("unit", "")
            if not unit:  # a phase without a count
                return Text("")
            total = _human(task.total) if task.total is not None else "?"
            speed = task.finished_speed or task.speed
            rate = f" {_human(speed)}/s" if speed else ""
            return Text(f"{_human(task.completed)}/{total} {unit}{rate}")

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=16),
        CountColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield _Bars(progress)


# ----------------------------------------------------------------------------------------------
# reading back


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a prepared data folder, checked for the fields readers rely on."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FromzeroError(f"data folder {data_dir} does not exist; {_PREPARE_HINT}")
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise FromzeroError(f"{data_dir} has no {META_FILE} (not a prepared data folder); {_PREPARE_HINT}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FromzeroError(f"{meta_path} is unreadable ({e}); {_PREPARE_HINT}") from None
    if not isinstance(meta, dict):
        raise FromzeroError(f"{meta_path} is not a JSON object; {_PREPARE_HINT}")
    problems = []
    if meta.get("dtype") not in ("uint16", "uint32"):
        problems.append(f"dtype {meta.get('dtype')!r} (expected uint16 or uint32)")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        problems.append(f"vocab_size {vocab!r}")
    for s in SPLITS:
        n = meta.get(f"{s}_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            problems.append(f"{s}_tokens {n!r}")
    if problems:
        raise FromzeroError(f"{meta_path} has bad fields: {', '.join(problems)}; {_PREPARE_HINT}")
    return meta


def load_split(data_dir: str | os.PathLike[str], split: Literal["train", "val"]) -> np.memmap:
    """The token ids of one split as a read-only memory map (dtype from ``meta.json``)."""
    if split not in SPLITS:
        raise FromzeroError(f"unknown split {split!r}: expected 'train' or 'val'")
    data_dir = Path(data_dir).expanduser()
    meta = load_meta(data_dir)
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        raise FromzeroError(f"{data_dir} has no {split}.bin; {_PREPARE_HINT}")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    expected = meta[f"{split}_tokens"]
    if size != expected * dtype.itemsize:
        raise FromzeroError(
            f"{path} holds {size} bytes but {META_FILE} says {expected} {dtype.name} tokens "
            f"({expected * dtype.itemsize} bytes); the data folder is corrupt, {_PREPARE_HINT}"
        )
    if size == 0:
        raise FromzeroError(f"{path} is empty; {_PREPARE_HINT}")
    return np.memmap(path, dtype=dtype, mode="r")


def sample_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of windows: ``x`` (B, T) and targets ``y`` = ``x`` shifted by one token.

    Offsets come from ``torch.randint(len(data) - block_size, (B,), generator=generator)``, so
    the batch depends only on the generator state (exact resume restores it). One numpy
    fancy-index gathers all windows at once; both tensors are contiguous int64 on the CPU.
    """
    if batch_size < 1 or block_size < 1:
        raise FromzeroError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    n = len(data)
    if n <= block_size:
        raise FromzeroError(f"block_size {block_size} is longer than the data ({n} tokens); "
                            "use a smaller block_size or more data")
    offsets = torch.randint(n - block_size, (batch_size,), generator=generator)  # (B,)
    index = offsets.numpy()[:, None] + np.arange(block_size + 1)  # (B, T+1)
    windows = torch.from_numpy(np.asarray(data[index], dtype=np.int64))  # (B, T+1)
    x = windows[:, :-1].contiguous()  # (B, T)
    y = windows[:, 1:].contiguous()  # (B, T)
    return x, y
