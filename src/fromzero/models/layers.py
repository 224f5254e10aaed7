"""Transformer building blocks shared by fromzero's model families.

Everything here is plain PyTorch: attention goes through ``F.scaled_dot_product_attention``
(which picks the flash / memory-efficient / math kernel for the device), and parameter names
follow GPT-2 (``c_attn``, ``c_proj``, ``c_fc``) so Hugging Face weights map one to one.

Two styles of decoder block are built from the same pieces:

* GPT-2: LayerNorm, learned positions (added outside the block), GELU MLP, biases.
* LLaMA: :class:`RMSNorm`, rotary position embeddings (:class:`RotaryEmbedding`, applied to
  queries and keys inside attention), grouped-query attention (fewer key/value heads than
  query heads) and a gated SwiGLU MLP (:class:`GatedMLP`), no biases.

Shapes use B = batch, T = sequence length (new tokens), S = cached + new tokens,
H = query heads, G = key/value heads (G divides H; G = H is plain multi-head attention),
D = head size, C = embedding width.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def kv_buffers(n_layer: int, shape: tuple[int, int, int, int], device: torch.device,
               dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed key and value buffers of ``shape`` (rows, G, L, D) for every layer."""
    keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
    values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
    return keys, values


class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    Buffers are preallocated to ``max_len`` so a generation step never reallocates;
    ``length`` is how many positions are filled (the same for every layer). ``n_head`` is the
    number of key/value heads (G, fewer than the query heads with grouped-query attention).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.keys, self.values = kv_buffers(n_layer, (batch_size, n_head, max_len, head_size), device, dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (B, G, T, D) at the current position; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0

    @classmethod
    def wrap(cls, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0) -> "KVCache":
        """A cache over existing (B, G, L, D) buffers, e.g. views of one row of a
        :class:`RaggedKVCache`, so a prefill writes straight into them (no copy)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = list(keys), list(values)
        cache.max_len = keys[0].size(2)
        cache.length = length
        return cache


class RaggedKVCache:
    """Key/value buffers for decoding a batch of sequences of different lengths (serving).

    Row r of every layer's (R, G, L, D) buffers holds one sequence, of which ``lengths[r]``
    positions are filled; rows ``0 .. rows - 1`` are in use. A forward pass of (rows, T) new
    tokens (see ``GPT.forward``) places every row at its own positions ``lengths[r] ..
    lengths[r] + T - 1``: position embeddings and rotary angles are per row, new keys and values
    are written at each row's own columns, and :attr:`attn_mask` lets row r's query at position
    p see only that row's columns 0 .. p. Columns past a row's length hold stale values of an
    earlier occupant or of a longer neighbour; the mask hides them, so each row computes what it
    would alone (up to float rounding of the masked matmuls).

    Rows come and go between steps (continuous batching): :meth:`append_row` + :meth:`row`
    prefill a new sequence with the ordinary one-sequence path, writing straight into its row;
    :meth:`remove_row` frees a row by moving the last row into it, so rows in use stay
    contiguous and every step works on plain slices of the buffers.
    """

    def __init__(self, n_layer: int, max_rows: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.keys, self.values = kv_buffers(n_layer, (max_rows, n_head, max_len, head_size), device, dtype)
        self.max_rows, self.max_len = max_rows, max_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.lengths: list[int] = []  # filled positions of each row in use (host side: no syncs)
        self.attn_mask: torch.Tensor | None = None  # (rows, 1, T, S) of the step being run
        self._write_rows: torch.Tensor | None = None
        self._write_cols: torch.Tensor | None = None
        self._span = 0

    @property
    def rows(self) -> int:
        """Rows in use (the batch size of the next forward pass)."""
        return len(self.lengths)

    def append_row(self) -> int:
        """Take the next free row (empty); returns its index."""
        if self.rows >= self.max_rows:
            raise ValueError(f"ragged KV cache is full: {self.max_rows} rows in use")
        self.lengths.append(0)
        return self.rows - 1

    def row(self, r: int) -> KVCache:
        """Row ``r`` as a one-sequence :class:`KVCache` sharing these buffers (for its prefill).

        After running the model on it, record its length with ``lengths[r] = cache.length``.
        """
        return KVCache.wrap([k[r : r + 1] for k in self.keys], [v[r : r + 1] for v in self.values],
                            self.lengths[r])

    def remove_row(self, r: int) -> int:
        """Free row ``r``: the last row moves into it. Returns the old index of the moved row
        (== ``r`` when ``r`` was the last row: nothing moved)."""
        last = self.rows - 1
        if r != last:
            n = self.lengths[last]
            for buf in (*self.keys, *self.values):
                buf[r, :, :n] = buf[last, :, :n]
            self.lengths[r] = n
        self.lengths.pop()
        return last

    def begin(self, T: int) -> torch.Tensor:
        """Prepare a forward pass of T new tokens per row; returns their positions (rows, T)."""
        if self.rows == 0:
            raise ValueError("ragged KV cache has no rows in use")
        end = max(self.lengths) + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.device)  # (R,)
        pos = lengths[:, None] + torch.arange(T, device=self.device)  # (R, T)
        cols = torch.arange(end, device=self.device)  # (S,)
        # Row r's query at position p sees that row's columns 0 .. p (its past and itself). An
        # additive mask (0 / -inf), built once per step: SDPA would convert a boolean one in
        # every layer.
        hidden = cols[None, None, None, :] > pos[:, None, :, None]  # (R, 1, T, S)
        self.attn_mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(
            hidden, float("-inf"))
        self._write_rows = torch.arange(self.rows, device=self.device)[:, None].expand(-1, T)
        self._write_cols = pos
        self._span = end
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (R, G, T, D) at each row's own next columns; return the (R, G, S, D)
        keys/values the step attends over (S = the longest row after this step)."""
        R = self.rows
        # Advanced indices on dims 0 and 2 (split by a slice) put their (R, T) dims first.
        self.keys[layer][self._write_rows, :, self._write_cols] = k.transpose(1, 2)
        self.values[layer][self._write_rows, :, self._write_cols] = v.transpose(1, 2)
        return self.keys[layer][:R, :, : self._span], self.values[layer][:R, :, : self._span]

    def advance(self, T: int) -> None:
        """Count the T positions the finished forward pass added to every row."""
        self.lengths = [n + T for n in self.lengths]
        self.attn_mask = self._write_rows = self._write_cols = None


# Below this sequence length, compiled CPU code uses the math SDPA backend (see attention()).
CPU_MATH_ATTENTION_MAX_LEN = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for (B, H, T, D) tensors, via F.scaled_dot_product_attention.

    ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query attention, (B, G, S, D)):
    query head h then reads key/value head h // (H / G), as in LLaMA's ``repeat_kv``.

    On GPUs PyTorch picks its flash / memory-efficient kernels. On CPUs (measured, torch 2.14):
    when training, the core runs in fp32, since the CPU flash kernel's backward is ~6x slower in
    bf16; under torch.compile short sequences take the math backend, which inductor fuses
    (faster than flash there). With attention dropout (math backend anyway) or without
    gradients (generation, evaluation) the inputs' dtype is kept: the casts would only cost.
    """
    # SDPA maps each group of query heads to its key/value head itself (enable_gqa).
    gqa = {"enable_gqa": True} if k.size(-3) != q.size(-3) else {}
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **gqa
        )
    if (dropout_p > 0 and not torch.compiler.is_compiling()) or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **gqa
        )
    dtype = q.dtype
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()  # an additive mask joins the fp32 core below
    use_math = torch.compiler.is_compiling() and k.size(-2) <= CPU_MATH_ATTENTION_MAX_LEN
    backend = sdpa_kernel([SDPBackend.MATH]) if use_math else contextlib.nullcontext()
    with torch.autocast("cpu", enabled=False), backend:
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, **gqa,
        )
    return y.to(dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE)


def rope_inverse_frequencies(head_size: int, theta: float = 10000.0, scaling: str = "none",
                             factor: float = 1.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                             original_max_len: int = 0) -> torch.Tensor:
    """The D/2 rotation speeds of RoPE: theta^(-2i/D), optionally rescaled. Returns fp32 (D/2,).

    scaling: ``none``; ``linear`` (position interpolation: every speed divided by ``factor``);
    ``llama3`` (Llama 3.1: slow rotations, whose wavelength exceeds
    ``original_max_len / low_freq_factor``, are divided by ``factor``; fast ones, shorter than
    ``original_max_len / high_freq_factor``, are kept; those in between are blended).
    Computed with the same fp32 operations as ``transformers``, so the angles match exactly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        low_freq_wavelen = original_max_len / low_freq_factor
        high_freq_wavelen = original_max_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unknown rope scaling {scaling!r} (none, linear or llama3)")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables of rotary position embeddings for positions 0 .. max_len-1.

    Position p rotates each pair of query/key features (x_i, x_{i + D/2}) by the angle
    p * inv_freq_i. The pairing is LLaMA's "rotate_half" convention as implemented in
    ``transformers`` (first half / second half of the head), so Hugging Face q/k projection
    weights are used as they are, without permuting rows. Because the rotation of a query at
    position p against a key at position s only depends on p - s, attention scores see relative
    positions. The tables are non-persistent buffers: never saved, rebuilt from the config.
    """

    def __init__(self, head_size: int, max_len: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        if head_size % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head size, got {head_size}")
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions start .. start+length-1, each (length, D/2)."""
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for per-row positions (B, T), each (B, 1, T, D/2): broadcast over heads."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by the angles of their positions (cos/sin: (T, D/2),
    or (B, 1, T, D/2) when each row has its own positions).

    With x = (x1, x2) split in halves this is x1 cos - x2 sin, x2 cos + x1 sin: the same
    numbers as ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``, with half the table.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA): x / sqrt(mean(x^2) + eps) * weight. No centring, no bias.

    Cheaper than LayerNorm and, for LLaMA-style models, as good. Low-precision inputs are
    normalised in fp32 and cast back before the gain, as LLaMA's reference does.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``layernorm`` (GPT-2; with a bias when ``bias``) or ``rmsnorm`` (LLaMA; never a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r} (layernorm or rmsnorm)")


# ---------------------------------------------------------------------------------------------
# Linear layers


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies a single bf16/fp16 row as a matrix-vector product on CPU.

    Decoding one token streams every weight from memory for one row: ``F.linear``'s bf16 product
    does not run at memory speed on CPU, ``torch.mv`` over the same weights does (measured: a
    135M LLaMA's decoding step 39 -> 27 ms). Same parameters and names as ``nn.Linear`` (LoRA,
    quantization and checkpoints see an ``nn.Linear``); every other case is ``F.linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w.dtype in (torch.bfloat16, torch.float16) and x.numel() == self.in_features
                and x.device.type == "cpu" and w.is_contiguous()):
            y = torch.mv(w, x.reshape(-1))  # (out,)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


# ---------------------------------------------------------------------------------------------
# Attention


class CausalSelfAttention(nn.Module):
    """Causal self-attention with a fused QKV projection (GPT-2's ``c_attn``).

    ``c_attn`` produces H query heads, then G key heads, then G value heads ((H + 2G) * D
    outputs); G = ``n_kv_head`` < H is grouped-query attention (G = 1: multi-query), which
    shrinks the KV cache H/G times. ``rope`` (cos, sin) rotates queries and keys by position.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, *, n_kv_head: int = 0,
                 head_size: int = 0, qkv_bias: bool = False) -> None:
        super().__init__()
        if head_size == 0 and n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_head ({n_kv_head})")
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_size = head_size or n_embd // n_head
        D = self.head_size
        # q, k, v in one matmul; Qwen2 has biases here only (qkv_bias).
        self.c_attn = Linear(n_embd, (n_head + 2 * n_kv_head) * D, bias=bias or qkv_bias)
        self.c_proj = Linear(n_head * D, n_embd, bias=bias)  # back into the residual stream
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | RaggedKVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_size
        # (B, T, (H + 2G) * D) -> (B, H + 2G, T, D): every head attends independently.
        qkv = self.c_attn(x).view(B, T, H + 2 * G, D).transpose(1, 2)
        qk, v = qkv.split((H + G, G), dim=1)
        if rope is not None:
            # Queries and keys turn by the same angles: rotate them as one tensor (half the
            # small ops of a decoding step's rotary). Keys are cached rotated.
            qk = apply_rope(qk, *rope)
        q, k = qk.split((H, G), dim=1)

        if isinstance(kv_cache, RaggedKVCache):
            # Rows of different lengths: each row's mask covers its own past only.
            k, v = kv_cache.update(layer, k, v)  # (B, G, S, D)
            y = attention(q, k, v, attn_mask=kv_cache.attn_mask)
        elif kv_cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # (B, G, S, D) with S = past + T
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
        y = y.transpose(1, 2).reshape(B, T, H * D)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


# ---------------------------------------------------------------------------------------------
# Feed-forward


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Under torch.compile it is written as x * sigmoid(2z), the same function, because the CPU
    code generator vectorises sigmoid far better than tanh; eager mode keeps PyTorch's kernel.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


# Activation functions by config name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": gelu_tanh,  # GPT-2 ("gelu_new"), Gemma ("gelu_pytorch_tanh")
    "gelu": F.gelu,  # exact erf GELU (BERT)
    "silu": F.silu,  # a.k.a. swish: LLaMA's gate
    "relu": F.relu,
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP / some ViTs."""
    return x * torch.sigmoid(1.702 * x)


# The same functions under the names Hugging Face configs use (``hidden_act``), for the
# encoders converted from HF (BERT, ViT). HF's "gelu" is the exact (erf) GELU; "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation (one formula, two kernels: equal to ~1e-7).
HF_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (one of {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Position-wise feed-forward: expand (4x by default), activate, project back.

    GPT-2's ``c_fc``/``c_proj``; GPT-2 was trained with the tanh approximation of GELU, the
    default, so its weights match.
    """

    def __init__(self, n_embd: int, dropout: float, bias: bool, *, hidden: int = 0,
                 activation: str = "gelu_tanh") -> None:
        super().__init__()
        hidden = hidden or 4 * n_embd
        self.c_fc = Linear(n_embd, hidden, bias=bias)
        self.c_proj = Linear(hidden, n_embd, bias=bias)
        self.act = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GatedMLP(nn.Module):
    """Gated feed-forward (SwiGLU with silu, LLaMA): c_proj(act(x W_gate) * (x W_up)).

    The gate and up projections are fused into one ``c_fc`` matmul: its first ``hidden``
    outputs are the gate (LLaMA's ``gate_proj``), the next ``hidden`` the values (``up_proj``);
    ``c_proj`` is ``down_proj``.
    """

    def __init__(self, n_embd: int, dropout: float, bias: bool, *, hidden: int = 0,
                 activation: str = "silu") -> None:
        super().__init__()
        self.hidden = hidden or 4 * n_embd
        self.c_fc = Linear(n_embd, 2 * self.hidden, bias=bias)
        self.c_proj = Linear(self.hidden, n_embd, bias=bias)
        self.act = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.c_proj(self.act(gate) * up))


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2's, BERT's and ViT's initialisation (for ``model.apply``): normal(0, std) weights of
    Linear, Conv2d and Embedding layers, an embedding's padding row zero, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
        if getattr(module, "padding_idx", None) is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


# ---------------------------------------------------------------------------------------------
# Weight memory layout for decoding


def set_linear_weight_layout(module: nn.Module, column_major: bool) -> None:
    """Store the weight of every ``nn.Linear`` in ``module`` column- or row-major, in place.

    Values, shapes, parameter names and tying stay the same; only the order in memory changes.
    Column-major is the (in, out) layout of GPT-2's ``Conv1D``. On CPU (measured) a matmul with
    one or two rows, as in one-token decoding, reads it ~1.25-1.7x faster; with 4 or more rows
    row-major is faster, ~2x for training batches. Hence row-major everywhere, and
    :meth:`fromzero.models.gpt.GPT.generate` switching to column-major for small-batch CPU decoding.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2:
            w = m.weight
            if column_major and not w.t().is_contiguous():
                w.data = w.data.t().contiguous().t()
            elif not column_major and not w.is_contiguous():
                w.data = w.data.contiguous()


# ---------------------------------------------------------------------------------------------
# Block


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Defaults are GPT-2's block; ``norm="rmsnorm", mlp="swiglu", bias=False`` (plus rope passed
    to forward) is LLaMA's.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, *, norm: str = "layernorm",
                 norm_eps: float = 1e-5, mlp: str = "gelu", activation: str = "", intermediate_size: int = 0,
                 n_kv_head: int = 0, head_size: int = 0, qkv_bias: bool = False) -> None:
        super().__init__()
        self.ln_1 = make_norm(norm, n_embd, norm_eps, bias)
        self.attn = CausalSelfAttention(
            n_embd, n_head, dropout, bias, n_kv_head=n_kv_head, head_size=head_size, qkv_bias=qkv_bias
        )
        self.ln_2 = make_norm(norm, n_embd, norm_eps, bias)
        if mlp == "gelu":
            self.mlp = MLP(n_embd, dropout, bias, hidden=intermediate_size, activation=activation or "gelu_tanh")
        elif mlp == "swiglu":
            self.mlp = GatedMLP(n_embd, dropout, bias, hidden=intermediate_size, activation=activation or "silu")
        else:
            raise ValueError(f"unknown mlp {mlp!r} (gelu or swiglu)")

    def forward(self, x: torch.Tensor, kv_cache: KVCache | RaggedKVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope)  # the residual stream carries x
        x = x + self.mlp(self.ln_2(x))
        return x
