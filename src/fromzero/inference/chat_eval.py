"""Score a chat model on a classification task by asking it: reply parsing and first-token logits.

``fromzero evaluate --data rotten-tomatoes`` on a chat checkpoint (a converted chat model, or an
sft run's, adapters included) asks the question of :func:`fromzero.data.rotten_tomatoes.user_message`
for every review in the model's chat template (with the sft run's system prompt, if any) and
reports two scores:

* **generated reply** -- greedy decoding up to the end of the turn, parsed by :func:`parse_reply`
  (:data:`PARSE_RULE`); an unparseable reply counts as wrong.
* **first token** -- the next-token logits right after the generation prompt: the class whose
  answer's first tokens (log-sum-exp over ``positive`` / ``Positive``) score higher wins, so a
  model that knows the answer but phrases it badly ("The review is positive") is not hidden by
  the format.

Prompts are grouped by their exact token count, so a batch needs no padding and no attention
mask (each row is computed exactly as it would be alone), and decoded with a KV cache.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fromzero.errors import FromzeroError
from fromzero.models.layers import KVCache

LABELS = ("negative", "positive")
SPELLINGS = {"negative": ("negative", "Negative"), "positive": ("positive", "Positive")}
DEFAULT_MAX_NEW_TOKENS = 8
PARSE_RULE = ("lower-cased reply: its first word if that is positive/negative; else the one of the two words it "
              "contains (as a word) if exactly one; else unparseable (counted as wrong)")
_WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------------------------------------
# Parsing and metrics


def parse_reply(reply: str, labels: Sequence[str] = LABELS) -> str | None:
    """The label a reply states, or None (the rule: :data:`PARSE_RULE`)."""
    words = _WORD.findall(reply.lower())
    if not words:
        return None
    if words[0] in labels:
        return words[0]
    found = {w for w in words if w in labels}
    return found.pop() if len(found) == 1 else None


def reply_metrics(y_true: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str] = LABELS
                  ) -> dict[str, Any]:
    """Accuracy, macro-F1 over ``labels``, unparseable count (None predictions), per-class scores
    and the confusion matrix (rows: true class; columns: the labels, then unparseable)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    if len(y_true) != len(predicted) or not y_true:
        raise FromzeroError(f"need as many predictions as labels (got {len(predicted)} and {len(y_true)})")
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({t for t in y_true if t not in index})
    if unknown:
        raise FromzeroError(f"true label {unknown[0]!r} is not one of {list(labels)}")
    t = [index[y] for y in y_true]
    p = [index[y] if y in index else len(labels) for y in predicted]  # unparseable: its own column
    ids = list(range(len(labels)))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=ids, average=None, zero_division=0)
    return {
        "n": len(t),
        "accuracy": sum(a == b for a, b in zip(t, p)) / len(t),
        "f1_macro": float(f1.mean()),
        "unparseable": sum(y not in index for y in predicted),
        "labels": list(labels),
        "per_class": {name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                             "support": int(sup[i])} for i, name in enumerate(labels)},
        "confusion_matrix": confusion_matrix(t, p, labels=ids + [len(labels)])[: len(labels)].astype(int).tolist(),
    }


# ---------------------------------------------------------------------------------------------
# First-token scores


def answer_token_ids(tokenizer: Any, labels: Sequence[str] = LABELS) -> dict[str, list[int]]:
    """Per label, the distinct first token ids of its spellings (``positive`` / ``Positive``);
    refused if two labels share a first token (the first token could not tell them apart)."""
    out: dict[str, list[int]] = {}
    for label in labels:
        ids: list[int] = []
        for spelling in SPELLINGS.get(label, (label,)):
            encoded = tokenizer.encode(spelling)
            if encoded and encoded[0] not in ids:
                ids.append(encoded[0])
        out[label] = ids
    seen: dict[int, str] = {}
    for label, ids in out.items():
        for i in ids:
            if i in seen:
                raise FromzeroError(f"answers {seen[i]!r} and {label!r} start with the same token {i}: "
                                    "first-token scores cannot tell them apart")
            seen[i] = label
    return out


def first_token_scores(logits: torch.Tensor, token_ids: dict[str, list[int]]) -> torch.Tensor:
    """(N, V) next-token logits -> (N, labels) scores: log-sum-exp over each label's first tokens."""
    return torch.stack([torch.logsumexp(logits[:, ids].float(), dim=-1) for ids in token_ids.values()], dim=-1)


# ---------------------------------------------------------------------------------------------
# Batched greedy decoding


@torch.no_grad()
def generate_replies(
    model: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int], batch_size: int,
    score_ids: Sequence[int], autocast: Callable[[], Any], on_batch: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuations of every prompt (token ids, cut before the first stop id) and the
    (N, len(score_ids)) logits of ``score_ids`` at the first generated position.

    Prompts of equal length share a batch (no padding); each batch prefills once with a KV
    cache and then decodes one token per step until every row has stopped."""
    if max_new_tokens < 1:
        raise FromzeroError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    block_size = model.config.block_size
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    cand = torch.tensor(list(score_ids), device=device, dtype=torch.long)
    replies: list[list[int]] = [[] for _ in prompts]
    scores = torch.empty(len(prompts), len(cand))
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        if not ids:
            raise FromzeroError(f"prompt {i} is empty")
        groups.setdefault(len(ids), []).append(i)
    model.eval()
    too_long = [n for n in groups if n + max_new_tokens > block_size]
    if too_long:
        raise FromzeroError(f"a prompt of {max(too_long)} tokens + {max_new_tokens} new ones is longer than the "
                            f"model's block_size {block_size}")
    # One KV cache for the biggest batch, reused by every batch (no allocation per batch), and one
    # autocast region for everything: the weights are cast to the compute dtype once, not per step.
    cache = model.new_kv_cache(min(batch_size, max(len(m) for m in groups.values())), max(groups) + max_new_tokens)
    with autocast():
        for length in sorted(groups):
            members = groups[length]
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                view = KVCache.wrap([k[: len(rows)] for k in cache.keys], [v[: len(rows)] for v in cache.values])
                _decode_batch(model, [prompts[r] for r in rows], rows, max_new_tokens, stops, cand, replies, scores,
                              view)
                if on_batch is not None:
                    on_batch(len(rows))
    return replies, scores


def _decode_batch(model: Any, batch: list[list[int]], rows: list[int], max_new_tokens: int, stops: torch.Tensor,
                  cand: torch.Tensor, replies: list[list[int]], scores: torch.Tensor, cache: Any) -> None:
    """Prefill equal-length prompts into the empty ``cache``, decode greedily; write replies[rows]
    and scores[rows]."""
    device = stops.device
    idx = torch.tensor(batch, dtype=torch.long, device=device)
    logits, _ = model(idx, kv_cache=cache, last_only=True)
    logits = logits[:, -1].float()
    scores[rows] = logits[:, cand].cpu()  # the first-token scores: right after the generation prompt
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        next_id = logits.argmax(dim=-1)
        finished |= torch.isin(next_id, stops)
        out.append(torch.where(finished, -1, next_id))  # -1: the stop token and everything after it
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits, _ = model(next_id[:, None], kv_cache=cache, last_only=True)
        logits = logits[:, -1].float()
    for r, ids in zip(rows, torch.stack(out, dim=1).tolist()):
        replies[r] = ids[: ids.index(-1)] if -1 in ids else ids


# ---------------------------------------------------------------------------------------------
# Evaluating a checkpoint


def stop_token_ids(directory: Path, tokenizer: Any, template: Any) -> list[int]:
    """Ids that end the assistant's turn: the checkpoint's eos ids (:func:`fromzero.inference.chat.eos_ids`)
    and the template's eos token (ChatML: <|im_end|>)."""
    from fromzero.inference.chat import eos_ids

    ids = set(eos_ids(directory, tokenizer))
    eos_text = getattr(template, "eos_token", None)
    found = tokenizer.backend.token_to_id(eos_text) if eos_text else None
    if found is not None:
        ids.add(int(found))
    if not ids:
        raise FromzeroError(f"{directory}: no end-of-turn token known (no eos in tokenizer, template or config)")
    return sorted(ids)


def evaluate_chat(
    checkpoint: Path, data: str = "rotten-tomatoes", split: str = "test", batch_size: int = 32,
    device: str = "auto", limit: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, dtype: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Ask a chat checkpoint for the label of every example of ``split`` (see the module
    docstring); returns the metrics dict ``fromzero evaluate`` prints and writes."""
    from fromzero.data import rotten_tomatoes
    from fromzero.data.sft import checkpoint_chat_template
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.checkpoint import TOKENIZER_FILE, checkpoint_info, load_model
    from fromzero.devices import autocast_context, resolve_device, resolve_dtype

    checkpoint = Path(checkpoint)
    if data != rotten_tomatoes.NAME:
        raise FromzeroError(f"chat evaluation knows the data {rotten_tomatoes.NAME!r}, not {data!r}")
    if split not in rotten_tomatoes.SPLITS:
        raise FromzeroError(f"split must be one of {', '.join(rotten_tomatoes.SPLITS)}, got {split!r}")
    if batch_size <= 0 or limit < 0:
        raise FromzeroError("--batch-size must be positive and --limit >= 0")
    info = checkpoint_info(checkpoint)
    template = checkpoint_chat_template(checkpoint)
    if template is None:
        raise FromzeroError(f"{checkpoint} has no chat template (chat_template.jinja, tokenizer_config.json or an "
                            "sft run's info.json): cannot ask it questions as a chat")
    dev = resolve_device(device)
    compute = resolve_dtype(dev, dtype)
    tokenizer = TextTokenizer.load(checkpoint / TOKENIZER_FILE)
    rows = rotten_tomatoes.load_reviews()[split]
    rows = rows[:limit] if limit else rows
    system = info.get("system_prompt") or None
    prompts = tokenizer.encode_batch([template.prompt_text(rotten_tomatoes.review_messages(r["text"], None, system))
                                      for r in rows])
    token_ids = answer_token_ids(tokenizer)
    flat = [i for ids in token_ids.values() for i in ids]
    stops = stop_token_ids(checkpoint, tokenizer, template)
    model = load_model(checkpoint, dev)
    for p in model.parameters():  # autocast keeps its low-precision copy of a weight for the whole run only
        if p.is_floating_point():  # if the weight requires grad (a merged adapter's base does not); no_grad
            p.requires_grad_(True)  # still builds no graph

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]{data} {split}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                   disable=not progress)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("eval", total=len(rows))
        replies_ids, logits = generate_replies(
            model, prompts, max_new_tokens, stops, batch_size, flat, lambda: autocast_context(dev, compute),
            on_batch=lambda n: bar.advance(task, n))
    elapsed = time.perf_counter() - t0
    replies = [tokenizer.decode(ids).strip() for ids in replies_ids]
    y_true = [r["label"] for r in rows]
    generated = reply_metrics(y_true, [parse_reply(r) for r in replies])
    columns, start = {}, 0
    for label, ids in token_ids.items():
        columns[label] = list(range(start, start + len(ids)))
        start += len(ids)
    scores = first_token_scores(logits, columns)
    first = reply_metrics(y_true, [LABELS[int(i)] for i in scores.argmax(dim=-1)])
    first.pop("unparseable")
    first["token_ids"] = token_ids
    return {
        "task": "chat-classification", "data": data, "split": split, "n": len(rows), "checkpoint": str(checkpoint),
        "accuracy": generated["accuracy"], "f1_macro": generated["f1_macro"], "unparseable": generated["unparseable"],
        "first_token_accuracy": first["accuracy"], "first_token_f1_macro": first["f1_macro"],
        "generated": generated, "first_token": first, "parse_rule": PARSE_RULE, "max_new_tokens": max_new_tokens,
        "system_prompt": system, "dtype": compute, "device": str(dev),
        "top_replies": Counter(replies).most_common(10),
        "examples": [{"text": r["text"], "label": r["label"], "reply": reply} for r, reply in zip(rows[:5], replies)],
        "elapsed_s": elapsed, "reviews_per_sec": len(rows) / max(elapsed, 1e-9),
    }


def format_chat_report(m: dict[str, Any]) -> str:
    """The lines ``fromzero evaluate`` prints for a chat evaluation."""
    g, f = m["generated"], m["first_token"]
    lines = [
        f"{m['data']} {m['split']}: {m['n']} reviews asked to {m['checkpoint']} "
        f"({m['elapsed_s']:.0f} s, {m['reviews_per_sec']:.1f} reviews/s)",
        f"  generated reply : accuracy {g['accuracy']:.4f}  macro-F1 {g['f1_macro']:.4f}  "
        f"unparseable {g['unparseable']} ({100 * g['unparseable'] / max(m['n'], 1):.1f}%)",
        f"  first token     : accuracy {f['accuracy']:.4f}  macro-F1 {f['f1_macro']:.4f}",
        "  most common replies: " + ", ".join(f"{text!r} x{n}" for text, n in m["top_replies"][:5]),
    ]
    return "\n".join(lines)
