"""Request bodies of the HTTP API (pydantic), in OpenAI's shapes.

Every model forbids unknown fields (as OpenAI does: a misspelt ``max_token`` is an error that
names it, not a silently ignored option) and checks types strictly (``"5"`` is not an integer).
OpenAI fields that fromzero does not implement are accepted only at their neutral value
(chat ``logprobs`` off, penalties 0, no ``logit_bias``); anything else is a 400 that says so (see
``app.py``). Completions implement ``logprobs`` and ``echo`` as OpenAI's legacy API does (what
lm-evaluation-harness's ``local-completions`` model uses to score answers). Extras, as in vLLM: ``top_k`` and ``ignore_eos``.

Responses are plain dicts built in ``app.py`` (the shapes of OpenAI's API reference).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "EmbeddingRequest",
    "ClassifyRequest",
    "StreamOptions",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with token usage (and no choices) before ``data: [DONE]``."""


Stop = Union[str, list[str], None]
Prompt = Union[str, list[str], list[int], list[list[int]]]


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    """The served model's id (GET /v1/models); optional, since one server serves one model."""
    max_tokens: int | None = None
    """Tokens to generate at most (default: completions 16; chat as many as fit the context)."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature, 0 = greedy; default 1."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling; default 1 (off)."""
    top_k: int | None = Field(default=None, ge=-1)
    """Sample among the k most likely tokens only; 0 or -1 = off (extra, as in vLLM)."""
    n: int = Field(default=1, ge=1, le=16)
    """Completions per prompt."""
    stream: bool = False
    """Send server-sent events as tokens are generated."""
    stream_options: StreamOptions | None = None
    stop: Stop = None
    """Up to 4 strings that end the text (not included in it)."""
    seed: int | None = None
    """Same seed, same text (also when batched with other requests)."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    """Do not stop at the end-of-text token (extra, as in vLLM; for benchmarks)."""


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Prompt
    """Text, a list of texts (one choice each), token ids, or a list of token-id lists."""
    echo: bool = False
    """Return the prompt in front of the completion (with ``logprobs``: its tokens, scored too).
    With echo, ``max_tokens`` may be 0: score the prompt, generate nothing."""
    logprobs: int | None = Field(default=None, ge=0)
    """Return each token's log-probability and this many most likely alternatives per token
    (at most 20; 0: the tokens' own only). None: no logprobs."""
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    """system | developer (= system) | user | assistant; others get a 400 that names them
    (checked with the chat template, as ``fromzero chat`` checks them)."""
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    """At least one (an empty list is a 400, as OpenAI answers it)."""
    max_completion_tokens: int | None = None
    """Newer name of max_tokens (give one of them)."""
    logprobs: bool | None = None
    top_logprobs: int | None = None


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    """base64: little-endian float32 bytes (what the openai client asks for by default)."""
    dimensions: int | None = None
    user: str | None = None


class ClassifyRequest(_Body):
    """POST /v1/classify (fromzero's own): label texts with a text-classification checkpoint."""

    input: Union[str, list[str]]
    model: str | None = None
