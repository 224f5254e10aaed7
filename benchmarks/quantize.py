"""Quantization of a MiniLM text classifier: size, CPU latency and accuracy, fp32 vs int8 / int4.

    .venv/bin/python benchmarks/quantize.py --checkpoint runs/genre-minilm/checkpoints/best \\
        [--gpt runs/shakespeare-char/checkpoints/best] [--rounds 15] [--out benchmarks/results/quantize.json]

For each method (int8-dynamic, int8-weight, int4-weight) the checkpoint is quantized with
``fromzero.compression.quantize.quantize_checkpoint`` (into a temporary directory) and compared
with the float checkpoint in this same process:

* size: bytes of model.safetensors;
* latency: one forward pass of the classifier (logits) on batch 1 and batch 16 of 128 real
  tokens each (windows of the test texts, no padding), under inference_mode, with torch's
  default thread count and with 1 thread (``--threads``; one thread is far less disturbed
  when other processes share the cores). Rounds are interleaved (every variant once per round,
  the order rotating, so load from other processes hits all alike); medians, and speed-ups
  against fp32. "fp32 +
  bf16 autocast" is what ``fromzero predict`` uses on a CPU with native bf16: shown for
  reference, not a baseline of the bars;
* quality: accuracy and macro-F1 on the test split of the checkpoint's run data
  (``shakespeare-genre``), every model in fp32 arithmetic (no autocast) outside its quantized
  layers.

With ``--gpt``, the same for a GPT language model: validation loss / perplexity on its prepared
data (the run's data.dir) and greedy decoding speed (tokens / s, batch 1, KV cache).

Bars (issue 6): int8-dynamic >= 1.5x faster than fp32 (both batch sizes), <= 40% of the fp32
size, accuracy drop <= 1 point. Writes benchmarks/results/quantize.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.compression.quantize import quantize_checkpoint  # noqa: E402
from fromzero.models.quantized import METHODS, QuantizeOptions
from fromzero.inference.predict import Classifier, run_config  # noqa: E402
from fromzero.checkpoint import MODEL_FILE, load_model  # noqa: E402


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds with a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def test_rows(checkpoint: Path, split: str) -> list[tuple[str, str]]:
    from fromzero.data.classification import load_text_classification

    cfg = run_config(checkpoint)
    data = cfg.get("data") or "shakespeare-genre"
    return load_text_classification(data, cfg.get("text_column", "text"), cfg.get("label_column", "label"),
                                    cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.1),
                                    cfg.get("seed", 0))[split]


def token_windows(classifier: Classifier, texts: list[str], n: int, length: int) -> torch.Tensor:
    """``n`` rows of ``length`` real tokens: [CLS] + a window of the concatenated texts + [SEP]."""
    from fromzero.models.bert import BertConfig, load_encoder_tokenizer

    tokenizer = load_encoder_tokenizer(classifier.directory, BertConfig.from_dict(classifier.config))
    tokenizer.no_truncation()
    ids = tokenizer.encode(" ".join(texts[:400]), add_special_tokens=False).ids
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    body = length - 2
    if len(ids) < n * body:
        raise SystemExit(f"not enough test text for {n} windows of {length} tokens")
    return torch.tensor([[cls, *ids[i * body:(i + 1) * body], sep] for i in range(n)])


def classifier_quality(directory: Path, rows: list[tuple[str, str]], batch_size: int) -> dict[str, float]:
    """Accuracy / macro-F1 / loss of a classifier checkpoint on ``rows``, fp32 (no autocast)."""
    from fromzero.finetune.text import score

    classifier = Classifier(directory, "cpu")
    classifier._autocast = contextlib.nullcontext  # type: ignore[method-assign]
    with torch.inference_mode():
        logits = classifier.text_logits([t for t, _ in rows], batch_size)
    index = {name: i for i, name in enumerate(classifier.labels)}
    metrics = score(logits, [index[label] for _, label in rows], classifier.labels)
    return {k: float(metrics[k]) for k in ("accuracy", "f1_macro", "loss")}


def bench_classifier(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    src = Path(args.checkpoint)
    dirs: dict[str, Path] = {"fp32": src}
    sizes = {"fp32": (src / MODEL_FILE).stat().st_size}
    for method in args.methods:
        out = work / f"classifier-{method}"
        report = quantize_checkpoint(src, out, QuantizeOptions(method, group_size=args.group_size), force=True)
        dirs[method], sizes[method] = out, report["size"]["quantized_bytes"]
        print(f"quantized {method}: {sizes[method]:,} bytes ({sizes[method] / sizes['fp32']:.1%} of fp32)", flush=True)

    rows = test_rows(src, args.split)
    classifier = Classifier(src, "cpu")
    models = {name: load_model(d, "cpu") for name, d in dirs.items()}
    default_threads = torch.get_num_threads()
    # latency[threads][batch][variant] = median ms
    latency: dict[int, dict[str, dict[str, float]]] = {}
    for threads in [t or default_threads for t in args.threads]:
        torch.set_num_threads(threads)
        latency[threads] = {}
        for batch in (1, 16):
            ids = token_windows(classifier, [t for t, _ in rows], batch, args.tokens)
            mask = torch.ones_like(ids)

            def run(model: torch.nn.Module, autocast: bool = False) -> Callable[[], Any]:
                def go() -> Any:
                    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
                    with torch.inference_mode(), ctx:
                        return model(ids, mask)
                return go

            fns = {name: run(m) for name, m in models.items()}
            fns["fp32 + bf16 autocast"] = run(models["fp32"], autocast=True)
            medians = interleaved(fns, args.rounds * (3 if batch == 1 else 1))
            latency[threads][f"batch{batch}"] = {name: medians[name] * 1e3 for name in fns}
            print(f"{threads} threads, batch {batch}: " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in medians.items()),
                  flush=True)
    torch.set_num_threads(default_threads)

    quality: dict[str, dict[str, float]] = {}
    if not args.skip_eval:
        eval_rows = rows[: args.eval_limit] if args.eval_limit else rows
        for name, d in dirs.items():
            t = time.perf_counter()
            quality[name] = classifier_quality(d, eval_rows, args.batch_size)
            print(f"quality {name}: {quality[name]} ({time.perf_counter() - t:.0f} s)", flush=True)

    variants = list(dirs) + ["fp32 + bf16 autocast"]
    table = []
    for name in variants:
        row: dict[str, Any] = {"variant": name}
        base = name if name in sizes else "fp32"
        row["bytes"] = sizes[base]
        row["size_ratio"] = sizes[base] / sizes["fp32"]
        row["latency"] = {
            f"threads={threads}": {
                **{f"{b}_ms": by_batch[b][name] for b in by_batch},
                **{f"{b}_speedup": by_batch[b]["fp32"] / by_batch[b][name] for b in by_batch},
            }
            for threads, by_batch in latency.items()
        }
        if base in quality and name in dirs:
            row.update({k: quality[name][k] for k in ("accuracy", "f1_macro")})
            row["accuracy_change_pt"] = 100 * (quality[name]["accuracy"] - quality["fp32"]["accuracy"])
            row["f1_macro_change_pt"] = 100 * (quality[name]["f1_macro"] - quality["fp32"]["f1_macro"])
        table.append(row)
    return {"checkpoint": str(src), "split": args.split, "test_examples": len(rows),
            "evaluated_examples": min(len(rows), args.eval_limit or len(rows)) if not args.skip_eval else 0,
            "tokens": args.tokens, "rows": table}


def bench_gpt(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.inference.predict import _prepared_split_loss

    src = Path(args.gpt)
    data = args.gpt_data
    if data is None:
        cfg = run_config(src)
        data = (cfg.get("data") or {}).get("dir") if isinstance(cfg.get("data"), dict) else cfg.get("data_dir")
    dirs: dict[str, Path] = {"fp32": src}
    sizes = {"fp32": (src / MODEL_FILE).stat().st_size}
    for method in args.methods:
        out = work / f"gpt-{method}"
        report = quantize_checkpoint(src, out, QuantizeOptions(method, group_size=args.group_size), force=True)
        dirs[method], sizes[method] = out, report["size"]["quantized_bytes"]
    models = {name: load_model(d, "cpu") for name, d in dirs.items()}
    tokenizer = TextTokenizer.load(src)
    prompt = torch.tensor([tokenizer.encode(args.prompt)])

    def decode(model: torch.nn.Module) -> Callable[[], Any]:
        return lambda: model.generate(prompt, args.new_tokens, temperature=0)

    default_threads = torch.get_num_threads()
    decode_s: dict[int, dict[str, float]] = {}
    for threads in [t or default_threads for t in args.threads]:
        torch.set_num_threads(threads)
        decode_s[threads] = interleaved({name: decode(m) for name, m in models.items()}, max(3, args.rounds // 3),
                                        warmup=1)
    torch.set_num_threads(default_threads)
    rows = []
    for name, model in models.items():
        row: dict[str, Any] = {"variant": name, "bytes": sizes[name], "size_ratio": sizes[name] / sizes["fp32"],
                               "decode": {f"threads={t}": {"tokens_per_s": args.new_tokens / m[name],
                                                           "speedup": m["fp32"] / m[name]}
                                          for t, m in decode_s.items()}}
        if data:
            with torch.inference_mode():
                m = _prepared_split_loss(model, Path(data), "val", 64, torch.device("cpu"), contextlib.nullcontext)
            row.update(val_loss=m["loss"], val_perplexity=m["perplexity"])
        rows.append(row)
        print(f"gpt {name}: {row}", flush=True)
    return {"checkpoint": str(src), "data": data, "new_tokens": args.new_tokens, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    c = result["classifier"]
    print(f"\nMiniLM classifier {c['checkpoint']} ({c['evaluated_examples']} {c['split']} examples; latency: "
          f"{c['tokens']} tokens, median ms and speed-up vs fp32)")
    keys = list(c["rows"][0]["latency"])
    head = f"{'variant':22s} {'MB':>7s} {'size':>6s}"
    for key in keys:
        head += f" | {key:>9s} {'b1 ms':>7s} {'x':>5s} {'b16 ms':>7s} {'x':>5s}"
    print(head + f" | {'acc':>7s} {'d pt':>6s} {'F1':>7s} {'d pt':>6s}")
    for r in c["rows"]:
        line = f"{r['variant']:22s} {r['bytes'] / 1e6:7.2f} {r['size_ratio']:6.1%}"
        for key in keys:
            lat = r["latency"][key]
            line += (f" | {'':9s} {lat['batch1_ms']:7.1f} {lat['batch1_speedup']:5.2f} {lat['batch16_ms']:7.1f} "
                     f"{lat['batch16_speedup']:5.2f}")
        if "accuracy" in r:
            line += (f" | {r['accuracy']:7.4f} {r['accuracy_change_pt']:+6.2f} {r['f1_macro']:7.4f} "
                     f"{r['f1_macro_change_pt']:+6.2f}")
        print(line)
    if "gpt" in result:
        g = result["gpt"]
        print(f"\nGPT {g['checkpoint']} (greedy decoding of {g['new_tokens']} tokens, batch 1)")
        keys = list(g["rows"][0]["decode"])
        print(f"{'variant':22s} {'MB':>7s} {'size':>6s}" + "".join(f" | {k:>9s} {'tok/s':>7s} {'x':>5s}" for k in keys)
              + f" | {'val loss':>9s} {'ppl':>7s}")
        for r in g["rows"]:
            line = f"{r['variant']:22s} {r['bytes'] / 1e6:7.2f} {r['size_ratio']:6.1%}"
            for k in keys:
                line += f" | {'':9s} {r['decode'][k]['tokens_per_s']:7.1f} {r['decode'][k]['speedup']:5.2f}"
            if "val_loss" in r:
                line += f" | {r['val_loss']:9.4f} {r['val_perplexity']:7.3f}"
            print(line)
    bars = result.get("bars", {})
    if bars:
        print("\nbars (int8-dynamic): " + ", ".join(f"{k} {'PASS' if v['pass'] else 'FAIL'} ({v['value']:.3g})"
                                                  for k, v in bars.items()))


def check_bars(result: dict[str, Any]) -> dict[str, Any]:
    rows = {r["variant"]: r for r in result["classifier"]["rows"]}
    q = rows.get("int8-dynamic")
    if q is None:
        return {}
    bars = {"size<=40%": {"value": q["size_ratio"], "pass": q["size_ratio"] <= 0.40}}
    for key, lat in q["latency"].items():
        for batch in ("batch1", "batch16"):
            value = lat[f"{batch}_speedup"]
            bars[f"{batch}_speedup>=1.5 ({key})"] = {"value": value, "pass": value >= 1.5}
    if "accuracy_change_pt" in q:
        bars["accuracy_drop<=1pt"] = {"value": -q["accuracy_change_pt"], "pass": q["accuracy_change_pt"] >= -1.0}
    return bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="MiniLM text-classification checkpoint directory")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to compare with fp32")
    parser.add_argument("--group-size", type=int, default=128, help="int4-weight group size")
    parser.add_argument("--split", default="test", help="split of the run's data to score")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row for the latency runs")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds at batch 16 (3x at batch 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the quality runs")
    parser.add_argument("--eval-limit", type=int, default=0, help="score only the first N examples (0 = all)")
    parser.add_argument("--skip-eval", action="store_true", help="no accuracy runs")
    parser.add_argument("--gpt", help="also a GPT checkpoint: val loss and decoding speed")
    parser.add_argument("--gpt-data", help="prepared data directory of --gpt (default: its run's data.dir)")
    parser.add_argument("--prompt", default="ROMEO:", help="--gpt decoding prompt")
    parser.add_argument("--new-tokens", type=int, default=200, help="--gpt tokens to decode")
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                        help="latency at each of these torch intra-op thread counts (0 = torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fromzero-quantize-") as tmp:
        result: dict[str, Any] = {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "quantized_engine": torch.backends.quantized.engine,
            "classifier": bench_classifier(args, Path(tmp)),
        }
        if args.gpt:
            result["gpt"] = bench_gpt(args, Path(tmp))
    result["bars"] = check_bars(result)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
