"""QLoRA (method: qlora): the 4-bit base, adapters only, the memory bound, save / load / merge.

A tiny random LLaMA-style fromzero GPT (2 layers, 64 wide, GQA, SwiGLU, tied embeddings):

* every Linear of the blocks becomes a 4-bit layer; its forward (and the gradient with respect
  to its input) equals a float Linear holding the dequantized weight;
* only lora_A / lora_B receive gradients; nothing of the base does;
* the Linear weights take <= 30 % of their bf16 bytes (group 64, fp16 scales and minimums),
  the tied embedding / head stays float;
* save_adapter -> load_adapter_model (-> merge-lora) gives the outputs of the trained peft model,
  i.e. the adapter merged into the *dequantized* base, not into the original float weights;
* a short SFT run with ``method: qlora`` lowers the validation loss and writes a PEFT adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from fromzero.models.quantized import Int4WeightLinear
from fromzero.errors import FromzeroError
from fromzero.finetune.qlora import apply_qlora, linear_weight_bytes, quantize_base, round_base_to_int4
from fromzero.models.gpt import GPT, GPTConfig

CONFIG = dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, bias=False,
              norm="rmsnorm", pos_embedding="rope", mlp="swiglu", intermediate_size=128, tie_embeddings=True)
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIG))
    with torch.no_grad():  # a wider spread than the init: rounding to 4 bits is then visible
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model.eval()


def method(**kw) -> SimpleNamespace:
    fields = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=TARGETS)
    fields.update(kw)
    return SimpleNamespace(**fields)


def model_config() -> dict:
    return {**GPTConfig(**CONFIG).to_dict(), "model_type": "fromzero-gpt"}


def test_4bit_forward_and_input_gradient_equal_the_dequantized_float_layer() -> None:
    model = tiny_gpt()
    quantize_base(model, group_size=16)
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, Int4WeightLinear)
    assert layer.scale.dtype == torch.float16 and layer.offset.dtype == torch.float16
    reference = nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight())
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.no_grad():  # the inference path (no graph) gives the same numbers
        torch.testing.assert_close(layer(x), y_ref)


def test_whole_model_forward_equals_the_rounded_float_model() -> None:
    """quantize_base and round_base_to_int4 stand for the same weights."""
    quantized, rounded = tiny_gpt(), tiny_gpt()
    quantize_base(quantized, group_size=16)
    round_base_to_int4(rounded, group_size=16)
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(quantized(idx)[0], rounded(idx)[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tiny_gpt()(idx)[0], rounded(idx)[0], atol=1e-4)  # rounding did something


def test_only_adapters_get_gradients() -> None:
    model = apply_qlora(tiny_gpt(), model_config(), method(), group_size=16)
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # every block's four Linear layers carry an adapter, on a 4-bit base
    from fromzero.finetune.qlora import quant_lora_class

    wrapped = [m for m in model.modules() if isinstance(m, quant_lora_class())]
    assert len(wrapped) == 4 * CONFIG["n_layer"]
    assert all(isinstance(m.get_base_layer(), Int4WeightLinear) for m in wrapped)


def test_linear_weights_take_at_most_30_percent_of_bf16() -> None:
    model = tiny_gpt()
    quantize_base(model, group_size=64)
    sizes = linear_weight_bytes(model)
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4WeightLinear))
    assert sizes["bf16_bytes"] == 2 * linear_params
    # 4 bits per weight + an fp16 scale and an fp16 minimum per 64 weights = 4.5 bits
    assert sizes["stored_bytes"] == linear_params // 2 + 2 * 2 * linear_params // 64
    assert sizes["stored_bytes"] <= 0.30 * sizes["bf16_bytes"]
    # with adapters on it, the base is counted alone (lora_A / lora_B are float Linear layers)
    assert linear_weight_bytes(apply_qlora(tiny_gpt(), model_config(), method(), group_size=64)) == sizes
    # the tied embedding / head stays a float table shared by both
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.dtype == torch.float32


def test_tied_head_is_not_a_qlora_target() -> None:
    with pytest.raises(FromzeroError, match="not quantized"):
        apply_qlora(tiny_gpt(), model_config(), method(lora_targets=["lm_head"]), group_size=16)


def _train_a_little(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, CONFIG["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_save_load_merge_round_trip(tmp_path: Path) -> None:
    from fromzero.finetune.lora import load_adapter_model, merge_lora, save_adapter
    from fromzero.checkpoint import load_model, save_checkpoint

    base_dir = tmp_path / "base"
    save_checkpoint(base_dir, tiny_gpt(), model_config())
    model = apply_qlora(load_model(base_dir), model_config(), method(), group_size=16)
    _train_a_little(model)
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 10))
    with torch.no_grad():
        trained = model(idx)[0]
    info = {"task": "sft", "qlora": {"group_size": 16, "scale_dtype": "float16"}}
    save_adapter(tmp_path / "adapter", model, model_config(), base_dir, None, info)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    assert saved["base_model_name_or_path"] == str(base_dir.resolve())
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # only the adapter is stored

    loaded = load_adapter_model(tmp_path / "adapter")  # the float base, rounded to 4 bits, + adapter, merged
    assert not any(isinstance(m, Int4WeightLinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], trained, rtol=1e-4, atol=1e-4)

    merged_dir = merge_lora(tmp_path / "adapter", tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged_dir)(idx)[0], trained, rtol=1e-4, atol=1e-4)

    # without the rounding (the adapter on the original float base) the outputs would differ
    info_file = tmp_path / "adapter" / "info.json"
    info_file.write_text(json.dumps({"task": "sft", "base_checkpoint": str(base_dir.resolve()), "adapter": "lora"}))
    with torch.no_grad():
        assert not torch.allclose(load_adapter_model(tmp_path / "adapter")(idx)[0], trained, atol=1e-4)


def test_peft_merge_of_a_quantized_layer_uses_the_dequantized_base() -> None:
    model = apply_qlora(tiny_gpt(), model_config(), method(), group_size=16)
    _train_a_little(model, steps=2)
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 10))
    with torch.no_grad():
        before = model(idx)[0]
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(idx)[0], before, rtol=1e-4, atol=1e-4)
    assert isinstance(merged.transformer.h[0].attn.c_attn, nn.Linear)
