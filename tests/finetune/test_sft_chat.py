"""SFT with a chat model's own (Jinja) template, on the rotten-tomatoes reviews.

The chat model is a random 2-layer ``transformers`` LLaMA with a byte-level BPE tokenizer trained
on review text and SmolLM2's own ChatML template (default system prompt included), saved with
``save_pretrained`` and converted with ``fromzero.models.hf.convert_from_hf``.

* tokenize_sft with that template masks exactly the reply tokens (``positive<|im_end|>\\n``), adds
  no tokenizer eos, and the reply-by-reply ids equal the whole chat's tokenization;
  segment_mismatches does catch a template whose boundary splits a token;
* short LoRA and QLoRA runs on a subset of the real reviews lower the validation loss, save the
  adapter with chat_template.jinja / tokenizer_config.json / tokenizer.json beside it, and the
  checkpoint answers ``fromzero evaluate --data rotten-tomatoes`` through the same template;
* a system_prompt from the recipe reaches the rendered chats and info.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from fromzero.data.chat_template import load_jinja_template  # noqa: E402
from fromzero.data.rotten_tomatoes import review_messages  # noqa: E402
from fromzero.data.sft import (  # noqa: E402
    ChatTemplate,
    add_system_prompt,
    checkpoint_chat_template,
    segment_mismatches,
    tokenize_sft,
)
from fromzero.data.tokenizers import TextTokenizer  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SUBSET = {"train": 320, "val": 64, "test": 64}


def real_reviews() -> dict[str, list[dict]]:
    from fromzero.data.rotten_tomatoes import load_reviews
    from fromzero.errors import FromzeroError

    try:
        return load_reviews()
    except FromzeroError as e:  # offline with nothing cached
        pytest.skip(f"rotten-tomatoes corpus unavailable: {e}")


def write_chat_model(root: Path, texts: list[str]) -> Path:
    """A tiny random LLaMA chat model (transformers) with a BPE tokenizer trained on ``texts``,
    converted to a fromzero checkpoint at root/model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fromzero.models.hf import convert_from_hf

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["positive Positive negative Negative"] * 20, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    hf_tok.chat_template = SMOLLM2_TEMPLATE
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      tie_word_embeddings=True)
    hf_dir = root / "model-hf"
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # wider than the init: logits far from uniform, as in a trained model
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(hf_dir)
    hf_tok.save_pretrained(hf_dir)
    convert_from_hf(str(hf_dir), root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    reviews = real_reviews()
    root = tmp_path_factory.mktemp("sft-chat")
    model = write_chat_model(root, [r["text"] for r in reviews["train"][:2000]] + [
        "Is this movie review positive or negative? Answer with one word. Review: "] * 20)
    data = root / "reviews"
    data.mkdir()
    for split, n in SUBSET.items():
        rows = [{"messages": review_messages(r["text"], r["label"])} for r in reviews[split][:n]]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return SimpleNamespace(model=model, data=data, reviews=reviews)


def test_the_model_keeps_its_template(chat: SimpleNamespace) -> None:
    template = load_jinja_template(chat.model)
    assert template is not None and template.eos_token == "<|im_end|>"
    assert isinstance(checkpoint_chat_template(chat.model), type(template))


def test_jinja_template_masks_exactly_the_reply(chat: SimpleNamespace) -> None:
    tokenizer = TextTokenizer.load(chat.model)
    template = load_jinja_template(chat.model)
    examples = [{"messages": review_messages(r["text"], r["label"])} for r in chat.reviews["test"][:50]]
    assert segment_mismatches(examples, tokenizer, template) == []  # ChatML: clean boundaries
    sft = tokenize_sft(examples, tokenizer, template, max_length=1024)
    assert len(sft) == 50 and sft.n_truncated == 0
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    for example, (x, y) in zip(examples, (sft[i] for i in range(len(sft)))):
        text = template.text(example["messages"])
        ids = tokenizer.encode(text)
        assert x.tolist() + [y[-1].item()] == ids  # the whole chat, nothing appended
        assert ids[0] == tokenizer.backend.token_to_id("<|im_start|>")  # one BOS, from the template
        reply = example["messages"][-1]["content"]
        target = y[y != -100].tolist()
        assert tokenizer.decode(target) == reply + "<|im_end|>\n"
        assert target[-2] == im_end and tokenizer.eos_id not in target
        n = len(target)  # the targets are the last n labels, contiguous
        assert (y[-n:] != -100).all() and (y[:-n] == -100).all()


def test_segment_mismatches_finds_a_token_split_at_a_boundary() -> None:
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tokenizer = TextTokenizer(backend)
    template = ChatTemplate(user_prefix="", assistant_prefix="a", turn_end="")
    examples = [{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "b"}]}]
    assert segment_mismatches(examples, tokenizer, template) == [0]  # "a" + "b" vs "ab"


def test_system_prompt_is_added_where_missing() -> None:
    examples = [{"messages": review_messages("Fine.", "positive")},
                {"messages": review_messages("Bad.", "negative", system_prompt="Be brief.")}]
    out = add_system_prompt(examples, "Classify reviews.")
    assert out[0]["messages"][0] == {"role": "system", "content": "Classify reviews."}
    assert out[1]["messages"][0]["content"] == "Be brief."
    assert add_system_prompt(examples, "") is examples


def _val_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_short_run_learns_and_saves_a_chat_checkpoint(cli, chat: SimpleNamespace, tmp_path: Path, method: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "sft", "init_from": str(chat.model), "data": str(chat.data), "method": method,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "qlora_group_size": 32,
        "max_length": 160, "epochs": 2, "max_steps": 30, "batch_size": 16, "lr": 1e-2, "eval_every": 10,
        "device": "cpu", "dtype": "float32", "progress": False, "system_prompt": "Classify the review.",
        "out_dir": str(tmp_path / "run"),
    }))
    result = cli("finetune", "--config", recipe)
    assert result.code == 0, result.err
    losses = _val_losses(tmp_path / "run")
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses
    best = tmp_path / "run" / "checkpoints" / "best"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "tokenizer_config.json", "info.json"):
        assert (best / name).is_file(), name
    info = json.loads((best / "info.json").read_text())
    assert info["chat_template"] == "chat_template.jinja" and "template" not in info
    assert info["system_prompt"] == "Classify the review."
    assert ("qlora" in info) == (method == "qlora")
    template = checkpoint_chat_template(best)
    assert template is not None and template.source == load_jinja_template(chat.model).source
    # evaluate reads the template and the system prompt back, loss and chat scoring alike
    result = cli("evaluate", "--checkpoint", best, "--data", "rotten-tomatoes", "--limit", "24", "--device", "cpu",
                 "--out", tmp_path / "eval.json")
    assert result.code == 0, result.err
    assert "generated reply" in result.out and "first token" in result.out
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["n"] == 24 and metrics["system_prompt"] == "Classify the review."
    assert 0 <= metrics["unparseable"] <= 24
    result = cli("evaluate", "--checkpoint", best, "--data", str(chat.data), "--split", "val", "--device", "cpu")
    assert result.code == 0, result.err
    # evaluate computes in bf16 where the CPU has fast bf16 (the run used float32)
    assert json.loads(result.out)["loss"] == pytest.approx(info["val"]["loss"], rel=0.02)
    # merge-lora keeps the template files: the merged model still chats and exports with its template
    merged = tmp_path / "merged"
    assert cli("merge-lora", "--checkpoint", best, "--out", merged).code == 0
    for name in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json", "model.safetensors"):
        assert (merged / name).is_file(), name
    assert checkpoint_chat_template(merged).source == template.source
