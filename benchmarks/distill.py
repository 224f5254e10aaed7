"""Distillation: the 2-layer student against its 6-layer MiniLM teacher — speed and quality.

    .venv/bin/python benchmarks/distill.py --teacher runs/genre/checkpoints/best \\
        --student runs/genre-distilled/checkpoints/best [--rounds 15] [--out benchmarks/results/distill.json]

Latency: one forward pass (logits) on batch 1 and batch 16 of 128 real tokens (windows of the
test texts), fp32 and with bf16 autocast (what ``fromzero predict`` uses on a CPU with native
bf16), interleaved rounds, medians, speed-up = teacher / student. Quality: accuracy and macro-F1
of both checkpoints on the test split of the teacher's run data (fp32, this process).
Bars (issue 6): student >= 2.5x faster and >= 90% of the teacher's test macro-F1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantize import classifier_quality, interleaved, test_rows, token_windows  # noqa: E402

from fromzero.inference.predict import Classifier  # noqa: E402
from fromzero.checkpoint import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher classifier checkpoint")
    parser.add_argument("--student", required=True, help="distilled student checkpoint")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (batch 1: 3x as many)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.json"))
    args = parser.parse_args()

    dirs = {"teacher": Path(args.teacher), "student": Path(args.student)}
    models = {name: load_model(d, "cpu") for name, d in dirs.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    rows = test_rows(dirs["teacher"], "test")
    classifier = Classifier(dirs["teacher"], "cpu")
    latency: dict[str, dict[str, float]] = {}
    for batch in (1, 16):
        ids = token_windows(classifier, [t for t, _ in rows], batch, args.tokens)
        mask = torch.ones_like(ids)

        def run(model: torch.nn.Module, autocast: bool) -> Callable[[], Any]:
            def go() -> Any:
                ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
                with torch.inference_mode(), ctx:
                    return model(ids, mask)
            return go

        fns = {f"{name} {kind}": run(m, kind == "bf16") for name, m in models.items() for kind in ("fp32", "bf16")}
        medians = interleaved(fns, args.rounds * (3 if batch == 1 else 1))
        latency[f"batch{batch}"] = {name: value * 1e3 for name, value in medians.items()}

    quality = {name: classifier_quality(d, rows, 64) for name, d in dirs.items()}
    print(f"{'model':<10} {'params':>12} {'test acc':>9} {'macro-F1':>9}   " +
          "   ".join(f"{b} {k} ms" for b in ("b1", "b16") for k in ("fp32", "bf16")))
    for name in dirs:
        cells = [latency[f"batch{b}"][f"{name} {k}"] for b in (1, 16) for k in ("fp32", "bf16")]
        print(f"{name:<10} {params[name]:>12,} {quality[name]['accuracy']:>9.4f} {quality[name]['f1_macro']:>9.4f}   " +
              "   ".join(f"{c:>10.1f}" for c in cells))
    speedups = {f"batch{b} {k}": latency[f"batch{b}"][f"teacher {k}"] / latency[f"batch{b}"][f"student {k}"]
                for b in (1, 16) for k in ("fp32", "bf16")}
    kept = quality["student"]["f1_macro"] / quality["teacher"]["f1_macro"]
    print("speed-up (teacher / student): " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    print(f"student keeps {kept:.1%} of the teacher's test macro-F1 "
          f"(bars: >= 2.5x faster, >= 90%: {'met' if min(speedups.values()) >= 2.5 and kept >= 0.9 else 'NOT met'})")
    result = {"teacher": str(dirs["teacher"]), "student": str(dirs["student"]), "params": params,
              "latency_ms": latency, "speedup": speedups, "quality": quality, "f1_kept": kept,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
