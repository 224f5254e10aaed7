"""Request bodies of the HTTP API (pydantic), in OpenAI's shapes.

Every model forbids unknown fields (as OpenAI does: a misspelt ``max_token`` is an error that
names it, not a silently ignored option) and checks types strictly (``"5"`` is not an integer).
OpenAI fields that fromzero does not implement are accepted only at their neutral value (``app.py``
answers anything else with a 400 that says so). Extras, as in vLLM: ``top_k`` and ``ignore_eos``.
Responses are plain dicts built in ``app.py``.
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
    include_usage: bool = False  # a last chunk with token usage (and no choices) before ``data: [DONE]``


Stop = Union[str, list[str], None]
Prompt = Union[str, list[str], list[int], list[list[int]]]


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # optional: one server serves one model
    max_tokens: int | None = None  # default: completions 16; chat as many as fit the context
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # 0 = greedy; default 1
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # default 1 (off)
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1 = off
    n: int = Field(default=1, ge=1, le=16)  # completions per prompt
    stream: bool = False  # server-sent events as tokens are generated
    stream_options: StreamOptions | None = None
    stop: Stop = None  # up to 4 strings that end the text (not included in it)
    seed: int | None = None  # same seed, same text (also when batched with other requests)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # do not stop at the end-of-text token (for benchmarks)


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

    messages: list[ChatMessage]  # at least one (an empty list is a 400, as OpenAI answers it)
    max_completion_tokens: int | None = None  # newer name of max_tokens (give one of them)
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
