"""Tests for the transformer building blocks (fromzero.models.layers).

The attention module is compared with a naive from-scratch reference (explicit scores,
causal mask, softmax) so that a wrong SDPA call (missing mask, wrong head split, wrong
scaling) shows up as a numeric mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fromzero.models.layers import MLP, Block, CausalSelfAttention, KVCache

C, H = 32, 4  # width and heads of the tiny modules used below
D = C // H


def naive_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference causal self-attention written out by hand (no SDPA)."""
    B, T, _ = x.shape
    W, b = attn.c_attn.weight, attn.c_attn.bias
    qkv = x @ W.T + (b if b is not None else 0.0)  # (B, T, 3C)
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, T, H, D).permute(0, 2, 1, 3)  # (B, H, T, D)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    y = (weights @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    out = y @ attn.c_proj.weight.T
    if attn.c_proj.bias is not None:
        out = out + attn.c_proj.bias
    return out


def make_attention(seed: int = 0, bias: bool = True, dropout: float = 0.0) -> CausalSelfAttention:
    torch.manual_seed(seed)
    attn = CausalSelfAttention(C, H, dropout, bias)
    with torch.no_grad():  # non-trivial weights and biases (default bias init is fine too)
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.eval()


# ----------------------------------------------------------------------------------------
# Attention vs the naive reference


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_attention_matches_naive_reference(bias: bool, T: int) -> None:
    attn = make_attention(seed=T, bias=bias)
    x = torch.randn(3, T, C)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), naive_attention(attn, x))


def test_naive_reference_is_sensitive_to_the_mask() -> None:
    # Guard against a reference that would agree with anything: without the causal mask the
    # outputs of early positions are different.
    attn = make_attention(seed=1)
    x = torch.randn(2, 6, C)
    with torch.no_grad():
        y = attn(x)
        qkv = attn.c_attn(x)
        q, k, v = (t.view(2, 6, H, D).transpose(1, 2) for t in qkv.split(C, dim=2))
        unmasked = F.scaled_dot_product_attention(q, k, v)
        unmasked = attn.c_proj(unmasked.transpose(1, 2).reshape(2, 6, C))
    assert not torch.allclose(y[:, 0], unmasked[:, 0], atol=1e-4)
    # The last position sees everything in both cases.
    torch.testing.assert_close(y[:, -1], unmasked[:, -1])


def test_attention_with_kv_cache_matches_naive_reference() -> None:
    attn = make_attention(seed=3)
    B, T = 2, 12
    x = torch.randn(B, T, C)
    ref = naive_attention(attn, x)
    cache = KVCache(1, B, H, 16, D, torch.device("cpu"), torch.float32)
    outs = []
    with torch.no_grad():
        # A multi-token prefill, a multi-token chunk on top of a non-empty cache (needs the
        # offset causal mask), then one token at a time.
        for lo, hi in [(0, 4), (4, 9), (9, 10), (10, 11), (11, 12)]:
            outs.append(attn(x[:, lo:hi], cache, 0))
            cache.length += hi - lo
    torch.testing.assert_close(torch.cat(outs, dim=1), ref)


def test_attention_rejects_indivisible_width() -> None:
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(30, 4, 0.0, True)


def test_attention_dropout_only_in_training() -> None:
    attn = make_attention(seed=4, dropout=0.5)
    x = torch.randn(2, 8, C)
    with torch.no_grad():
        attn.eval()
        torch.testing.assert_close(attn(x), attn(x))
        torch.testing.assert_close(attn(x), naive_attention(attn, x))
        attn.train()
        a, b = attn(x), attn(x)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------
# KV cache


def test_kv_cache_update_returns_filled_prefix() -> None:
    cache = KVCache(2, 1, H, 8, D, torch.device("cpu"), torch.float32)
    assert cache.length == 0 and cache.max_len == 8
    assert cache.keys[0].shape == (1, H, 8, D)
    k1, v1 = torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)
    k, v = cache.update(1, k1, v1)
    assert k.shape == (1, H, 3, D)
    torch.testing.assert_close(k, k1)
    torch.testing.assert_close(v, v1)
    assert cache.keys[0].abs().sum() == 0  # other layer untouched
    cache.length = 3  # the model advances the length once per forward, not update()
    k2, v2 = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)
    k, v = cache.update(1, k2, v2)
    torch.testing.assert_close(k, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(v, torch.cat([v1, v2], dim=2))
    cache.reset()
    assert cache.length == 0


def test_kv_cache_overflow_raises() -> None:
    cache = KVCache(1, 1, H, 4, D, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.zeros(1, H, 5, D), torch.zeros(1, H, 5, D))
    cache.length = 3
    cache.update(0, torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D))  # exactly full: fine
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.zeros(1, H, 2, D), torch.zeros(1, H, 2, D))


# ----------------------------------------------------------------------------------------
# MLP and Block


def test_mlp_is_gelu_tanh_between_expand_and_project() -> None:
    torch.manual_seed(5)
    mlp = MLP(C, 0.0, True).eval()
    assert mlp.c_fc.weight.shape == (4 * C, C)
    assert mlp.c_proj.weight.shape == (C, 4 * C)
    x = torch.randn(2, 3, C)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    ref = h @ mlp.c_proj.weight.T + mlp.c_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref)


def test_block_is_pre_layernorm_residual() -> None:
    torch.manual_seed(6)
    block = Block(C, H, 0.0, True).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
        x = torch.randn(2, 7, C)
        h = x + naive_attention(block.attn, F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias))
        ref = h + block.mlp(F.layer_norm(h, (C,), block.ln_2.weight, block.ln_2.bias))
        torch.testing.assert_close(block(x), ref)


def test_block_without_bias_has_no_bias_parameters() -> None:
    block = Block(C, H, 0.0, False)
    names = [n for n, _ in block.named_parameters()]
    assert names and not any(n.endswith("bias") for n in names)


# ----------------------------------------------------------------------------------------
# bf16 on CPU


def test_bf16_cpu_attention_core_runs_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU autocast the projections are bf16 but SDPA gets fp32 (see layers.py)."""
    attn = make_attention(seed=7)
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        out = real(q, k, v, *args, **kwargs)
        seen.append(out.dtype)  # the dtype the core really ran in (autocast would give bf16)
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(2, 8, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x)
    assert seen == [torch.float32]
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        ref = naive_attention(attn, x)
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


def test_bf16_cpu_attention_gradients_close_to_fp32() -> None:
    attn = make_attention(seed=8).train()  # training path (dropout 0)
    x = torch.randn(2, 10, C)
    target = torch.randn(2, 10, C)

    def grads(autocast: bool) -> dict[str, torch.Tensor]:
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = attn(x)
        loss = ((y.float() - target) ** 2).mean()
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in attn.named_parameters()}

    g32, g16 = grads(False), grads(True)
    for name in g32:
        assert g16[name].dtype == torch.float32
        rel = (g16[name] - g32[name]).norm() / g32[name].norm()
        assert rel < 0.05, f"{name}: relative gradient error {rel:.3f}"
