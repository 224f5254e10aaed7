"""Text classification data: labelled texts from files, token ids, length-bucketed batches.

``load_text_classification(source)`` -> ``{"train": [(text, label), ...], "val": ..., "test": ...}``

``source`` is one of

* ``"shakespeare-genre"`` / ``"rotten-tomatoes"`` -- built in (``datasets.shakespeare_genre``, split
  by play; ``rotten_tomatoes.classification_splits``, positive / negative, split by movie).
* a directory holding ``train.csv`` or ``train.jsonl`` (exactly one), and optionally ``val.*``
  and ``test.*``; a missing val or test split is carved out of train (see below).
* a single ``.csv`` / ``.jsonl`` / ``.json-lines`` file, split into train/val/test.

File rules:

* CSV: read with the ``csv`` module, UTF-8 (a BOM is allowed); the first row is the header.
* JSONL: one JSON object per line; blank lines are skipped.
* Each row needs a text column (default ``text``) and a label column (default ``label``). A text
  must be a string with some non-whitespace character. A label must be a non-empty string or an
  integer and is kept as a string (``0`` -> ``"0"``); a boolean or null label is an error.
* Train needs at least 2 classes; every val/test label must occur in train; no split may be empty.

Carving (``val_fraction`` / ``test_fraction`` of the rows being split, ``seed``): a split is cut
with scikit-learn's ``train_test_split`` stratified by label. When stratification is impossible
(a class with a single row, or fewer rows to cut than classes) the cut is a plain random one and
rows whose class would then be missing from train are put back into train, so every class always
stays in train. Everything is deterministic for a given seed.

Every problem with the data raises ``FromzeroError`` with a one-line message naming the file
(and the line, for a bad row).

For training: ``encode_texts`` (token ids, truncated keeping the final [SEP]), then an
``EncodedClassificationSet`` batched with ``LengthBucketSampler`` + its ``collator`` (``PadCollator``).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fromzero.errors import FromzeroError

__all__ = [
    "BUILTIN", "load_text_classification", "label_names", "encode_texts", "LengthBucketSampler",
    "collate_padded", "PadCollator", "EncodedClassificationSet",
]

BUILTIN = "shakespeare-genre"
ROTTEN_TOMATOES = "rotten-tomatoes"  # fromzero.data.rotten_tomatoes
SUFFIXES = (".csv", ".jsonl", ".json-lines")
SPLITS = ("train", "val", "test")

Example = tuple[str, str]
_Row = tuple[str, str, int]  # text, label, line number (for error messages)

# ---------------------------------------------------------------------------------------------
# reading files


def _check_columns(path: Path, where: str, columns: Sequence[str], text_col: str, label_col: str) -> None:
    for kind, name in (("text", text_col), ("label", label_col)):
        if name not in columns:
            msg = f"{path}{where}: no {kind} column {name!r}; columns are: {', '.join(map(repr, columns))}"
            close = difflib.get_close_matches(name, [str(c) for c in columns], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FromzeroError(f"{msg} ({hint}name it with --data.{kind}_column)")


def _check_row(path: Path, line: int, text: Any, label: Any) -> _Row:
    where = f"{path}:{line}"
    if not isinstance(text, str) or not text.strip():
        raise FromzeroError(f"{where}: the text must be a non-empty string, got {text!r}")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        raise FromzeroError(f"{where}: the label must be a string or an integer, got {label!r}")
    return text, label, line


def _read_csv(path: Path, text_col: str, label_col: str) -> list[_Row]:
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            _check_columns(path, " (header)", reader.fieldnames or [], text_col, label_col)
            for row in reader:
                rows.append(_check_row(path, reader.line_num, row[text_col], row[label_col]))
    except UnicodeDecodeError as e:
        raise FromzeroError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except csv.Error as e:
        raise FromzeroError(f"{path}: invalid CSV: {e}") from None
    return rows


def _read_jsonl(path: Path, text_col: str, label_col: str) -> list[_Row]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: U+2028 is text
    except UnicodeDecodeError as e:
        raise FromzeroError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FromzeroError(f"{path}:{n}: invalid JSON on line {n}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise FromzeroError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        _check_columns(path, f":{n}", list(obj), text_col, label_col)
        rows.append(_check_row(path, n, obj[text_col], obj[label_col]))
    return rows


def _read_file(path: Path, text_col: str, label_col: str) -> list[_Row]:
    if not path.is_file():
        raise FromzeroError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise FromzeroError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                            f"use one of {', '.join(SUFFIXES)}")
    reader = _read_csv if suffix == ".csv" else _read_jsonl
    rows = reader(path, text_col, label_col)
    if not rows:
        raise FromzeroError(f"{path} has no rows")
    return rows


def _split_file(directory: Path, split: str) -> Path | None:
    found = [directory / f"{split}{s}" for s in SUFFIXES if (directory / f"{split}{s}").is_file()]
    if len(found) > 1:
        raise FromzeroError(f"{directory} has several {split} files: "
                            f"{', '.join(p.name for p in found)}; keep one")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# splitting


def _check_classes(rows: list[_Row], name: str) -> None:
    labels = {r[1] for r in rows}
    if len(labels) < 2:
        raise FromzeroError(f"{name} has a single class {labels.pop()!r}: a classifier needs at least 2")


def _carve(rows: list[_Row], fraction: float, seed: int, what: str
           ) -> tuple[list[_Row], list[_Row]]:
    """(rest, cut): ``fraction`` of ``rows`` cut off, stratified when possible, every class kept."""
    from sklearn.model_selection import train_test_split

    labels = [r[1] for r in rows]
    try:
        rest, cut = train_test_split(rows, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class too small to stratify: plain random split
        try:
            rest, cut = train_test_split(rows, test_size=fraction, random_state=seed)
        except ValueError:
            raise FromzeroError(f"{what}: too few rows ({len(rows)}) to carve out a split") from None
        kept = {r[1] for r in rest}
        rest = rest + [r for r in cut if r[1] not in kept]
        cut = [r for r in cut if r[1] in kept]
    return list(rest), list(cut)


def _check_splits(splits: dict[str, list[_Row]], names: dict[str, str]) -> None:
    _check_classes(splits["train"], names["train"])
    train_labels = {r[1] for r in splits["train"]}
    for split in SPLITS:
        if not splits[split]:
            raise FromzeroError(f"the {split} split of {names[split]} is empty: too few rows "
                                "to carve it out (add rows or give the split its own file)")
        for _text, label, line in splits[split]:
            if label not in train_labels:
                raise FromzeroError(f"{names[split]}:{line}: label {label!r} never occurs in "
                                    f"train ({names['train']})")


def load_text_classification(source: str, text_column: str = "text", label_column: str = "label",
                             val_fraction: float = 0.1, test_fraction: float = 0.1,
                             seed: int = 0) -> dict[str, list[Example]]:
    """Labelled texts as ``{"train": [(text, label), ...], "val": [...], "test": [...]}``; the
    sources, file rules and carving (fractions of the rows before carving) are in the module docstring."""
    if source == BUILTIN:
        from fromzero.data.datasets import shakespeare_genre

        data = shakespeare_genre()
        return {s: [(r["text"], r["label"]) for r in data[s]] for s in SPLITS}
    if source == ROTTEN_TOMATOES:  # built in: review -> positive / negative, split by movie
        from fromzero.data.rotten_tomatoes import classification_splits

        return classification_splits()
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise FromzeroError(f"{name} must be between 0 and 1 (exclusive), got {f}")
    if val_fraction + test_fraction >= 1:
        raise FromzeroError(f"val_fraction + test_fraction must be below 1, "
                            f"got {val_fraction} + {test_fraction}")

    path = Path(source)
    if path.is_dir():
        files = {s: _split_file(path, s) for s in SPLITS}
        if files["train"] is None:
            raise FromzeroError(f"{path} has no train file: expected train.csv or train.jsonl")
    elif path.exists() or path.suffix.lower() in SUFFIXES:
        files = {"train": path, "val": None, "test": None}
    else:
        raise FromzeroError(f"dataset not found: {source} (neither a file, a directory nor {BUILTIN!r})")

    splits = {s: _read_file(p, text_column, label_column) for s, p in files.items() if p}
    names = {s: str(p or files["train"]) for s, p in files.items()}
    _check_classes(splits["train"], names["train"])
    whole = len(splits["train"])
    if files["test"] is None:
        splits["train"], splits["test"] = _carve(splits["train"], test_fraction, seed, names["train"])
    if files["val"] is None:  # val_fraction of all the rows, not of those left after test
        fraction = min(val_fraction * whole / len(splits["train"]), 0.5)
        splits["train"], splits["val"] = _carve(splits["train"], fraction, seed, names["train"])
    _check_splits(splits, names)
    return {s: [(text, label) for text, label, _ in splits[s]] for s in SPLITS}


def label_names(train: Sequence[Example]) -> list[str]:
    """The sorted distinct labels of ``train``; numerically sorted if all are integers."""
    labels = {label for _, label in train}
    if labels and all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        return sorted(labels, key=lambda s: (int(s), s))
    return sorted(labels)


# ---------------------------------------------------------------------------------------------
# token ids


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[np.ndarray], int]:
    """Token ids (int64 arrays, special tokens included) of ``texts`` and how many were cut.

    A text longer than ``max_length`` ids is truncated the way Hugging Face does it: the
    post-processor's special tokens (the final [SEP]) are kept. The tokenizer's truncation
    and padding settings are restored afterwards.
    """
    if max_length < 2:
        raise FromzeroError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
    if not texts:
        return [], 0
    truncation, padding = tokenizer.truncation, tokenizer.padding
    try:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        long = [i for i, a in enumerate(ids) if len(a) > max_length]
        if long:
            tokenizer.enable_truncation(max_length=max_length)
            cut = tokenizer.encode_batch([texts[i] for i in long], add_special_tokens=True)
            for i, e in zip(long, cut):
                ids[i] = np.asarray(e.ids, dtype=np.int64)
    finally:
        if truncation is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**truncation)
        if padding is not None:
            tokenizer.enable_padding(**padding)
    return ids, len(long)


# ---------------------------------------------------------------------------------------------
# batches


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of indices of similar length, so that padding per batch wastes little.

    ``shuffle=True``: the indices are shuffled, cut into chunks of ``batch_size *
    bucket_size_multiplier``, each chunk is sorted by length and cut into batches, and the
    order of all batches is shuffled. The shuffle depends only on ``seed + epoch``
    (``set_epoch``). ``shuffle=False``: all indices sorted by length, longest first.
    ``drop_last`` drops the one short batch, if any.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 bucket_size_multiplier: int = 50, drop_last: bool = False) -> None:
        if batch_size < 1 or bucket_size_multiplier < 1:
            raise ValueError(f"batch_size and bucket_size_multiplier must be >= 1, "
                             f"got {batch_size} and {bucket_size_multiplier}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.bucket_size_multiplier, self.drop_last = bucket_size_multiplier, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of this epoch (``seed + epoch``) from the next iteration on."""
        self.epoch = epoch

    def _cut(self, indices: list[int]) -> list[list[int]]:
        indices = sorted(indices, key=lambda i: -self.lengths[i])  # stable: ties keep their order
        return [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            batches = self._cut(list(range(n)))
        else:
            rng = random.Random(self.seed + self.epoch)
            order = list(range(n))
            rng.shuffle(order)
            chunk = self.batch_size * self.bucket_size_multiplier
            batches = [b for s in range(0, n, chunk) for b in self._cut(order[s:s + chunk])]
            rng.shuffle(batches)
        for batch in batches:
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def collate_padded(sequences: list[np.ndarray], labels: list[int] | None, pad_id: int,
                   pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T) int64, right-padded, and ``labels`` (B,).

    T is the longest sequence rounded up to a multiple of ``pad_to_multiple_of`` (1 or 0: no
    rounding). ``labels`` is left out of the batch when it is None.
    """
    if not sequences:
        raise ValueError("collate_padded needs at least one sequence")
    longest = max(len(s) for s in sequences)
    m = max(pad_to_multiple_of, 1)
    width = max(-(-longest // m) * m, 1)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[row, :len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.int64)
    return batch


@dataclass(frozen=True)
class PadCollator:
    """``collate_fn`` for a DataLoader over an :class:`EncodedClassificationSet` (picklable)."""

    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, items: list[tuple[np.ndarray, int | None]]) -> dict[str, torch.Tensor]:
        labels = [label for _, label in items]
        return collate_padded([ids for ids, _ in items],
                              None if any(label is None for label in labels) else labels,
                              self.pad_id, self.pad_to_multiple_of)


class EncodedClassificationSet(Dataset):
    """Token id arrays with their label ids (None for unlabelled data); ``lengths`` per item.

    ``ds[i]`` -> ``(ids, label_id)``. Batch it with ``batch_sampler=LengthBucketSampler(
    ds.lengths, ...)`` and ``collate_fn=ds.collator(pad_id)``.
    """

    def __init__(self, ids: list[np.ndarray], label_ids: Sequence[int] | None = None) -> None:
        if label_ids is not None and len(label_ids) != len(ids):
            raise ValueError(f"{len(ids)} sequences but {len(label_ids)} labels")
        self.ids = ids
        self.label_ids = None if label_ids is None else [int(i) for i in label_ids]
        self.lengths = [len(a) for a in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int | None]:
        return self.ids[index], None if self.label_ids is None else self.label_ids[index]

    @staticmethod
    def collator(pad_id: int, pad_to_multiple_of: int = 8) -> PadCollator:
        """The ``collate_fn`` that pads this set's items into a batch dict."""
        return PadCollator(pad_id, pad_to_multiple_of)
