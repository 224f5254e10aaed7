"""The HTTP server: an OpenAI-compatible API over one checkpoint (FastAPI + uvicorn).

Routes: POST /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/classify (fromzero's
own); GET /v1/models, /health and /metrics (these two never need the API key). ``backends.py``
says which checkpoint serves which.

Generation requests go through a bounded queue to one background worker that decodes all running
requests as one batch (``engine.py``). Every refusal is an OpenAI-style JSON error
``{"error": {"message", "type", "param", "code"}}``: 503 + ``Retry-After`` for a full queue, 504
past ``request_timeout`` (its batch row is freed, as when a streaming client disconnects), 413,
401, 404; 422 naming the field for wrong types, unknown fields and out-of-range values; 400 for
malformed JSON, prompt / max_tokens / logprobs limits and a checkpoint of the wrong kind.

Completions' ``logprobs`` and ``echo`` follow OpenAI's legacy API (what lm-evaluation-harness's
``local-completions`` reads): fp32 log-softmax of the logits the server decodes with, before
temperature / top-k / top-p. By default (as OpenAI) prompt + max_tokens must fit the context;
with ``sliding_window`` only the prompt must (generation continues as ``fromzero generate``).
SIGTERM finishes the requests in flight, stops the worker and exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fromzero.errors import FromzeroError
from fromzero.serving.backends import (
    Backend,
    ClassifierBackend,
    EmbeddingBackend,
    GeneratorBackend,
    load_backend,
)
from fromzero.serving.engine import EngineStats, Event, GenerationEngine, QueueFull, SamplingParams, Sequence
from fromzero.serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics, route_label
from fromzero.serving.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
)

log = logging.getLogger("fromzero.serving")

__all__ = ["ServeConfig", "create_app", "run_server", "APIError"]

MAX_STOP_STRINGS = 4
MAX_INPUTS = 2048  # texts per embeddings / classify request (OpenAI's limit for embeddings)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_LOGPROBS = 20  # alternatives per token at most (vLLM's default cap; OpenAI's legacy API had 5)


@dataclass
class ServeConfig:
    """Options of ``fromzero serve``: each is the command-line flag of the same name."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the chosen one is printed)
    api_key: str | None = None  # require ``Authorization: Bearer KEY`` on /v1/* (None: no key)
    max_batch_size: int = 8
    max_queue: int = 64  # requests waiting for a batch slot; beyond: 503 + Retry-After
    max_tokens_cap: int = 0  # 0: the model's context length
    max_prompt_tokens: int = 0  # 0: the model's context length
    request_timeout: float = 60.0  # seconds, queueing included; then 504 and its slot is freed
    max_body_bytes: int = 1 << 20  # beyond: 413
    device: str = "auto"
    sliding_window: bool = False  # generate past the context (else prompt + max_tokens must fit it)
    model_name: str = ""  # the model id clients use ('': the checkpoint path as given)
    chat_template: str | None = None  # a Jinja template file for chat (None: the checkpoint's own)
    log_level: str = "info"  # uvicorn's

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FromzeroError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise FromzeroError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_queue", "max_tokens_cap", "max_prompt_tokens"):
            if getattr(self, name) < 0:
                raise FromzeroError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.request_timeout > 0 and math.isfinite(self.request_timeout)):
            raise FromzeroError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise FromzeroError("--api-key must not be empty")


# ---------------------------------------------------------------------------------------------
# Errors


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                500: "server_error", 503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message, param) of a pydantic error: which field, and what is wrong with it."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"malformed JSON body{': ' + str(detail) if detail else ''}", None
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, "invalid request: " + "; ".join(parts) + more, param


# ---------------------------------------------------------------------------------------------
# Middleware: metrics, API key, body size


class ServingMiddleware:
    """Counts every request (route, status, latency), checks the API key and the body size.

    The body is read here (up to the limit) and replayed to the app, so a body too large is a
    413 before any parsing; a body far beyond the limit is not even read.
    """

    def __init__(self, app: Any, config: ServeConfig, metrics: ServerMetrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        status = {"code": 500}
        start = time.perf_counter()

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.config.api_key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.config.api_key.encode()):
                what = "no API key given" if not given else "invalid API key"
                await APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            limit = self.config.max_body_bytes
            too_big = APIError(413, f"request body is larger than the limit of {limit} bytes (--max-body-bytes)",
                               code="request_too_large")
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > 64 * limit:
                await too_big.response()(scope, receive, send)  # not worth reading
                return
            chunks, size, more = [], 0, True
            while more and size <= 64 * limit:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                size += len(message.get("body", b""))
                if size <= limit:
                    chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            if size > limit:
                await too_big.response()(scope, receive, send)
                return
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay() -> dict:
                return pending.pop() if pending else await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Workers


class EncoderWorker:
    """Runs encoder work (embeddings, classification) on one thread, with a bounded backlog."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.pending = 0  # touched only on the event loop thread
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fromzero-encoder")

    @property
    def queue_depth(self) -> int:
        return max(0, self.pending - 1)

    async def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        if self.pending >= self.max_queue + 1:  # one running + max_queue waiting
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

        def done(_: Any) -> None:
            self.pending -= 1

        future.add_done_callback(done)
        return await asyncio.wait_for(future, timeout)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class GenerationJob:
    """The sequences of one HTTP request in the engine, and their events on the event loop."""

    def __init__(self, app_state: Any, prompts: list[list[int]], params: list[SamplingParams],
                 stream: bool) -> None:
        self.state = app_state
        self.engine: GenerationEngine = app_state.engine
        self.deadline = time.monotonic() + app_state.config.request_timeout
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        decode = app_state.backend.tokenizer.decode
        self.sequences = [
            Sequence(ids, p, functools.partial(self._post, loop, i), decode, self.deadline, stream)
            for i, (ids, p) in enumerate(zip(prompts, params))
        ]
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self._getter: asyncio.Future | None = None

    def _post(self, loop: asyncio.AbstractEventLoop, index: int, event: Event) -> None:
        loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def submit(self) -> None:
        try:
            self.engine.submit(self.sequences)
        except QueueFull as e:
            self.state.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, f"server busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.state.metrics.prompt_tokens.inc(self.prompt_tokens)

    def cancel(self) -> None:
        """Drop every sequence of the request (the worker frees their rows before its next step)."""
        for seq in self.sequences:
            seq.cancel()
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sequence finished. Raises APIError 504 on timeout
        (after cancelling); with ``request``, stops quietly when the client has gone away."""
        remaining = len(self.sequences)
        while remaining:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._timed_out()
            # One pending get() across polls: cancelling a get() that just received an item
            # could lose that item.
            if self._getter is None:
                self._getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._getter}, timeout=min(left, 0.5))
            if not done:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return
                continue
            index, event = self._getter.result()
            self._getter = None
            if event.finish_reason == "timeout":
                self._timed_out()
            if event.finish_reason in ("error", "shutdown"):
                self.cancel()
                raise APIError(503 if event.finish_reason == "shutdown" else 500, event.error or "generation failed",
                               code=event.finish_reason)
            if event.finish_reason is not None:
                remaining -= 1
            yield index, event

    def _timed_out(self) -> None:
        self.cancel()
        self.state.metrics.rejected.labels("timeout").inc()
        raise APIError(504, f"the request did not finish within {self.state.config.request_timeout:g} s "
                            "(--request-timeout)", code="timeout")


class _JobStream(StreamingResponse):
    """A server-sent event stream that frees its sequences however it ends (done, client gone)."""

    def __init__(self, content: AsyncIterator[str], job: GenerationJob) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# The app


def create_app(config: ServeConfig, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app serving ``config.checkpoint`` (or an already loaded ``backend``)."""
    from fromzero.devices import resolve_device

    config.validate()
    if backend is None:
        backend = load_backend(config.checkpoint, resolve_device(config.device), config.model_name,
                               chat_template=config.chat_template)
    metrics = ServerMetrics()
    engine: GenerationEngine | None = None
    encoder: EncoderWorker | None = None
    if isinstance(backend, GeneratorBackend):
        block = backend.block_size
        if config.max_prompt_tokens > block:
            raise FromzeroError(f"--max-prompt-tokens {config.max_prompt_tokens} exceeds the model's context "
                                f"of {block} tokens")
        if not config.sliding_window and config.max_tokens_cap > block:
            raise FromzeroError(f"--max-tokens-cap {config.max_tokens_cap} exceeds the model's context of "
                                f"{block} tokens (pass --sliding-window to generate past the context)")
        stats = EngineStats(on_batch=metrics.batch_size.observe, on_tokens=metrics.generated_tokens.inc)
        engine = GenerationEngine(backend.model, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                                  sliding_window=config.sliding_window, stats=stats)
        metrics.track(lambda: engine.queue_depth, lambda: engine.running)
    else:
        encoder = EncoderWorker(config.max_queue)
        metrics.track(lambda: encoder.queue_depth, lambda: min(encoder.pending, 1))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            if encoder is not None:
                encoder.shutdown()

    app = FastAPI(title="fromzero", description="OpenAI-compatible API over a fromzero checkpoint",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.backend, app.state.metrics = config, backend, metrics
    app.state.engine, app.state.encoder = engine, encoder
    app.state.created = int(time.time())
    app.add_middleware(ServingMiddleware, config=config, metrics=metrics)
    _install_error_handlers(app)
    _install_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(exc)
        return APIError(status, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (f"unknown route: {request.method} {request.url.path} (this server has POST /v1/completions, "
                       "/v1/chat/completions, /v1/embeddings, /v1/classify; GET /v1/models, /health, /metrics)")
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()


def _install_routes(app: FastAPI) -> None:
    state = app.state

    def backend_for(kind: str, route: str, needs: str, requested: str | None) -> Any:
        """The backend, if it is of ``kind`` and the request's model (if any) is the one served."""
        backend: Backend = state.backend
        if backend.kind != kind:
            raise APIError(400, f"{route} needs {needs}, but this server serves {backend.name!r}: "
                                f"{backend.description}; its endpoints: {', '.join(backend.endpoints)}",
                           code="wrong_model_kind")
        if requested is not None and requested != backend.name:
            raise APIError(404, f"model {requested!r} does not exist: this server serves {backend.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        return backend

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state.engine
        return {"status": "ok", "model": state.backend.name, "kind": state.backend.kind,
                "running": engine.running if engine else 0, "queued": engine.queue_depth if engine else 0}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        b: Backend = state.backend
        card: dict[str, Any] = {"id": b.name, "object": "model", "created": state.created, "owned_by": "fromzero",
                                "task": b.task, "endpoints": list(b.endpoints)}
        if isinstance(b, GeneratorBackend):
            card["max_model_len"] = b.block_size
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen: GeneratorBackend = backend_for("generate", "/v1/completions", "a GPT language model",
                                            body.model)
        _refuse_unsupported(body)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (leave it out or equal to n)", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.logprobs is not None:
            if body.logprobs > MAX_LOGPROBS:
                raise APIError(400, f"logprobs is {body.logprobs}; this server returns at most {MAX_LOGPROBS} "
                                    "alternatives per token", param="logprobs")
            if body.stream:
                raise APIError(400, "logprobs with stream: true is not supported (leave stream out)",
                               param="logprobs")
        prompts, texts = _completion_prompts(body.prompt, gen)
        stops = _stop_strings(body.stop)
        scores = {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None}
        params = [_sampling(body, len(ids), gen, state.config, body.max_tokens, stops, gen.stop_ids, j,
                            default=DEFAULT_COMPLETION_TOKENS, allow_zero=body.echo, **scores)
                  for ids in prompts for j in range(body.n)]
        seeds = [ids for ids in prompts for _ in range(body.n)]
        echo = [texts[i // body.n] if body.echo else "" for i in range(len(seeds))]
        job = GenerationJob(state, seeds, params, body.stream)
        return await _respond(job, request, body, "completion", echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gen: GeneratorBackend = backend_for("generate", "/v1/chat/completions", "an instruction-tuned GPT",
                                              body.model)
        _refuse_unsupported(body)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if gen.chat is None:
            raise APIError(400, f"chat needs an instruction-tuned (sft) checkpoint with a chat template; this "
                                f"server serves {gen.name!r}: {gen.description} (start the server with "
                                "--chat-template FILE to chat with it); use /v1/completions",
                           code="wrong_model_kind")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        if not body.messages:
            raise APIError(400, "messages is empty: a chat needs at least one message", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                    for m in body.messages]
        try:  # the same prompt ids and stop tokens as `fromzero chat` (fromzero.inference.chat)
            ids = gen.chat.prompt_ids(messages)
        except FromzeroError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        stops = _stop_strings(body.stop)
        stops += tuple(s for s in gen.chat.stop_strings if s not in stops)  # a template's text turn end
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        # stop tokens: end of text and the template's end-of-turn token
        params = [_sampling(body, len(ids), gen, state.config, limit, stops, gen.chat.stop_ids, j)
                  for j in range(body.n)]
        job = GenerationJob(state, [ids] * body.n, params, body.stream)
        return await _respond(job, request, body, "chat", [""] * body.n)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        emb: EmbeddingBackend = backend_for("embed", "/v1/embeddings", "a BERT encoder checkpoint",
                                            body.model)
        texts = _texts(body.input, "input")
        dim = emb.config.hidden_size
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"this model's embeddings have {dim} dimensions; dimensions={body.dimensions} "
                                "is not supported", param="dimensions")
        vectors, n_tokens = await _encoder_call(state, emb.embed, texts)
        if body.encoding_format == "base64":
            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": emb.name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        clf: ClassifierBackend = backend_for("classify", "/v1/classify", "a text-classification checkpoint",
                                                 body.model)
        texts = _texts(body.input, "input")
        results = await _encoder_call(state, clf.classify, texts)
        return {"object": "list", "model": clf.name,
                "data": [{"index": i, **r} for i, r in enumerate(results)]}


# ---------------------------------------------------------------------------------------------
# Request checking


def _refuse_unsupported(body: Any) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (leave it out or 0)", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _completion_prompts(prompt: Any, gen: GeneratorBackend) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of every prompt of a completions request (str, [str], [int], [[int]])."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_INPUTS:
        raise APIError(400, f"too many prompts: {len(prompt)} > {MAX_INPUTS}", param="prompt")
    ids_list, texts = [], []
    for i, p in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if not p:
            raise APIError(400, f"{where} is empty", param="prompt")
        if isinstance(p, str):
            try:
                ids = gen.tokenizer.encode(p)
            except FromzeroError as e:
                raise APIError(400, f"{where}: {e}", param=where) from None
        else:
            bad = [t for t in p if not 0 <= t < gen.vocab_size]
            if bad:
                raise APIError(400, f"{where} has token id {bad[0]}, outside the vocabulary of {gen.vocab_size}",
                               param="prompt")
            ids = list(p)
        if not ids:
            raise APIError(400, f"{where} encodes to no tokens", param="prompt")
        ids_list.append(ids)
        texts.append(p if isinstance(p, str) else gen.tokenizer.decode(p))
    return ids_list, texts


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return tuple(stops)


def _sampling(body: Any, prompt_len: int, gen: GeneratorBackend, config: ServeConfig, requested: int | None,
              stops: tuple[str, ...], stop_ids: Any, choice: int, default: int | None = None,
              allow_zero: bool = False, **scores: int | None) -> SamplingParams:
    """The SamplingParams of one prompt, after checking the prompt and max_tokens limits.

    ``requested``: the request's max_tokens (None: ``default``, or with no default as many as
    the context and the cap allow). ``stop_ids``: unless the body says ignore_eos. ``choice``:
    which of the n choices (choice j of a seeded request draws with seed + j, so the n choices
    differ and each is reproducible). ``allow_zero``: max_tokens 0 is valid (completions with
    echo: score the prompt only). ``scores``: logprobs / prompt_logprobs."""
    block = gen.block_size
    max_prompt = config.max_prompt_tokens or block
    if prompt_len > block:
        why = "; echo scores every prompt token, so the whole prompt must fit" if allow_zero else ""
        raise APIError(400, f"the prompt is {prompt_len} tokens, longer than the model's context of {block} tokens"
                            f"{why}", param="prompt", code="context_length_exceeded")
    if prompt_len > max_prompt:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this server accepts at most {max_prompt} "
                            "(--max-prompt-tokens)", param="prompt", code="context_length_exceeded")
    cap = config.max_tokens_cap or block
    room = cap if config.sliding_window else min(cap, block - prompt_len)
    if requested is None:
        if room <= 0:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the model's context of {block} tokens: "
                                "no room to generate", param="prompt", code="context_length_exceeded")
        limit = min(default, room) if default else room
    else:
        if requested < 0 or (requested == 0 and not allow_zero):
            raise APIError(400, f"max_tokens must be at least 1, got {requested} (0 only with echo: true, to score "
                                "the prompt)", param="max_tokens")
        if requested > cap:
            raise APIError(400, f"max_tokens {requested} is above this server's cap of {cap} (--max-tokens-cap)",
                           param="max_tokens")
        if not config.sliding_window and prompt_len + requested > block:
            raise APIError(400, f"the model's context is {block} tokens, but the prompt ({prompt_len}) + max_tokens "
                                f"({requested}) need {prompt_len + requested}: lower max_tokens to at most "
                                f"{block - prompt_len} or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        limit = requested
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None
    return SamplingParams(
        max_tokens=limit, temperature=temperature, top_p=body.top_p, top_k=top_k,
        seed=None if body.seed is None else body.seed + choice, stop=stops,
        stop_ids=frozenset() if body.ignore_eos else frozenset(stop_ids), **scores,
    )


def _content_text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content or ())


def _texts(value: Any, param: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, f"{param} is empty", param=param)
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"{param} must be text (a string or a list of strings); token ids are not supported",
                       param=param)
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"too many inputs: {len(texts)} > {MAX_INPUTS}", param=param)
    for i, t in enumerate(texts):
        if not t.strip():
            raise APIError(400, f"{param}[{i}] is empty" if len(texts) > 1 else f"{param} is empty", param=param)
    return texts


async def _encoder_call(state: Any, fn: Callable[..., Any], texts: list[str]) -> Any:
    try:
        return await state.encoder.run(fn, texts, timeout=state.config.request_timeout)
    except QueueFull as e:
        state.metrics.rejected.labels("queue_full").inc()
        raise APIError(503, f"server busy: {e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from None
    except asyncio.TimeoutError:
        state.metrics.rejected.labels("timeout").inc()
        raise APIError(504, f"the request did not finish within {state.config.request_timeout:g} s "
                            "(--request-timeout)", code="timeout") from None
    except FromzeroError as e:
        raise APIError(400, str(e), param="input") from None


# ---------------------------------------------------------------------------------------------
# Responses


async def _respond(job: GenerationJob, request: Request, body: Any, kind: str, echo: list[str]) -> Response:
    """Run ``job``: one JSON response, or (``stream``) server-sent events."""
    job.submit()
    model = job.state.backend.name
    created = int(time.time())
    rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    n_choices = len(job.sequences)
    if not body.stream:
        texts, reasons, tokens = list(echo), [None] * n_choices, [0] * n_choices
        try:
            async for i, event in job.events(request):
                texts[i] += event.text
                if event.finish_reason is not None:
                    reasons[i], tokens[i] = event.finish_reason, event.completion_tokens
        finally:
            job.cancel()  # no-op when done; frees the rows of a request that failed or was abandoned
        if kind == "completion":
            tokenizer = job.state.backend.tokenizer
            choices = [{"index": i, "text": texts[i],
                        "logprobs": _completion_logprobs(job.sequences[i], tokenizer, echo[i]),
                        "finish_reason": reasons[i]} for i in range(n_choices)]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(n_choices)]
        usage = _usage(job.prompt_tokens, sum(tokens))
        return JSONResponse({"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                             "created": created, "model": model, "choices": choices, "usage": usage})

    # Streaming: wait for the first event, so that a timeout or failure before any token is still
    # a proper HTTP error rather than an error inside a 200 stream.
    events = job.events()
    try:
        first = await anext(events)
    except BaseException:
        job.cancel()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if kind == "completion":
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        else:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text or role:
                delta["content"] = text or ""
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

    async def stream() -> AsyncIterator[str]:
        tokens = [0] * n_choices
        for i in range(n_choices):
            if kind == "chat" or echo[i]:
                yield chunk(i, echo[i], None, role=kind == "chat")
        pending: list[tuple[int, Event]] = [first]
        try:
            while True:
                for i, event in pending:
                    if event.finish_reason is not None:
                        tokens[i] = event.completion_tokens
                    if event.text or event.finish_reason is not None:
                        yield chunk(i, event.text, event.finish_reason)
                pending = [await anext(events)]
        except StopAsyncIteration:
            pass
        except APIError as e:  # timed out or failed mid-stream: the status is sent already
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": _usage(job.prompt_tokens, sum(tokens))})
        yield "data: [DONE]\n\n"

    return _JobStream(stream(), job)


def _completion_logprobs(seq: Sequence, tokenizer: Any, echo: str) -> dict[str, list] | None:
    """OpenAI's legacy ``logprobs`` object of one finished completion choice (None: not asked for).

    ``echo``: the echoed prompt text in front of the completion ('' without echo). One entry per
    token: the prompt's (when echoed and scored), then the generated ones that are part of the text
    (a stop token, and tokens after the cut of a stop string, are not). ``text_offset``: where each
    token's text starts in the choice's text.
    """
    if seq.params.logprobs is None:
        return None
    piece = functools.cache(lambda token: tokenizer.decode([token]))  # a token's text, decoded once
    entries, offsets = [], []
    if seq.prompt_logprobs is not None:
        entries += seq.prompt_logprobs
        offsets += _text_offsets(tokenizer.decode, [e.token for e in seq.prompt_logprobs])
    generated = seq.logprobs[: len(seq.tokens)]
    starts = _text_offsets(tokenizer.decode, seq.tokens[: len(generated)])
    if len(seq.text) < len(tokenizer.decode(seq.tokens)):  # cut at a stop string
        keep = sum(1 for o in starts if o < len(seq.text))
        generated, starts = generated[:keep], starts[:keep]
    entries += generated
    offsets += [len(echo) + o for o in starts]
    top_logprobs = []
    for e in entries:
        if e.logprob is None:
            top_logprobs.append(None)
            continue
        top = {piece(t): lp for t, lp in e.top}
        top.setdefault(piece(e.token), e.logprob)  # the chosen token is always listed (as OpenAI)
        top_logprobs.append(top)
    return {"tokens": [piece(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top_logprobs, "text_offset": offsets}


def _text_offsets(decode: Callable[[list[int]], str], ids: list[int]) -> list[int]:
    """Character offset of each token's text in ``decode(ids)``: ``len(decode(ids[:i]))``.

    Each token's text is read in the context of the token before it (a SentencePiece-style
    decoder drops a leading space only at the start); when the pieces do not add up to the whole
    text (a character split over several byte tokens), every prefix is decoded instead (exact,
    quadratic in the length)."""
    if not ids:
        return []
    single = [decode([t]) for t in ids]
    offsets, total = [0], len(single[0])
    for i in range(1, len(ids)):
        offsets.append(total)
        pair = decode(ids[i - 1 : i + 1])
        if not pair.startswith(single[i - 1]):
            break
        total += len(pair) - len(single[i - 1])
    else:
        if total == len(decode(ids)):
            return offsets
    return [len(decode(ids[:i])) for i in range(len(ids))]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------------------------------
# Running


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FromzeroError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run_server(config: ServeConfig) -> int:
    """Serve until SIGTERM / Ctrl-C; returns 0 after a graceful shutdown (exit code of the CLI)."""
    import uvicorn

    app = create_app(config)
    sock = _listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    backend: Backend = app.state.backend
    print(f"serving {backend.name!r} ({backend.description}) on http://{shown}:{port} "
          f"(endpoints: {', '.join(backend.endpoints)})", file=sys.stderr, flush=True)
    uv_config = uvicorn.Config(app, log_level=config.log_level, lifespan="on",
                               timeout_graceful_shutdown=int(config.request_timeout) + 5)
    server = uvicorn.Server(uv_config)
    # uvicorn re-raises the signal that stopped it once it has drained; SIGTERM's handler is a
    # no-op here, so a graceful stop ends the process with exit code 0 instead of -SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
