"""LLaMA-style options of the decoder: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU, untied head; each piece against a from-scratch reference, and the whole model for
cached == uncached decoding. (Parity with ``transformers`` is in test_convert_gpt.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fromzero.config import load_pretrain_config
from fromzero.errors import FromzeroError
from fromzero.models.gpt import GPT, LLAMA_STYLE, GPTConfig
from fromzero.models.layers import (
    Block,
    CausalSelfAttention,
    GatedMLP,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    attention,
    rope_inverse_frequencies,
    set_linear_weight_layout,
)

V, BS = 23, 16


def llama_config(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=BS, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                intermediate_size=48, **LLAMA_STYLE)
    base.update(kw)
    return GPTConfig(**base)


def llama_model(seed: int = 0, sharpen: float = 1.0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(llama_config(**kw))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(sharpen)
        model.lm_head.weight.mul_(sharpen)
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm gains and biases off their init values
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# RMSNorm


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 4 + 1
    ref = x / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6).float() * norm.weight
    torch.testing.assert_close(norm(x), ref)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias, no centring
    # bf16 input: normalised in fp32, the result rounded once (as LLaMA's reference does)
    xb = x.bfloat16()
    ref_b = norm.weight * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm(xb), ref_b)


def test_rmsnorm_is_scale_invariant_and_not_centring() -> None:
    norm = RMSNorm(8)
    x = torch.randn(4, 8) + 3.0
    torch.testing.assert_close(norm(x), norm(10 * x))
    assert norm(x).mean().abs() > 0.5  # a LayerNorm would give mean 0


# ----------------------------------------------------------------------------------------
# Rotary embeddings


def naive_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Reference RoPE with complex numbers: feature pair (x_i, x_{i+D/2}) is the complex number
    x_i + j x_{i+D/2}, multiplied by exp(j p theta^(-2i/D)) at position p (fp64)."""
    D = x.size(-1)
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions.double()[:, None] * freqs[None, :]  # (T, D/2)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_complex_reference(theta: float) -> None:
    D, L = 16, 40
    rope = RotaryEmbedding(D, L, rope_inverse_frequencies(D, theta))
    x = torch.randn(2, 3, 7, D)
    for start in (0, 5, 33):
        cos, sin = rope(start, 7)
        assert cos.shape == (7, D // 2)
        got = apply_rope(x, cos, sin)
        ref = naive_rope(x, torch.arange(start, start + 7), theta)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    D = 8
    rope = RotaryEmbedding(D, 64, rope_inverse_frequencies(D))
    q, k = torch.randn(D), torch.randn(D)

    def score(pq: int, pk: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, D), *rope(pq, 1))
        rk = apply_rope(k.view(1, 1, 1, D), *rope(pk, 1))
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(40, 36), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=1e-5)  # position 0: identity
    assert not torch.allclose(score(7, 3), score(7, 5))


def test_rope_tables_are_buffers_not_saved() -> None:
    model = GPT(llama_config())
    assert not any("rotary" in k or k.endswith((".cos", ".sin")) for k in model.state_dict())
    assert model.rotary.cos.shape == (BS, 4)  # head size 8 -> 4 rotation speeds
    assert "transformer.wpe.weight" not in model.state_dict()


def test_rope_scaling_inverse_frequencies() -> None:
    D = 64
    base = rope_inverse_frequencies(D, 10000.0)
    torch.testing.assert_close(rope_inverse_frequencies(D, 10000.0, "linear", 4.0), base / 4)
    ll3 = rope_inverse_frequencies(D, 10000.0, "llama3", 8.0, 1.0, 4.0, 64)
    wavelen = 2 * math.pi / base
    fast, slow = wavelen < 64 / 4, wavelen > 64 / 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(ll3[fast], base[fast])  # short wavelengths untouched
    torch.testing.assert_close(ll3[slow], base[slow] / 8)  # long ones fully scaled
    mid = ~fast & ~slow
    assert torch.all(ll3[mid] < base[mid]) and torch.all(ll3[mid] > base[mid] / 8)
    with pytest.raises(ValueError, match="rope scaling"):
        rope_inverse_frequencies(D, 10000.0, "yarn")


# ----------------------------------------------------------------------------------------
# Grouped-query attention


def make_gqa(n_kv_head: int, seed: int = 0, C: int = 32, H: int = 4) -> CausalSelfAttention:
    torch.manual_seed(seed)
    attn = CausalSelfAttention(C, H, 0.0, False, n_kv_head=n_kv_head)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.eval()


def as_mha(gqa: CausalSelfAttention) -> CausalSelfAttention:
    """The same attention with every key/value head repeated for its group of query heads."""
    H, G, D = gqa.n_head, gqa.n_kv_head, gqa.head_size
    mha = CausalSelfAttention(H * D, H, 0.0, False)
    q, k, v = gqa.c_attn.weight.split((H * D, G * D, G * D))

    def repeat(w: torch.Tensor) -> torch.Tensor:  # (G*D, C) -> (H*D, C), head g -> heads g*H/G..
        return w.view(G, D, -1).repeat_interleave(H // G, dim=0).reshape(H * D, -1)

    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        mha.c_proj.weight.copy_(gqa.c_proj.weight)
    return mha.eval()


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head: int) -> None:
    gqa = make_gqa(n_kv_head)
    assert gqa.c_attn.weight.shape == ((4 + 2 * n_kv_head) * 8, 32)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), as_mha(gqa)(x))


def test_gqa_with_one_kv_head_is_multi_query() -> None:
    """n_kv_head=1: every query head attends with the same keys and values (MQA)."""
    attn = make_gqa(1)
    x = torch.randn(2, 6, 32)
    D = 8
    with torch.no_grad():
        q, k, v = attn.c_attn(x).split((4 * D, D, D), dim=-1)
        heads = []
        for h in range(4):
            scores = q[..., h * D : (h + 1) * D] @ k.transpose(1, 2) / math.sqrt(D)
            scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        ref = attn.c_proj(torch.cat(heads, dim=-1))
        torch.testing.assert_close(attn(x), ref)


def test_attention_function_gqa_matches_repeat_interleave() -> None:
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), ref)


def test_gqa_kv_cache_holds_only_kv_heads() -> None:
    attn = make_gqa(2)
    x = torch.randn(2, 10, 32)
    cache = KVCache(1, 2, 2, 16, 8, torch.device("cpu"), torch.float32)
    rope = RotaryEmbedding(8, 16, rope_inverse_frequencies(8))
    outs = []
    with torch.no_grad():
        full = attn(x, rope=rope(0, 10))
        for lo, hi in [(0, 4), (4, 7), (7, 8), (8, 9), (9, 10)]:
            outs.append(attn(x[:, lo:hi], cache, 0, rope(lo, hi - lo)))
            cache.length += hi - lo
    assert cache.keys[0].shape == (2, 2, 16, 8)
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_attention_rejects_bad_kv_heads() -> None:
    with pytest.raises(ValueError, match="n_kv_head"):
        CausalSelfAttention(32, 4, 0.0, False, n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(llama_config(n_kv_head=3))


def test_head_dim_independent_of_width() -> None:
    attn = CausalSelfAttention(30, 4, 0.0, False, n_kv_head=2, head_size=6)
    assert attn.c_attn.weight.shape == ((4 + 4) * 6, 30) and attn.c_proj.weight.shape == (30, 24)
    model = GPT(llama_config(n_embd=30, head_dim=6))
    assert model(tokens(1, 5))[0].shape == (1, 5, V)


# ----------------------------------------------------------------------------------------
# SwiGLU


def test_swiglu_matches_formula() -> None:
    torch.manual_seed(3)
    mlp = GatedMLP(16, 0.0, False, hidden=24).eval()
    assert mlp.c_fc.weight.shape == (48, 16) and mlp.c_proj.weight.shape == (16, 24)
    x = torch.randn(2, 5, 16)
    gate_w, up_w = mlp.c_fc.weight[:24], mlp.c_fc.weight[24:]
    a = x @ gate_w.T
    ref = ((a * torch.sigmoid(a)) * (x @ up_w.T)) @ mlp.c_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref)
    assert mlp.c_fc.bias is None and mlp.c_proj.bias is None


def test_llama_block_is_pre_rmsnorm_residual() -> None:
    torch.manual_seed(6)
    block = Block(32, 4, 0.0, False, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", intermediate_size=40,
                  n_kv_head=2).eval()
    assert isinstance(block.ln_1, RMSNorm) and isinstance(block.mlp, GatedMLP)
    rope = RotaryEmbedding(8, 16, rope_inverse_frequencies(8))(0, 7)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        h = x + block.attn(F.rms_norm(x, (32,), block.ln_1.weight, 1e-6), rope=rope)
        ref = h + block.mlp(F.rms_norm(h, (32,), block.ln_2.weight, 1e-6))
        torch.testing.assert_close(block(x, rope=rope), ref)


# ----------------------------------------------------------------------------------------
# Config


def test_defaults_are_gpt2_and_old_configs_load() -> None:
    c = GPTConfig()
    assert (c.norm, c.pos_embedding, c.mlp, c.n_kv_head, c.tie_embeddings, c.norm_eps) == (
        "layernorm", "learned", "gelu", 0, True, 1e-5)
    old = {"model_type": "fromzero-gpt", "vocab_size": V, "block_size": BS, "n_layer": 1, "n_head": 2,
           "n_embd": 16, "dropout": 0.0, "bias": True}  # a config.json written before these fields
    model = GPT(GPTConfig.from_dict(old))
    assert "transformer.wpe.weight" in model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(norm="batchnorm"), "model.norm must be one of"),
        (dict(pos_embedding="alibi"), "model.pos_embedding"),
        (dict(mlp="moe"), "model.mlp"),
        (dict(activation="tanh"), "model.activation"),
        (dict(rope_scaling="yarn"), "model.rope_scaling"),
        (dict(n_kv_head=3), "model.n_kv_head"),
        (dict(n_kv_head=8), "model.n_kv_head"),
        (dict(intermediate_size=-1), "model.intermediate_size"),
        (dict(norm_eps=0.0), "model.norm_eps"),
        (dict(rope_theta=-1.0), "model.rope_theta"),
        (dict(head_dim=7), "even head size"),
        (dict(rope_scaling="llama3", rope_scaling_factor=8.0), "rope_original_block_size"),
        (dict(rope_scaling="linear", rope_scaling_factor=0.0), "rope_scaling_factor"),
    ],
)
def test_config_rejects_bad_llama_fields(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        llama_config(**kw).validate()


def test_recipe_overrides_select_llama_style() -> None:
    overrides = ["--model.vocab_size", "50", "--model.norm", "rmsnorm", "--model.pos_embedding", "rope",
                 "--model.mlp", "swiglu", "--model.n_kv_head", "4", "--model.tie_embeddings", "false"]
    cfg = load_pretrain_config(None, overrides)
    assert cfg.model.norm == "rmsnorm" and cfg.model.n_kv_head == 4 and cfg.model.tie_embeddings is False
    with pytest.raises(FromzeroError, match="model.norm must be one of"):
        load_pretrain_config(None, ["--model.norm", "rms"])


# ----------------------------------------------------------------------------------------
# The LLaMA-style model


def test_llama_style_parameter_names_and_shapes() -> None:
    model = llama_model()
    state = model.state_dict()
    D, G, I = 8, 2, 48
    expected = {
        "transformer.wte.weight": (V, 32),
        "transformer.h.0.ln_1.weight": (32,),
        "transformer.h.0.attn.c_attn.weight": ((4 + 2 * G) * D, 32),
        "transformer.h.0.attn.c_proj.weight": (32, 32),
        "transformer.h.0.ln_2.weight": (32,),
        "transformer.h.0.mlp.c_fc.weight": (2 * I, 32),
        "transformer.h.0.mlp.c_proj.weight": (32, I),
        "transformer.ln_f.weight": (32,),
        "lm_head.weight": (V, 32),
    }
    assert {k: tuple(v.shape) for k, v in state.items() if ".h.1." not in k} == expected
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied head
    assert model.num_params() == sum(p.numel() for p in model.parameters())  # no wpe to exclude


def test_qwen2_style_qkv_bias_only() -> None:
    model = GPT(llama_config(qkv_bias=True))
    biases = sorted(n for n, _ in model.named_parameters() if n.endswith("bias"))
    assert biases == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]


def test_llama_style_causality_and_loss() -> None:
    model = llama_model(sharpen=4.0)
    idx = tokens(2, 12)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)
    logits, loss = model(idx, tokens(2, 12, seed=1))
    assert loss.shape == () and torch.isfinite(loss)


def test_llama_style_trains_with_bf16_autocast() -> None:
    model = llama_model(sharpen=4.0).train()
    idx, targets = tokens(4, BS), tokens(4, BS, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("prefill", [1, 6])
def test_llama_cached_forward_matches_full_forward(prefill: int) -> None:
    model = llama_model(sharpen=4.0)
    idx = tokens(2, BS)
    cache = model.new_kv_cache(2)
    assert cache.keys[0].shape == (2, 2, BS, 8)  # G = 2 key/value heads are cached, not 4
    with torch.no_grad():
        model(idx[:, :prefill], kv_cache=cache)
        for t in range(prefill, BS):
            logits, _ = model(idx[:, t : t + 1], kv_cache=cache, last_only=True)
            full, _ = model(idx[:, : t + 1])
            torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,T,new", [(1, 4, 8), (3, 10, 20), (2, BS + 5, 4)])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_llama_generate_cache_equals_no_cache(B: int, T: int, new: int, temperature: float) -> None:
    model = llama_model(seed=1, sharpen=4.0)
    idx = tokens(B, T, seed=2)
    kw = dict(max_new_tokens=new, temperature=temperature, top_k=10)
    a = model.generate(idx, generator=torch.Generator().manual_seed(5), use_cache=True, **kw)
    b = model.generate(idx, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert a.shape == (B, T + new) and torch.equal(a, b)


# ----------------------------------------------------------------------------------------
# Decode layout (column-major weights for one-token steps on CPU)


def _is_column_major(model: GPT) -> list[bool]:
    return [m.weight.t().is_contiguous() and not m.weight.is_contiguous()
            for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_decode_layout_keeps_values_and_is_undone_by_train() -> None:
    model = llama_model(sharpen=4.0, tie_embeddings=True)
    idx = tokens(1, 5)
    with torch.no_grad():
        before, _ = model(idx)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.generate(idx, max_new_tokens=4, temperature=0.0)  # batch 1, eval: switches
    assert all(_is_column_major(model))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], before, atol=1e-5, rtol=1e-5)
    model.generate(tokens(3, 5), max_new_tokens=2, temperature=0.0)  # batch 3: row-major again
    assert not any(_is_column_major(model))
    model.generate(idx, max_new_tokens=2, temperature=0.0)
    model.train()
    assert not any(_is_column_major(model))
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(model.eval().generate(idx, max_new_tokens=4, temperature=0.0), out)


def test_generate_in_training_mode_keeps_layout() -> None:
    model = llama_model().train()
    model.generate(tokens(1, 3), max_new_tokens=2)
    assert model.training and not any(_is_column_major(model))


def test_set_linear_weight_layout_round_trip() -> None:
    lin = torch.nn.Linear(5, 3)
    w = lin.weight.detach().clone()
    set_linear_weight_layout(lin, True)
    assert lin.weight.stride() == (1, 3) and torch.equal(lin.weight, w)
    x = torch.randn(2, 5)
    torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias))
    set_linear_weight_layout(lin, False)
    assert lin.weight.stride() == (5, 1) and torch.equal(lin.weight, w)
