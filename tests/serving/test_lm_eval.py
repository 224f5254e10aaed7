"""lm-evaluation-harness, a tool nobody here wrote, scores a task against ``fromzero serve``.

A tiny random LLaMA (transformers) with a byte-level BPE tokenizer is converted with
``convert_from_hf`` and served by the real command (``python -m fromzero serve --port 0``). The
harness's ``local-completions`` model runs the multiple-choice task in ``lm_eval_task/`` (local
JSONL, offline): each choice's log-likelihood comes from /v1/completions with echo + logprobs.
Its per-choice log-likelihoods and its acc / acc_norm must equal what we compute directly from our
model's log-softmax on the same items, with text requests and with token-id requests (batched).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASK = "fromzero_tiny_mc"
MODEL_NAME = "tiny-llama"
BLOCK = 128


def build_checkpoint(root: Path) -> Path:
    """A tiny random LlamaForCausalLM + byte-level BPE tokenizer, converted to a fromzero checkpoint."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fromzero.models.hf import convert_from_hf

    texts = [json.loads(line) for line in (TASK_DIR / "items.jsonl").read_text().splitlines()]
    corpus = [f"Question: {t['question']}\nAnswer: {' '.join(t['choices'])}" for t in texts]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = root / "hf"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>").save_pretrained(hf)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=BLOCK, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits so that choices differ clearly (random init is near-uniform)
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(hf)
    convert_from_hf(str(hf), root / "ckpt")
    return root / "ckpt"


def tokenizer_dir(ckpt: Path, out: Path) -> Path:
    """The checkpoint's tokenizer files alone: what the harness loads with AutoTokenizer (it cannot
    read a fromzero checkpoint directory itself: AutoTokenizer first parses config.json as an HF
    model config, and fromzero's is not one)."""
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """(checkpoint, tokenizer dir, base URL) of ``fromzero serve`` running in a subprocess."""
    root = tmp_path_factory.mktemp("lm-eval")
    ckpt = build_checkpoint(root)
    log = root / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fromzero", "serve", "--checkpoint", str(ckpt), "--port", "0", "--device", "cpu",
             "--model-name", MODEL_NAME, "--max-batch-size", "4", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline, port = time.monotonic() + 60, None
        while port is None:
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
            if match:
                port = int(match.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fromzero serve did not start: {log.read_text()}")
            else:
                time.sleep(0.05)
        yield ckpt, tokenizer_dir(ckpt, root / "tokenizer"), f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()


def direct_loglikelihoods(ckpt: Path, items: list[dict]) -> list[list[float]]:
    """Per item, per choice: log p(" " + choice | "Question: ...\\nAnswer:") summed over the
    choice's tokens, from our model's fp32 log-softmax (one forward, no server)."""
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.checkpoint import load_model

    model, tok = load_model(ckpt, "cpu"), TextTokenizer.load(ckpt)
    out = []
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = []
        for choice in item["choices"]:
            ctx, whole = tok.encode(context), tok.encode(context + " " + choice)
            assert whole[: len(ctx)] == ctx
            with torch.inference_mode():
                logits, _ = model(torch.tensor([whole]))
            lp = logits[0].float().log_softmax(-1)
            scores.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        out.append(scores)
    return out


@pytest.mark.parametrize("tokenized, batch", [(False, 1), (True, 4)], ids=["text-requests", "token-ids-batched"])
def test_lm_eval_accuracy_equals_ours(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenized: bool,
                                      batch: int):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    ckpt, tok_dir, url = served
    items = [json.loads(line) for line in (TASK_DIR / "items.jsonl").read_text().splitlines()]
    model_args = (f"base_url={url}/v1/completions,model={MODEL_NAME},tokenizer_backend=huggingface,"
                  f"tokenizer={tok_dir},tokenized_requests={tokenized},batch_size={batch},max_length={BLOCK},"
                  "num_concurrent=1,max_retries=1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # not ~/.cache
    monkeypatch.chdir(TASK_DIR)  # the YAML's data_files is relative to the working directory
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=[TASK],
                                      task_manager=TaskManager(include_path=str(TASK_DIR)), log_samples=True,
                                      bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    metrics = results["results"][TASK]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)

    ours = direct_loglikelihoods(ckpt, items)
    for sample, want in zip(samples, ours):
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-4), sample["doc"]
    acc = sum(max(range(len(s)), key=s.__getitem__) == item["label"] for s, item in zip(ours, items)) / len(items)
    lengths = [[len((" " + c).encode()) for c in item["choices"]] for item in items]
    acc_norm = sum(max(range(len(s)), key=lambda j: s[j] / n[j]) == item["label"]
                   for s, n, item in zip(ours, lengths, items)) / len(items)
    assert metrics["acc,none"] == pytest.approx(acc)
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm)
    # The random model is not at chance on every item by accident: the comparison means something.
    assert len({round(max(s) - min(s), 3) for s in ours}) > 1
