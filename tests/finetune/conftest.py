"""Shared fixtures for the fine-tuning tests: tiny base checkpoints and tiny learnable datasets.

* ``bert_base``: a random 2-layer, 32-wide fromzero-bert encoder (head "embedding", as a
  converted sentence-transformer) with a WordPiece ``tokenizer.json`` over the words of
  :data:`WORDS` ([PAD]=0, [UNK], [CLS], [SEP] first), "[CLS] $A [SEP]" post-processing.
* ``sentiment_csv`` / ``sentiment_jsonl``: 300 short sentences whose label (pos / neg) is set by
  one sentiment word among neutral filler; full fine-tuning reaches val accuracy 1.0 in ~15 epochs.
* ``gpt_base``: a random 2-layer GPT-2-style fromzero-gpt with a char tokenizer, and ``sft_jsonl``:
  prompt/response pairs written only with that tokenizer's characters.

Everything is session-scoped and read-only: tests write their runs under their own tmp paths.
The helpers :func:`text_config` and :func:`sentiment_rows` are importable by the test modules.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
SUBJECTS = ["the film", "this book", "my day", "the food", "our trip", "the show"]
POSITIVE = ["good", "great", "nice", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "boring"]
FILLER = ["was", "really", "quite", "very", "so", "and", "it", "felt", "today", "again"]
WORDS = sorted({w for s in SUBJECTS for w in s.split()} | set(POSITIVE) | set(NEGATIVE) | set(FILLER))
VOCAB = SPECIALS + WORDS

GPT_EMBED_SCALE = 20.0
SFT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?!.,' \n"


def sentiment_rows(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (text, label) pairs, balanced; the one sentiment word decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        before = rng.sample(FILLER, k=rng.randint(0, 2))
        after = rng.sample(FILLER, k=rng.randint(0, 3))
        text = " ".join([rng.choice(SUBJECTS), *before, word, *after])
        rows.append((text, label))
    return rows


def text_config(init_from: Path | str, data: Path | str, out_dir: Path | str, **overrides: Any):
    """A TextClassificationConfig for the tiny encoder on CPU (15 epochs at lr 1e-3 by default)."""
    from fromzero.finetune.text import TextClassificationConfig

    fields: dict[str, Any] = dict(init_from=str(init_from), data=str(data), out_dir=str(out_dir), epochs=15,
                                  batch_size=16, lr=1e-3, seed=0, device="cpu", dtype="float32",
                                  progress=False, log_interval=5)
    fields.update(overrides)
    return TextClassificationConfig(**fields)


def write_bert_base(directory: Path) -> Path:
    """A random tiny fromzero-bert checkpoint + WordPiece tokenizer.json in ``directory``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from fromzero.models.bert import Bert, BertConfig
    from fromzero.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, head="embedding", max_position_embeddings=64)
    model = Bert(config)
    tokenizer = Tokenizer(models.WordPiece({tok: i for i, tok in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))])
    tokenizer_file = directory.parent / f"{directory.name}-tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    # save_checkpoint replaces the directory atomically: the tokenizer goes in through it
    save_checkpoint(directory, model, config.to_dict(),
                    tokenizer_file=tokenizer_file)
    return directory


def write_gpt_base(directory: Path, chars: str = SFT_CHARS) -> Path:
    """A random tiny GPT-2-style fromzero-gpt checkpoint + char tokenizer.json in ``directory``."""
    import torch

    from fromzero.data.tokenizers import char_tokenizer_from_chars
    from fromzero.models.gpt import GPT, GPTConfig
    from fromzero.checkpoint import save_checkpoint

    tokenizer = char_tokenizer_from_chars(chars)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    with torch.no_grad():  # GPT-2's init gives near-uniform logits through the tied head: give them a range
        model.transformer.wte.weight.mul_(GPT_EMBED_SCALE)
    tokenizer_file = directory.parent / f"{directory.name}-tokenizer.json"
    tokenizer.save(tokenizer_file)
    save_checkpoint(directory, model, config.to_dict(),
                    tokenizer_file=tokenizer_file)
    return directory


@pytest.fixture(scope="session")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random fromzero-bert base checkpoint directory (read-only)."""
    return write_bert_base(tmp_path_factory.mktemp("bert") / "base")


@pytest.fixture(scope="session")
def gpt_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random GPT-2-style fromzero-gpt base checkpoint directory with a char tokenizer (read-only)."""
    return write_gpt_base(tmp_path_factory.mktemp("gpt") / "base")


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 labelled sentences (text,label; pos/neg) as CSV."""
    path = tmp_path_factory.mktemp("sentiment") / "sentiment.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sentiment_rows())
    return path


@pytest.fixture(scope="session")
def sentiment_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 300 sentences as JSONL ({"text", "label"})."""
    path = tmp_path_factory.mktemp("sentiment-jsonl") / "sentiment.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in sentiment_rows()),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 prompt/response pairs (the response is a fixed function of the prompt), SFT_CHARS only."""
    rng = random.Random(0)
    answers = {"hi": "hello", "yes": "no", "up": "down", "cat": "dog", "sun": "moon", "red": "blue"}
    lines = []
    for _ in range(60):
        key = rng.choice(sorted(answers))
        lines.append(json.dumps({"prompt": key, "response": answers[key]}))
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
