"""Pruning: what structured and magnitude pruning buy (size, CPU speed) and cost (quality).

    .venv/bin/python benchmarks/prune.py [--classifier DIR] [--gpt DIR] [--gpt-data DIR]
        [--clf-recover-steps 60] [--gpt-recover-steps 200] [--threads 1] [--out FILE]

Models (each skipped when its checkpoint is missing, or with --skip-classifier / --skip-gpt):

* the MiniLM genre classifier (default runs/genre/checkpoints/best: all-MiniLM-L6-v2
  fine-tuned on ``shakespeare-genre``, 6 layers x 12 heads of 32, 1536 MLP channels); quality =
  test accuracy / macro-F1 (1395 passages, by play, as ``fromzero evaluate`` splits them);
* the Shakespeare char GPT (default runs/shakespeare-char/checkpoints/best: 4 layers x 4 heads of 32,
  512 MLP channels); quality = loss over the whole val split (``fromzero evaluate``'s windows).

Variants, each made by ``fromzero prune``'s own code (:func:`prune_checkpoint`): structured 25%
and 50% (Taylor importance on 8 training batches), magnitude 50% (per layer), each also with a
short recovery fine-tune (``--*-recover-steps``; 0 skips those rows; the classifier's
magnitude row recovers only with --recover-magnitude), plus a control: the unpruned model given
the same extra steps (recovery is also more training). Reported per variant: parameters,
model.safetensors bytes, CPU latency of one forward pass (classifier: 8 test passages padded to
the longest; GPT: 8 x 64 tokens) as the median over interleaved rounds (baseline, v1, v2, ...,
baseline, v1, ...) and its ratio to the baseline's median from the same rounds (a recovered
variant has the shapes of its unrecovered twin and is timed as it), and quality.

torch runs on ``--threads`` threads (default 1): on this shared 2-core machine two threads
contending with other jobs were 15-30x slower than one, which would bury the comparison in noise.
Writes benchmarks/results/prune.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CLASSIFIER = ROOT / "runs" / "genre" / "checkpoints" / "best"
GPT = ROOT / "runs" / "shakespeare-char" / "checkpoints" / "best"


def variants(recover_steps: int, recover_magnitude: bool) -> list[tuple[str, dict]]:
    """(name, PruneConfig fields); recovered rows end in "+ N steps". The control is the unpruned
    model given the same extra steps (magnitude at sparsity 0 is exactly that): recovery is also
    more training, and the control shows how much of a recovered score that alone explains."""
    rows = [("structured 25%", dict(method="structured", sparsity=0.25)),
            ("structured 50%", dict(method="structured", sparsity=0.5)),
            ("magnitude 50%", dict(method="magnitude", sparsity=0.5))]
    if recover_steps:
        recovered = [("unpruned", dict(method="magnitude", sparsity=0.0))]
        recovered += [(name, kw) for name, kw in rows if kw["method"] == "structured" or recover_magnitude]
        rows += [(f"{name} + {recover_steps} steps", dict(kw, recover_steps=recover_steps)) for name, kw in recovered]
    return rows


def bench_model(label: str, src: Path, data: str | None, recover_steps: int, recover_magnitude: bool,
                rounds: int, lr: float | None, work: Path) -> dict:
    import torch

    from fromzero.compression.prune import PruneConfig, measure_latency, prune_checkpoint, resolve_task
    from fromzero.checkpoint import checkpoint_info
    from fromzero.checkpoint import load_model, read_json

    device = torch.device("cpu")
    config = read_json(src / "config.json", "model config")
    task = resolve_task(src, config, checkpoint_info(src), data, device)
    if task is None:
        raise SystemExit(f"{src}: no data to evaluate it on (pass the data option)")
    t0 = time.perf_counter()
    base_quality = task.evaluate_dir(src)
    print(f"[{label}] baseline quality {base_quality} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base_model = load_model(src)
    rows = [{"variant": "baseline", "params": sum(p.numel() for p in base_model.parameters()),
             "size_bytes": (src / "model.safetensors").stat().st_size, "quality": base_quality}]
    outs = {}
    for name, kw in variants(recover_steps, recover_magnitude):
        out = work / f"{label}-{name.replace(' ', '_').replace('%', '').replace('+', 'r')}"
        t0 = time.perf_counter()
        report = prune_checkpoint(PruneConfig(checkpoint=str(src), out=str(out), data=data, device="cpu",
                                              progress=False, force=True, lr=lr, **kw))
        prune_s = time.perf_counter() - t0
        quality = task.evaluate_dir(out)
        row = {"variant": name, "params": report["params"]["after"], "size_bytes": report["size_bytes"]["after"],
               "quality": quality, "prune_s": round(prune_s, 1)}
        if kw["method"] == "magnitude":
            row["sparsity_achieved"] = report["sparsity_achieved"]
            row["sparse_format_estimate_bytes"] = report["size_bytes"]["sparse_format_estimate"]
        else:
            row["importance"] = report["importance"]
            row["config_changes"] = report["config_changes"]
        if "recovery" in report:
            r = report["recovery"]
            row["recovery"] = {k: r[k] for k in ("steps", "lr", "batch_size", "train_s", "val")}
        rows.append(row)
        outs[name] = out
        print(f"[{label}] {name}: {quality} (prune{' + recover' if 'recovery' in report else ''} "
              f"{prune_s:.0f} s)", flush=True)

    # Latency once per architecture: a recovered variant has its unrecovered twin's shapes (and
    # zeros, for magnitude), so it is timed as that twin, and the unpruned control as the baseline.
    def twin(name: str) -> str:
        base = name.split(" + ")[0]
        return "baseline" if base == "unpruned" else base

    models = {"baseline": base_model, **{name: load_model(out) for name, out in outs.items() if twin(name) == name}}
    example = task.latency_input(config)
    ms = measure_latency(models, example, rounds=rounds)
    for row in rows:
        row["latency_ms"] = ms[twin(row["variant"])]
        row["speedup"] = ms["baseline"] / row["latency_ms"]
    return {"checkpoint": str(src), "data": task.data, "latency_input_shape": list(example[0].shape),
            "rounds": rounds, "rows": rows}


def print_table(label: str, result: dict, keys: tuple[str, ...]) -> None:
    print(f"\n{label}: {result['checkpoint']} (latency: input {tuple(result['latency_input_shape'])}, "
          f"median of {result['rounds']} interleaved rounds)")
    head = f"{'variant':<30} {'params':>11} {'MB':>7} {'ms':>8} {'speedup':>7} " + " ".join(f"{k:>9}" for k in keys)
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        q = row["quality"]
        print(f"{row['variant']:<30} {row['params']:>11,} {row['size_bytes'] / 1e6:>7.2f} {row['latency_ms']:>8.2f} "
              f"{row['speedup']:>6.2f}x " + " ".join(f"{q[k]:>9.4f}" for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", type=Path, default=CLASSIFIER)
    ap.add_argument("--classifier-data", default=None, help="default: the classifier run's data")
    ap.add_argument("--gpt", type=Path, default=GPT)
    ap.add_argument("--gpt-data", default=None, help="default: the GPT run's data.dir (relative to the repo)")
    ap.add_argument("--clf-recover-steps", type=int, default=60)
    ap.add_argument("--clf-lr", type=float, default=None, help="classifier recovery lr (default: its run's lr)")
    ap.add_argument("--gpt-recover-steps", type=int, default=200)
    ap.add_argument("--recover-magnitude", action="store_true", help="also recover the classifier's magnitude row")
    ap.add_argument("--skip-classifier", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune.json")
    args = ap.parse_args()

    import os

    import torch

    os.chdir(ROOT)  # run configs name data directories relative to the repository
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_gpt and (args.gpt / "model.safetensors").is_file():
            results["gpt"] = bench_model("gpt", args.gpt, args.gpt_data, args.gpt_recover_steps, True,
                                         args.rounds, None, work)
        elif not args.skip_gpt:
            print(f"skipping the GPT: no checkpoint at {args.gpt}")
        if not args.skip_classifier and (args.classifier / "model.safetensors").is_file():
            results["classifier"] = bench_model("classifier", args.classifier, args.classifier_data,
                                                args.clf_recover_steps, args.recover_magnitude, args.rounds,
                                                args.clf_lr, work)
        elif not args.skip_classifier:
            print(f"skipping the classifier: no checkpoint at {args.classifier}")
    if "gpt" in results:
        print_table("char GPT (val loss)", results["gpt"], ("loss",))
    if "classifier" in results:
        print_table("MiniLM genre classifier (test)", results["classifier"], ("accuracy", "f1_macro"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
