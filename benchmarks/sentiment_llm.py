"""Movie-review sentiment (rotten-tomatoes, split by movie): SmolLM2 zero-shot vs LoRA / QLoRA SFT vs
MiniLM (frozen + LR, full, LoRA) vs TF-IDF, all on the same test split; and the memory of one
training step.

    .venv/bin/python benchmarks/sentiment_llm.py                       # trains what it needs (long)
    .venv/bin/python benchmarks/sentiment_llm.py --lora runs/L --qlora runs/Q --minilm runs/M
    .venv/bin/python benchmarks/sentiment_llm.py --only encoders       # TF-IDF + the three MiniLM rows
    .venv/bin/python benchmarks/sentiment_llm.py --only memory         # one training step per method

Rows of the table (test split of ``fromzero.data.rotten_tomatoes``, 1,320 reviews of 52 movies):

* **TF-IDF + LR** -- word 1-2 grams (sublinear tf, min_df 2) + scikit-learn logistic regression;
  C chosen by validation accuracy, test scored once.
* **MiniLM frozen + LR** -- all-MiniLM-L6-v2 sentence embeddings (mean-pooled over the attention
  mask and L2-normalised, as sentence-transformers computes them:
  :func:`fromzero.models.bert.embed_checkpoint`) of every review, then the same logistic
  regression with C chosen on validation. The encoder is not trained at all.
* **SmolLM2 zero-shot** -- ``smollm2-135m-instruct`` asked "Is this movie review positive or
  negative? Answer with one word." in its own chat template
  (:func:`fromzero.inference.chat_eval.evaluate_chat`): accuracy / macro-F1 / unparseable of the
  greedy reply, and accuracy / macro-F1 of the first-token logits.
* **SmolLM2 + LoRA SFT**, **+ QLoRA SFT** -- recipes/smollm2-sentiment-lora.yaml / -qlora.yaml
  (trained here unless ``--lora`` / ``--qlora`` name finished run directories), scored the same way.
* **MiniLM classifier** -- recipes/sentiment-minilm.yaml (text-classification with data
  rotten-tomatoes, full fine-tuning), unless ``--minilm`` names a finished run; **MiniLM LoRA** --
  recipes/sentiment-minilm-lora.yaml the same way (``--minilm-lora``).
* **Classic references** (printed as such, not measured here; Pang & Lee's sentence polarity
  data, another corpus and split): NB-SVM (Wang & Manning 2012) 79.4%, CNN (Kim 2014) 81.5%.

``--only encoders`` is ``tfidf frozen minilm minilm-lora``: every row that needs no LLM.

Memory (``--only memory`` or part of a full run): for ``full`` / ``lora`` / ``qlora``, a fresh
subprocess builds the model (SmolLM2, the recipes' LoRA settings), runs one optimizer step on 16
real training chats, and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: over the step
alone (the high-water mark is reset with ``/proc/self/clear_refs`` once the model is built, so the
float model QLoRA quantizes on load does not count) and over the whole process; plus the bytes of
the trainable parameters and of the base's Linear weights (QLoRA: int4 + fp16 scales and
minimums, against their bf16 size). On CUDA also ``torch.cuda.max_memory_allocated`` of the step.
``MALLOC_MMAP_THRESHOLD_`` is fixed in the subprocesses so that freed tensors return to the OS.

Bars checked (printed, and stored under "bars"): LoRA SFT beats zero-shot by >= 10 points of
accuracy (generated replies) and beats TF-IDF + LR. Writes benchmarks/results/sentiment_llm.json
(or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = "smollm2-135m-instruct"
ENCODER = "all-MiniLM-L6-v2"
RECIPES = {"lora": ROOT / "recipes" / "smollm2-sentiment-lora.yaml",
           "qlora": ROOT / "recipes" / "smollm2-sentiment-qlora.yaml",
           "minilm": ROOT / "recipes" / "sentiment-minilm.yaml",
           "minilm-lora": ROOT / "recipes" / "sentiment-minilm-lora.yaml"}
C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
EMBEDDING_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
PARTS = ("tfidf", "frozen", "zero-shot", "lora", "qlora", "minilm", "minilm-lora", "memory")
GROUPS = {"encoders": ("tfidf", "frozen", "minilm", "minilm-lora")}
TABLE = ("tfidf", "frozen", "minilm", "minilm-lora", "zero-shot", "lora", "qlora")
REFERENCES = (  # accuracy on Pang & Lee's sentence polarity data (10-fold CV): another corpus and split
    {"model": "NB-SVM (Wang & Manning 2012), Pang & Lee sentence polarity", "accuracy": 0.794},
    {"model": "CNN (Kim 2014), Pang & Lee sentence polarity", "accuracy": 0.815},
)


# ---------------------------------------------------------------------------------------------
# Rows


def logistic_regression_on_val(x: dict[str, Any], y: dict[str, list[str]],
                               grid: tuple[float, ...]) -> dict[str, Any]:
    """scikit-learn logistic regression on ``x["train"]``, C chosen by validation accuracy (the
    smallest C among ties), the test split scored once with that C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    scores = []
    for C in grid:
        clf = LogisticRegression(C=C, max_iter=5000).fit(x["train"], y["train"])
        scores.append((accuracy_score(y["val"], clf.predict(x["val"])), -C, clf))
    val_acc, neg_c, clf = max(scores, key=lambda g: g[:2])
    pred = clf.predict(x["test"])
    return {"C": -neg_c, "val_accuracy": val_acc, "accuracy": accuracy_score(y["test"], pred),
            "f1_macro": f1_score(y["test"], pred, average="macro"),
            "val_grid": {str(-c): a for a, c, _ in scores}, "n": len(pred)}


def _texts_and_labels() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    from fromzero.data.rotten_tomatoes import classification_splits

    data = classification_splits()
    return ({s: [t for t, _ in rows] for s, rows in data.items()},
            {s: [label for _, label in rows] for s, rows in data.items()})


def tfidf_row() -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, y = _texts_and_labels()
    vec = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = {s: (vec.fit_transform if s == "train" else vec.transform)(rows) for s, rows in texts.items()}
    row = logistic_regression_on_val(x, y, C_GRID)
    return {"model": "TF-IDF word 1-2 grams + logistic regression", **row}


def frozen_row(args: argparse.Namespace) -> dict[str, Any]:
    """MiniLM as a frozen feature extractor: sentence embeddings + logistic regression."""
    import numpy as np

    from fromzero.devices import resolve_device
    from fromzero.finetune.text import resolve_checkpoint
    from fromzero.models.bert import embed_checkpoint

    texts, y = _texts_and_labels()
    encoder = resolve_checkpoint(ENCODER)
    t0 = time.perf_counter()
    x = {s: np.asarray(embed_checkpoint(encoder, rows, normalize=True, batch_size=args.batch_size,
                                        device=resolve_device(args.device)), dtype=np.float32)
         for s, rows in texts.items()}
    embed_s = time.perf_counter() - t0
    row = logistic_regression_on_val(x, y, EMBEDDING_C_GRID)
    print(f"  embedded {sum(len(r) for r in texts.values()):,} reviews in {embed_s:.0f} s; C {row['C']} "
          f"(val acc {row['val_accuracy']:.4f})", flush=True)
    return {"model": f"{ENCODER} frozen (mean-pooled embeddings) + logistic regression", **row,
            "embed_s": round(embed_s, 1), "dim": int(x["train"].shape[1])}


def chat_row(checkpoint: Path, args: argparse.Namespace, name: str) -> dict[str, Any]:
    from fromzero.inference.chat_eval import evaluate_chat

    m = evaluate_chat(checkpoint, "rotten-tomatoes", "test", batch_size=args.batch_size, device=args.device,
                      limit=args.limit, progress=not args.quiet)
    print(f"  {name}: generated acc {m['accuracy']:.4f} F1 {m['f1_macro']:.4f} unparseable {m['unparseable']}; "
          f"first-token acc {m['first_token_accuracy']:.4f} ({m['elapsed_s']:.0f} s)", flush=True)
    return {"model": name, "checkpoint": str(checkpoint), "n": m["n"], "accuracy": m["accuracy"],
            "f1_macro": m["f1_macro"], "unparseable": m["unparseable"],
            "first_token_accuracy": m["first_token_accuracy"], "first_token_f1_macro": m["first_token_f1_macro"],
            "top_replies": m["top_replies"], "eval_s": m["elapsed_s"], "dtype": m["dtype"], "device": m["device"]}


def finetune(kind: str, args: argparse.Namespace) -> Path:
    """Run a recipe (into runs/sentiment-<kind>); returns the run directory."""
    from fromzero.finetune.recipe import load_finetune_config, run_finetune

    out = Path(args.runs_dir) / f"sentiment-{kind}"
    overrides = ["--out_dir", str(out), "--force", "true", "--device", args.device, *shlex.split(args.finetune_args)]
    if args.quiet:
        overrides += ["--progress", "false"]
    task, cfg = load_finetune_config(RECIPES[kind], overrides)
    t0 = time.perf_counter()
    run_finetune(task, cfg)
    print(f"  trained {kind} in {time.perf_counter() - t0:.0f} s: {out}", flush=True)
    return out


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Training facts of a finished run: steps, wall time, trainable parameters, recipe."""
    import yaml

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"run_dir": str(run_dir), "steps": max((r["step"] for r in train), default=0),
            "train_s": max((r.get("elapsed_s", 0) for r in rows), default=0.0),
            "final_train_loss": train[-1]["loss"] if train else None,
            "settings": {k: cfg.get(k) for k in ("method", "lora_rank", "lora_alpha", "lr", "batch_size",
                                                  "max_steps", "epochs", "max_length", "qlora_group_size", "device")}}


def minilm_row(run_dir: Path, args: argparse.Namespace, name: str) -> dict[str, Any]:
    from fromzero.inference.predict import evaluate_checkpoint

    m = evaluate_checkpoint(run_dir / "checkpoints" / "best", "rotten-tomatoes", "test", args.batch_size,
                            args.device, limit=args.limit)
    return {"model": name, "checkpoint": str(run_dir), "n": m["n"], "accuracy": m["accuracy"],
            "f1_macro": m["f1_macro"]}


# ---------------------------------------------------------------------------------------------
# Memory of one training step, in a fresh process per method


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_probe(method: str, device: str, batch: int) -> dict[str, Any]:
    """Build SmolLM2 for ``method``, run one optimizer step; what resource.getrusage reports."""
    import gc
    import resource
    from types import SimpleNamespace

    import torch
    import yaml

    from fromzero.data.chat_template import load_jinja_template
    from fromzero.data.rotten_tomatoes import sft_splits
    from fromzero.data.sft import collate_sft, tokenize_sft
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.finetune.lora import apply_lora
    from fromzero.finetune.qlora import apply_qlora, linear_weight_bytes
    from fromzero.models.builtin import resolve_model
    from fromzero.checkpoint import CONFIG_FILE, load_model, read_json
    from fromzero.devices import autocast_context, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dtype = resolve_dtype(dev, "auto")
    ckpt = resolve_model(MODEL)
    config = read_json(ckpt / CONFIG_FILE, "model config")
    recipe = yaml.safe_load(RECIPES["qlora" if method == "qlora" else "lora"].read_text())
    lora = SimpleNamespace(lora_rank=recipe["lora_rank"], lora_alpha=recipe["lora_alpha"],
                           lora_dropout=recipe["lora_dropout"], lora_targets=recipe["lora_targets"])
    tokenizer = TextTokenizer.load(ckpt)
    examples = sft_splits()["train"][:batch]
    chats = tokenize_sft(examples, tokenizer, load_jinja_template(ckpt), recipe["max_length"])
    x, y = collate_sft([chats[i] for i in range(len(chats))], pad_id=0)
    import peft  # noqa: F401  (imported by every method's baseline alike, not counted as model memory)

    gc.collect()
    base_kb = _rss_kb("VmRSS")  # python + torch + peft + data, before any weight
    model = load_model(ckpt, "cpu").train()
    if method == "lora":
        model = apply_lora(model, config, lora, modules_to_save=[])
    elif method == "qlora":
        model = apply_qlora(model, config, lora, recipe["qlora_group_size"])
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    gc.collect()
    model_kb = _rss_kb("VmRSS")
    lifetime_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path("/proc/self/clear_refs").write_text("5")  # ru_maxrss from here on: the step alone
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with autocast_context(dev, dtype):
        _, loss = model(x.to(dev), y.to(dev))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    step_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sizes = linear_weight_bytes(model)
    by_dtype: dict[str, int] = {}
    for p in {id(p): p for p in model.parameters()}.values():
        by_dtype[str(p.dtype).removeprefix("torch.")] = by_dtype.get(str(p.dtype).removeprefix("torch."), 0) + \
            p.numel() * p.element_size()
    out = {"method": method, "device": str(dev), "dtype": dtype, "batch": list(x.shape), "loss": loss.item(),
           "step_s": step_s, "trainable_params": sum(p.numel() for p in params),
           "process_baseline_mb": base_kb / 1024, "rss_after_build_mb": model_kb / 1024,
           "model_rss_mb": (model_kb - base_kb) / 1024,
           "ru_maxrss_step_mb": step_kb / 1024, "ru_maxrss_until_step_mb": lifetime_kb / 1024,
           "step_peak_over_baseline_mb": (step_kb - base_kb) / 1024,
           "linear_weight_bytes": sizes["stored_bytes"], "linear_weight_bf16_bytes": sizes["bf16_bytes"],
           "linear_fraction_of_bf16": sizes["stored_bytes"] / sizes["bf16_bytes"],
           "parameter_bytes_by_dtype": by_dtype,
           "embedding_dtype": str(next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).weight.dtype)}
    if dev.type == "cuda":
        out["cuda_step_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_before_step_mb"] = cuda_before / 2**20
    return out


def memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for method in ("full", "lora", "qlora"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        cmd = [sys.executable, __file__, "--memory-probe", method, "--device", args.device,
               "--probe-batch", str(args.probe_batch)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"memory probe {method} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {method:<5}: step ru_maxrss {row['ru_maxrss_step_mb']:.0f} MB (model {row['model_rss_mb']:.0f} MB "
              f"over a {row['process_baseline_mb']:.0f} MB process); Linear weights "
              f"{100 * row['linear_fraction_of_bf16']:.1f}% of bf16", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", help="a finished LoRA SFT run directory (else the recipe is trained)")
    parser.add_argument("--qlora", help="a finished QLoRA SFT run directory (else the recipe is trained)")
    parser.add_argument("--minilm", help="a finished MiniLM text-classification run directory (else trained)")
    parser.add_argument("--minilm-lora", help="a finished MiniLM LoRA text-classification run directory "
                        "(else trained)")
    parser.add_argument("--only", nargs="+", choices=PARTS + tuple(GROUPS),
                        help="run only these parts (default: all); encoders = "
                        + " ".join(GROUPS["encoders"]))
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="leave these parts out")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N test reviews (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32, help="reviews per forward pass when scoring")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--probe-batch", type=int, default=16, help="chats in the memory probe's training step")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--finetune-args", default="", help="extra recipe overrides for the runs trained here, "
                        "e.g. '--max_steps 2 --max_eval_examples 16' for a quick trial")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where runs trained here go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sentiment_llm.json"))
    parser.add_argument("--memory-probe", choices=("full", "lora", "qlora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device, args.probe_batch)))
        return
    chosen = [q for p in (args.only or PARTS) for q in GROUPS.get(p, (p,))]
    parts = [p for p in PARTS if p in chosen and p not in args.skip]

    import torch

    from fromzero.models.builtin import resolve_model

    t0 = time.perf_counter()
    out_path = Path(args.out)
    result: dict[str, Any] = {"benchmark": "sentiment_llm", "data": "rotten-tomatoes", "split": "test",
                              "limit": args.limit, "rows": {}, "runs": {}}
    if out_path.is_file():  # keep rows of earlier partial runs
        result = {**json.loads(out_path.read_text()), "limit": args.limit}

    def save() -> None:
        result["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    if "tfidf" in parts:
        print("TF-IDF + LR", flush=True)
        result["rows"]["tfidf"] = tfidf_row()
        save()
    if "frozen" in parts:
        print(f"{ENCODER} frozen + LR", flush=True)
        result["rows"]["frozen"] = frozen_row(args)
        save()
    if "zero-shot" in parts:
        print("SmolLM2 zero-shot", flush=True)
        result["rows"]["zero-shot"] = chat_row(resolve_model(MODEL), args, "SmolLM2-135M-Instruct zero-shot")
        save()
    for kind in ("lora", "qlora"):
        if kind in parts:
            print(f"SmolLM2 {kind} SFT", flush=True)
            run_dir = Path(getattr(args, kind)) if getattr(args, kind) else finetune(kind, args)
            result["runs"][kind] = run_summary(run_dir)
            result["rows"][kind] = chat_row(run_dir / "checkpoints" / "best", args, f"SmolLM2 + {kind} SFT")
            save()
    for kind, name in (("minilm", f"{ENCODER} full fine-tuning"), ("minilm-lora", f"{ENCODER} LoRA")):
        if kind in parts:
            print(f"MiniLM classifier: {name}", flush=True)
            given = getattr(args, kind.replace("-", "_"))
            run_dir = Path(given) if given else finetune(kind, args)
            result["runs"][kind] = run_summary(run_dir)
            result["rows"][kind] = minilm_row(run_dir, args, name)
            save()
    if "memory" in parts:
        print("memory of one training step (fresh process per method)", flush=True)
        result["memory"] = memory_rows(args)
        save()

    rows = result["rows"]
    print(f"\n{'model':<58} {'n':>5} {'acc':>7} {'F1':>7} {'unparse':>7} {'1st-tok acc':>11} "
          f"{'1st-tok F1':>10}")
    for key in TABLE:
        if key in rows:
            r = rows[key]
            extra = (f"{r['unparseable']:>7} {r['first_token_accuracy']:>11.4f} {r['first_token_f1_macro']:>10.4f}"
                     if "unparseable" in r else f"{'':>7} {'':>11} {'':>10}")
            print(f"{r['model'][:58]:<58} {r['n']:>5} {r['accuracy']:>7.4f} {r['f1_macro']:>7.4f} {extra}")
    for r in REFERENCES:
        print(f"{r['model'][:58]:<58} {'':>5} {r['accuracy']:>7.3f} {'':>7}   "
              "(published; another corpus and split)")
    result["references"] = list(REFERENCES)
    bars = {}
    if "lora" in rows and "zero-shot" in rows:
        gain = rows["lora"]["accuracy"] - rows["zero-shot"]["accuracy"]
        bars["lora_beats_zero_shot_by_10_points"] = {"gain_points": 100 * gain, "met": gain >= 0.10}
    if "lora" in rows and "tfidf" in rows:
        bars["lora_beats_tfidf"] = {"lora": rows["lora"]["accuracy"], "tfidf": rows["tfidf"]["accuracy"],
                                    "met": rows["lora"]["accuracy"] > rows["tfidf"]["accuracy"]}
    for name, bar in bars.items():
        print(f"bar {name}: {'met' if bar['met'] else 'NOT met'} ({json.dumps(bar)})")
    for row in result.get("memory", []):
        print(f"memory {row['method']:<5}: step ru_maxrss {row['ru_maxrss_step_mb']:.0f} MB, trainable "
              f"{row['trainable_params']:,}, Linear weights {row['linear_weight_bytes'] / 2**20:.1f} MiB = "
              f"{100 * row['linear_fraction_of_bf16']:.1f}% of bf16"
              + (f", CUDA step peak {row['cuda_step_peak_mb']:.0f} MB" if "cuda_step_peak_mb" in row else ""))
    result["bars"] = bars
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
