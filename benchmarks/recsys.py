"""Recommenders on the built-in synthetic interactions: NCF and Wide & Deep vs popularity and MF.

    .venv/bin/python benchmarks/recsys.py [--seeds 0,1,2] [--epochs 12] [--users 1000 --items 500]

Data: ``synthetic_interactions`` (users and items in 8 latent taste clusters, log-normal item
popularity, ~20 interactions per user), implicit feedback, leave-one-out; every model ranks
each held-out item against the same 99 sampled negatives (HR@10, NDCG@10, best epoch chosen by
validation NDCG@10, test scored once).

Models, each trained by ``finetune_recommendation`` exactly as ``fromzero finetune --task
recommendation`` runs it (AdamW, batch 256, 4 negatives per positive, up to --epochs epochs with
early stopping, patience 4), the learning rate picked per model and seed by validation NDCG@10
from {1e-3, 3e-3} (GMF needs the larger one, the others are close either way):

* ``gmf``, ``mlp``, ``neumf`` (from scratch), ``widedeep``;
* ``neumf-pretrained``: NeuMF initialised from that seed's chosen GMF and MLP (alpha 0.5), then
  trained with SGD (lr picked from {1e-2, 5e-2}) as in He et al. 2017 (Adam's moments are not
  carried over);
* baselines from the same run: ``popularity`` (training counts) and ``mf_als`` (implicit ALS,
  reg and alpha chosen on validation);
* ``oracle``: the generator's own scores (popularity x cluster affinity), the ceiling.

Each seed changes the data (synthetic_seed), the initialisation and the negatives. Reported:
per-model medians over seeds, and the ratio of test HR@10 to popularity's in the same seed.
Writes benchmarks/results/recsys.json (or --out).

``--data movielens-100k`` (:func:`movielens`): the same protocol on the built-in MovieLens-100K
(943 users, 1,682 movies; the data and the 99 candidates per held-out rating are the same for
every seed, a seed changes initialisation and training negatives). Rows: popularity; iALS with
factors, regularisation, confidence alpha and iterations chosen on validation NDCG@10 from a grid,
then refitted per seed; GMF, MLP, NeuMF from scratch, NeuMF initialised from that seed's GMF and
MLP (alpha 0.5, SGD fine-tune, as in He et al. 2017) and Wide & Deep with the users' occupation /
age / gender and the movies' genres / year; mean and standard deviation of test HR@10 / NDCG@10
over seeds, and training seconds. The JSON (benchmarks/results/recsys-movielens.json) is
rewritten after every seed, so an interrupted run keeps the seeds it finished::

    .venv/bin/python benchmarks/recsys.py --data movielens-100k [--seeds 0,1,2] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fromzero.data.interactions import (implicit, leave_one_out, ranking_metrics, synthetic_interactions,  # noqa: E402
                                        synthetic_preferences)
from fromzero.finetune.recsys import RecommendationConfig, finetune_recommendation  # noqa: E402

MODELS = ("gmf", "mlp", "neumf", "widedeep", "neumf-pretrained")


def oracle(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """HR/NDCG of the generator's true preferences on the runs' own test candidates."""
    data = leave_one_out(implicit(synthetic_interactions(args.users, args.items, per_user=args.per_user, seed=seed)))
    test = data.eval_set("test", 99, 0)
    users = np.repeat([data.ids.users[u] for u in test.users], test.items.shape[1]).reshape(test.items.shape)
    items = np.array(data.ids.items, dtype=object)[test.items]
    metrics = ranking_metrics(synthetic_preferences(users, items, args.users, args.items, seed=seed), 10)
    return {"hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"]}


def run(args: argparse.Namespace, seed: int, arch: str, out: Path, **extra) -> dict:
    cfg = RecommendationConfig(data="synthetic", synthetic_users=args.users, synthetic_items=args.items,
                               synthetic_per_user=args.per_user, synthetic_seed=seed, seed=seed, arch=arch,
                               epochs=args.epochs, patience=4, progress=False, device="cpu",
                               out_dir=str(out), force=True, log_interval=1000, **extra)
    print(f"== seed {seed}: {arch} lr {cfg.lr} {cfg.optimizer}" + (" (pretrained)" if cfg.pretrained_gmf else ""),
          flush=True)
    t0 = time.perf_counter()
    summary = finetune_recommendation(cfg)
    summary["seconds"] = time.perf_counter() - t0
    summary["lr"] = cfg.lr
    return summary


def best_of(summaries: list[dict]) -> dict:
    """The run with the best validation NDCG@10 (the other kept under "other")."""
    ranked = sorted(summaries, key=lambda s: s["val"]["ndcg@10"], reverse=True)
    return {**ranked[0], "other": ranked[1]}


# ---------------------------------------------------------------------------------------------
# MovieLens-100K

ALS_GRID = {"factors": (16, 32, 64), "reg": (1.0, 5.0, 20.0, 50.0), "alpha": (0.5, 1.0, 3.0, 10.0)}
ALS_ITERATIONS = (5, 10, 20)  # scored after these passes of one 20-pass fit
NEURAL = ("gmf", "mlp", "neumf", "neumf-pretrained", "widedeep")


def tune_als(data, val) -> tuple[dict, list[dict]]:
    """The iALS setting with the best validation NDCG@10 over ALS_GRID x ALS_ITERATIONS."""
    from fromzero.finetune.recsys import evaluate_scores, score_eval_set
    from fromzero.models.recsys import ImplicitALS

    tried = []
    for f in ALS_GRID["factors"]:
        for reg in ALS_GRID["reg"]:
            for alpha in ALS_GRID["alpha"]:
                def after(k, als, f=f, reg=reg, alpha=alpha):
                    if k in ALS_ITERATIONS:
                        m = evaluate_scores(score_eval_set(als.score, val), 10)
                        tried.append({"factors": f, "reg": reg, "alpha": alpha, "iterations": k, "val": m})
                ImplicitALS(f, reg, alpha, max(ALS_ITERATIONS), seed=0).fit(
                    data.train, data.ids.num_users, data.ids.num_items, after)
    best = max(tried, key=lambda t: t["val"]["ndcg@10"])
    print(f"iALS: best of {len(tried)} settings on validation: {best}", flush=True)
    return {k: best[k] for k in ("factors", "reg", "alpha", "iterations")}, tried


def run_movielens(args: argparse.Namespace, seed: int, arch: str, out: Path, **extra) -> dict:
    settings = dict(data="movielens-100k", seed=seed, arch=arch, epochs=args.epochs, patience=3,
                    batch_size=args.batch_size, lr=args.lr, factors=args.factors,
                    mlp_layers=[4 * args.factors, 2 * args.factors, args.factors], progress=False, device="cpu",
                    out_dir=str(out), force=True, log_interval=1000, baselines=False)
    cfg = RecommendationConfig(**{**settings, **extra})
    print(f"== seed {seed}: {arch} lr {cfg.lr} {cfg.optimizer}" + (" (pretrained)" if cfg.pretrained_gmf else ""),
          flush=True)
    summary = finetune_recommendation(cfg)
    return {"val": summary["val"], "test": summary["test"], "seconds": summary["train_s"],
            "best_epoch": summary["best_epoch"], "params": summary["total_params"], "lr": cfg.lr,
            "optimizer": cfg.optimizer, "checkpoint": summary["checkpoint"]}


def movielens(args: argparse.Namespace, seeds: list[int]) -> None:
    from fromzero.finetune.recsys import evaluate_scores, load_recommendation_data, score_eval_set
    from fromzero.models.recsys import ImplicitALS, PopularityRanker

    t_start = time.perf_counter()
    data = load_recommendation_data(RecommendationConfig(data="movielens-100k"))
    val, test = data.eval_set("val", 99, 0), data.eval_set("test", 99, 0)
    results: dict[str, list[dict]] = {}
    pop = PopularityRanker(data.train, data.ids.num_items)
    results["popularity"] = [{"seed": None, "val": evaluate_scores(score_eval_set(pop.score, val), 10),
                              "test": evaluate_scores(score_eval_set(pop.score, test), 10), "seconds": 0.0}]
    t0 = time.perf_counter()
    als_params, als_tried = tune_als(data, val)
    als_tuning_s = time.perf_counter() - t0
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            t0 = time.perf_counter()
            als = ImplicitALS(**als_params, seed=seed).fit(data.train, data.ids.num_users, data.ids.num_items)
            results.setdefault("ials", []).append({
                "seed": seed, "val": evaluate_scores(score_eval_set(als.score, val), 10),
                "test": evaluate_scores(score_eval_set(als.score, test), 10), "seconds": time.perf_counter() - t0,
                "params": als_params})
            runs = {arch: run_movielens(args, seed, arch, Path(tmp) / f"{arch}-{seed}")
                    for arch in ("gmf", "mlp", "neumf", "widedeep")}
            runs["neumf-pretrained"] = run_movielens(
                args, seed, "neumf", Path(tmp) / f"neumf-pre-{seed}", pretrained_gmf=runs["gmf"]["checkpoint"],
                pretrained_mlp=runs["mlp"]["checkpoint"], optimizer="sgd", lr=args.pretrained_lr, momentum=0.0)
            for name, r in runs.items():
                results.setdefault(name, []).append({"seed": seed, **{k: v for k, v in r.items() if k != "checkpoint"}})
            print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
            write_movielens(args, results, als_params, als_tried, als_tuning_s, t_start, out)


def write_movielens(args, results, als_params, als_tried, als_tuning_s, t_start, out: Path) -> None:
    """Print the table (mean and std over seeds) and (re)write the JSON."""
    def stats(name: str, split: str, metric: str) -> tuple[float, float]:
        values = [r[split][metric] for r in results[name]]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    seeds = sorted({r["seed"] for r in results.get("gmf", [])})
    summary = {}
    print(f"\nMovieLens-100K, NCF protocol (leave-one-out, 99 sampled negatives); seeds {seeds}: mean (std)")
    print(f"{'model':<18} {'val HR@10':>10} {'val NDCG@10':>12} {'test HR@10':>16} {'test NDCG@10':>16} "
          f"{'train s':>8}")
    for name in ("popularity", "ials", *NEURAL):
        if name not in results:
            continue
        row = {}
        for split in ("val", "test"):
            for metric in ("hr@10", "ndcg@10"):
                row[f"{split}_{metric}"], row[f"{split}_{metric}_std"] = stats(name, split, metric)
        row["train_s"] = statistics.mean(r["seconds"] for r in results[name])
        row["seeds"] = len(results[name])
        summary[name] = row
        print(f"{name:<18} {row['val_hr@10']:>10.4f} {row['val_ndcg@10']:>12.4f} "
              f"{row['test_hr@10']:>8.4f} ({row['test_hr@10_std']:.3f}) "
              f"{row['test_ndcg@10']:>8.4f} ({row['test_ndcg@10_std']:.3f}) {row['train_s']:>8.1f}")
    report = {"benchmark": "recsys-movielens", "data": "movielens-100k (recbole==1.2.1 wheel)",
              "protocol": "all ratings as implicit feedback, leave-one-out by timestamp (ties: file order), "
                          "99 sampled negatives per held-out item (eval_seed 0), HR@10 / NDCG@10, "
                          "best epoch by val NDCG@10",
              "settings": {"epochs": args.epochs, "patience": 3, "batch_size": args.batch_size, "lr": args.lr,
                           "pretrained_lr": args.pretrained_lr, "factors": args.factors,
                           "mlp_layers": [4 * args.factors, 2 * args.factors, args.factors], "negatives": 4},
              "ials": {"chosen": als_params, "grid": ALS_GRID, "iterations": ALS_ITERATIONS,
                       "tuning_seconds": als_tuning_s, "tried": als_tried},
              "seeds": seeds, "summary": summary, "runs": results,
              "command": "python benchmarks/recsys.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
              "cpu_count": os.cpu_count(), "seconds": time.perf_counter() - t_start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", choices=("synthetic", "movielens-100k"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--per-user", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024, help="movielens-100k: examples per step")
    p.add_argument("--lr", type=float, default=2e-3, help="movielens-100k: AdamW learning rate")
    p.add_argument("--pretrained-lr", type=float, default=0.05, help="movielens-100k: SGD lr of pretrained NeuMF")
    p.add_argument("--factors", type=int, default=16,
                   help="movielens-100k: GMF factors; MLP layers [4F, 2F, F]")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.data == "movielens-100k":
        args.out = args.out or str(ROOT / "benchmarks" / "results" / "recsys-movielens.json")
        movielens(args, seeds)
        return
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "recsys.json")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {}

    def add(name: str, seed: int, val: dict, test: dict, seconds: float | None, **more) -> None:
        results.setdefault(name, []).append({"seed": seed, "val": val, "test": test, "seconds": seconds, **more})

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs = {}
            for arch in ("gmf", "mlp", "neumf", "widedeep"):
                runs[arch] = best_of([run(args, seed, arch, Path(tmp) / f"{arch}-{seed}-{lr}", lr=lr,
                                          baselines=arch == "neumf") for lr in (1e-3, 3e-3)])
            runs["neumf-pretrained"] = best_of([run(
                args, seed, "neumf", Path(tmp) / f"neumf-pre-{seed}-{lr}", baselines=False,
                pretrained_gmf=runs["gmf"]["checkpoint"], pretrained_mlp=runs["mlp"]["checkpoint"],
                optimizer="sgd", lr=lr) for lr in (1e-2, 5e-2)])
            baselines = runs["neumf"]["baselines"] or runs["neumf"]["other"]["baselines"]
            for name, s in runs.items():
                add(name, seed, s["val"], s["test"], s["train_s"], best_epoch=s["best_epoch"],
                    params=s["total_params"], lr=s["lr"], other_lr_val_ndcg=s["other"]["val"]["ndcg@10"])
            for name, b in baselines.items():
                add(name, seed, b["val"], b["test"], None, **({"params": b["params"]} if "params" in b else {}))
            add("oracle", seed, {}, oracle(args, seed), None)
            print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def median(name: str, split: str, metric: str) -> float | None:
        values = [r[split][metric] for r in results[name] if metric in r[split]]
        return statistics.median(values) if values else None

    order = ["popularity", "mf_als", *MODELS, "oracle"]
    pop = {r["seed"]: r["test"]["hr@10"] for r in results["popularity"]}
    summary = {}
    header = (f"{'model':<18} {'val HR@10':>10} {'val NDCG@10':>12} {'test HR@10':>11} {'test NDCG@10':>13} "
              f"{'HR / pop':>9} {'train s':>8}")
    print(f"\n{args.users} users, {args.items} items, ~{args.per_user} interactions each; seeds {seeds}; "
          "medians over seeds; 99 sampled negatives per held-out item")
    print(header)
    for name in order:
        ratio = statistics.median(r["test"]["hr@10"] / pop[r["seed"]] for r in results[name])
        secs = [r["seconds"] for r in results[name] if r["seconds"] is not None]
        row = {"val_hr@10": median(name, "val", "hr@10"), "val_ndcg@10": median(name, "val", "ndcg@10"),
               "test_hr@10": median(name, "test", "hr@10"), "test_ndcg@10": median(name, "test", "ndcg@10"),
               "test_hr_over_popularity": ratio, "train_s": statistics.median(secs) if secs else None}
        summary[name] = row

        def fmt(v: float | None, width: int, spec: str = ".4f") -> str:
            return f"{v:>{width}{spec}}" if v is not None else f"{'-':>{width}}"

        print(f"{name:<18} {fmt(row['val_hr@10'], 10)} {fmt(row['val_ndcg@10'], 12)} {fmt(row['test_hr@10'], 11)} "
              f"{fmt(row['test_ndcg@10'], 13)} {fmt(ratio, 9, '.2f')} {fmt(row['train_s'], 8, '.1f')}")
    report = {"benchmark": "recsys", "data": {"generator": "synthetic_interactions", "users": args.users,
                                              "items": args.items, "per_user": args.per_user, "clusters": 8},
              "protocol": "implicit feedback, leave-one-out, 99 sampled negatives, HR@10 / NDCG@10, best epoch by "
                          "val NDCG@10",
              "epochs": args.epochs, "seeds": seeds, "summary": summary, "runs": results,
              "command": "python benchmarks/recsys.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
              "seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
