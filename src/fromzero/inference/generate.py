"""Sample continuations of a prompt from a GPT checkpoint (``fromzero generate``): the prompt's text
continued (:func:`generate_text`), or replies to it as a chat message (:func:`generate_chat_replies`),
``num_samples`` seeded samples in one batch, each ending at its first end-of-text (or end-of-turn) token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fromzero.checkpoint import load_model
from fromzero.data.tokenizers import TextTokenizer
from fromzero.devices import resolve_device
from fromzero.errors import FromzeroError
from fromzero.inference.chat import eos_ids, load_chat_format


def generate_text(checkpoint: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 1337, num_samples: int = 1,
                  device: str = "auto", use_cache: bool = True, lookup_tokens: int | None = None) -> list[str]:
    """``num_samples`` continuations of ``prompt``, each the prompt followed by its new text.

    An empty prompt starts a fresh document from the tokenizer's end-of-text token (the GPT-2
    convention; a tokenizer without one is an error), which is left out of the text. A sample
    ends before its first end-of-text token (the tokenizer's, and the checkpoint's configured
    eos ids). The sampling options are those of :meth:`fromzero.models.gpt.GPT.generate`
    (``temperature`` 0: greedy; ``lookup_tokens``: prompt-lookup drafts for greedy decoding).
    """
    torch_device = resolve_device(device)
    model = load_model(checkpoint, torch_device)
    tokenizer = TextTokenizer.load(Path(checkpoint))
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        if tokenizer.eos_id is None:
            raise FromzeroError("empty prompt: give --prompt TEXT (this tokenizer has no start token)")
        ids = [tokenizer.eos_id]  # GPT-2 convention: <|endoftext|> starts a fresh document
    stop_ids = eos_ids(Path(checkpoint), tokenizer)
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=torch_device)
    out = model.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=stop_ids, generator=generator, use_cache=use_cache,
        lookup_tokens=lookup_tokens,
    )
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        stops = [pos for pos, t in enumerate(new) if t in stop_ids]
        if stops:
            row = row[: len(ids) + stops[0]]
        texts.append(tokenizer.decode(row if prompt else row[1:]))
    return texts


def generate_chat_replies(checkpoint: str | Path, prompt: str, *, system: str | None = None,
                          chat_template: str | Path | None = None, max_new_tokens: int = 200,
                          temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                          seed: int = 1337, num_samples: int = 1, device: str = "auto", use_cache: bool = True,
                          lookup_tokens: int | None = None) -> list[str]:
    """``num_samples`` replies to ``prompt`` sent as one user message (after ``system``, if any).

    The conversation is rendered with the checkpoint's chat template, or ``chat_template`` (a
    Jinja file), exactly as ``fromzero chat`` renders it (:func:`load_chat_format`, read before
    the weights so that a checkpoint without a template fails fast); each reply ends at the
    template's stop tokens. Sampling options as for :func:`generate_text`.
    """
    chat = load_chat_format(Path(checkpoint), chat_template)  # before the weights: fail fast
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    ids = chat.prompt_ids(messages)
    torch_device = resolve_device(device)
    model = load_model(checkpoint, torch_device)
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=torch_device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, eos_id=list(chat.stop_ids), generator=generator,
                         use_cache=use_cache, lookup_tokens=lookup_tokens)
    return [chat.reply_text(row[len(ids):]) for row in out.tolist()]
