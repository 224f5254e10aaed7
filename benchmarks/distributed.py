"""Scaling and memory of pretraining: 1 vs 2 processes (DDP, CPU) and activation checkpointing.

    .venv/bin/python benchmarks/distributed.py [--steps 30] [--rounds 2]

1. Scaling: the tiny char recipe on the bundled sample text, trained by one process with batch
   2b and by two DDP processes (torchrun, gloo) with batch b each -- the same samples per step.
   Reported: ms per optimizer step (median of the timed steps, from metrics.jsonl's elapsed_s)
   and the speed-up. Each process gets one thread (2 cores here), so 2 ranks use both cores.
2. Memory: a GPT ~10x the Shakespeare recipe (8 layers, 256 wide, block 256; 6.4M parameters),
   batch 16, fp32, one training step in a fresh process with and without
   ``train.activation_checkpointing``; reported: the bytes autograd keeps from the forward for
   the backward (exact, from saved-tensor hooks) and the process's peak RSS (what the OS sees;
   glibc keeps freed memory, so it mixes in allocator behaviour).

Prints two tables and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TORCHRUN = Path(sys.executable).parent / "torchrun"


def corpus(directory: Path) -> Path:
    """~200 KB of varied English text (the test suite's generator), prepared char-level."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_corpus_text  # noqa: E402

    from fromzero.data.text import prepare_dataset

    text = directory / "corpus.txt"
    text.write_text(make_corpus_text() * 25, encoding="utf-8")
    out = directory / "data"
    prepare_dataset([str(text)], "char", out, progress=False)
    return out


def recipe(directory: Path, data: Path, steps: int) -> Path:
    import yaml

    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"vocab_size": 0, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0},
        "train": {"max_steps": steps, "eval_every": 10 ** 6, "eval_batches": 1, "log_interval": 1,
                  "dtype": "float32", "compile": False, "device": "cpu", "warmup_steps": 0},
        "data": {"dir": str(data)},
    }))
    return path


def step_ms(run: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    t = [r["elapsed_s"] for r in rows if "loss" in r]
    return 1000 * statistics.median(b - a for a, b in zip(t[warmup:], t[warmup + 1:]))


def run(cmd: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")


def scaling(args: argparse.Namespace, work: Path) -> list[dict]:
    data = corpus(work)
    path = recipe(work, data, args.steps)
    results = {"1 process, batch 2b": [], "2 DDP processes, batch b each": []}
    b = args.batch
    for r in range(args.rounds):
        for name in results:
            out = work / f"run-{r}-{len(results[name])}-{name[0]}"
            common = ["--config", str(path), "--out_dir", str(out), "--quiet", "--force"]
            if name.startswith("1"):
                run([sys.executable, "-m", "fromzero", "pretrain", *common, "--train.batch_size", str(2 * b)],
                    threads=2)
            else:
                run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fromzero", "pretrain", *common,
                     "--train.batch_size", str(b), "--dist.strategy", "ddp"], threads=1)
            results[name].append(step_ms(out, warmup=5))
    base = statistics.median(results["1 process, batch 2b"])
    return [{"variant": name, "ms_per_step": statistics.median(v), "speedup": base / statistics.median(v),
             "runs_ms": v} for name, v in results.items()]


def memory_child(checkpointing: bool) -> None:
    import torch

    from fromzero.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=256, n_layer=8, n_head=8, n_embd=256, dropout=0.0)).train()
    model.activation_checkpointing = checkpointing
    idx = torch.randint(0, 96, (16, 256))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"params": model.num_params(), "saved_for_backward_mib": saved[0] / 2**20,
                      "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
                      "step_growth_mib": (peak - before) / 1024}))


def memory() -> list[dict]:
    rows = []
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(int(checkpointing))],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        rows.append({"activation_checkpointing": checkpointing, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first 5 are not timed)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both variants")
    ap.add_argument("--batch", type=int, default=8, help="per-process batch b of the DDP run")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(bool(args.memory_child))
        return
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="fz-bench-dist-") as tmp:
        scale = scaling(args, Path(tmp))
    mem = memory()
    table = Table(title=f"pretraining step, 4x128 char GPT, global batch {2 * args.batch} x 64, CPU")
    for col in ("variant", "ms/step", "speed-up"):
        table.add_column(col)
    for row in scale:
        table.add_row(row["variant"], f"{row['ms_per_step']:.1f}", f"{row['speedup']:.2f}x")
    Console().print(table)
    table = Table(title=f"one training step, GPT {mem[0]['params'] / 1e6:.1f}M params, batch 16 x 256, fp32")
    for col in ("activation checkpointing", "saved for backward MiB", "peak RSS MiB", "RSS growth in the step MiB"):
        table.add_column(col)
    for row in mem:
        table.add_row(str(row["activation_checkpointing"]), f"{row['saved_for_backward_mib']:.0f}",
                      f"{row['peak_mib']:.0f}", f"{row['step_growth_mib']:.0f}")
    Console().print(table)
    out = ROOT / "benchmarks" / "results" / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "distributed", "scaling": scale, "memory": mem,
                               "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
