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

:class:`JinjaChatTemplate` offers the same ``text`` / ``prompt_text`` / ``render`` methods as
fromzero's own :class:`fromzero.data.sft.ChatTemplate`, so SFT, DPO, ``generate --chat``, ``chat``
and ``serve`` take either. ``render`` finds the assistant replies (loss targets) by rendering
prefixes: a reply is the text it adds after the generation prompt of the conversation so far (its
closing end-of-turn marker included).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from fromzero.errors import FromzeroError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps (Jinja's own escapes <, > and & for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it):
    rendered as its body; :meth:`JinjaChatTemplate.render` finds replies by prefixes instead."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(Namespace):
    """``namespace()`` that refuses underscore names (no way to reach Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template cannot store {name!r} on a namespace")


@dataclass
class JinjaChatTemplate:
    """A model's own chat template (Jinja source) and the special tokens it refers to."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    extra_context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def raise_exception(message: str) -> None:
            raise FromzeroError(f"chat template: {message}")

        def strftime_now(fmt: str) -> str:
            return _dt.datetime.now().strftime(fmt)

        # As transformers compiles templates: loop controls ({% break %}), the {% generation %}
        # block (rendered as its body), a tojson that does not HTML-escape, dunder-free namespaces.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=_Namespace)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise FromzeroError(f"chat template does not parse: {e}") from None

    # ------------------------------------------------------------------------------------------

    def format(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Render ``messages`` exactly as the model expects them."""
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


def read_tokenizer_config(directory: str | Path) -> dict:
    """tokenizer_config.json of a checkpoint or HF directory ({} when there is none)."""
    from fromzero.checkpoint import read_json  # imports torch: not at module import

    path = Path(directory) / TOKENIZER_CONFIG
    return read_json(path, "tokenizer config") if path.is_file() else {}


def special_token_texts(config: dict) -> dict[str, str]:
    """The special-token strings a template may refer to (bos_token, eos_token, pad_token,
    unk_token), from a tokenizer_config.json dict; absent ones are left out."""
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(config.get(name))
        if text is not None:
            out[name] = text
    return out


def load_jinja_template(directory: str | Path) -> JinjaChatTemplate | None:
    """The chat template stored in a checkpoint or HF directory, or None if it has none."""
    directory = Path(directory)
    config = read_tokenizer_config(directory)
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
    specials = special_token_texts(config)
    extra = {k: v for k, v in specials.items() if k in ("pad_token", "unk_token")}
    return JinjaChatTemplate(source, bos_token=specials.get("bos_token"), eos_token=specials.get("eos_token"),
                             extra_context=extra)


def read_template_file(path: str | Path) -> str:
    """A ``--chat-template FILE`` given by the user."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise FromzeroError(f"cannot read chat template {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FromzeroError(f"chat template {path} is not UTF-8 text") from None
