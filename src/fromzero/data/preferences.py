"""Preference data for DPO: pairs of a prompt, a preferred (chosen) and a dispreferred (rejected) reply.

Formats (:func:`load_preference_pairs`); every row becomes a :class:`PreferencePair`:

* JSONL, one pair per line: ``{"prompt": str, "chosen": str, "rejected": str}`` (the prompt is
  one user message; an optional ``"system"`` string goes before it) or ``{"messages": [...],
  "chosen": str, "rejected": str}`` where ``messages`` is the conversation so far (roles
  system/user/assistant, non-empty string contents, ending with a user message). ``chosen`` and
  ``rejected`` are the two assistant replies; TRL's conversational form (a list holding one
  ``{"role": "assistant", "content": ...}``) is accepted too. Refused with the file and line:
  invalid JSON, a missing or empty reply, ``chosen == rejected``. Blank lines are skipped, other
  keys ignored.
* A ``.jsonl`` file or a folder with ``train.jsonl`` (+ ``val.jsonl``, ``test.jsonl``), split as
  :func:`fromzero.data.sft.load_jsonl_splits` does.
* ``rotten-tomatoes-preferences``: built from the rotten-tomatoes sentiment reviews, split as
  :mod:`fromzero.data.rotten_tomatoes` splits them (:func:`sentiment_preferences`).

Tokenizing (:func:`tokenize_preferences`): a pair is rendered with the model's chat template
twice, conversation + chosen and conversation + rejected. The prompt is everything before the
final reply (the same text for both: the template's rendering up to and including the
assistant's opening); each reply is the final target segment (its end-of-turn marker included;
fromzero's own template also gets the tokenizer's eos, as SFT trains it). Only reply tokens
carry labels. A prompt + reply longer than ``max_length`` tokens is refused, or with
``truncate_prompt`` the prompt loses tokens from its start (the end, next to the reply, is kept;
what TRL's ``truncation_mode="keep_end"`` did for prompts). Replies are never cut: a cut reply
is a different reply, and its log-probability would no longer be the one being compared.

Batches (:func:`collate_preferences`): ``2B`` rows, the B chosen sequences then the B rejected
ones, right-padded (a causal model never looks right, so no attention mask is needed), labels
``-100`` off the replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from fromzero.data.sft import IGNORE_INDEX, check_messages, load_jsonl_splits, message_list
from fromzero.errors import FromzeroError

__all__ = [
    "BUILTIN", "PreferencePair", "PreferenceSet", "load_preference_pairs", "parse_preference_row",
    "add_system_prompt", "sentiment_preferences", "tokenize_preferences", "collate_preferences",
]

BUILTIN = ("rotten-tomatoes-preferences",)


@dataclass
class PreferencePair:
    """A conversation (ending with a user message) and two assistant replies, the first preferred."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    where: str = ""  # where the pair came from (file:line), for error messages
    kind: str = ""  # optional tag for reporting (the built-in sentiment set: "label" or "verbose")


# ---------------------------------------------------------------------------------------------
# Loading


def load_preference_pairs(source: str, val_fraction: float = 0.1, test_fraction: float = 0.1,
                          seed: int = 0) -> dict[str, list[PreferencePair]]:
    """``{"train", "val", "test"}`` lists of pairs (formats in the module docstring)."""
    if source in BUILTIN:
        return _rotten_tomatoes_preferences()
    return load_jsonl_splits(source, parse_preference_row, "preference", "pairs",
                             f"a .jsonl file, a folder with train.jsonl or {' | '.join(BUILTIN)}",
                             val_fraction, test_fraction, seed)


def _reply(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise FromzeroError(f"{where}: missing '{key}' (each row needs prompt or messages, chosen and rejected)")
    value = obj[key]
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise FromzeroError(f"{where}: '{key}' must be a string or a list of one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise FromzeroError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise FromzeroError(f"{where}: '{key}' is empty")
    return value


def parse_preference_row(obj: Any, where: str) -> PreferencePair:
    """One validated pair from a decoded JSON row (see the module docstring)."""
    if not isinstance(obj, dict):
        raise FromzeroError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = message_list(obj["messages"], where)
    elif "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list):  # TRL's conversational prompt
            return parse_preference_row({**{k: v for k, v in obj.items() if k != "prompt"}, "messages": prompt}, where)
        messages = [{"role": "user", "content": prompt}]
        if "system" in obj:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise FromzeroError(f"{where}: missing 'prompt' (or 'messages'); got keys {sorted(obj)}")
    check_messages(messages, where)
    if messages[-1]["role"] != "user":
        raise FromzeroError(f"{where}: the conversation must end with a user message (the replies answer it)")
    chosen, rejected = _reply(obj, "chosen", where), _reply(obj, "rejected", where)
    if chosen == rejected:
        raise FromzeroError(f"{where}: chosen and rejected are the same reply (nothing to prefer)")
    return PreferencePair(messages, chosen, rejected, where)


def add_system_prompt(pairs: list[PreferencePair], system_prompt: str) -> list[PreferencePair]:
    """Copies of ``pairs`` with a system message first, unless a pair has one (or the prompt is empty)."""
    if not system_prompt:
        return pairs
    return [pair if any(m["role"] == "system" for m in pair.messages) else
            PreferencePair([{"role": "system", "content": system_prompt}, *pair.messages], pair.chosen,
                           pair.rejected, pair.where, pair.kind) for pair in pairs]


# ---------------------------------------------------------------------------------------------
# rotten-tomatoes-preferences

LABELS = ("negative", "positive")
VERBOSE_REPLIES = (
    "The sentiment of this review is {label}.",
    "This review is {label}.",
    "I would say the review is {label}.",
    "Sentiment: {label}. The reviewer's tone makes that clear.",
)


def sentiment_preferences(rows: list[tuple[str, str]], verbose: bool = True, start: int = 0) -> list[PreferencePair]:
    """Pairs from labelled reviews ``(text, "positive"|"negative")``, asked as
    :func:`fromzero.data.rotten_tomatoes.review_messages` asks (the chat evaluation's question).

    Each review gives a *label* pair (chosen: the right label, rejected: the wrong one) and, with
    ``verbose``, a *verbose* pair (chosen: the bare label, rejected: a sentence that says the same
    label, cycling through :data:`VERBOSE_REPLIES`), which teaches the one-word answer format the
    evaluation parses. Pairs of one review are adjacent; deterministic.
    """
    from fromzero.data.rotten_tomatoes import review_messages

    pairs = []
    for i, (text, label) in enumerate(rows):
        if label not in LABELS:
            raise FromzeroError(f"sentiment row {i}: label {label!r} is not one of {LABELS}")
        wrong = LABELS[1 - LABELS.index(label)]
        messages = review_messages(text)
        pairs.append(PreferencePair(messages, label, wrong, f"review {start + i}", kind="label"))
        if verbose:
            template = VERBOSE_REPLIES[(start + i) % len(VERBOSE_REPLIES)]
            pairs.append(PreferencePair(messages, label, template.format(label=label), f"review {start + i}",
                                        kind="verbose"))
    return pairs


def _rotten_tomatoes_preferences() -> dict[str, list[PreferencePair]]:
    """The built-in set: the rotten-tomatoes train / val / test reviews (the shared split by movie)."""
    from fromzero.data.rotten_tomatoes import classification_splits

    return {split: sentiment_preferences(rows) for split, rows in classification_splits().items()}


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching


@dataclass
class PreferenceSet(Dataset):
    """Item ``i``: a dict with ``prompt``, ``chosen``, ``rejected`` token ids (lists), plus
    ``ref_chosen`` / ``ref_rejected`` (the reference model's reply log-probabilities) once
    :meth:`set_reference` has been called."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    kinds: list[str] = field(default_factory=list)
    n_truncated: int = 0
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"prompt": self.prompts[i], "chosen": self.chosen[i], "rejected": self.rejected[i]}
        if self.ref_chosen is not None and self.ref_rejected is not None:
            item["ref_chosen"], item["ref_rejected"] = self.ref_chosen[i], self.ref_rejected[i]
        return item

    def set_reference(self, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> None:
        if len(ref_chosen) != len(self) or len(ref_rejected) != len(self):
            raise ValueError("one reference log-probability per pair is needed")
        self.ref_chosen, self.ref_rejected = ref_chosen.float().cpu(), ref_rejected.float().cpu()

    @property
    def n_reply_tokens(self) -> int:
        return sum(len(c) + len(r) for c, r in zip(self.chosen, self.rejected))

    def max_sequence(self) -> int:
        return max((len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompts, self.chosen, self.rejected)),
                   default=0)


def _split_prompt_reply(template: Any, pair: PreferencePair, reply: str) -> tuple[str, str]:
    """(prompt text, reply text) of the conversation + reply as the template renders it."""
    segments = template.render(pair.messages + [{"role": "assistant", "content": reply}])
    if not segments or not segments[-1][1]:
        # A template may close the conversation after the last reply (text after it, not a target).
        last = max((i for i, (_, target) in enumerate(segments) if target), default=None)
        if last is None:
            raise FromzeroError(f"{pair.where}: the chat template marks no assistant reply")
        segments = segments[: last + 1]
    prompt = "".join(text for text, _ in segments[:-1])
    return prompt, segments[-1][0]


def tokenize_preferences(pairs: list[PreferencePair], tokenizer: Any, template: Any, max_length: int,
                         truncate_prompt: bool = False, eos_id: int | None = None, what: str = "") -> PreferenceSet:
    """Token ids of each pair (see the module docstring). ``eos_id``: appended after each reply
    (fromzero's own template, as SFT trained it; None for a model's own template, which writes
    its end-of-turn marker itself). Too long -> FromzeroError unless ``truncate_prompt``."""
    if max_length < 2:
        raise FromzeroError(f"max_length must be >= 2, got {max_length}")
    prompts, chosen, rejected, kinds, n_truncated = [], [], [], [], 0
    for i, pair in enumerate(pairs):
        where = pair.where or f"{what} pair {i}"
        try:
            prompt_text, chosen_text = _split_prompt_reply(template, pair, pair.chosen)
            prompt_text2, rejected_text = _split_prompt_reply(template, pair, pair.rejected)
            if prompt_text != prompt_text2:
                raise FromzeroError("the chat template renders the prompt differently for the two replies")
            p, c, r = tokenizer.encode(prompt_text), tokenizer.encode(chosen_text), tokenizer.encode(rejected_text)
        except FromzeroError as e:
            raise FromzeroError(f"{where}: {e}") from None
        if eos_id is not None:
            c, r = c + [eos_id], r + [eos_id]
        if c == r:
            raise FromzeroError(f"{where}: chosen and rejected tokenize to the same ids (nothing to prefer)")
        longest = max(len(c), len(r))
        if not p:
            raise FromzeroError(f"{where}: the rendered prompt has no tokens (a reply needs something to follow)")
        if len(p) + longest > max_length:
            if not truncate_prompt:
                raise FromzeroError(
                    f"{where}: prompt + reply is {len(p) + longest} tokens, more than max_length {max_length} "
                    "(raise max_length, shorten the pair, or set truncate_prompt to cut the prompt's start)")
            keep = max_length - longest
            if keep < 1:
                raise FromzeroError(f"{where}: a reply alone is {longest} tokens; max_length {max_length} leaves "
                                    "no room for the prompt (replies are never cut)")
            p = p[len(p) - keep:]
            n_truncated += 1
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
        kinds.append(pair.kind)
    return PreferenceSet(prompts, chosen, rejected, kinds, n_truncated)


def collate_preferences(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``x``, ``y``: (2B, T) inputs and reply labels, chosen rows then rejected rows
    (``y[t]`` is the label of the token after ``x[t]``; -100 off the replies and on padding);
    ``ref_chosen`` / ``ref_rejected`` (B,) when the items carry precomputed reference log-probs."""
    seqs, labels = [], []
    for key in ("chosen", "rejected"):
        for item in items:
            prompt, reply = item["prompt"], item[key]
            seqs.append(torch.tensor((prompt + reply)[:-1], dtype=torch.int64))
            labels.append(torch.tensor(([IGNORE_INDEX] * len(prompt) + reply)[1:], dtype=torch.int64))
    out = {"x": pad_sequence(seqs, batch_first=True, padding_value=pad_id),
           "y": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)}
    if "ref_chosen" in items[0]:
        out["ref_chosen"] = torch.stack([torch.as_tensor(it["ref_chosen"]) for it in items]).float()
        out["ref_rejected"] = torch.stack([torch.as_tensor(it["ref_rejected"]) for it in items]).float()
    return out
