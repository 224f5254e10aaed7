"""Transformer building blocks shared by fromzero's model families.

Everything here is plain PyTorch: attention goes through ``F.scaled_dot_product_attention``
(which picks the flash / memory-efficient / math kernel for the device), and parameter names
follow GPT-2 (``c_attn``, ``c_proj``, ``c_fc``) so Hugging Face weights map one to one.

Shapes use B = batch, T = sequence length (new tokens), S = cached + new tokens,
H = heads, D = head size, C = embedding width (H * D).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    Buffers are preallocated to ``max_len`` so a generation step never reallocates;
    ``length`` is how many positions are filled (the same for every layer).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (B, H, T, D) at the current position; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


# Below this sequence length, compiled CPU code uses the math SDPA backend (see attention()).
CPU_MATH_ATTENTION_MAX_LEN = 256


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for (B, H, T, D) tensors, via F.scaled_dot_product_attention.

    On GPUs PyTorch picks its flash / memory-efficient kernels. On CPUs two measured facts
    (torch 2.14, 2 cores, T = 64) decide the path:
    1. the CPU flash kernel's backward is ~6x slower in bf16 than in fp32, so the attention core
       runs in fp32 (the bf16 projections around it keep their speed);
    2. under torch.compile the math backend (matmuls + softmax, fused by inductor) beats the
       flash kernel for short sequences: the whole Shakespeare training step got ~1.2x faster.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
        )
    dtype = q.dtype
    use_math = torch.compiler.is_compiling() and k.size(-2) <= CPU_MATH_ATTENTION_MAX_LEN
    backend = sdpa_kernel([SDPBackend.MATH]) if use_math else contextlib.nullcontext()
    with torch.autocast("cpu", enabled=False), backend:
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal,
        )
    return y.to(dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection (GPT-2's ``c_attn``)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.head_size = n_embd // n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)  # back into the residual stream
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, H, T, D): every head attends independently.
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)

        if kv_cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # (B, H, S, D) with S = past + T
            if T == 1:
                # One new token may see every cached position: no mask needed.
                y = attention(q, k, v)
            elif past == 0:
                y = attention(q, k, v, is_causal=True)  # a fresh prefill
            else:
                # New token i (absolute position past + i) sees keys 0 .. past + i.
                S = k.size(2)
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Under torch.compile it is written as x * sigmoid(2z), the same function
    (0.5 (1 + tanh(z)) = sigmoid(2z)), because the CPU code generator vectorises sigmoid far
    better than tanh (forward + backward ~2x faster, measured); eager mode keeps PyTorch's
    fused kernel.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU, project back (GPT-2's ``c_fc``/``c_proj``)."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU; use it so its weights match.
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # the residual stream carries x
        x = x + self.mlp(self.ln_2(x))
        return x
