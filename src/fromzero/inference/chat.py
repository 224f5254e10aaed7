"""Chatting with a checkpoint: one prompt builder and one token streamer for every consumer.

``fromzero chat``, ``fromzero generate --chat`` and ``serve``'s /v1/chat/completions all turn
``{"role", "content"}`` messages into prompt ids and stop tokens with :func:`load_chat_format` /
:meth:`ChatFormat.prompt_ids`, so a model sees the same text whichever way it is asked.

The template: ``--chat-template FILE`` if given, else the checkpoint's own Jinja template
(``chat_template.jinja`` or ``tokenizer_config.json``), else fromzero's SFT template in
``info.json``, else an error. Stop tokens: the eos id(s) plus the template's end-of-turn token,
found by rendering a probe conversation (fromzero's SFT template ends a turn with a stop *string*).
The prompt is tokenized without special tokens (as transformers' ``apply_chat_template``), and a
BOS is prepended only when the tokenizer asks for one and the text does not already start with it.

:func:`stream_tokens` generates with a KV cache that a :class:`DecodeState` keeps between turns,
so the next turn prefills only its new tokens; :class:`ChatSession` keeps the history within the
context and :func:`run_repl` is the command's read-reply loop.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import torch

from fromzero.data.chat_template import (
    JinjaChatTemplate,
    check_messages,
    load_jinja_template,
    read_template_file,
    read_tokenizer_config,
    special_token_texts,
)
from fromzero.data.sft import ChatTemplate
from fromzero.data.tokenizers import TextTokenizer
from fromzero.errors import FromzeroError

__all__ = [
    "ChatFormat",
    "load_chat_format",
    "eos_ids",
    "end_of_turn_ids",
    "DecodeState",
    "stream_tokens",
    "StreamDetokenizer",
    "ChatSession",
    "open_chat_session",
    "run_repl",
]

Template = Union[JinjaChatTemplate, ChatTemplate]

# End-of-turn tokens of well-known templates: looked for in the template source when rendering
# a probe conversation fails (e.g. a template that insists on a system message).
KNOWN_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|eom_id|>")
_PROBE = "fromzero probe reply 7d1c"


# ---------------------------------------------------------------------------------------------
# The chat format of a checkpoint


@dataclass
class ChatFormat:
    """How a checkpoint chats: its template, tokenizer, stop tokens and BOS rule."""

    template: Template
    tokenizer: TextTokenizer
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a reply (not part of it): eos id(s) + the template's end-of-turn token."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends a reply (fromzero's SFT template ends turns with text, e.g. a blank line)."""
    bos_id: int | None = None
    """Prepended to a prompt that does not already start with it (None: never)."""
    source: str = ""
    """Where the template came from, for messages: e.g. 'chat_template.jinja'."""

    def prompt_text(self, messages: list[dict]) -> str:
        """The rendered conversation plus the assistant's opening (messages checked first)."""
        check_messages(messages)
        return self.template.prompt_text(messages)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids to generate the next assistant reply from. FromzeroError for an empty
        list, unknown roles or non-text content, or a template that refuses the messages."""
        text = self.prompt_text(messages)
        ids = self.tokenizer.encode(text)
        if self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id, *ids]
        if not ids:
            raise FromzeroError("the chat template renders these messages to no text")
        return ids

    def reply_text(self, ids: Iterable[int]) -> str:
        """The reply in generated ``ids``: up to the first stop token, cut at a stop string."""
        kept = list(itertools.takewhile(lambda t: t not in self.stop_ids, map(int, ids)))
        return _settle(self.tokenizer.decode(kept), self.stop_strings)[0]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FromzeroError(f"{path} ({what}) is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    """An id or a list of ids from config.json (anything else: none)."""
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _single_token(tokenizer: TextTokenizer, text: str) -> int | None:
    """The id of ``text`` when it encodes to exactly one token, else None."""
    if not text:
        return None
    try:
        ids = tokenizer.encode(text)
    except FromzeroError:
        return None
    return ids[0] if len(ids) == 1 else None


def eos_ids(directory: str | Path, tokenizer: TextTokenizer) -> list[int]:
    """The end-of-text ids of a checkpoint: the tokenizer's ``<|endoftext|>`` and the eos id(s)
    a converted model declared (config.json ``hf_special_tokens.eos_token_id``, int or list)."""
    config = _read_json(Path(directory) / "config.json", "model config")
    special = config.get("hf_special_tokens") or {}
    ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + _ids(special.get("eos_token_id"))
    return list(dict.fromkeys(ids))


def end_of_turn_ids(template: JinjaChatTemplate, tokenizer: TextTokenizer) -> list[int]:
    """The special token the template closes an assistant reply with, as a one-element list
    ([] when it closes replies with text or nothing).

    Renders a user message and an assistant reply and takes the first special token written
    after the reply; a template that cannot render that conversation falls back to the
    well-known end-of-turn tokens (:data:`KNOWN_TURN_ENDS`) that occur in its source. Either
    way, a token counts only if it is a single special token of the tokenizer.
    """
    specials = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    try:
        text = template.text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
    except FromzeroError:
        text = ""
    if _PROBE in text:
        tail = text[text.rindex(_PROBE) + len(_PROBE):]
        found = [(tail.find(s), -len(s), s) for s in specials if s and s in tail]
    else:
        found = [(template.source.find(s), 0, s) for s in KNOWN_TURN_ENDS if s in template.source and s in specials]
    for _, _, s in sorted(found):
        if _single_token(tokenizer, s) == specials[s]:
            return [specials[s]]
    return []


def load_chat_format(checkpoint: str | Path, template_file: str | Path | None = None,
                     tokenizer: TextTokenizer | None = None, required: bool = True) -> ChatFormat | None:
    """The :class:`ChatFormat` of ``checkpoint`` (see the module docstring for which template).

    ``template_file``: a Jinja chat template given by the user (``--chat-template FILE``).
    ``required``: without any template raise the one-line error (else return None).
    """
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {directory}")
    tokenizer = tokenizer or TextTokenizer.load(directory)
    model_config = _read_json(directory / "config.json", "model config")
    info = _read_json(directory / "info.json", "checkpoint info")
    hf_special = model_config.get("hf_special_tokens") or {}
    tok_config = read_tokenizer_config(directory)
    texts = special_token_texts(tok_config)
    for name in ("bos", "eos"):  # strings from the declared ids when tokenizer_config.json lacks them
        ids = _ids(hf_special.get(f"{name}_token_id"))
        if f"{name}_token" not in texts and ids:
            token = tokenizer.backend.id_to_token(ids[0])
            if token is not None:
                texts[f"{name}_token"] = token

    template: Template
    if template_file is not None:
        extra = {k: v for k, v in texts.items() if k in ("pad_token", "unk_token")}
        template = JinjaChatTemplate(read_template_file(template_file), bos_token=texts.get("bos_token"),
                                     eos_token=texts.get("eos_token"), extra_context=extra)
        source = f"--chat-template {template_file}"
    elif (jinja := load_jinja_template(directory)) is not None:
        template = jinja
        template.bos_token = template.bos_token or texts.get("bos_token")
        template.eos_token = template.eos_token or texts.get("eos_token")
        source = "chat_template.jinja" if (directory / "chat_template.jinja").is_file() else "tokenizer_config.json"
    elif info.get("task") in ("sft", "dpo") and isinstance(info.get("template"), dict):
        try:
            template = ChatTemplate(**info["template"])
        except TypeError as e:
            raise FromzeroError(f"{directory}/info.json has an invalid chat template: {e}") from None
        source = "info.json (fromzero SFT template)"
    else:
        if required:
            raise FromzeroError(f"{checkpoint} has no chat template; pass --chat-template FILE (a Jinja template)")
        return None

    stop_ids = eos_ids(directory, tokenizer)
    stop_strings: tuple[str, ...] = ()
    if isinstance(template, JinjaChatTemplate):
        eos_text = template.eos_token
        eos_id = _single_token(tokenizer, eos_text) if eos_text else None
        stop_ids += end_of_turn_ids(template, tokenizer) + ([eos_id] if eos_id is not None else [])
    elif template.turn_end:
        stop_strings = (template.turn_end,)
    bos_id = None
    if tok_config.get("add_bos_token") is True:
        declared = _ids(hf_special.get("bos_token_id"))
        bos_id = declared[0] if declared else _single_token(tokenizer, texts.get("bos_token", ""))
    return ChatFormat(template, tokenizer, tuple(dict.fromkeys(stop_ids)), stop_strings, bos_id, source)


# ---------------------------------------------------------------------------------------------
# Token streaming with a KV cache


def _model_device(model: Any) -> torch.device:
    return model.transformer.ln_f.weight.device  # float even when wte is int8-quantized


class DecodeState:
    """A KV cache kept between calls of :func:`stream_tokens` for one conversation.

    ``ids`` are the tokens whose keys and values the cache holds. A prompt that starts with
    some of them (the next turn of a chat starts with the previous prompt and reply) reuses
    that prefix and prefills only the rest. The cache grows as needed, up to block_size.
    """

    def __init__(self) -> None:
        self.cache: Any = None
        self.ids: list[int] = []

    def reset(self) -> None:
        """Forget the cached tokens (the buffers stay allocated)."""
        self.ids = []

    def next_logits(self, model: Any, ids: Sequence[int], reserve: int) -> torch.Tensor:
        """(1, V) logits of the token after ``ids``; ``reserve``: tokens still to come (sizes
        a new cache as GPT.generate does)."""
        block = model.config.block_size
        device = _model_device(model)
        if len(ids) > block:
            # Past the context every position shifts, so cached keys are stale: recompute the
            # last block_size tokens, exactly as GPT.generate does.
            self.ids = []
            x = torch.tensor([list(ids[-block:])], dtype=torch.long, device=device)
            return model(x, last_only=True)[0][:, -1, :]
        common = min(len(self.ids), len(ids))
        same = next((i for i, (a, b) in enumerate(zip(self.ids, ids)) if a != b), common)
        reuse = min(same, len(ids) - 1)  # at least one token runs: its logits are needed
        needed = min(block, len(ids) + reserve)
        if self.cache is None or self.cache.max_len < needed:
            self._grow(model, max(needed, min(block, 2 * self.cache.max_len) if self.cache else needed), reuse)
        self.ids = self.ids[:reuse]  # consistent even if the forward pass is interrupted
        self.cache.length = reuse
        x = torch.tensor([list(ids[reuse:])], dtype=torch.long, device=device)
        logits = model(x, kv_cache=self.cache, last_only=True)[0]
        self.ids = list(ids)
        return logits[:, -1, :]

    def _grow(self, model: Any, size: int, keep: int) -> None:
        new = model.new_kv_cache(1, size)
        if self.cache is not None and keep:
            for old_buf, new_buf in zip((*self.cache.keys, *self.cache.values), (*new.keys, *new.values)):
                new_buf[:, :, :keep] = old_buf[:, :, :keep]
        self.cache = new


def stream_tokens(
    model: Any,
    ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    state: DecodeState | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``ids``, one per model step.

    The same tokens as ``GPT.generate`` with the same arguments and generator (a stop token is
    yielded, then generation ends): the prompt is prefilled into a KV cache, then each step runs
    the model on the one new token. ``state`` keeps the cache for the next call (see
    :class:`DecodeState`); without it a fresh one is used.
    """
    from fromzero.models.gpt import sample_next_token

    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("stream_tokens needs at least one prompt token")
    stop = set(int(i) for i in stop_ids)
    state = state or DecodeState()
    model.eval()
    if _model_device(model).type == "cpu" and hasattr(model, "use_decode_layout"):
        model.use_decode_layout(True)  # one-row decoding streams column-major weights faster
    for step in range(max_new_tokens):
        with torch.inference_mode():
            logits = state.next_logits(model, ids, max_new_tokens - step)
            token = int(sample_next_token(logits, temperature, top_k, top_p, generator)[0])
        ids.append(token)
        yield token
        if token in stop:
            return


# ---------------------------------------------------------------------------------------------
# Incremental detokenization


def _settle(text: str, stops: Sequence[str]) -> tuple[str, int, bool]:
    """(``text`` cut before its first stop string, how many of its characters are final, whether a
    stop string appeared); without one, :func:`_holdback` characters at the end are not final yet."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if found:
        return text[:min(found)], min(found), True
    return text, len(text) - _holdback(text, stops), False


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to print yet: U+FFFD of a multi-byte character
    whose other bytes are still to come, or a possible start of a stop string."""
    keep = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if s.startswith(text[-k:]):
                keep = k
                break
    return keep


class StreamDetokenizer:
    """Token ids in, printable text out, never a broken character.

    Each :meth:`push` decodes the whole reply so far and returns the new suffix, holding back a
    trailing U+FFFD (a byte-level token that ends inside a UTF-8 sequence decodes to it until the
    rest arrives) and anything that may begin a stop string. :meth:`finish` returns the rest.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # the reply so far (cut at a stop string once one appeared)
        self.sent = 0  # characters of text already returned
        self.stopped = False  # a stop string appeared: the reply is complete

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.text, final, self.stopped = _settle(self.tokenizer.decode(self.ids), self.stop_strings)
        return self._take(final)

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta


# ---------------------------------------------------------------------------------------------
# A conversation


@dataclass
class ReplyStats:
    """What the last reply took: prompt tokens, new tokens (a final stop token included)."""

    prompt_tokens: int = 0
    new_tokens: int = 0


@dataclass
class ChatSession:
    """A multi-turn conversation with one model: history within the context, streamed replies.

    The prompt of every turn (system message + history + the new user message) must leave
    ``max_new_tokens`` of the model's context (block_size) free for the reply; the oldest
    user/assistant messages are dropped (in pairs, never the system message) until it does,
    and ``notice`` is told so.
    """

    model: Any
    chat: ChatFormat
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = 1337
    notice: Any = None
    """Called with one-line messages about the history (default: print to stderr)."""
    history: list[dict] = field(default_factory=list)
    stats: ReplyStats = field(default_factory=ReplyStats)

    def __post_init__(self) -> None:
        block = int(self.model.config.block_size)
        if self.max_new_tokens <= 0:
            raise FromzeroError("--max-new-tokens must be positive")
        if self.max_new_tokens >= block:
            raise FromzeroError(f"--max-new-tokens {self.max_new_tokens} leaves no room for the conversation in "
                                f"the model's context of {block} tokens; lower it")
        self.context = block - self.max_new_tokens
        self.generator = torch.Generator(device=_model_device(self.model))
        self.generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        self.state = DecodeState()
        self.notice = self.notice or (lambda message: print(message, file=sys.stderr, flush=True))
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.state.reset()

    def fit(self, messages: list[dict]) -> tuple[list[int], list[dict], int]:
        """(prompt ids, messages kept, messages dropped) for a prompt within the context."""
        messages = list(messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = self.chat.prompt_ids(messages)
            if len(ids) <= self.context:
                return ids, messages, dropped
            if len(messages) - first <= 1:
                block = self.context + self.max_new_tokens
                raise FromzeroError(
                    f"this message needs {len(ids)} tokens with the template{' and system message' if first else ''}, "
                    f"more than the {self.context}-token context (block_size {block} - --max-new-tokens "
                    f"{self.max_new_tokens}); shorten it or lower --max-new-tokens")
            n = 2 if len(messages) - first > 2 and messages[first + 1]["role"] == "assistant" else 1
            del messages[first:first + n]
            dropped += n

    def ask(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply as text deltas; the reply joins the history.

        Interrupted (an exception, or the generator closed early), the text produced so far is
        kept as the reply; with none, the user message is forgotten too. FromzeroError (before
        any text) for a message that cannot fit the context or that the template refuses.
        """
        ids, kept, dropped = self.fit([*self.history, {"role": "user", "content": text}])
        if dropped:
            what = "the oldest message" if dropped == 1 else f"the {dropped} oldest messages"
            self.notice(f"(dropped {what} to fit the {self.context}-token context)")
        self.history = kept
        detok = StreamDetokenizer(self.chat.tokenizer, self.chat.stop_strings)
        stop = set(self.chat.stop_ids)
        self.stats = ReplyStats(prompt_tokens=len(ids))
        done = False
        try:
            tokens = stream_tokens(self.model, ids, self.max_new_tokens, temperature=self.temperature,
                                   top_k=self.top_k, top_p=self.top_p, stop_ids=stop, generator=self.generator,
                                   state=self.state)
            for token in tokens:
                self.stats.new_tokens += 1
                if token in stop:
                    break
                delta = detok.push(token)
                if delta:
                    yield delta
                if detok.stopped:
                    break
            tail = detok.finish()
            if tail:
                yield tail
            done = True
        finally:
            reply = detok.text if done else detok.text[:detok.sent]
            if done or reply:
                self.history.append({"role": "assistant", "content": reply})
            else:
                self.history.pop()  # nothing was said: forget the question too


def open_chat_session(checkpoint: str | Path, chat_template: str | Path | None = None, device: str = "auto",
                      system: str | None = None, max_new_tokens: int | None = None, temperature: float = 0.7,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = 1337) -> ChatSession:
    """A :class:`ChatSession` with the GPT of ``checkpoint`` (``fromzero chat``).

    The chat format (:func:`load_chat_format`: ``chat_template`` if given, else the
    checkpoint's own) is read before the weights, so a checkpoint without a template fails fast;
    a checkpoint that is not a GPT language model is an error. ``max_new_tokens`` None: 512 or
    half the model's context, whichever is smaller.
    """
    from fromzero.checkpoint import load_model
    from fromzero.devices import resolve_device
    from fromzero.models.gpt import GPT

    chat = load_chat_format(Path(checkpoint), chat_template)  # before the weights: fail fast
    model = load_model(checkpoint, resolve_device(device))
    if not isinstance(model, GPT):
        raise FromzeroError(f"chat needs a GPT language model; {checkpoint} holds a {type(model).__name__}")
    block = model.config.block_size
    max_new = max_new_tokens if max_new_tokens is not None else min(512, block // 2)
    return ChatSession(model, chat, system=system, max_new_tokens=max_new, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed)


# ---------------------------------------------------------------------------------------------
# The REPL


COMMANDS_HELP = "/reset clears the history, /exit or Ctrl-D ends, Ctrl-C stops a reply"


def run_repl(session: ChatSession, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
             stderr: IO[str] | None = None, banner: str = "") -> int:
    """Read user messages (one per line), stream each reply to ``stdout``; returns the exit code.

    On a terminal it shows a ``>>>`` prompt (with line editing); piped input is read line by
    line with no prompt, so transcripts are just the replies, one per line. ``/reset`` and
    ``/exit`` are commands; end of input or Ctrl-C at the prompt ends with 0; Ctrl-C during a
    reply stops that reply only. Errors of one turn (a message too long for the context) are
    one ``error:`` line on ``stderr`` and the loop goes on.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        if banner:
            print(banner, file=stderr, flush=True)
    while True:
        try:
            if interactive and stdin is sys.stdin:
                line = input(">>> ")
            else:
                line = stdin.readline()
                if not line:
                    return 0  # end of input
        except (EOFError, KeyboardInterrupt):
            print(file=stdout, flush=True)
            return 0
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            return 0
        if command == "/reset":
            session.reset()
            print("(history cleared)", file=stderr, flush=True)
            continue
        try:
            with contextlib.closing(session.ask(text)) as reply:
                for delta in reply:
                    print(delta, end="", file=stdout, flush=True)
            print(file=stdout, flush=True)
        except KeyboardInterrupt:
            print(file=stdout, flush=True)
            print("(reply interrupted)", file=stderr, flush=True)
        except FromzeroError as e:
            print(f"error: {e}", file=stderr, flush=True)
