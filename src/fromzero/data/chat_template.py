"""Chat templates of pretrained chat models: Jinja source rendered in a sandbox.

A converted Hugging Face or GGUF chat model carries its own template (the Jinja text that turns a
list of ``{"role", "content"}`` messages into the exact string the model was tuned on). We keep it
where transformers does: ``chat_template.jinja`` in the checkpoint directory, or the
``chat_template`` field of ``tokenizer_config.json``; the special tokens the template refers to
(``bos_token``, ``eos_token``) come from ``tokenizer_config.json``.

Rendering uses Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`, as transformers
does: a template is data from the internet, so it gets no attribute access to Python internals
and cannot mutate its inputs. ``raise_exception`` and ``strftime_now`` are provided because real
templates call them.

:class:`JinjaChatTemplate` offers the same three methods as fromzero's own
:class:`fromzero.data.sft.ChatTemplate`, so SFT, DPO, ``generate --chat``, ``chat`` and ``serve``
take either:

* ``text(messages)`` -- the whole conversation;
* ``prompt_text(messages)`` -- the conversation plus the assistant's opening (generation prompt);
* ``render(messages)`` -- ``(text, is_target)`` segments, assistant replies marked as targets,
  for loss masking. Found by rendering prefixes: the text a reply adds after the generation
  prompt of the conversation so far (its closing end-of-turn marker included).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class JinjaChatTemplate:
    """A model's own chat template (Jinja source) and the special tokens it refers to."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    extra_context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise FromzeroError(f"chat template: {message}")

        def strftime_now(fmt: str) -> str:
            return _dt.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise FromzeroError(f"chat template does not parse: {e}") from None

    # ------------------------------------------------------------------------------------------

    def format(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Render ``messages`` exactly as the model expects them."""
        from jinja2 import TemplateError

        check_messages(messages)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **self.extra_context,
            )
        except TemplateError as e:
            raise FromzeroError(f"chat template failed to render: {e}") from None

    def text(self, messages: list[dict]) -> str:
        return self.format(messages, add_generation_prompt=False)

    def prompt_text(self, messages: list[dict]) -> str:
        """Text to generate the next assistant turn from (a final assistant message is dropped)."""
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.format(messages, add_generation_prompt=True)

    def render(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """``(text, is_target)`` segments whose concatenation is ``text(messages)``."""
        full = self.text(messages)
        segments: list[tuple[str, bool]] = []
        done = 0  # characters of ``full`` already covered
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.format(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.text(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
                raise FromzeroError(
                    "this chat template renders a conversation differently from its prefixes, so the "
                    "assistant replies cannot be located for loss masking"
                )
            if len(before) > done:
                segments.append((full[done:len(before)], False))
            segments.append((full[len(before):len(upto)], True))
            done = len(upto)
        if done < len(full):
            segments.append((full[done:], False))
        return segments

    @property
    def turn_end(self) -> str:
        """The text that closes a turn where the template ends replies with eos (else '')."""
        return self.eos_token or ""


def check_messages(messages: Any) -> None:
    """One clear error for what no template can render: an empty list, unknown roles, non-text."""
    if not isinstance(messages, list) or not messages:
        raise FromzeroError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise FromzeroError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise FromzeroError(f"message {i} has unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise FromzeroError(f"message {i}: content must be a string")


def load_jinja_template(directory: str | Path) -> JinjaChatTemplate | None:
    """The chat template stored in a checkpoint or HF directory, or None if it has none."""
    directory = Path(directory)
    config: dict = {}
    if (directory / TOKENIZER_CONFIG).is_file():
        try:
            config = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FromzeroError(f"{directory / TOKENIZER_CONFIG} is not valid JSON: {e}") from None
    source: Any = None
    if (directory / TEMPLATE_FILE).is_file():
        source = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    elif config.get("chat_template"):
        source = config["chat_template"]
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
    if not isinstance(source, str) or not source.strip():
        return None
    return JinjaChatTemplate(source, bos_token=_token_text(config.get("bos_token")),
                             eos_token=_token_text(config.get("eos_token")))


def read_template_file(path: str | Path) -> str:
    """A ``--chat-template FILE`` given by the user."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise FromzeroError(f"cannot read chat template {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FromzeroError(f"chat template {path} is not UTF-8 text") from None
