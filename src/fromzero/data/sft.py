"""Instruction-tuning (SFT) data for decoder LMs: load, render, tokenize with loss masks, pack.

Sources (:func:`load_sft_examples`), every example normalised to ``{"messages": [{"role":
"system"|"user"|"assistant", "content": str}, ...]}``:

* a ``.jsonl`` file or a folder with ``train.jsonl`` (+ optional ``val.jsonl``, ``test.jsonl``;
  :func:`load_jsonl_splits` carves missing splits out of train). A line is ``{"prompt",
  "response"}`` (+ optional ``"system"``) or ``{"messages": [...]}``: known roles, non-empty string
  contents, at least one assistant message; a bad line is a :class:`FromzeroError` naming the file
  and line. Blank lines are skipped, other keys ignored.
* ``"shakespeare-dialogue"`` (:func:`shakespeare_dialogue`) and ``"rotten-tomatoes"`` (a review ->
  ``positive`` / ``negative``, :mod:`fromzero.data.rotten_tomatoes`), built in.

Template (:class:`ChatTemplate`): each message is ``prefix + content + turn_end``; by default::

    USER:
    Who's there?

    ASSISTANT:
    Nay, answer me: stand, and unfold yourself.

    <eos, if the tokenizer has one>

Only capitals, a colon, newlines and spaces, so a char tokenizer trained on Shakespeare encodes it
(and speeches never hold a blank line, so ``turn_end`` doubles as the char models' stop sequence).
A pretrained chat model brings its own template instead (:class:`~fromzero.data.chat_template.
JinjaChatTemplate`, e.g. ChatML), with the same ``render`` / ``text`` / ``prompt_text`` methods
(:func:`checkpoint_chat_template` finds a checkpoint's). Its target is the reply plus the
template's own end-of-turn text (``positive<|im_end|>\n``), so no eos is appended (``add_eos=None``
decides by template); the special tokens it writes are parsed from the text, and the tokenizer adds
none of its own, so a template that starts with BOS gets exactly one.

Masking (:func:`tokenize_sft`): only assistant contents, their ``turn_end`` and eos are targets;
everything else gets label ``-100``, which ``GPT.forward`` ignores. Segments are tokenized
separately and concatenated, so a target boundary never falls inside a token; items are ``(x, y) =
(ids[:-1], labels[1:])``. Whether those ids equal the whole text's (what the model reads at
inference) depends on the template (:func:`segment_mismatches`): with ChatML every boundary sits
next to a special token, which is never merged, so they agree; fromzero's template with a BPE
tokenizer may differ by a merge at a boundary (the char tokenizer never does).

Packing (:func:`pack_sft`): examples are concatenated in order and cut into rows of exactly
``block_size`` tokens (the last padded with ``y = -100``). There is no block-diagonal mask: a token
may attend to earlier examples in its row and an example may span two rows, the standard trade-off
of packed SFT (the loss is unchanged: prompt tokens are never targets).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from fromzero.checkpoint import INFO_FILE, read_json
from fromzero.data.datasets import folio_plays
from fromzero.data.tokenizers import TextTokenizer
from fromzero.errors import FromzeroError

if TYPE_CHECKING:
    from fromzero.data.chat_template import JinjaChatTemplate

__all__ = [
    "ROLES", "IGNORE_INDEX", "load_sft_examples", "add_system_prompt", "shakespeare_dialogue", "ChatTemplate",
    "checkpoint_chat_template", "SFTSet", "tokenize_sft", "segment_mismatches", "pack_sft", "collate_sft",
]

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Loading


def load_sft_examples(
    source: str, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[dict]]:
    """``{"train", "val", "test"}`` lists of normalised examples (see the module docstring)."""
    if source == "shakespeare-dialogue":
        return shakespeare_dialogue()
    if source == "rotten-tomatoes":
        from fromzero.data.rotten_tomatoes import sft_splits

        return sft_splits()
    return load_jsonl_splits(
        source, lambda obj, where: {"messages": _normalise(obj, where)}, "SFT", "examples",
        "shakespeare-dialogue, rotten-tomatoes, a .jsonl file or a folder with train.jsonl",
        val_fraction, test_fraction, seed,
    )


def load_jsonl_splits(source: str, parse: Callable[[Any, str], T], what: str, noun: str, expected: str,
                      val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[T]]:
    """``parse(row, "file:line")`` of the rows of a ``.jsonl`` file or of a folder's ``train.jsonl``
    (+ optional ``val.jsonl``, ``test.jsonl``); a missing split is carved out of train:
    ``val_fraction`` / ``test_fraction`` of it, chosen by ``seed``, file order kept. ``what`` and
    ``noun`` name the data and its rows in errors; ``expected`` lists the sources a bad one could be."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise FromzeroError(f"val_fraction and test_fraction must be >= 0 and sum to < 1 "
                            f"(got {val_fraction}, {test_fraction})")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise FromzeroError(f"{what} data folder {path} has no train.jsonl")
        files = {s: path / f"{s}.jsonl" for s in SPLITS}
        splits = {s: _read_jsonl(f, parse, what, noun) for s, f in files.items() if f.is_file()}
    elif path.is_file() and path.suffix == ".jsonl":
        splits = {"train": _read_jsonl(path, parse, what, noun)}
    elif path.exists():
        raise FromzeroError(f"{what} data {path} must be a .jsonl file or a folder with train.jsonl")
    else:
        raise FromzeroError(f"{what} data {source!r} not found: expected {expected}")
    train = splits["train"]
    fractions = {"val": val_fraction, "test": test_fraction}
    carve = {s: int(round(len(train) * fractions[s])) for s in ("val", "test") if s not in splits}
    order = np.random.default_rng(seed).permutation(len(train))
    start = 0
    for s, n in carve.items():
        splits[s] = [train[i] for i in sorted(order[start : start + n].tolist())]
        start += n
    if start:
        taken = set(order[:start].tolist())
        splits["train"] = [row for i, row in enumerate(train) if i not in taken]
    if not splits["train"]:
        raise FromzeroError(f"{what} data {source!r}: no training {noun} left after the split")
    return {s: splits[s] for s in SPLITS}


def add_system_prompt(examples: list[dict], system_prompt: str) -> list[dict]:
    """Copies of ``examples`` with a system message ``system_prompt`` first, unless an example
    already has a system message (or the prompt is empty: examples returned unchanged)."""
    if not system_prompt:
        return examples
    out = []
    for ex in examples:
        messages = ex["messages"]
        if not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        out.append({**ex, "messages": messages})
    return out


def _read_jsonl(path: Path, parse: Callable[[Any, str], T], what: str, noun: str) -> list[T]:
    """``parse`` of each non-blank line of a JSONL file, decoded; errors name ``file:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FromzeroError(f"{what} file {path} is not UTF-8 text") from None
    except OSError as e:
        raise FromzeroError(f"cannot read {what} file {path}: {e.strerror or e}") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FromzeroError(f"{where}: not valid JSON ({e.msg})") from None
        rows.append(parse(obj, where))
    if not rows:
        raise FromzeroError(f"{what} file {path} holds no {noun}")
    return rows


def message_list(raw: Any, where: str) -> list[dict]:
    """A record's ``messages`` as ``{"role", "content"}`` dicts (checked by :func:`check_messages`)."""
    if not isinstance(raw, list) or not raw:
        raise FromzeroError(f"{where}: 'messages' must be a non-empty list")
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FromzeroError(f"{where}: message {j} must be an object with role and content")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def check_messages(messages: list[dict], where: str) -> None:
    """Every message has a known role and a non-empty string content."""
    for j, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise FromzeroError(f"{where}: message {j} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise FromzeroError(f"{where}: message {j} ({m['role']}) needs a non-empty string content")


def _normalise(obj: object, where: str) -> list[dict]:
    """The validated message list of one JSONL record."""
    if not isinstance(obj, dict):
        raise FromzeroError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = message_list(obj["messages"], where)
    elif "prompt" in obj and "response" in obj:
        messages = [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["response"]}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise FromzeroError(f"{where}: expected {{\"prompt\", \"response\"}} or {{\"messages\"}}, "
                            f"got keys {sorted(obj)}")
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise FromzeroError(f"{where}: no assistant message (nothing to learn)")
    return messages


# ---------------------------------------------------------------------------------------------
# shakespeare-dialogue

# A speaker line: "Ber.", "FIRST WITCH.", "TIMON. [To another Servant.]" or (A Midsummer
# Night's Dream) "THESEUS" alone. The name's words must be capitalised (or "and"/"of"), which
# rejects one-sentence lines like "Saddle my horse."; bare roman numerals are song stanzas.
_SPEAKER = re.compile(
    r"^(?P<name>[A-Z][A-Za-z'&\-. ]{0,40}?)\.(?:\s*(?P<rest>\[.*))?$"
    r"|^(?P<caps>[A-Z][A-Z'&\- ]{0,40})$"
)
_HEADING = re.compile(r"^(ACT|SCENE)\b", re.IGNORECASE)
_NUMERAL = re.compile(r"^[IVXL]+$")
# Inside a block, an all-capitals "NAME." line is a speaker whose speech lacks a blank line.
_INNER_SPEAKER = re.compile(r"^[A-Z][A-Z'&\-. ]{1,40}\.$")
DIALOGUE_MIN_CHARS = 20
DIALOGUE_MAX_CHARS = 400


def _speaker(line: str) -> tuple[str, str] | None:
    """(name, rest of the line) if ``line`` opens a speech."""
    m = _SPEAKER.match(line)
    if not m or _HEADING.match(line):
        return None
    name = m["name"] or m["caps"]
    if _NUMERAL.match(name) or not all(w[0].isupper() or w in ("and", "of") for w in name.split()):
        return None
    return name.upper(), m["rest"] or ""


@dataclass
class Speech:
    """One speech of a play: who speaks, the text, and where it is in the play's lines."""

    speaker: str
    """The speaker's name as the text writes it, upper-cased, without the final period ("BER")."""
    text: str
    """The speech without its speaker line (stage directions inside it kept), lines joined with \\n."""
    first: int
    """Index (0-based) in the lines given of the speaker line."""
    last: int
    """Index (0-based) of the speech's last line."""


def speech_scenes(lines: list[str]) -> list[list[Speech]]:
    """A play's speeches as scenes of :class:`Speech`; a heading starts a new scene.

    Blocks are separated by blank lines (or an all-capitals speaker line). A block opening
    with a speaker line starts a speech; a ``[stage direction]`` block between speeches is
    dropped; any other block continues the current speech (after a stage direction, a song, a
    letter), with the directions that came before it kept in the text.
    """
    blocks: list[list[tuple[int, str]]] = [[]]  # (index in lines, stripped line)
    for i, line in enumerate(lines):
        line = line.strip()
        if blocks[-1] and _INNER_SPEAKER.match(line) and _speaker(line):
            blocks.append([])
        if line:
            blocks[-1].append((i, line))
        elif blocks[-1]:
            blocks.append([])
    scenes: list[list[Speech]] = [[]]
    speaker: str | None = None
    text: list[str] = []
    pending: list[str] = []  # directions after the current speech
    first = last = 0

    def flush() -> None:
        if speaker is not None and text:
            scenes[-1].append(Speech(speaker, "\n".join(text), first, last))

    for numbered in blocks:
        if not numbered:
            continue
        block = [line for _, line in numbered]
        # A speaker line alone in its block (its speech follows a blank line) must be capitals.
        head = _speaker(block[0]) if len(block) >= 2 or _INNER_SPEAKER.match(block[0]) else None
        if _HEADING.match(block[0]):
            flush()
            speaker, text, pending = None, [], []
            scenes.append([])
        elif head is not None:
            flush()
            speaker, text, pending = head[0], ([head[1]] if head[1] else []) + block[1:], []
            first, last = numbered[0][0], numbered[-1][0]
        elif block[0].startswith("[") and block[-1].endswith("]"):
            pending.extend(block)
        elif speaker is not None:
            text.extend(pending + block)
            pending = []
            last = numbered[-1][0]
    flush()
    return [s for s in scenes if s]


def _speeches(lines: list[str]) -> list[list[tuple[str, str]]]:
    """:func:`speech_scenes` as scenes of ``(speaker, text)``."""
    return [[(s.speaker, s.text) for s in scene] for scene in speech_scenes(lines)]


def shakespeare_dialogue(
    min_chars: int = DIALOGUE_MIN_CHARS, max_chars: int = DIALOGUE_MAX_CHARS
) -> dict[str, list[dict]]:
    """Prompt/response pairs from consecutive speeches of the plays, split by play.

    Every two consecutive speeches of one scene by different speakers give an example: the
    first speech (without its speaker line) is the user message, the reply the assistant
    message; pairs where either text has fewer than ``min_chars`` or more than ``max_chars``
    characters are skipped. Stage directions inside a speech stay. Plays and splits are those of
    :func:`~fromzero.data.datasets.folio_plays`; each example also has ``"play"``.
    Deterministic: plays in file-name order, pairs in text order. With the defaults:
    train 13,407, val 3,824, test 2,279 examples (19,510 in all).
    """
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for play, split, lines in folio_plays():
        for scene in _speeches(lines):
            for (a, prompt), (b, reply) in zip(scene, scene[1:]):
                if a == b or not all(min_chars <= len(t) <= max_chars for t in (prompt, reply)):
                    continue
                out[split].append({"messages": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": reply}],
                                   "play": play})
    return out


# ---------------------------------------------------------------------------------------------
# Template


@dataclass
class ChatTemplate:
    """How messages become text: ``prefix + content + turn_end`` per message."""

    system_prefix: str = ""
    user_prefix: str = "USER:\n"
    assistant_prefix: str = "ASSISTANT:\n"
    turn_end: str = "\n\n"

    def prefix(self, role: str) -> str:
        if role not in ROLES:
            raise FromzeroError(f"unknown message role {role!r}; expected one of {ROLES}")
        return {"system": self.system_prefix, "user": self.user_prefix,
                "assistant": self.assistant_prefix}[role]

    def render(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """``(text, is_target)`` segments; targets are assistant content + ``turn_end``."""
        segments: list[tuple[str, bool]] = []
        for m in messages:
            if m["role"] == "assistant":
                if self.assistant_prefix:
                    segments.append((self.assistant_prefix, False))
                segments.append((m["content"] + self.turn_end, True))
            else:
                segments.append((self.prefix(m["role"]) + m["content"] + self.turn_end, False))
        return segments

    def text(self, messages: list[dict]) -> str:
        """The whole conversation as one string (no eos)."""
        return "".join(t for t, _ in self.render(messages))

    def prompt_text(self, messages: list[dict]) -> str:
        """The text to generate the next assistant turn from: every message (a final assistant
        message, e.g. a reference answer, is left out) followed by ``assistant_prefix``."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.text(messages) + self.assistant_prefix


def checkpoint_chat_template(directory: str | Path) -> "ChatTemplate | JinjaChatTemplate | None":
    """The chat template a checkpoint was tuned with, or None.

    An SFT checkpoint tuned with fromzero's template keeps its fields in ``info.json``
    (``template``); a model with its own Jinja template (converted from Hugging Face / GGUF, or
    tuned with it) keeps ``chat_template.jinja`` / ``tokenizer_config.json`` next to its weights.
    """
    from fromzero.data.chat_template import load_jinja_template

    info_file = Path(directory) / INFO_FILE
    info = read_json(info_file, "checkpoint info") if info_file.is_file() else {}
    if isinstance(info.get("template"), dict):
        try:
            return ChatTemplate(**info["template"])
        except TypeError as e:
            raise FromzeroError(f"{info_file} has an invalid chat template: {e}") from None
    return load_jinja_template(directory)


# ---------------------------------------------------------------------------------------------
# Tokenizing, packing, batching


class SFTSet(Dataset):
    """Item ``i`` is ``(x, y)``: int64 inputs and next-token labels (-100 = no loss)."""

    def __init__(self, xs: list[torch.Tensor], ys: list[torch.Tensor],
                 n_truncated: int = 0, n_dropped: int = 0) -> None:
        self.xs, self.ys = xs, ys
        self.lengths = [len(x) for x in xs]
        self.n_truncated, self.n_dropped = n_truncated, n_dropped
        self.n_target_tokens = int(sum(int((y != IGNORE_INDEX).sum()) for y in ys))

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.xs[i], self.ys[i]

    def __repr__(self) -> str:
        return (f"SFTSet({len(self)} sequences, {self.n_target_tokens} target tokens, "
                f"{self.n_truncated} truncated, {self.n_dropped} dropped)")


def _wants_eos(template: object, add_eos: bool | None) -> bool:
    # fromzero's template needs the tokenizer's eos after a reply; a model's own template closes
    # the turn itself (SmolLM2: <|im_end|>), and its tokenizer's <|endoftext|> would be wrong there.
    return isinstance(template, ChatTemplate) if add_eos is None else add_eos


def tokenize_sft(examples: list[dict], tokenizer: TextTokenizer,
                 template: "ChatTemplate | JinjaChatTemplate | None" = None, max_length: int = 1024,
                 add_eos: bool | None = None) -> SFTSet:
    """Token ids and loss-masked labels of each example (see the module docstring).

    ``template``: fromzero's :class:`ChatTemplate` (default) or a model's own
    :class:`~fromzero.data.chat_template.JinjaChatTemplate`. ``add_eos``: append the tokenizer's
    eos after each reply; None = only for fromzero's template. A sequence longer than
    ``max_length + 1`` tokens is cut to that (``n_truncated``), so every ``x`` has at most
    ``max_length`` tokens; an example left with no target is dropped (``n_dropped``).
    """
    if max_length < 1:
        raise FromzeroError(f"max_length must be >= 1, got {max_length}")
    template = template or ChatTemplate()
    eos = tokenizer.eos_id if _wants_eos(template, add_eos) else None
    xs, ys, n_truncated, n_dropped = [], [], 0, 0
    for i, example in enumerate(examples):
        ids: list[int] = []
        labels: list[int] = []
        for text, is_target in template.render(example["messages"]):
            try:
                seg = tokenizer.encode(text)
            except FromzeroError as e:
                raise FromzeroError(f"SFT example {i}: {e}") from None
            if is_target and eos is not None:
                seg = seg + [eos]
            ids.extend(seg)
            labels.extend(seg if is_target else [IGNORE_INDEX] * len(seg))
        if len(ids) > max_length + 1:
            ids, labels = ids[: max_length + 1], labels[: max_length + 1]
            n_truncated += 1
        y = torch.tensor(labels[1:], dtype=torch.int64)
        if len(ids) < 2 or not bool((y != IGNORE_INDEX).any()):
            n_dropped += 1
            continue
        xs.append(torch.tensor(ids[:-1], dtype=torch.int64))
        ys.append(y)
    return SFTSet(xs, ys, n_truncated=n_truncated, n_dropped=n_dropped)


def segment_mismatches(examples: list[dict], tokenizer: TextTokenizer,
                       template: "ChatTemplate | JinjaChatTemplate | None" = None) -> list[int]:
    """Indices of the examples whose segment-by-segment token ids (what :func:`tokenize_sft`
    trains on) differ from the tokenization of the whole rendered text (what the model reads at
    inference). Empty for templates whose segment boundaries never fall inside a token."""
    template = template or ChatTemplate()
    bad = []
    for i, example in enumerate(examples):
        segments = template.render(example["messages"])
        pieces = [tokenizer.encode(text) for text, _ in segments]
        whole = tokenizer.encode("".join(text for text, _ in segments))
        if [t for p in pieces for t in p] != whole:
            bad.append(i)
    return bad


def pack_sft(sft_set: SFTSet, block_size: int, pad_id: int = 0) -> SFTSet:
    """Concatenate all ``(x, y)`` pairs in order and cut them into rows of ``block_size``.

    The last row is padded (``x`` with ``pad_id``, ``y`` with -100). See the module docstring
    for what packing does to attention.
    """
    if block_size < 1:
        raise FromzeroError(f"block_size must be >= 1, got {block_size}")
    if len(sft_set) == 0:
        return SFTSet([], [], sft_set.n_truncated, sft_set.n_dropped)
    x = torch.cat([sft_set[i][0] for i in range(len(sft_set))])
    y = torch.cat([sft_set[i][1] for i in range(len(sft_set))])
    pad = -len(x) % block_size
    x = torch.cat([x, torch.full((pad,), pad_id, dtype=torch.int64)])
    y = torch.cat([y, torch.full((pad,), IGNORE_INDEX, dtype=torch.int64)])
    return SFTSet(list(x.view(-1, block_size)), list(y.view(-1, block_size)),
                  sft_set.n_truncated, sft_set.n_dropped)


def collate_sft(
    batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(x, y)`` pairs into ``(B, T)`` tensors, right-padding x with ``pad_id`` and
    y with -100 (padding never contributes to the loss)."""
    return (pad_sequence([x for x, _ in batch], batch_first=True, padding_value=pad_id),
            pad_sequence([y for _, y in batch], batch_first=True, padding_value=IGNORE_INDEX))
