"""Serving throughput: 8 concurrent clients vs the same 8 requests one at a time.

    .venv/bin/python benchmarks/serve.py [--checkpoint runs/shakespeare-char/checkpoints/best] [--rounds 5]

Starts ``fromzero serve`` in a subprocess (the real command: uvicorn, HTTP, the batching engine)
on the checkpoint -- by default ``runs/shakespeare-char/checkpoints/best`` (the char-level Shakespeare GPT of
``recipes/shakespeare-char.yaml``) if it exists, else a randomly initialised model of that shape
(speed does not depend on the weights). Each client asks /v1/completions for exactly
``--max-tokens`` tokens (greedy, ``ignore_eos``, no stop strings). Two modes, interleaved over
``--rounds`` rounds:

* sequential: the 8 requests one after another (the server decodes a batch of one);
* concurrent: the 8 requests at once from 8 threads (the server batches them).

The Shakespeare model's context is only 64 tokens, so a prompt + 64 new tokens never fits it: the
server runs with ``--sliding-window``, and the tokens past the context are computed as
``fromzero generate`` does, over the whole last-64-token window (learned positions shift, so
nothing can be cached: 64 tokens of compute per token, which batching cannot share the way it
shares cached one-token steps). Two prompt sets show both sides:

* in-context: one-character prompts (the initial of a speaker: R, J, K, ...): 63 of the 64 new
  tokens are decoded with the KV cache -- the bar (>= 3x) is measured here;
* past-context: speaker-name prompts ("ROMEO:\n", "First Citizen:\n", ...; 7-17 characters):
  the last 6-16 tokens of each request are window recomputations.

Reported per prompt set: total throughput (generated tokens / wall time of the round; median over
rounds), its ratio concurrent / sequential, p50 / p99 latency of single requests, and whether both
modes produced identical text (greedy decoding must not depend on batching); and the batch sizes
the server reports in /metrics. The server runs with ``--threads`` torch threads (OMP_NUM_THREADS;
default 1: on a small shared CPU a second thread mostly waits for the first).

Writes benchmarks/results/serve.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_CHECKPOINT = ROOT / "runs" / "shakespeare-char" / "checkpoints" / "best"
PROMPT_SETS = {
    "in-context": ["R", "J", "K", "F", "H", "E", "L", "P"],
    "past-context": ["ROMEO:\n", "JULIET:\nO ", "KING HENRY:\n", "First Citizen:\n", "HAMLET:\nTo be",
                     "Enter a Messenger", "LADY MACBETH:\n", "PORTIA:\nThe "],
}


def tiny_checkpoint(directory: Path) -> Path:
    """A random GPT of the Shakespeare recipe's shape (4 layers, 4 heads, 128 wide, block 64)."""
    import torch

    from fromzero.data.tokenizers import char_tokenizer_from_chars
    from fromzero.models.gpt import GPT, GPTConfig
    from fromzero.checkpoint import save_checkpoint

    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-\n")))
    tokenizer = char_tokenizer_from_chars(chars)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128)
    tokenizer_file = directory.parent / "tokenizer.json"
    tokenizer.save(tokenizer_file)
    save_checkpoint(directory, GPT(config), config.to_dict(), tokenizer_file=tokenizer_file)
    return directory


def start_server(checkpoint: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "fromzero", "serve", "--checkpoint", str(checkpoint), "--port", "0",
           "--device", args.device, "--max-batch-size", str(args.clients), "--sliding-window",
           "--max-tokens-cap", str(args.max_tokens), "--request-timeout", "600", "--log-level", "warning"]
    return launch_server(cmd, env, log, timeout=120)


def launch_server(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start ``fromzero serve ... --port 0`` and wait for the URL it prints (stderr goes to ``log``)."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"on (http://[\d.]+:\d+)", log.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start: {log.read_text()}")


def request(http: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                           "ignore_eos": True})
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    body = r.json()
    return elapsed, body["choices"][0]["text"], body["usage"]["completion_tokens"]


def run_round(http: httpx.Client, concurrent: bool, prompts: list[str], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: request(http, p, max_tokens), prompts))
    else:
        results = [request(http, p, max_tokens) for p in prompts]
    wall = time.perf_counter() - t0
    tokens = sum(n for _, _, n in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latencies": [t for t, _, _ in results], "texts": [text for _, text, _ in results],
            "counts": [n for _, _, n in results]}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def batch_histogram(metrics_text: str) -> dict[str, float]:
    out = {}
    for line in metrics_text.splitlines():
        m = re.match(r'fromzero_batch_size_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help=f"GPT checkpoint (default: {DEFAULT_CHECKPOINT.relative_to(ROOT)} if it exists, "
                        "else a random model of its shape)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (and --max-batch-size)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu", help="device of the server")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"), help="JSON output")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint, source = Path(args.checkpoint), args.checkpoint
        elif DEFAULT_CHECKPOINT.is_dir():
            checkpoint, source = DEFAULT_CHECKPOINT, str(DEFAULT_CHECKPOINT.relative_to(ROOT))
        else:
            checkpoint, source = tiny_checkpoint(Path(tmp) / "gpt"), "random model of the Shakespeare recipe's shape"
        log = Path(tmp) / "server.log"
        proc, url = start_server(checkpoint, args, log)
        try:
            with httpx.Client(base_url=url, timeout=600,
                              limits=httpx.Limits(max_connections=args.clients * 2, keepalive_expiry=2.0)) as http:
                sets = {name: [ps[i % len(ps)] for i in range(args.clients)] for name, ps in PROMPT_SETS.items()}
                run_round(http, True, sets["in-context"], args.max_tokens)  # warm-up (not timed)
                rounds = {(name, mode): [] for name in sets for mode in ("sequential", "concurrent")}
                for i in range(args.rounds):
                    for name, prompts in sets.items():
                        order = ("sequential", "concurrent") if i % 2 == 0 else ("concurrent", "sequential")
                        for mode in order:
                            rounds[name, mode].append(run_round(http, mode == "concurrent", prompts, args.max_tokens))
                metrics_text = http.get("/metrics").text
        finally:
            proc.terminate()
            code = proc.wait(timeout=120)

    summary: dict[str, dict] = {}
    for (name, mode), rs in rounds.items():
        latencies = [t for r in rs for t in r["latencies"]]
        summary.setdefault(name, {})[mode] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "round_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
        }
    for name in sets:
        s = summary[name]
        s["throughput_ratio"] = s["concurrent"]["tokens_per_s"] / s["sequential"]["tokens_per_s"]
        runs = rounds[name, "sequential"] + rounds[name, "concurrent"]
        s["exact_token_counts"] = all(c == args.max_tokens for r in runs for c in r["counts"])
        s["identical_text"] = all(r["texts"] == runs[0]["texts"] for r in runs)
        s["prompts"] = sets[name]
    ratio = summary["in-context"]["throughput_ratio"]

    print(f"checkpoint: {source}; {args.clients} clients x {args.max_tokens} tokens, greedy; "
          f"{args.rounds} interleaved rounds (medians); server threads {args.threads}")
    print(f"{'prompts':<14}{'mode':<12}{'tokens/s':>10}{'ratio':>8}{'p50 latency s':>15}{'p99 latency s':>15}"
          f"{'same text':>11}")
    for name in sets:
        for mode in ("sequential", "concurrent"):
            m = summary[name][mode]
            shown = f"{summary[name]['throughput_ratio']:.2f}x" if mode == "concurrent" else ""
            same = str(summary[name]["identical_text"] and summary[name]["exact_token_counts"]) if mode == "concurrent" else ""
            print(f"{name:<14}{mode:<12}{m['tokens_per_s']:>10.1f}{shown:>8}{m['latency_p50_s']:>15.3f}"
                  f"{m['latency_p99_s']:>15.3f}{same:>11}")
    print(f"bar (in-context, concurrent / sequential >= 3x): {ratio:.2f}x {'pass' if ratio >= 3 else 'FAIL'}; "
          f"server exit code after SIGTERM: {code}")

    import torch

    result = {
        "checkpoint": source, "clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "server_threads": args.threads, "device": args.device, "torch": torch.__version__,
        "results": summary, "bar": 3.0, "bar_ratio": ratio, "passes_bar": ratio >= 3.0, "server_exit_code": code,
        "batch_size_histogram_cumulative": batch_histogram(metrics_text),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
