"""G2P training speed: length-bucketed batches vs random batches, in one process.

    .venv/bin/python benchmarks/g2p_speed.py                    # recipes/g2p-transformer.yaml's model
    .venv/bin/python benchmarks/g2p_speed.py --rounds 2 --steps 4   # a quick look

The translation task's training pairs of ``cmudict-g2p`` (the recipe's data and model, fp32),
batched two ways by :func:`fromzero.finetune.translation.training_batches`:

* **random** -- ``train.bucket_by_length false``: a shuffled DataLoader, each batch padded to its
  longest word and its longest pronunciation (a 3-letter and a 15-letter word often share one);
* **bucketed** -- the default: pairs of similar source + target length batched together, batch
  order shuffled.

Padding: over one whole epoch of each, real tokens / padded tokens (sources and targets).
Speed: both variants start from the same initial weights (each its own copy and AdamW); after
``--warmup`` steps each, ``--rounds`` rounds alternate ``--steps`` training steps of one and of
the other (so a noisy shared machine slows both alike), each step exactly what the loop does
(the task's loss, backward, clipping, AdamW). Reported per variant: the median over rounds of
pairs/s and target tokens/s, the epoch time those pairs/s imply, and bucketed / random. Batches are
taken in epoch order, so the timed steps are a sample of the epoch's mix of lengths. Writes
benchmarks/results/g2p_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RECIPE = ROOT / "recipes" / "g2p-transformer.yaml"
VARIANTS = {"random": False, "bucketed": True}


def padding(rows: list, batch_size: int, seed: int, bucketed: bool) -> dict[str, float]:
    """Real / padded tokens of sources and targets over one epoch (epoch 1)."""
    from fromzero.finetune.translation import training_batches

    make, _ = training_batches(rows, batch_size, seed, bucketed)
    padded = {"source": 0, "target": 0}
    for src, tgt in make(1):
        padded["source"] += src.numel()
        padded["target"] += tgt.numel()
    real = {"source": sum(len(s) for s, _ in rows), "target": sum(len(t) for _, t in rows)}
    both = (real["source"] + real["target"]) / (padded["source"] + padded["target"])
    return {"real_fraction": both, **{f"{k}_real_fraction": real[k] / padded[k] for k in real}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="a translation recipe (model, data, batch size)")
    parser.add_argument("--rounds", type=int, default=4, help="alternated rounds of timed steps per variant")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default: one per core)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "g2p_speed.json"))
    args = parser.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from fromzero.finetune.recipe import load_finetune_config
    from fromzero.finetune.translation import TranslationTask, training_batches
    from fromzero.training.distributed import DistContext

    task_name, cfg = load_finetune_config(Path(args.recipe), ["--device", "cpu"])
    if task_name != "translation":
        raise SystemExit(f"{args.recipe} is a {task_name} recipe, not translation")
    task = TranslationTask(cfg, DistContext(), torch.device("cpu"), "float32")
    rows, initial = task.train_rows, copy.deepcopy(task.model.state_dict())
    print(f"{len(rows):,} training pairs, batch {cfg.batch_size}, {torch.get_num_threads()} threads", flush=True)

    pad = {name: padding(rows, cfg.batch_size, cfg.seed, bucketed) for name, bucketed in VARIANTS.items()}
    for name, p in pad.items():
        print(f"  {name:<8}: real tokens {100 * p['real_fraction']:.1f}% of the padded batches "
              f"(sources {100 * p['source_real_fraction']:.1f}%, targets {100 * p['target_real_fraction']:.1f}%)")

    runs: dict[str, dict[str, Any]] = {}
    for name, bucketed in VARIANTS.items():
        model = copy.deepcopy(task.model)
        model.load_state_dict(initial)
        model.train()
        make, per_epoch = training_batches(rows, cfg.batch_size, cfg.seed, bucketed)
        runs[name] = {"model": model, "stream": iter(make(1)), "per_epoch": per_epoch, "rounds": [],
                      "opt": torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}

    def steps(run: dict[str, Any], n: int) -> tuple[float, int, int]:
        pairs = tokens = 0
        t0 = time.perf_counter()
        for _ in range(n):
            src, tgt = next(run["stream"])
            loss, count = run["model"].loss(src, tgt, label_smoothing=cfg.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(run["model"].parameters(), cfg.grad_clip)
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            pairs, tokens = pairs + len(src), tokens + count
        return time.perf_counter() - t0, pairs, tokens

    for run in runs.values():
        steps(run, args.warmup)
    for r in range(args.rounds):
        for name, run in (runs.items() if r % 2 == 0 else reversed(list(runs.items()))):
            seconds, pairs, tokens = steps(run, args.steps)
            run["rounds"].append({"seconds": seconds, "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds})
        print(f"  round {r + 1}: " + ", ".join(f"{n} {run['rounds'][-1]['pairs_per_s']:.0f} pairs/s"
                                                for n, run in runs.items()), flush=True)

    result: dict[str, Any] = {"benchmark": "g2p_speed", "recipe": str(args.recipe), "pairs": len(rows),
                              "batch_size": cfg.batch_size, "rounds": args.rounds, "steps": args.steps,
                              "variants": {}}
    for name, run in runs.items():
        pairs_s = statistics.median(x["pairs_per_s"] for x in run["rounds"])
        result["variants"][name] = {
            **pad[name], "pairs_per_s": pairs_s,
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in run["rounds"]),
            "step_s": statistics.median(x["seconds"] / args.steps for x in run["rounds"]),
            "batches_per_epoch": run["per_epoch"], "epoch_min": len(rows) / pairs_s / 60, "rounds": run["rounds"]}
    v = result["variants"]
    result["speedup"] = v["bucketed"]["pairs_per_s"] / v["random"]["pairs_per_s"]
    print(f"\n{'batches':<10} {'real tokens':>11} {'pairs/s':>8} {'tgt tok/s':>9} {'s/step':>7} {'min/epoch':>9}")
    for name, row in v.items():
        print(f"{name:<10} {100 * row['real_fraction']:>10.1f}% {row['pairs_per_s']:>8.0f} {row['tokens_per_s']:>9.0f} "
              f"{row['step_s']:>7.3f} {row['epoch_min']:>9.2f}")
    print(f"bucketed / random: {result['speedup']:.2f}x pairs/s (median of {args.rounds} alternated rounds)")
    result["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
