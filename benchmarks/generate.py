"""Generation speed with and without the KV cache.

    .venv/bin/python benchmarks/generate.py [--checkpoint runs/RUN/checkpoints/best]

Without a checkpoint, a randomly initialised model of the Shakespeare recipe's shape is used
(speed does not depend on the weights). Two cases: generating within the context window (the
cache turns each step into a one-token forward) and past it (the learned position embeddings
shift, so both paths recompute the cropped window: no gain, reported honestly). A bigger
context (block 256) shows where the cache pays. Interleaved rounds, medians; the cached and
uncached outputs are checked to be identical.

Writes benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.models.gpt import GPT, GPTConfig  # noqa: E402
from fromzero.training.checkpoint import load_model  # noqa: E402


def run(model: GPT, prompt_len: int, new: int, use_cache: bool, seed: int = 0) -> tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    t0 = time.perf_counter()
    out = model.generate(idx, new, temperature=0.8, top_k=40, generator=g, use_cache=use_cache)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: random recipe-shaped model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    torch.manual_seed(0)
    if args.checkpoint:
        small = load_model(args.checkpoint)
    else:
        small = GPT(GPTConfig(vocab_size=84, block_size=64, n_layer=4, n_head=4, n_embd=128)).eval()
    big_ctx = GPT(GPTConfig(vocab_size=84, block_size=256, n_layer=4, n_head=4, n_embd=128)).eval()
    cases = [
        ("recipe model, 8 + 56 tokens (inside block 64)", small, 8, 56),
        ("recipe model, 8 + 300 tokens (past block 64)", small, 8, 300),
        ("block 256 model, 8 + 248 tokens (inside block)", big_ctx, 8, 248),
    ]
    results = []
    table = Table(title="generation, batch 1, CPU (median of rounds)")
    for col in ("case", "no cache tok/s", "KV cache tok/s", "speed-up", "same tokens"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, model, prompt_len, new in cases:
        times = {False: [], True: []}
        same = True
        for r in range(args.rounds):
            outs = {}
            for use_cache in (False, True):
                dt, outs[use_cache] = run(model, prompt_len, new, use_cache, seed=r)
                times[use_cache].append(dt)
            same &= torch.equal(outs[False], outs[True])
        tps = {k: new / statistics.median(v) for k, v in times.items()}
        row = {"case": name, "new_tokens": new, "no_cache_tok_s": tps[False], "kv_cache_tok_s": tps[True],
               "speedup": tps[True] / tps[False], "identical_tokens": same}
        results.append(row)
        table.add_row(name, f"{tps[False]:,.0f}", f"{tps[True]:,.0f}", f"{row['speedup']:.2f}x", str(same))
    Console(width=120).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
