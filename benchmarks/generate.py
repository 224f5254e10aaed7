"""Generation speed: with and without the KV cache, and against transformers on GPT-2 small.

    .venv/bin/python benchmarks/generate.py [--checkpoint runs/RUN/checkpoints/best] [--no-gpt2]

Without a checkpoint, a randomly initialised model of the Shakespeare recipe's shape is used
(speed does not depend on the weights). Two cases: generating within the context window (the
cache turns each step into a one-token forward) and past it (the learned position embeddings
shift, so both paths recompute the cropped window: no gain, reported honestly). A bigger
context (block 256) shows where the cache pays. Interleaved rounds, medians; the cached and
uncached outputs are checked to be identical.

Then greedy decoding with a GPT-2-small-shaped random model (12 layers, 12 heads, 768 wide,
vocab 50257, block 1024; fp32, batch 1, 16 prompt tokens + 128 new): fromzero's ``generate``
against ``transformers``' ``GPT2LMHeadModel.generate(do_sample=False)`` (its own KV cache, SDPA
attention) on the same weights (exported with ``convert_gpt.to_hf``), interleaved rounds,
medians, tokens checked identical. A third column runs fromzero with its weights kept
row-major (the decode layout switch disabled) to show what that switch buys; its one-time cost
(copying every Linear weight once) is reported separately, outside the timed rounds.

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
from fromzero.checkpoint import load_model  # noqa: E402


def run(model: GPT, prompt_len: int, new: int, use_cache: bool, seed: int = 0) -> tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    t0 = time.perf_counter()
    out = model.generate(idx, new, temperature=0.8, top_k=40, generator=g, use_cache=use_cache)
    return time.perf_counter() - t0, out


def gpt2_small_case(rounds: int, prompt_len: int = 16, new: int = 128) -> dict | None:
    """fromzero vs transformers greedy decoding on the same GPT-2-small weights."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping the GPT-2 small comparison")
        return None
    from fromzero.models.convert_gpt import to_hf

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval()
    hf_config, hf_state = to_hf(model.config.to_dict(), model.state_dict())
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(hf_config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # tied head
    row_major = GPT(model.config).eval()
    row_major.load_state_dict(model.state_dict())
    row_major.use_decode_layout = lambda enabled=True: None  # keep PyTorch's default layout

    t0 = time.perf_counter()
    model.use_decode_layout(True)  # what the first generate() call does: once per model
    layout_s = time.perf_counter() - t0

    def fz(m: GPT, idx: torch.Tensor) -> torch.Tensor:
        return m.generate(idx, new, temperature=0.0)

    def tf(idx: torch.Tensor) -> torch.Tensor:
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
                           pad_token_id=0)

    runners = {"transformers": tf, "fromzero": lambda i: fz(model, i), "fromzero_row_major": lambda i: fz(row_major, i)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    same = True
    idx = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    for f in runners.values():  # warm-up (allocator, first-call paths)
        f(idx)
    for r in range(rounds):
        idx = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(r + 1))
        outs = {}
        for name, f in runners.items():
            t0 = time.perf_counter()
            outs[name] = f(idx)
            times[name].append(time.perf_counter() - t0)
        assert all(o.shape == (1, prompt_len + new) for o in outs.values())
        same &= torch.equal(outs["fromzero"], outs["transformers"]) and torch.equal(outs["fromzero_row_major"], outs["transformers"])
    tps = {k: new / statistics.median(v) for k, v in times.items()}
    return {
        "case": f"GPT-2 small, greedy, {prompt_len} + {new} tokens", "new_tokens": new, "rounds": rounds,
        "transformers_version": transformers.__version__, "transformers_attn": hf.config._attn_implementation,
        "transformers_tok_s": tps["transformers"], "fromzero_tok_s": tps["fromzero"],
        "fromzero_row_major_tok_s": tps["fromzero_row_major"],
        "speedup_vs_transformers": tps["fromzero"] / tps["transformers"],
        "row_major_speedup_vs_transformers": tps["fromzero_row_major"] / tps["transformers"],
        "decode_layout_switch_s": layout_s, "identical_tokens": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory (default: random recipe-shaped model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2 small comparison with transformers")
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
    console = Console(width=120)
    console.print(table)
    gpt2 = None if args.no_gpt2 else gpt2_small_case(args.rounds)
    if gpt2 is not None:
        t2 = Table(title=f"GPT-2 small greedy decoding, batch 1, CPU fp32 (median of {args.rounds} rounds)")
        for col in ("case", "transformers tok/s", "fromzero tok/s", "speed-up", "fromzero row-major tok/s",
                    "same tokens"):
            t2.add_column(col, justify="left" if col == "case" else "right")
        t2.add_row(gpt2["case"], f"{gpt2['transformers_tok_s']:.1f}", f"{gpt2['fromzero_tok_s']:.1f}",
                   f"{gpt2['speedup_vs_transformers']:.2f}x",
                   f"{gpt2['fromzero_row_major_tok_s']:.1f} ({gpt2['row_major_speedup_vs_transformers']:.2f}x)",
                   str(gpt2["identical_tokens"]))
        console.print(t2)
        console.print(f"one-time decode layout switch (first generate call): {gpt2['decode_layout_switch_s']:.2f} s")
        results.append(gpt2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
