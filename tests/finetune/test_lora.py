"""LoRA fine-tuning (fromzero.finetune.lora): what it trains, the PEFT-format adapter it writes,
and parity with Hugging Face: the adapter on the exported base model, loaded by ``peft``, gives
the logits fromzero gives (BERT classifier: nn.Linear; GPT-2 SFT: Conv1D, fan_in_fan_out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fromzero.finetune.text import finetune_text_classification
from fromzero.checkpoint import load_model

from .conftest import VOCAB, text_config

RANK = 4
HIDDEN = 32
LAYERS = 2


def padded_batch(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] ids padded with [PAD] (id 0) to the longest, and the attention mask."""
    rows = [[VOCAB.index("[CLS]"), *(VOCAB.index(w) for w in s.split()), VOCAB.index("[SEP]")] for s in sentences]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


SENTENCES = ["the film was good", "my day was so very awful and it felt bad again", "our trip", "this book was nice"]


@pytest.fixture(scope="module")
def lora_run(bert_base: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """LoRA (r=4, default targets) on the tiny encoder, lr high enough to move the adapters."""
    cfg = text_config(bert_base, sentiment_csv, tmp_path_factory.mktemp("lora") / "run", method="lora",
                      lora_rank=RANK, lr=1e-2, epochs=3)
    return finetune_text_classification(cfg)


@pytest.fixture(scope="module")
def hf_base(bert_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.models.hf import convert_to_hf

    out = tmp_path_factory.mktemp("hf") / "bert"
    convert_to_hf(bert_base, out)
    return out


# ---------------------------------------------------------------------------------------------
# what LoRA trains


def test_lora_trains_adapters_and_the_classifier_only(lora_run: dict) -> None:
    adapted = 4 * LAYERS  # query, key, value, out of each layer
    expected = adapted * RANK * (HIDDEN + HIDDEN) + (HIDDEN * 2 + 2)  # + classifier (2 labels)
    assert lora_run["trainable_params"] == expected
    assert lora_run["trainable_params"] / lora_run["total_params"] < 0.1
    assert lora_run["val"]["accuracy"] >= 0.8  # it learns something


def test_lora_on_minilm_trains_the_parameters_the_readme_states() -> None:
    """README: "LoRA on MiniLM trains 148,611 of 22,862,982 parameters (0.65%)" (3 genre labels)."""
    from fromzero.finetune.lora import apply_lora
    from fromzero.finetune.methods import MethodConfig, count_parameters
    from fromzero.models.bert import Bert, BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, head="classification", num_labels=3, labels=["a", "b", "c"])
    model = apply_lora(Bert(config), config.to_dict(), MethodConfig(method="lora"), modules_to_save=["classifier"])
    trainable, total = count_parameters(model)
    assert trainable == 6 * 4 * 8 * (384 + 384) + (384 * 3 + 3) == 148_611  # r=8 on q/k/v/out + classifier
    assert total == 22_862_982 and f"{100 * trainable / total:.2f}%" == "0.65%"


def test_adapter_checkpoint_layout(lora_run: dict, bert_base: Path) -> None:
    ckpt = Path(lora_run["checkpoint"])
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()
    for name in ("config.json", "info.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "SEQ_CLS"
    assert adapter["r"] == RANK and adapter["modules_to_save"] == ["classifier"]
    expected = {f"bert.encoder.layer.{i}.attention.{m}" for i in range(LAYERS)
                for m in ("self.query", "self.key", "self.value", "output.dense")}
    assert set(adapter["target_modules"]) == expected
    info = json.loads((ckpt / "info.json").read_text())
    assert info["adapter"] == "lora" and Path(info["base_checkpoint"]) == bert_base.resolve()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["head"] == "classification" and config["labels"] == ["neg", "pos"]
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in tensors


# ---------------------------------------------------------------------------------------------
# parity with Hugging Face transformers + peft


def test_adapter_matches_peft_on_the_exported_base(lora_run: dict, hf_base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ckpt = Path(lora_run["checkpoint"])
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 1e-3 for v in lora_b)  # trained, not the zero init

    ids, mask = padded_batch(SENTENCES)
    ours, _ = load_model(ckpt)(ids, mask)
    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_base), num_labels=2)
    theirs = PeftModel.from_pretrained(hf, str(ckpt)).eval()
    with torch.no_grad():
        hf_logits = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, hf_logits, atol=1e-5, rtol=1e-5)


def test_merge_lora_gives_the_same_logits(cli, one_line_error, lora_run: dict, bert_base: Path,
                                          tmp_path: Path) -> None:
    ckpt = Path(lora_run["checkpoint"])
    merged = tmp_path / "merged"
    result = cli("merge-lora", "--checkpoint", ckpt, "--out", merged)
    assert result.code == 0, result
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    ids, mask = padded_batch(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(ids, mask)[0], load_model(ckpt)(ids, mask)[0],
                                   atol=1e-5, rtol=1e-5)
    info = json.loads((merged / "info.json").read_text())
    assert "adapter" not in info and info["task"] == "text-classification"
    # the merged checkpoint is a classifier like any other
    predicted = cli("predict", "--checkpoint", merged, "--device", "cpu", "--text", "the film was good")
    assert predicted.code == 0, predicted

    one_line_error(cli("merge-lora", "--checkpoint", ckpt, "--out", merged), "--force")
    assert cli("merge-lora", "--checkpoint", ckpt, "--out", merged, "--force").code == 0
    one_line_error(cli("merge-lora", "--checkpoint", bert_base, "--out", tmp_path / "m2"), "adapter")
    assert not (tmp_path / "m2").exists()


def test_lora_target_matching_nothing_lists_the_layers(cli, one_line_error, bert_base: Path, sentiment_csv: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("finetune", "--task", "text-classification", "--init_from", bert_base, "--data", sentiment_csv,
                 "--method", "lora", "--lora_targets", "[nope]", "--epochs", "1", "--device", "cpu",
                 "--out_dir", out, "--quiet")
    one_line_error(result, "'nope'", "attn.query", "attn.out")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# SFT LoRA on a GPT-2-style decoder (Conv1D in HF: fan_in_fan_out)


@pytest.fixture(scope="module")
def sft_lora_run(gpt_base: Path, sft_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from fromzero.finetune.sft import SFTConfig, finetune_sft

    cfg = SFTConfig(init_from=str(gpt_base), data=str(sft_jsonl), method="lora", lora_rank=RANK, lr=1e-2,
                    epochs=8, batch_size=8, seed=0, device="cpu", dtype="float32", progress=False,
                    out_dir=str(tmp_path_factory.mktemp("sft") / "run"))
    return finetune_sft(cfg)


def test_sft_lora_lowers_the_response_loss(sft_lora_run: dict) -> None:
    assert sft_lora_run["test"]["loss"] < 0.5 * sft_lora_run["test_before"]["loss"]
    adapter = json.loads((Path(sft_lora_run["checkpoint"]) / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["fan_in_fan_out"] is True
    assert set(adapter["target_modules"]) == {f"transformer.h.{i}.attn.{m}" for i in range(LAYERS)
                                              for m in ("c_attn", "c_proj")}
    assert not (Path(sft_lora_run["checkpoint"]) / "model.safetensors").exists()


def test_sft_adapter_matches_peft_on_exported_gpt2(sft_lora_run: dict, gpt_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.models.hf import convert_to_hf

    ckpt = Path(sft_lora_run["checkpoint"])
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 1e-3 for k, v in tensors.items() if "lora_B" in k)

    convert_to_hf(gpt_base, tmp_path / "hf")
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")), str(ckpt)).eval()
    tokenizer = TextTokenizer.load(ckpt / "tokenizer.json")
    idx = torch.tensor([tokenizer.encode("USER:\nsun\n\nASSISTANT:\nmoon"),
                        tokenizer.encode("USER:\ncat\n\nASSISTANT:\nDOG?")])
    with torch.no_grad():
        ours, _ = load_model(ckpt)(idx)
        hf_logits = theirs(input_ids=idx).logits
    torch.testing.assert_close(ours, hf_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_llama_style_adapter_splits_fused_layers_and_matches_peft(style: str, tmp_path: Path) -> None:
    """Our c_attn (q|k|v, grouped-query) and c_fc (gate|up) are one Linear each; HF has three and two.
    The exported adapter repeats A and cuts B by rows: peft on the exported model gives our logits."""
    import transformers
    from peft import PeftModel

    from fromzero.finetune.lora import apply_lora, save_adapter
    from fromzero.finetune.methods import MethodConfig
    from fromzero.models.gpt import GPT, GPTConfig
    from fromzero.models.hf import convert_to_hf
    from fromzero.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=style == "qwen2",
                       tie_embeddings=False)
    base_dir = tmp_path / "base"
    save_checkpoint(base_dir, GPT(config), config.to_dict())
    model = GPT(config)
    base = load_model(base_dir)
    model.load_state_dict(base.state_dict())
    method = MethodConfig(method="lora", lora_rank=4, lora_targets=["attn.c_attn", "attn.c_proj", "mlp.c_fc"])
    peft_model = apply_lora(model, config.to_dict(), method, modules_to_save=[])
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_adapter(tmp_path / "adapter", peft_model, config.to_dict(), base_dir)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.k_proj" in adapter_config["target_modules"]
    assert "model.layers.1.mlp.up_proj" in adapter_config["target_modules"]

    convert_to_hf(base_dir, tmp_path / "hf")
    cls = transformers.Qwen2ForCausalLM if style == "qwen2" else transformers.LlamaForCausalLM
    hf = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "hf"), tmp_path / "adapter").eval()
    ours = load_model(tmp_path / "adapter").eval()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got, _ = ours(ids)
    base_logits, _ = base(ids)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
