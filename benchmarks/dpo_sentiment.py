"""DPO on rotten-tomatoes sentiment preferences: SmolLM2-135M-Instruct before and after (LoRA, CPU).

    .venv/bin/python benchmarks/dpo_sentiment.py [--recipe recipes/smollm2-sentiment-dpo.yaml]
        [--init PATH|NAME] [--reviews 80] [--out-dir DIR] [--set key=value ...]

1. Trains with ``finetune_dpo`` on the recipe (``rotten-tomatoes-preferences``: pairs from the
   train split of :mod:`fromzero.data.rotten_tomatoes`, the shared split by movie; chosen = the
   right label, rejected = the wrong label or a sentence saying the right label). ``--init``
   starts from another model, e.g. an sft LoRA run's ``checkpoints/best`` (the adapter is continued).
2. Held-out preference accuracy, before and after: on the recipe's test pairs (test-split
   reviews), the share where the model gives the chosen reply the higher summed log-probability
   (``logp_accuracy``; before = the starting model, which is DPO's reference), and DPO's reward
   accuracy / loss after.
3. Test accuracy, before and after, on the first ``--reviews`` test-split reviews, asked the chat
   evaluation's question in the model's chat template (:mod:`fromzero.inference.chat_eval`):
   *first token* (the next-token logits after the generation prompt: positive/Positive vs
   negative/Negative, as chat_eval scores them) and *reply log-prob* (the one-word reply
   ``positive`` vs ``negative`` + end of turn, summed log-probs). Greedy generation is left to
   ``fromzero evaluate --checkpoint ... --data rotten-tomatoes --split test`` (slow on 2 shared cores).

The baseline is the starting model, scored in the same script. Prints a table and writes
benchmarks/results/dpo_sentiment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def score_reviews(checkpoint: Path, rows: list[dict], batch_size: int = 8) -> dict[str, float]:
    """First-token and reply-log-prob accuracy of a chat checkpoint on (text, label) reviews."""
    from fromzero.data.preferences import PreferencePair, collate_preferences, tokenize_preferences
    from fromzero.data.rotten_tomatoes import review_messages
    from fromzero.data.sft import checkpoint_chat_template
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.inference.chat_eval import LABELS, answer_token_ids, first_token_scores
    from fromzero.finetune.dpo import sequence_logps
    from fromzero.checkpoint import checkpoint_info
    from fromzero.checkpoint import load_model
    from fromzero.devices import autocast_context, resolve_dtype

    device = torch.device("cpu")
    autocast = lambda: autocast_context(device, resolve_dtype(device, "auto"))  # noqa: E731
    model = load_model(checkpoint, device).eval()
    tokenizer = TextTokenizer.load(checkpoint)
    template = checkpoint_chat_template(checkpoint)
    system = checkpoint_info(checkpoint).get("system_prompt") or None
    token_ids = answer_token_ids(tokenizer)
    columns, start = {}, 0
    for label, ids in token_ids.items():
        columns[label] = list(range(start, start + len(ids)))
        start += len(ids)
    flat = [i for ids in token_ids.values() for i in ids]
    first_right = logp_right = 0
    pairs = [PreferencePair(review_messages(r["text"], None, system), "positive", "negative") for r in rows]
    data = tokenize_preferences(pairs, tokenizer, template, 1024)
    for lo in range(0, len(rows), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(rows))))
        batch = collate_preferences([data[i] for i in idx], pad_id=0)
        with autocast():
            logits, _ = model(batch["x"])
        pos, neg = sequence_logps(logits, batch["y"]).chunk(2)
        for j, i in enumerate(idx):
            label = rows[i]["label"]
            logp_right += int(("positive" if pos[j] > neg[j] else "negative") == label)
            at = len(data.prompts[i]) - 1  # the logits after the generation prompt
            scores = first_token_scores(logits[j, at][flat].float().unsqueeze(0), columns)
            first_right += int(LABELS[int(scores.argmax(-1))] == label)
    return {"first_token_accuracy": first_right / len(rows), "reply_logp_accuracy": logp_right / len(rows),
            "n": len(rows)}


def main() -> int:
    from fromzero.data import rotten_tomatoes
    from fromzero.finetune.recipe import load_finetune_config, run_finetune
    from fromzero.models.builtin import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-sentiment-dpo.yaml"))
    parser.add_argument("--init", default=None, help="start from this checkpoint / adapter / built-in name")
    parser.add_argument("--reviews", type=int, default=80, help="test-split reviews for the accuracy figures")
    parser.add_argument("--out-dir", default=None, help="the DPO run directory (default /tmp/dpo-sentiment-<time>)")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides key=value")
    args = parser.parse_args()

    out_dir = args.out_dir or f"/tmp/dpo-sentiment-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = ["--out_dir", out_dir, "--progress", "false"]
    if args.init:
        overrides += ["--init_from", args.init]
    for item in args.set:
        key, _, value = item.partition("=")
        overrides += [f"--{key}", value]
    task, cfg = load_finetune_config(args.recipe, overrides)
    init = resolve_model(cfg.init_from)
    rows = rotten_tomatoes.load_reviews()["test"][: args.reviews]

    t0 = time.perf_counter()
    before = score_reviews(init, rows)
    before_s = time.perf_counter() - t0
    print(f"before: {before} ({before_s:.0f} s)", flush=True)
    result = run_finetune(task, cfg)
    t1 = time.perf_counter()
    after = score_reviews(Path(result["checkpoint"]), rows)
    print(f"after: {after} ({time.perf_counter() - t1:.0f} s)", flush=True)

    tb, ta = result["test_before"], result["test"]
    table = [
        ("held-out pairs: chosen preferred by log-prob", tb["logp_accuracy"], ta["logp_accuracy"]),
        ("held-out pairs: DPO reward accuracy", tb["reward_accuracy"], ta["reward_accuracy"]),
        ("held-out pairs: DPO loss", tb["loss"], ta["loss"]),
        ("held-out pairs: reward margin", tb["reward_margin"], ta["reward_margin"]),
        (f"test reviews ({len(rows)}): first-token accuracy", before["first_token_accuracy"],
         after["first_token_accuracy"]),
        (f"test reviews ({len(rows)}): reply log-prob accuracy", before["reply_logp_accuracy"],
         after["reply_logp_accuracy"]),
    ]
    print(f"\nDPO {cfg.init_from} -> {result['checkpoint']}: {len(cfg.__dict__)} settings, method {cfg.method}, "
          f"beta {cfg.beta}, {result['steps']} steps, best step {result['best_step']}, train {result['train_s']:.0f} s, "
          f"wall {result['wall_s']:.0f} s")
    print(f"{'metric':52s} {'before':>9s} {'after':>9s} {'change':>9s}")
    for name, b, a in table:
        print(f"{name:52s} {b:9.4f} {a:9.4f} {a - b:+9.4f}")
    out = {
        "recipe": str(args.recipe), "overrides": overrides, "init": str(init), "checkpoint": result["checkpoint"],
        "config": {k: v for k, v in cfg.__dict__.items()}, "steps": result["steps"], "best_step": result["best_step"],
        "train_s": result["train_s"], "dpo_wall_s": result["wall_s"], "reference": result["reference"],
        "trainable_params": result["trainable_params"], "total_params": result["total_params"],
        "val_best": result["val"], "test_pairs_before": tb, "test_pairs_after": ta,
        "test_reviews_before": before, "test_reviews_after": after,
        "table": [{"metric": n, "before": b, "after": a} for n, b, a in table],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": sys.version.split()[0]},
    }
    path = ROOT / "benchmarks" / "results" / "dpo_sentiment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
