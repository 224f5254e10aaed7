"""``fromzero serve``: a checkpoint behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os

from fromzero.cli import _OWN_DEFAULT, _add_parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    sv = _add_parser(
        sub, "serve", "serve a checkpoint over an OpenAI-compatible HTTP API", func=_cmd_serve,
        description="FastAPI + uvicorn. POST /v1/completions and /v1/chat/completions (GPT; chat needs a "
        "chat template: the checkpoint's own, an SFT checkpoint's, or --chat-template; \"stream\": true for "
        "server-sent events), /v1/embeddings (BERT "
        "encoder), /v1/classify (text classifier); GET /v1/models, /health, /metrics (Prometheus).\n"
        "Concurrent generation requests are decoded together in one batch (continuous batching); a full "
        "queue answers 503 with Retry-After. SIGTERM finishes the requests in flight, then exits 0.\n\n"
        "examples:\n  fromzero serve --checkpoint runs/latest/checkpoints/best --port 8000\n"
        "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"ROMEO:\", \"max_tokens\": 40}'",
    )
    sv.add_argument("--checkpoint", required=True, help="checkpoint directory (GPT, SFT GPT, BERT encoder or text classifier)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; the chosen one is printed)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $FROMZERO_API_KEY, else no key); "
                    "/health and /metrics stay open")
    sv.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together at most")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a batch slot at most; more get 503 with Retry-After")
    sv.add_argument("--max-tokens-cap", type=int, default=0,
                    help="largest max_tokens a request may ask for (0: the model's context length)")
    sv.add_argument("--max-prompt-tokens", type=int, default=0,
                    help="longest prompt in tokens (0: the model's context length); without --sliding-window "
                    "prompt + max_tokens must also fit the context")
    sv.add_argument("--request-timeout", type=float, default=60.0,
                    help="seconds a request may take, queueing included; then 504 and its batch slot is freed")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger: 413")
    sv.add_argument("--sliding-window", action="store_true",
                    help="generate past the context like `fromzero generate` (each token sees the last "
                    "block_size tokens) instead of requiring prompt + max_tokens to fit it")
    sv.add_argument("--model-name", default="", help="model id clients use (default: the --checkpoint path)")
    sv.add_argument("--chat-template", metavar="FILE", default=None,
                    help="a Jinja chat template for /v1/chat/completions instead of the checkpoint's own "
                    "(lets a GPT without one chat; default: the checkpoint's)" + _OWN_DEFAULT)
    sv.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn log level (info logs every request)")


def _cmd_serve(args: argparse.Namespace) -> int:
    from fromzero.serving import ServeConfig, run_server

    api_key = args.api_key if args.api_key is not None else (os.environ.get("FROMZERO_API_KEY") or None)
    config = ServeConfig(
        checkpoint=args.checkpoint, host=args.host, port=args.port, api_key=api_key,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, device=args.device, sliding_window=args.sliding_window,
        model_name=args.model_name, log_level=args.log_level, chat_template=args.chat_template,
    )
    return run_server(config)


# verb -> the function that adds its parser (cli.build_parser calls them in --help order)
PARSERS = {"serve": _add_serve}
