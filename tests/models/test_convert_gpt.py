"""Parity of fromzero's decoder with Hugging Face GPT-2, LLaMA, Mistral and Qwen2, and
conversion in both directions.

Tiny random reference models are built with ``transformers`` inside the test (weights drawn
wider than their init so that greedy decoding has clear winners), saved with
``save_pretrained``, converted with ``fromzero.models.hf`` and compared in fp32: logits, and
KV-cached greedy tokens against ``generate(do_sample=False)``. Exports go back through
``transformers.AutoModelForCausalLM``. Bad input goes through ``fromzero convert`` (exit 2,
one ``error:`` line, OUT untouched).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from fromzero.cli import main  # noqa: E402
from fromzero.data.tokenizers import TextTokenizer, char_tokenizer_from_chars  # noqa: E402
from fromzero.models.gpt import GPT, LLAMA_STYLE, GPTConfig  # noqa: E402
from fromzero.models.hf import convert_from_hf, convert_to_hf  # noqa: E402
from fromzero.checkpoint import load_model, save_checkpoint  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TOL = dict(atol=1e-5, rtol=1e-4)
V = 97
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_KW = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, **NO_SPECIAL)

# name -> (transformers class, config class, config kwargs, class exported back by to-hf)
CASES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, **NO_SPECIAL), "GPT2LMHeadModel"),
    "gpt2-untied-inner-relu": ("GPT2LMHeadModel", "GPT2Config",
                               dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=48,
                                    activation_function="relu", tie_word_embeddings=False, layer_norm_epsilon=1e-4,
                                    **NO_SPECIAL), "GPT2LMHeadModel"),
    "llama-gqa-untied": ("LlamaForCausalLM", "LlamaConfig",
                         dict(LLAMA_KW, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5), "LlamaForCausalLM"),
    "llama-tied-biases-headdim": ("LlamaForCausalLM", "LlamaConfig",
                                  dict(LLAMA_KW, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                       head_dim=16), "LlamaForCausalLM"),
    "llama3-rope-scaling": ("LlamaForCausalLM", "LlamaConfig",
                            dict(LLAMA_KW, num_key_value_heads=1, rope_parameters=dict(
                                rope_type="llama3", rope_theta=5000.0, factor=8.0, low_freq_factor=1.0,
                                high_freq_factor=4.0, original_max_position_embeddings=8)), "LlamaForCausalLM"),
    "llama-linear-rope": ("LlamaForCausalLM", "LlamaConfig",
                          dict(LLAMA_KW, rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0)),
                          "LlamaForCausalLM"),
    "mistral-mqa-window": ("MistralForCausalLM", "MistralConfig",
                           dict(LLAMA_KW, num_key_value_heads=1, max_position_embeddings=64, sliding_window=24),
                           "LlamaForCausalLM"),
    "qwen2-gqa-tied": ("Qwen2ForCausalLM", "Qwen2Config",
                       dict(LLAMA_KW, num_key_value_heads=2, tie_word_embeddings=True), "Qwen2ForCausalLM"),
}


def hf_model(case: str, seed: int = 0, **kw):
    """A tiny random transformers causal LM in eval mode, weights wider than the init."""
    cls_name, config_name, config_kw, _ = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**config_kw, **kw})
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
            elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:  # biases
                p.normal_(0.0, 0.2)
    return model.eval()


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def save_and_convert(model, tmp_path: Path) -> tuple[Path, Path, GPT]:
    hf_dir, fz_dir = tmp_path / "hf", tmp_path / "fz"
    model.save_pretrained(hf_dir)
    convert_from_hf(str(hf_dir), fz_dir)
    return hf_dir, fz_dir, load_model(fz_dir)


def hf_greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                          do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# Parity: logits, cached greedy decoding, export back to transformers


@pytest.mark.parametrize("case", list(CASES))
def test_parity_generation_and_round_trip(case: str, tmp_path: Path) -> None:
    ref = hf_model(case)
    _, fz_dir, model = save_and_convert(ref, tmp_path)
    x = ids(2, 13)
    with torch.no_grad():
        want = ref(x).logits
        got, _ = model(x)
    torch.testing.assert_close(got, want, **TOL)

    prompt = ids(1, 5, seed=1)
    mine = model.generate(prompt, max_new_tokens=10, temperature=0.0)  # KV cache, decode layout
    assert torch.equal(mine, hf_greedy(ref, prompt, 10))
    assert len(set(mine[0, 5:].tolist())) > 1  # not a degenerate constant continuation

    back = tmp_path / "back"
    hf_config = convert_to_hf(fz_dir, back)
    expected_cls = CASES[case][3]
    assert hf_config["architectures"] == [expected_cls]
    again, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert type(again).__name__ == expected_cls
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).logits, want, **TOL)
    # from-hf of the export gives the same fromzero weights again
    convert_from_hf(str(back), tmp_path / "again")
    a, b = load_file(str(fz_dir / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converted_configs(tmp_path: Path) -> None:
    _, fz_dir, model = save_and_convert(hf_model("llama-gqa-untied"), tmp_path / "l")
    c = model.config
    assert (c.norm, c.pos_embedding, c.mlp, c.bias, c.tie_embeddings) == ("rmsnorm", "rope", "swiglu", False, False)
    assert (c.n_kv_head, c.intermediate_size, c.rope_theta, c.norm_eps, c.block_size) == (2, 40, 500.0, 1e-5, 32)
    _, _, model = save_and_convert(hf_model("mistral-mqa-window"), tmp_path / "m")
    assert model.config.block_size == 24  # capped at the sliding window
    assert model.config.n_kv_head == 1
    _, fz_dir, model = save_and_convert(hf_model("qwen2-gqa-tied"), tmp_path / "q")
    assert model.config.qkv_bias and not model.config.bias and model.config.tie_embeddings
    _, fz_dir, model = save_and_convert(hf_model("gpt2"), tmp_path / "g")
    assert model.config == GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.1)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_special_token_ids_survive_the_round_trip(tmp_path: Path) -> None:
    ref = hf_model("llama-gqa-untied", bos_token_id=1, eos_token_id=2)
    _, fz_dir, _ = save_and_convert(ref, tmp_path)
    assert json.loads((fz_dir / "config.json").read_text())["hf_special_tokens"] == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    hf_config = convert_to_hf(fz_dir, tmp_path / "back")
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 2)


def test_sliding_window_that_never_applies_is_not_a_cap(tmp_path: Path) -> None:
    """Qwen2 with use_sliding_window=false, and Mistral without a window: full context."""
    _, _, model = save_and_convert(hf_model("qwen2-gqa-tied", use_sliding_window=False, sliding_window=4),
                                   tmp_path / "q")
    assert model.config.block_size == 32
    _, _, model = save_and_convert(hf_model("mistral-mqa-window", sliding_window=None), tmp_path / "m")
    assert model.config.block_size == 64


def test_gpt2_bare_weights_and_legacy_buffers(tmp_path: Path) -> None:
    """A GPT2Model-style file (no ``transformer.`` prefix, no head) with the old attention-mask
    buffers ``h.N.attn.bias`` / ``masked_bias`` converts to the same model."""
    ref = hf_model("gpt2", seed=2)
    state = {k.removeprefix("transformer."): v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    src = tmp_path / "bare"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    cfg = ref.config.to_dict()
    cfg.pop("architectures", None)
    (src / "config.json").write_text(json.dumps(cfg))
    convert_from_hf(str(src), tmp_path / "out")
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out")(x)[0], ref(x).logits, **TOL)


def test_llama_old_style_config_and_rotary_buffers(tmp_path: Path) -> None:
    """transformers 4.x wrote rope_theta / rope_scaling at the top level and, earlier still,
    saved rotary_emb.inv_freq with the weights."""
    ref = hf_model("llama3-rope-scaling", seed=3)
    src = tmp_path / "old"
    ref.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (src / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, str(src / "model.safetensors"))
    convert_from_hf(str(src), tmp_path / "out")
    model = load_model(tmp_path / "out")
    assert (model.config.rope_scaling, model.config.rope_theta, model.config.rope_original_block_size) == (
        "llama3", 5000.0, 8)
    x = ids(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x).logits, **TOL)


# ---------------------------------------------------------------------------------------------
# fromzero-trained checkpoints -> transformers


CHARS = "abcdefghij .,\n"


def fromzero_checkpoint(directory: Path, **kw) -> GPT:
    torch.manual_seed(7)
    config = GPTConfig(vocab_size=len(CHARS), block_size=24, n_layer=2, n_head=2, n_embd=16, **kw)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    tok = char_tokenizer_from_chars(CHARS)
    tok_file = tok.save(directory.parent / f"{directory.name}-tokenizer.json")
    save_checkpoint(directory, model, config.to_dict(), tokenizer_file=tok_file)
    return model


@pytest.mark.parametrize(
    "kw,expected_cls",
    [
        (dict(), "GPT2LMHeadModel"),
        (dict(bias=False, tie_embeddings=False, activation="gelu"), "GPT2LMHeadModel"),  # zero biases
        (dict(n_kv_head=1, intermediate_size=24, **LLAMA_STYLE), "LlamaForCausalLM"),
        (dict(qkv_bias=True, rope_scaling="linear", rope_scaling_factor=2.0, **{**LLAMA_STYLE, "tie_embeddings": True}),
         "Qwen2ForCausalLM"),
    ],
)
def test_fromzero_checkpoint_to_hf_loads_in_transformers(tmp_path: Path, kw: dict, expected_cls: str) -> None:
    model = fromzero_checkpoint(tmp_path / "ckpt", **kw)
    out = tmp_path / "exported"
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == expected_cls
    # transformers 5 forces its own Qwen2Tokenizer pipeline on model_type qwen2 whatever
    # tokenizer_config.json says (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which re-splits a
    # char-level tokenizer; the tokenizer.json itself loads as it is.
    auto = transformers.PreTrainedTokenizerFast if expected_cls == "Qwen2ForCausalLM" else transformers.AutoTokenizer
    tok = auto.from_pretrained(out)
    text = "abc, def.\nghij"
    x = torch.tensor([tok(text)["input_ids"]])
    assert x[0].tolist() == TextTokenizer.load(tmp_path / "ckpt").encode(text)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], **TOL)
    prompt = x[:, :4]
    assert torch.equal(hf_greedy(hf, prompt, 12), model.generate(prompt, max_new_tokens=12, temperature=0.0))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _hf_dir(tmp_path: Path, case: str = "llama-gqa-untied") -> Path:
    src = tmp_path / "src"
    hf_model(case).save_pretrained(src)
    return src


def _edit_weights(src: Path, edit) -> None:
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(src / "model.safetensors"))


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def _assert_refused(cli, one_line_error, tmp_path: Path, src: Path, *fragments: str,
                    direction: str = "from-hf") -> None:
    out = tmp_path / "out"
    result = cli("convert", direction, src, out)
    one_line_error(result, *fragments)
    assert not out.exists()
    # an existing OUT replaced with --force stays as it was when the conversion fails
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("convert", direction, src, out, "--force")
    one_line_error(result, *fragments)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_missing_tensor_is_named(cli, one_line_error, tmp_path: Path) -> None:
    src = _hf_dir(tmp_path)
    _edit_weights(src, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_refused(cli, one_line_error, tmp_path, src, "missing 1: model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor_is_named(cli, one_line_error, tmp_path: Path) -> None:
    src = _hf_dir(tmp_path, "gpt2")
    _edit_weights(src, lambda s: s.update({"transformer.h.0.attn.c_extra.weight": torch.zeros(2, 2)}))
    _assert_refused(cli, one_line_error, tmp_path, src, "unexpected 1: transformer.h.0.attn.c_extra.weight")


def test_wrong_shape_is_named(cli, one_line_error, tmp_path: Path) -> None:
    src = _hf_dir(tmp_path)
    _edit_weights(src, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    _assert_refused(cli, one_line_error, tmp_path, src, "model.layers.0.self_attn.k_proj.weight",
                    "(32, 32)", "(16, 32)")


def test_unsupported_model_type(cli, one_line_error, tmp_path: Path) -> None:
    src = _hf_dir(tmp_path)
    _edit_config(src, model_type="gpt_neox")
    _assert_refused(cli, one_line_error, tmp_path, src, "unsupported Hugging Face model_type 'gpt_neox'",
                    "gpt2", "llama", "mistral", "qwen2")


@pytest.mark.parametrize(
    "changes,fragment",
    [
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
         "unsupported rope scaling type 'yarn' (supported: default, linear, llama3)"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "'dynamic'"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "llama3 rope scaling"),
        (dict(partial_rotary_factor=0.5), "partial rotary"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
        (dict(hidden_act="gelu_fast"), "unsupported hidden_act 'gelu_fast'"),
        (dict(num_key_value_heads=3), "n_kv_head"),
        (dict(hidden_size="32"), "hidden_size must be a positive integer"),
    ],
)
def test_unsupported_llama_configs(cli, one_line_error, tmp_path: Path, changes: dict, fragment: str) -> None:
    src = _hf_dir(tmp_path)
    _edit_config(src, **changes)
    _assert_refused(cli, one_line_error, tmp_path, src, fragment)


def test_unsupported_gpt2_configs(cli, one_line_error, tmp_path: Path) -> None:
    src = _hf_dir(tmp_path, "gpt2")
    _edit_config(src, scale_attn_by_inverse_layer_idx=True)
    _assert_refused(cli, one_line_error, tmp_path, src, "attention scaling")


def test_to_hf_refuses_mixed_architectures(cli, one_line_error, tmp_path: Path) -> None:
    fromzero_checkpoint(tmp_path / "ckpt", pos_embedding="rope")  # rope + layernorm + gelu MLP
    _assert_refused(cli, one_line_error, tmp_path, tmp_path / "ckpt", "cannot export this model to Hugging Face",
                    "pos_embedding=rope, norm=layernorm, mlp=gelu", direction="to-hf")
