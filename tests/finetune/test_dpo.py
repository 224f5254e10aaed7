"""DPO (task: dpo): the loss against the formula and TRL, the LoRA reference, training, bad input.

The tiny chat model is a random 2-layer ``transformers`` LLaMA with a byte-level BPE tokenizer
and a ChatML chat template, saved with ``save_pretrained`` and converted with
``fromzero.models.hf.convert_from_hf`` (which keeps ``chat_template.jinja``). A second copy with
perturbed weights plays the policy, so policy and reference differ.

* the loss of :func:`fromzero.finetune.dpo.batch_loss` on fromzero models equals the DPO formula
  written out here from the two *transformers* models' per-token log-probs (and cDPO's label
  smoothing), and equals TRL's ``DPOTrainer.compute_loss`` on the same pairs (same token ids too);
* with LoRA, the reference (adapter disabled) is the base model exactly, and gradients reach only
  the adapter;
* short runs on a learnable toy preference set lower the val loss and raise preference accuracy
  (LoRA; full with a frozen copy; full with precomputed reference log-probs; continuing an sft
  LoRA adapter made with fromzero's own template);
* bad input through ``fromzero finetune --config``: exit 2, one ``error:`` line, no run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

transformers = pytest.importorskip("transformers")

from fromzero.data.chat_template import load_jinja_template  # noqa: E402
from fromzero.data.preferences import (  # noqa: E402
    PreferencePair,
    collate_preferences,
    load_preference_pairs,
    parse_preference_row,
    tokenize_preferences,
)
from fromzero.data.tokenizers import TextTokenizer  # noqa: E402
from fromzero.errors import FromzeroError  # noqa: E402
from fromzero.finetune.dpo import DPOConfig, Reference, batch_loss, finetune_dpo, sequence_logps  # noqa: E402
from fromzero.checkpoint import load_model  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GOOD = ["great", "lovely", "fine", "superb"]
BAD = ["awful", "boring", "dull", "poor"]
SUBJECTS = ["the film", "this show", "the play", "our trip"]


def review_rows() -> list[tuple[str, str]]:
    """32 (review, label) rows: the one sentiment word decides the label."""
    rows = []
    for i, subject in enumerate(SUBJECTS):
        for j in range(4):
            rows.append((f"{subject} was {GOOD[(i + j) % 4]}", "positive"))
            rows.append((f"{subject} was {BAD[(i + j) % 4]}", "negative"))
    return rows


def pair_rows() -> list[dict]:
    """64 pairs: the right label over the wrong one, and the bare label over a sentence."""
    out = []
    for text, label in review_rows():
        wrong = "negative" if label == "positive" else "positive"
        out.append({"prompt": f"review: {text}", "chosen": label, "rejected": wrong})
        out.append({"prompt": f"review: {text}", "chosen": label, "rejected": f"the review is {label}."})
    return out


def learnable_rows() -> list[dict]:
    """16 distinct pairs (8 film reviews x {label, verbose}): a tiny random model learns them in a
    few dozen steps (the runs train on them twice over and are scored on them again)."""
    return [r for r in pair_rows() if "the film" in r["prompt"]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    chat = ["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n"]
    corpus = [f"review: {t} {lab}" for t, lab in review_rows()] + ["the review is positive. negative."] + chat * 8
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _hf_model(vocab: int, seed: int, noise: float = 0.0):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # wider than the init, so log-probs are far from uniform
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
                if noise:
                    p.add_(noise * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Reference and policy chat models, each as a transformers dir and a fromzero checkpoint."""
    from fromzero.models.hf import convert_from_hf

    root = tmp_path_factory.mktemp("dpo-chat")
    tok = _tokenizer()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    hf_tok.chat_template = CHATML
    out = {}
    for name, noise in (("ref", 0.0), ("policy", 0.05)):
        hf_dir = root / f"{name}-hf"
        _hf_model(tok.get_vocab_size(), seed=1, noise=noise).save_pretrained(hf_dir)
        hf_tok.save_pretrained(hf_dir)
        convert_from_hf(str(hf_dir), root / name)
        out[name], out[f"{name}_hf"] = root / name, hf_dir
    assert load_jinja_template(out["ref"]) is not None  # the template came across
    data = root / "pairs"
    data.mkdir()
    for split, copies in (("train", 2), ("val", 1), ("test", 1)):
        write_jsonl(data / f"{split}.jsonl", learnable_rows() * copies)
    return SimpleNamespace(root=root, data=data, hf_tokenizer=hf_tok, **out)


def _tokenized(directory: Path, rows: list[dict]):
    pairs = [parse_preference_row(r, f"row {i}") for i, r in enumerate(rows)]
    template = load_jinja_template(directory)
    return tokenize_preferences(pairs, TextTokenizer.load(directory), template, max_length=64)


def _hf_reply_logps(model, prompt: list[int], reply: list[int]) -> float:
    """log p(reply | prompt) summed over the reply tokens, token by token from transformers' logits."""
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    total = 0.0
    for k, token in enumerate(reply):
        position = len(prompt) + k - 1  # the logits that predict reply token k
        total += float(torch.log_softmax(logits[position].double(), dim=-1)[token])
    return total


# ---------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_loss_equals_the_formula_from_two_models_log_probs(chat: SimpleNamespace, beta: float, eps: float) -> None:
    rows = pair_rows()[:6]
    data = _tokenized(chat.ref, rows)
    policy, ref = load_model(chat.policy), load_model(chat.ref)
    hf_policy = transformers.LlamaForCausalLM.from_pretrained(chat.policy_hf).eval()
    hf_ref = transformers.LlamaForCausalLM.from_pretrained(chat.ref_hf).eval()
    losses, margins = [], []
    for i in range(len(data)):
        p, c, r = data.prompts[i], data.chosen[i], data.rejected[i]
        h = ((_hf_reply_logps(hf_policy, p, c) - _hf_reply_logps(hf_ref, p, c))
             - (_hf_reply_logps(hf_policy, p, r) - _hf_reply_logps(hf_ref, p, r)))
        sig = 1 / (1 + math.exp(-beta * h))
        losses.append(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
        margins.append(beta * h)
    batch = collate_preferences([data[i] for i in range(len(data))], pad_id=0)
    loss, stats = batch_loss(policy, batch, Reference("copy", policy, ref), beta, eps)
    assert abs(float(loss.detach()) - sum(losses) / len(losses)) < 1e-5
    assert abs(stats["reward_margin"] / stats["n"] - sum(margins) / len(margins)) < 1e-5
    assert stats["reward_accuracy"] == sum(m > 0 for m in margins)
    assert 0 < stats["reward_accuracy"] < stats["n"]  # the pairs are not all on one side


def test_loss_equals_trl_dpo_trainer(chat: SimpleNamespace, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    rows = pair_rows()[:8]
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(rows), max_length=None, save_strategy="no", logging_strategy="no")
    hf_policy = transformers.LlamaForCausalLM.from_pretrained(chat.policy_hf).eval()
    hf_ref = transformers.LlamaForCausalLM.from_pretrained(chat.ref_hf).eval()
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=Dataset.from_list(conversational),
                         processing_class=chat.hf_tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    ours = _tokenized(chat.ref, rows)
    for i, ex in enumerate(examples):  # the same text -> the same tokens, split at the same place
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == (ours.prompts[i], ours.chosen[i], ours.rejected[i])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    policy, ref = load_model(chat.policy), load_model(chat.ref)
    batch = collate_preferences([ours[i] for i in range(len(ours))], pad_id=0)
    loss, stats = batch_loss(policy, batch, Reference("copy", policy, ref), beta=0.1, label_smoothing=0.0)
    assert abs(float(loss) - trl_loss) < 1e-5
    assert abs(stats["reward_margin"] / stats["n"] - trl_metrics["rewards/margins"]) < 1e-5
    assert abs(stats["reward_chosen"] / stats["n"] - trl_metrics["rewards/chosen"]) < 1e-5
    assert abs(stats["reward_accuracy"] / stats["n"] - trl_metrics["rewards/accuracies"]) < 1e-6


def test_sequence_logps_sums_only_labelled_tokens() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = [sum(float(torch.log_softmax(logits[b, t], -1)[labels[b, t]]) for t in range(5) if labels[b, t] >= 0)
                for b in range(2)]
    torch.testing.assert_close(sequence_logps(logits, labels), torch.tensor(expected), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# LoRA: the reference is the base; only the adapter learns


def test_lora_reference_is_the_base_and_only_adapters_get_gradients(chat: SimpleNamespace) -> None:
    from fromzero.finetune.lora import apply_lora
    from fromzero.finetune.methods import MethodConfig
    from fromzero.models import build_model
    from fromzero.checkpoint import read_json

    config = read_json(chat.ref / "config.json", "config")
    base = load_model(chat.ref)
    model = build_model(config)
    model.load_state_dict(base.state_dict())
    peft_model = apply_lora(model, config, MethodConfig(method="lora", lora_rank=4, lora_dropout=0.0), [])
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    data = _tokenized(chat.ref, pair_rows()[:6])
    batch = collate_preferences([data[i] for i in range(len(data))], pad_id=0)
    reference = Reference("adapter", peft_model)
    ref_logps = reference.logps(batch["x"], batch["y"])
    with torch.no_grad():
        base_logps = sequence_logps(base(batch["x"])[0], batch["y"])
        policy_logps = sequence_logps(peft_model(batch["x"])[0], batch["y"])
    torch.testing.assert_close(ref_logps, base_logps, atol=1e-5, rtol=1e-5)
    assert (policy_logps - base_logps).abs().max() > 1e-2  # the adapter is on for the policy

    peft_model.train()
    loss, _ = batch_loss(peft_model, batch, reference, beta=0.1, label_smoothing=0.0)
    loss.backward()
    assert peft_model.training  # the reference pass put the modes back
    got_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad and all("lora_" in n for n in got_grad)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------------------------------------
# Training runs


def _cfg(chat: SimpleNamespace, out: Path, **kw) -> DPOConfig:
    fields = dict(init_from=str(chat.ref), data=str(chat.data), out_dir=str(out), method="lora", lora_rank=8,
                  lora_dropout=0.0, lr=1e-2, epochs=6, batch_size=8, beta=0.1, device="cpu", dtype="float32",
                  progress=False, log_interval=2, seed=0, warmup_ratio=0.0)
    fields.update(kw)
    return DPOConfig(**fields)


def _metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,precompute", [("lora", False), ("full", False), ("full", True)])
def test_short_run_learns_the_preferences(chat: SimpleNamespace, tmp_path: Path, method: str, precompute: bool) -> None:
    lr = 1e-2 if method == "lora" else 3e-3
    result = finetune_dpo(_cfg(chat, tmp_path / "run", method=method, precompute_ref=precompute, lr=lr))
    assert result["reference"] == ("precomputed" if precompute else {"lora": "adapter", "full": "copy"}[method])
    before, val, test = result["test_before"], result["val"], result["test"]
    assert abs(before["loss"] - math.log(2)) < 1e-6 and before["reward_margin"] == 0  # policy == reference
    assert val["loss"] < 0.35 and val["reward_accuracy"] > 0.9 and val["reward_margin"] > 0
    assert test["loss"] < math.log(2) and test["reward_accuracy"] > 0.75
    assert test["logp_accuracy"] > before["logp_accuracy"]
    rows = _metric_rows(result["run_dir"])
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert train and all({"reward_margin", "reward_chosen", "reward_rejected", "reward_accuracy"} <= set(r) for r in train)
    assert evals and all({"val_reward_margin", "val_reward_accuracy", "val_logp_accuracy"} <= set(r) for r in evals)
    assert min(r["val_loss"] for r in evals) == pytest.approx(val["loss"], abs=1e-5)  # best = lowest val loss
    assert train[-1]["loss"] < train[0]["loss"]

    best = Path(result["checkpoint"])
    info = json.loads((best / "info.json").read_text())
    assert info["task"] == "dpo" and info["method"] == method
    assert (best / "chat_template.jinja").is_file()  # generate --chat / serve keep the template
    assert (best / ("adapter_config.json" if method == "lora" else "model.safetensors")).is_file()
    # The saved weights are the best ones: re-scoring test with the loaded checkpoint gives the same preferences.
    tuned = load_model(best)
    data = _tokenized(chat.ref, pair_rows()[:8])
    batch = collate_preferences([data[i] for i in range(len(data))], pad_id=0)
    loss, _ = batch_loss(tuned, batch, Reference("copy", tuned, load_model(chat.ref)), 0.1, 0.0)
    assert float(loss) < math.log(2)


def test_continuing_an_sft_lora_adapter_keeps_the_sft_model_as_reference(gpt_base: Path, tmp_path: Path) -> None:
    """An sft LoRA run's output (fromzero's own template in info.json, char tokenizer): the DPO run
    continues the adapter; the reference (precomputed) is base + sft adapter, not the bare base."""
    from fromzero.data.sft import ChatTemplate
    from fromzero.finetune.lora import apply_lora, save_adapter
    from fromzero.finetune.methods import MethodConfig
    from fromzero.checkpoint import read_json

    config = read_json(gpt_base / "config.json", "config")
    torch.manual_seed(0)
    sft = apply_lora(load_model(gpt_base).train(), config, MethodConfig(method="lora", lora_rank=4), [])
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    template = {"system_prefix": "", "user_prefix": "USER:\n", "assistant_prefix": "ASSISTANT:\n", "turn_end": "\n"}
    adapter = tmp_path / "sft-adapter"
    save_adapter(adapter, sft, config, gpt_base, gpt_base / "tokenizer.json", {"task": "sft", "template": template})
    rows = []
    for word, good, bad in (("hi", "hello", "bye"), ("up", "down", "left"), ("cat", "dog", "cow"), ("sun", "moon", "star")):
        rows += [{"prompt": word, "chosen": good, "rejected": bad}] * 6
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = finetune_dpo(DPOConfig(init_from=str(adapter), data=str(data), out_dir=str(tmp_path / "run"),
                                    method="lora", lr=3e-2, epochs=8, batch_size=4, device="cpu", dtype="float32",
                                    progress=False, seed=0, warmup_ratio=0.0))
    assert result["reference"] == "precomputed"
    assert result["test"]["reward_accuracy"] > result["test_before"]["reward_accuracy"]
    best = Path(result["checkpoint"])
    info = json.loads((best / "info.json").read_text())
    assert Path(info["base_checkpoint"]) == gpt_base.resolve() and info["template"] == template
    adapter_config = json.loads((best / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4  # the sft adapter, continued
    from fromzero.inference.chat import load_chat_format

    chat_format = load_chat_format(best)  # generate --chat / chat / serve find the sft template
    assert chat_format is not None and isinstance(chat_format.template, ChatTemplate)

    # The reference is the sft model (base + adapter as saved), not the bare base.
    from fromzero.finetune.dpo import build_starting_model, reference_logps

    cfg = DPOConfig(init_from=str(adapter), data=str(data), method="lora")
    start = build_starting_model(cfg, adapter, config, read_json(adapter / "info.json", "info"))
    assert start.reference_kind == "precomputed" and start.adapter_init
    pairs = [PreferencePair([{"role": "user", "content": w}], "hello", "bye") for w in ("hi", "up")]
    tokens = tokenize_preferences(pairs, TextTokenizer.load(gpt_base), ChatTemplate(**template), 32)
    ref_chosen, ref_rejected = reference_logps(start.model, tokens, 2, 0, torch.device("cpu"), contextlib.nullcontext)
    batch = collate_preferences([tokens[i] for i in range(len(tokens))], pad_id=0)
    with torch.no_grad():
        sft_logps = sequence_logps(load_model(adapter)(batch["x"])[0], batch["y"])
        bare_logps = sequence_logps(load_model(gpt_base)(batch["x"])[0], batch["y"])
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), sft_logps, atol=1e-4, rtol=1e-4)
    assert (sft_logps - bare_logps).abs().max() > 1e-2  # the sft adapter changed the model


# ---------------------------------------------------------------------------------------------
# Data


def test_row_formats(tmp_path: Path) -> None:
    a = parse_preference_row({"prompt": "q", "system": "be brief", "chosen": "yes", "rejected": "no"}, "x")
    assert a.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    b = parse_preference_row({"prompt": [{"role": "user", "content": "q"}],
                              "chosen": [{"role": "assistant", "content": "yes"}],
                              "rejected": [{"role": "assistant", "content": "no"}]}, "x")  # TRL's conversational
    assert (b.messages, b.chosen, b.rejected) == ([{"role": "user", "content": "q"}], "yes", "no")
    with pytest.raises(FromzeroError, match="end with a user message"):
        parse_preference_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                              "chosen": "yes", "rejected": "no"}, "x")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)])
    splits = load_preference_pairs(str(path), 0.2, 0.1, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 4, 2]


def test_truncate_prompt_cuts_the_start_and_keeps_replies(chat: SimpleNamespace) -> None:
    pair = parse_preference_row({"prompt": "review: the film was great " * 2, "chosen": "positive",
                                 "rejected": "negative"}, "row 0")
    tokenizer, template = TextTokenizer.load(chat.ref), load_jinja_template(chat.ref)
    full = tokenize_preferences([pair], tokenizer, template, 96)
    limit = len(full.prompts[0]) + max(len(full.chosen[0]), len(full.rejected[0])) - 5
    with pytest.raises(FromzeroError, match="more than max_length"):
        tokenize_preferences([pair], tokenizer, template, limit)
    cut = tokenize_preferences([pair], tokenizer, template, limit, truncate_prompt=True)
    assert cut.n_truncated == 1 and cut.chosen == full.chosen and cut.rejected == full.rejected
    assert cut.prompts[0] == full.prompts[0][5:]  # the end of the prompt, next to the reply, is kept


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI


BAD_ROWS = {
    "missing-chosen": ([{"prompt": "q", "rejected": "no"}], "missing 'chosen'"),
    "same-replies": ([{"prompt": "q", "chosen": "yes", "rejected": "yes"}], "the same reply"),
    "empty-reply": ([{"prompt": "q", "chosen": "  ", "rejected": "no"}], "'chosen' is empty"),
    "bad-json": (['{"prompt": "q", "chosen": "yes", "rejected": "no"}', '{"prompt": "q", "chosen": '], "pairs.jsonl:2"),
    "too-long": ([{"prompt": "review: " + "the film was great " * 40, "chosen": "yes", "rejected": "no"}],
                 "more than max_length"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_one_line_errors(cli, one_line_error, chat: SimpleNamespace, tmp_path: Path, case: str) -> None:
    rows, fragment = BAD_ROWS[case]
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows + good)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"task": "dpo", "model": {"init_from": str(chat.ref)},
                                      "data": {"source": str(data), "max_length": 64}, "train": {"device": "cpu"},
                                      "out_dir": str(tmp_path / "run")}))
    one_line_error(cli("finetune", "--config", recipe), fragment)
    assert not (tmp_path / "run").exists()


def test_checkpoint_without_chat_template_is_refused(cli, one_line_error, gpt_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "no"}] * 4)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"task": "dpo", "model": {"init_from": str(gpt_base)}, "data": {"source": str(data)},
                                      "out_dir": str(tmp_path / "run")}))
    one_line_error(cli("finetune", "--config", recipe), "no chat template")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,fragment", [(("--beta", "0"), "beta must be positive"),
                                               (("--label_smoothing", "0.5"), "label_smoothing")])
def test_bad_settings_are_one_line_errors(cli, one_line_error, chat: SimpleNamespace, tmp_path: Path,
                                          override: tuple[str, str], fragment: str) -> None:
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"task": "dpo", "model": {"init_from": str(chat.ref)},
                                      "data": {"source": str(chat.data)}, "out_dir": str(tmp_path / "run")}))
    one_line_error(cli("finetune", "--config", recipe, *override), fragment)
    assert not (tmp_path / "run").exists()


def test_cli_run_writes_a_dpo_checkpoint(cli, chat: SimpleNamespace, tmp_path: Path) -> None:
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"task": "dpo", "init_from": str(chat.ref), "data": str(chat.data),
                                      "method": "lora", "lr": 1e-2, "max_steps": 4, "batch_size": 8,
                                      "out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32"}))
    result = cli("finetune", "--config", recipe, "--quiet")
    assert result.code == 0, result
    assert (tmp_path / "run" / "checkpoints" / "best" / "adapter_config.json").is_file()
    assert "reward accuracy" in result.out
    help_text = cli("finetune", "--help").out
    assert "task dpo:" in help_text and "label_smoothing" in help_text and "precompute_ref" in help_text


def test_resume_continues_bit_for_bit(chat: SimpleNamespace, tmp_path: Path, monkeypatch) -> None:
    """DPO stopped in its second epoch and resumed = never stopped (weights, best, losses)."""
    from .resume import assert_resume_is_exact

    def cfg(out):
        return _cfg(chat, out, epochs=3, batch_size=4, eval_every=2, log_interval=1, lora_dropout=0.1)

    assert_resume_is_exact(finetune_dpo, cfg, tmp_path, monkeypatch, stop_at=5)
