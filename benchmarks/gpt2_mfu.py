"""GPT-2 124M training throughput and MFU (model FLOPs utilisation) on one device.

    .venv/bin/python benchmarks/gpt2_mfu.py [--steps 30] [--batch 12] [--peak-tflops 989]

The recipes/gpt2-124m.yaml model (12 x 768, block 1024, vocab 50304) trained on random tokens
with the trainer's settings: bf16 autocast, torch.compile, fused AdamW. Reports ms per
micro-batch of batch x 1024 tokens, tokens/s and MFU = 6 N tokens/s + attention FLOPs over the
GPU's dense bf16 peak (default 989 TFLOP/s: H100/H200 SXM). nanoGPT's reference: ~135 ms per
12 x 1024 micro-batch on an A100 with compile. ``--tiny`` runs a 2-layer model on CPU for a
smoke test. Writes benchmarks/results/gpt2_mfu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from fromzero.models.gpt import GPT, GPTConfig  # noqa: E402
from fromzero.devices import autocast_context, resolve_device, resolve_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps (after 10 warm-up / compile steps)")
    ap.add_argument("--batch", type=int, default=12, help="sequences of 1024 tokens per step")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    ap.add_argument("--no-compile", action="store_true", help="eager instead of torch.compile")
    ap.add_argument("--tiny", action="store_true", help="2-layer model, block 128 (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpt2_mfu.json",
                    help="where the JSON result goes (default: %(default)s)")
    args = ap.parse_args()
    device = resolve_device("auto")
    dtype = resolve_dtype(device, "auto")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0)
    if args.tiny:
        config = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type in ("cuda", "cpu"))
    step_model = model if args.no_compile else torch.compile(model)
    T = config.block_size
    x = torch.randint(0, config.vocab_size, (args.batch, T), device=device)

    def step() -> None:
        with autocast_context(device, dtype):
            _, loss = step_model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(10):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    tokens_per_s = args.batch * T / (ms / 1000)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    flops_per_token = 6 * n + 12 * config.n_layer * config.n_embd * T
    mfu = flops_per_token * tokens_per_s / (args.peak_tflops * 1e12)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "dtype": dtype, "compile": not args.no_compile, "batch": args.batch, "block": T,
              "params": n, "ms_per_step": ms, "tokens_per_s": tokens_per_s, "mfu": mfu,
              "peak_tflops": args.peak_tflops, "warmup_s": warm_s,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    print(json.dumps(result, indent=2))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
