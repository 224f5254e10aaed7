"""Pretraining speed of the Shakespeare char GPT: fromzero's trainer vs a plain eager loop.

    .venv/bin/python benchmarks/pretrain.py              # speed table (~3 min on 2 cores)
    .venv/bin/python benchmarks/pretrain.py --quality    # + full 2000-step runs: val loss

Every variant trains the recipe's model (recipes/shakespeare-char.yaml) on the prepared
Shakespeare data. The baseline is a plain fp32 eager PyTorch loop of the same model, run in
the same process. This machine is shared and noisy, so variants are measured interleaved:
R rounds, each timing S steps of every variant in turn, and the median per variant is
reported; speed-ups are ratios of medians. MFU uses the usual 6N + 12*L*H*Q*T FLOPs per token
against the GEMM peak this script measures itself (fp32 and bf16 matmuls).

Writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.config import load_pretrain_config  # noqa: E402
from fromzero.data.text import load_split, sample_batch  # noqa: E402
from fromzero.models.gpt import GPT  # noqa: E402
from fromzero.training.pretrain import PretrainRun  # noqa: E402

RECIPE = ROOT / "recipes" / "shakespeare-char.yaml"


def gemm_peak(dtype: torch.dtype, n: int = 1024, reps: int = 30) -> float:
    """Measured matmul throughput in GFLOP/s (best of a few timings)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e9


def ensure_data(data_dir: Path) -> Path:
    if (data_dir / "meta.json").is_file():
        return data_dir
    from fromzero.data.text import prepare_dataset

    prepare_dataset(["shakespeare"], "char", data_dir, progress=False)
    return data_dir


class PlainLoop:
    """The baseline: what a user writes by hand. fp32, eager, default AdamW, clip, no tricks."""

    name = "plain eager fp32 loop"

    def __init__(self, cfg, data_dir: Path):
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.model = GPT(cfg.model)
        t = cfg.train
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2),
        )
        self.data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
        self.rng = np.random.default_rng(t.seed)
        self.dtype = "float32"

    def step(self, lr: float) -> float:
        t, T = self.cfg.train, self.cfg.model.block_size
        ix = self.rng.integers(0, len(self.data) - T, t.batch_size)
        x = torch.stack([torch.from_numpy(self.data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        for g in self.opt.param_groups:
            g["lr"] = lr
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class FromzeroVariant:
    """fromzero's own trainer step (batches, autocast, compile, fused AdamW) with overrides."""

    def __init__(self, name: str, overrides: dict, data_dir: Path, workdir: Path):
        self.name = name
        base = {"data": {"dir": str(data_dir)}, "train": {"device": "cpu"}}
        for section, values in overrides.items():
            base.setdefault(section, {}).update(values)
        cfg = load_pretrain_config(RECIPE, base)
        run_dir = Path(tempfile.mkdtemp(dir=workdir))
        self.run = PretrainRun(cfg, run_dir=run_dir, force=True)
        self.trainer = self.run.make_trainer(progress=False)
        self.batches = self.run.stream()(1)
        self.dtype = self.run.dtype
        self.cfg = cfg

    def step(self, lr: float) -> torch.Tensor:
        """One optimizer step of the shared loop (the same train_step fit() calls)."""
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = lr
        loss, *_ = self.trainer.train_step([next(self.batches) for _ in range(self.cfg.train.grad_accum)])
        return loss


VARIANTS = [
    # (name, overrides): each adds one lever to the row above it
    ("fromzero eager fp32", {"train": {"dtype": "float32", "compile": False}}),
    ("fromzero eager bf16", {"train": {"dtype": "bfloat16", "compile": False}}),
    ("fromzero compile fp32", {"train": {"dtype": "float32", "compile": True}}),
    ("fromzero compile bf16 (recipe default)", {"train": {"dtype": "bfloat16", "compile": True}}),
]


def flops_per_token(model: GPT) -> float:
    c = model.config
    n = model.num_params()
    return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size


def time_steps(variant, steps: int, lr: float) -> float:
    t0 = time.perf_counter()
    last = None
    for _ in range(steps):
        last = variant.step(lr)
    if isinstance(last, torch.Tensor):
        last.item()  # wait for the last step's result (matters on GPU; cheap on CPU)
    return (time.perf_counter() - t0) / steps


def quality_run(overrides: list[str], seed: int, data_dir: Path, workdir: Path) -> dict:
    """A full recipe run through the CLI in a child process: final val loss and its RSS."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    cmd = [sys.executable, "-m", "fromzero", "pretrain", "--config", str(RECIPE), "--quiet", "--force",
           "--out_dir", str(run_dir), "--data.dir", str(data_dir), "--train.seed", str(seed), *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "tokens_per_sec" in r]
    return {"seed": seed, "final_step": val[-1]["step"], "val_loss": val[-1]["val_loss"],
            "tokens_per_sec_median": statistics.median(r["tokens_per_sec"] for r in train[2:]),
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation happens here)")
    ap.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char"), help="prepared Shakespeare char data")
    ap.add_argument("--quality", action="store_true", help="also run the full recipe for val loss at 2000 steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2], help="seeds for --quality")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrain.json"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    data_dir = ensure_data(Path(args.data))
    workdir = Path(tempfile.mkdtemp(prefix="fromzero-bench-"))
    peak = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    console.print(f"measured GEMM peak: fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s "
                  f"({torch.get_num_threads()} threads)")

    cfg = load_pretrain_config(RECIPE, {"data": {"dir": str(data_dir)}, "model": {"vocab_size": 84}})
    variants = [PlainLoop(cfg, data_dir)]
    compile_s = {variants[0].name: 0.0}
    for name, overrides in VARIANTS:
        v = FromzeroVariant(name, overrides, data_dir, workdir)
        t0 = time.perf_counter()
        time_steps(v, args.warmup, 1e-3)
        compile_s[name] = time.perf_counter() - t0
        variants.append(v)
        console.print(f"ready: {name} (warm-up {compile_s[name]:.1f} s)")
    time_steps(variants[0], args.warmup, 1e-3)

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            times[v.name].append(time_steps(v, args.steps, 1e-3))
        console.print(f"round {r + 1}/{args.rounds} done")

    tokens = cfg.train.batch_size * cfg.model.block_size
    fpt = flops_per_token(variants[0].model)
    base = statistics.median(times[variants[0].name])
    results = []
    table = Table(title=f"pretrain step, Shakespeare char GPT ({tokens} tokens/step, median of {args.rounds} rounds x {args.steps} steps)")
    for col in ("variant", "ms/iter", "tokens/s", "speed-up", "MFU (own dtype)", "MFU vs fp32 peak", "warm-up s"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for v in variants:
        ms = statistics.median(times[v.name])
        tps = tokens / ms
        achieved = fpt * tps / 1e9
        row = {"variant": v.name, "dtype": v.dtype, "ms_per_iter": ms * 1e3, "tokens_per_sec": tps,
               "speedup_vs_plain": base / ms, "mfu_own_dtype": achieved / peak[v.dtype],
               "mfu_vs_fp32_peak": achieved / peak["float32"], "warmup_s": compile_s[v.name],
               "all_ms": [t * 1e3 for t in times[v.name]]}
        results.append(row)
        table.add_row(v.name, f"{row['ms_per_iter']:.1f}", f"{tps:,.0f}", f"{row['speedup_vs_plain']:.2f}x",
                      f"{row['mfu_own_dtype']:.0%}", f"{row['mfu_vs_fp32_peak']:.0%}", f"{compile_s[v.name]:.1f}")
    console.print(table)

    quality = []
    if args.quality:
        for label, overrides in (("plain-equivalent fp32 eager", ["--train.dtype", "float32", "--train.compile", "false"]),
                                 ("recipe default", [])):
            for seed in args.seeds:
                q = quality_run(overrides, seed, data_dir, workdir)
                q["config"] = label
                quality.append(q)
                console.print(f"quality ({label}) seed {seed}: val loss {q['val_loss']:.4f} at step "
                              f"{q['final_step']} ({q['tokens_per_sec_median']:,.0f} tok/s, {q['wall_s']:.0f} s)")
    rss_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    console.print(f"peak RSS: {rss_mb:.0f} MB (this process; child runs included)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "gemm_peak_gflops": peak, "flops_per_token": fpt, "tokens_per_step": tokens,
        "steps": args.steps, "rounds": args.rounds, "results": results, "quality": quality,
        "peak_rss_mb": rss_mb,
    }, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
