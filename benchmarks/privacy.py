"""Differential privacy on digits: the simple CNN's test accuracy at epsilon = 1, 3, 8 and inf.

    .venv/bin/python benchmarks/privacy.py [--epochs 10] [--eps 1,3,8,inf] [--seeds 1] \\
        [--out benchmarks/results/privacy.json]

Every private run is recipes/digits-cnn-dp.yaml (scikit-learn's 8x8 digits, 1257 training
images; DP-SGD through Opacus with Poisson sampling, per-example clipping at max_grad_norm and
noise calibrated so the whole run spends exactly ``privacy.target_epsilon`` at delta 1e-5) with
the target set to each epsilon. The baseline (epsilon = inf) is the non-private recipe
recipes/digits-cnn.yaml (its own batch size and learning rate, which suit training without
noise), run in the same process for the same number of epochs. Both recipes' ``epochs`` are
replaced by ``--epochs`` (the recipes' own 20 / 40 take long on a small shared CPU).

The private runs set ``privacy.reproducible`` (noise and Poisson batches drawn from the seed)
so that the figures can be re-made exactly. Seeds are the outer loop and the epsilons the inner one (interleaved), so slow phases of a busy
machine hit every setting alike; the table reports the median over seeds of test accuracy and
macro-F1, the accuracy kept relative to the baseline, the epsilon actually spent and the noise
multiplier the calibration chose.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.finetune.images import finetune_images  # noqa: E402
from fromzero.finetune.recipe import load_finetune_config  # noqa: E402

PRIVATE_RECIPE = ROOT / "recipes" / "digits-cnn-dp.yaml"
BASELINE_RECIPE = ROOT / "recipes" / "digits-cnn.yaml"


def one_run(epsilon: float, seed: int, epochs: int, work: Path) -> dict[str, Any]:
    """Train one setting; returns its test metrics and privacy report."""
    overrides: dict[str, Any] = {"epochs": epochs, "seed": seed, "device": "cpu", "progress": False,
                                 "out_dir": str(work / f"eps{epsilon}-seed{seed}")}
    if math.isinf(epsilon):
        _, cfg = load_finetune_config(BASELINE_RECIPE, overrides)
    else:
        # reproducible: noise and batches follow the seed, so the table can be re-made exactly
        # (a benchmark, not a release: the same distribution as fresh entropy)
        privacy = {"target_epsilon": epsilon, "reproducible": True}
        _, cfg = load_finetune_config(PRIVATE_RECIPE, {**overrides, "privacy": privacy})
    t0 = time.perf_counter()
    # Quiet runs (their reports and per-epoch lines): the table is printed at the end.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = finetune_images(cfg)
    privacy = result["privacy"] or {}
    return {"epsilon_target": epsilon, "seed": seed, "test_accuracy": result["test"]["accuracy"],
            "test_f1_macro": result["test"]["f1_macro"], "best_epoch": result["best_epoch"],
            "epsilon_spent": privacy.get("epsilon", math.inf), "noise_multiplier": privacy.get("noise_multiplier", 0.0),
            "steps": privacy.get("steps"), "batch_size": cfg.batch_size, "lr": cfg.lr,
            "wall_s": time.perf_counter() - t0}


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: the no-privacy setting's epsilons are written as the string "inf"."""
    return {k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every run (the recipes' own: 20 / 40)")
    parser.add_argument("--eps", default="1,3,8,inf", help="comma-separated target epsilons; inf = no privacy")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per setting (the table shows medians)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "privacy.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    epsilons = [float(e) for e in args.eps.split(",")]

    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fromzero-privacy-bench-") as tmp:
        for seed in range(args.seeds):
            for eps in epsilons:
                run = one_run(eps, seed, args.epochs, Path(tmp))
                runs.append(run)
                print(f"  seed {seed} epsilon {eps:g}: test accuracy {run['test_accuracy']:.4f} "
                      f"({run['wall_s']:.0f} s)", file=sys.stderr, flush=True)

    def median(eps: float, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["epsilon_target"] == eps)

    baseline = median(math.inf, "test_accuracy") if math.inf in epsilons else None
    table = []
    for eps in epsilons:
        row = {"epsilon_target": eps, "test_accuracy": median(eps, "test_accuracy"),
               "test_f1_macro": median(eps, "test_f1_macro"), "epsilon_spent": median(eps, "epsilon_spent"),
               "noise_multiplier": median(eps, "noise_multiplier"),
               "accuracy_kept": median(eps, "test_accuracy") / baseline if baseline else None}
        table.append(row)

    print(f"\ndigits, simple CNN, {args.epochs} epochs, delta 1e-5, median of {args.seeds} seed(s)")
    print(f"{'epsilon':>8} {'test acc':>9} {'macro-F1':>9} {'kept':>7} {'spent':>7} {'sigma':>7}")
    for row in table:
        kept = f"{row['accuracy_kept']:.1%}" if row["accuracy_kept"] is not None else "-"
        spent = f"{row['epsilon_spent']:.3f}" if math.isfinite(row["epsilon_spent"]) else "inf"
        print(f"{row['epsilon_target']:>8g} {row['test_accuracy']:>9.4f} {row['test_f1_macro']:>9.4f} {kept:>7} "
              f"{spent:>7} {row['noise_multiplier']:>7.3f}")

    result = {"dataset": "digits", "model": "simple CNN", "epochs": args.epochs, "seeds": args.seeds,
              "private_recipe": PRIVATE_RECIPE.name, "baseline_recipe": BASELINE_RECIPE.name,
              "table": [jsonable(row) for row in table], "runs": [jsonable(r) for r in runs],
              "total_s": time.perf_counter() - t0, "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
