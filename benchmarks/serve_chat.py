"""Chat serving throughput of a real LLM: 8 concurrent streaming clients vs the same 8 chats in turn.

    .venv/bin/python benchmarks/serve_chat.py                      # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/serve_chat.py --rounds 3 --max-tokens 128 --threads 2

Starts ``fromzero serve`` in a subprocess (the real command: uvicorn, HTTP, the batching engine)
on ``--checkpoint`` (default: the built-in ``smollm2-135m-instruct``; any checkpoint with a chat
template) and talks to it with the official ``openai`` client: ``client.chat.completions.create(
..., stream=True, temperature=0, stream_options={"include_usage": True})``, one chat per client,
eight different user questions. Two modes, interleaved over ``--rounds`` rounds:

* sequential: the 8 chats one after another (the server decodes a batch of one);
* concurrent: the 8 chats at once, one ``AsyncOpenAI`` client each (the server batches them).

Replies end where the model ends its turn (``<|im_end|>``) or at ``--max-tokens``;
``--ignore-eos`` makes every reply exactly ``--max-tokens`` long (vLLM's extra, which
fromzero serve accepts). Greedy decoding must not depend on batching: every reply of every
round, in both modes, is checked to be identical to the first sequential round's.

Reported: total throughput (completion tokens from the usage chunks / wall time of the round;
median over rounds), its ratio concurrent / sequential (the bar: >= 3x), time to first token and
request latency (p50 / p99), and the batch sizes the server reports in /metrics. The server runs
with ``--threads`` torch threads (OMP_NUM_THREADS).

Writes benchmarks/results/serve_chat.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve import batch_histogram, launch_server, percentile  # noqa: E402  (benchmarks/serve.py)

QUESTIONS = [
    "What is the capital of France, and what is it famous for?",
    "Explain in a few sentences how a rainbow forms.",
    "Write a short poem about the sea.",
    "Give me three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "How do I make a simple tomato sauce?",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def start_server(checkpoint: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "fromzero", "serve", "--checkpoint", checkpoint, "--port", "0",
           "--device", "cpu", "--max-batch-size", str(args.clients), "--max-tokens-cap", str(args.max_tokens),
           "--request-timeout", "1200", "--model-name", "bench", "--log-level", "warning"]
    return launch_server(cmd, env, log, timeout=600)  # the first start converts the built-in model


async def chat(client, question: str, args: argparse.Namespace) -> dict:
    """One streaming chat: its text, completion tokens, time to first token and latency."""
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    tokens = None
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True} if args.ignore_eos else None,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens is None:
        raise SystemExit("the server sent no usage chunk (stream_options.include_usage)")
    return {"text": "".join(parts), "tokens": tokens, "ttft_s": first if first is not None else float("nan"),
            "latency_s": time.perf_counter() - t0}


async def run_round(clients: list, concurrent: bool, args: argparse.Namespace) -> dict:
    """Client i asks question i; all at once, or one after another."""
    t0 = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(chat(c, q, args) for c, q in zip(clients, QUESTIONS)))
    else:
        results = [await chat(c, q, args) for c, q in zip(clients, QUESTIONS)]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "results": results}


async def benchmark(url: str, args: argparse.Namespace) -> dict:
    import httpx
    from openai import AsyncOpenAI

    clients = [AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=1200, max_retries=0)
               for _ in range(args.clients)]
    await run_round(clients, True, args)  # warm-up (not timed): first-call paths, allocator
    rounds: dict[str, list[dict]] = {"sequential": [], "concurrent": []}
    for i in range(args.rounds):
        order = ("sequential", "concurrent") if i % 2 == 0 else ("concurrent", "sequential")
        for mode in order:
            rounds[mode].append(await run_round(clients, mode == "concurrent", args))
            print(f"round {i + 1} {mode}: {rounds[mode][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    async with httpx.AsyncClient(base_url=url) as http:
        metrics_text = (await http.get("/metrics")).text
    for c in clients:
        await c.close()
    return {"rounds": rounds, "metrics": metrics_text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="smollm2-135m-instruct",
                        help="checkpoint with a chat template, .gguf file or built-in name (default: smollm2-135m-instruct)")
    parser.add_argument("--clients", type=int, default=8, choices=range(1, len(QUESTIONS) + 1), metavar="N",
                        help=f"concurrent clients and --max-batch-size of the server (1..{len(QUESTIONS)}, default 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each chat (default 128)")
    parser.add_argument("--ignore-eos", action="store_true", help="every reply exactly --max-tokens long")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each mode (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_chat.json"), help="JSON output")
    args = parser.parse_args()
    questions = QUESTIONS[: args.clients]

    from fromzero.models.builtin import resolve_model

    checkpoint = str(resolve_model(args.checkpoint))  # converts a built-in model once, before the server starts
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, url = start_server(checkpoint, args, log)
        try:
            out = asyncio.run(benchmark(url, args))
        finally:
            proc.terminate()
            code = proc.wait(timeout=120)
    rounds = out["rounds"]
    reference = [r["text"] for r in rounds["sequential"][0]["results"]]
    summary: dict[str, dict] = {}
    for mode, rs in rounds.items():
        results = [x for r in rs for x in r["results"]]
        summary[mode] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "round_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
            "completion_tokens_per_round": [r["tokens"] for r in rs],
            "ttft_p50_s": percentile([x["ttft_s"] for x in results], 50),
            "ttft_p99_s": percentile([x["ttft_s"] for x in results], 99),
            "latency_p50_s": percentile([x["latency_s"] for x in results], 50),
            "latency_p99_s": percentile([x["latency_s"] for x in results], 99),
            "identical_to_sequential": all([x["text"] for x in r["results"]] == reference for r in rs),
        }
    ratio = summary["concurrent"]["tokens_per_s"] / summary["sequential"]["tokens_per_s"]
    identical = summary["sequential"]["identical_to_sequential"] and summary["concurrent"]["identical_to_sequential"]

    print(f"\ncheckpoint: {args.checkpoint}; {args.clients} streaming chat clients (openai), max_tokens "
          f"{args.max_tokens}{', ignore_eos' if args.ignore_eos else ''}, greedy; {args.rounds} interleaved "
          f"rounds (medians); server threads {args.threads}")
    print(f"{'mode':<12}{'tokens/s':>10}{'ratio':>8}{'TTFT p50 s':>12}{'latency p50 s':>15}{'p99 s':>8}"
          f"{'tokens':>8}{'same replies':>14}")
    for mode in ("sequential", "concurrent"):
        m = summary[mode]
        print(f"{mode:<12}{m['tokens_per_s']:>10.1f}{(f'{ratio:.2f}x' if mode == 'concurrent' else ''):>8}"
              f"{m['ttft_p50_s']:>12.3f}{m['latency_p50_s']:>15.3f}{m['latency_p99_s']:>8.2f}"
              f"{m['completion_tokens_per_round'][0]:>8}{str(m['identical_to_sequential']):>14}")
    print(f"bar (concurrent / sequential >= 3x, identical replies): {ratio:.2f}x, identical {identical}: "
          f"{'pass' if ratio >= 3 and identical else 'FAIL'}; server exit code after SIGTERM: {code}")
    print(f"first reply: {reference[0][:200]!r}")

    import torch

    result = {
        "checkpoint": args.checkpoint, "clients": args.clients, "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos, "rounds": args.rounds, "server_threads": args.threads,
        "torch": torch.__version__, "questions": questions, "replies": reference, "results": summary,
        "bar": 3.0, "ratio": ratio, "identical_replies": identical, "passes_bar": ratio >= 3.0 and identical,
        "server_exit_code": code, "batch_size_histogram_cumulative": batch_histogram(out["metrics"]),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
