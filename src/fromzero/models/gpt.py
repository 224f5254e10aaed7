"""GPT: a decoder-only transformer language model, written from scratch.

The default architecture is GPT-2's: token + learned position embeddings, a stack of
pre-LayerNorm blocks (causal self-attention, GELU MLP, residual connections), a final LayerNorm
and a language-model head tied to the token embedding. Parameter names are GPT-2's
(``transformer.wte``, ``transformer.h.0.attn.c_attn``, ..., ``lm_head``) so GPT-2 weights map
directly.

The same class builds LLaMA-style decoders (LLaMA, Mistral, Qwen2) through config fields:
``norm="rmsnorm"``, ``pos_embedding="rope"`` (rotary embeddings instead of ``wpe``),
``mlp="swiglu"``, ``n_kv_head`` < ``n_head`` (grouped-query attention), ``bias=False`` and
``tie_embeddings=False`` (a separate ``lm_head``). The parameter names stay GPT-2's: q/k/v are
fused into ``c_attn`` and gate/up into ``mlp.c_fc`` (``fromzero.models.convert_gpt`` maps
them to and from ``q_proj``, ``gate_proj``, ...). See :data:`LLAMA_STYLE`.

Try it::

    from fromzero.models.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(idx, targets)            # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=40)
    llama = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128,
                          n_kv_head=2, **LLAMA_STYLE))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from fromzero.models import ConfigDict, FamilyFacts
from fromzero.models.layers import (
    Block,
    KVCache,
    Linear,
    RaggedKVCache,
    RotaryEmbedding,
    init_normal,
    make_norm,
    rope_inverse_frequencies,
    set_linear_weight_layout,
)

NORMS = ("layernorm", "rmsnorm")
POS_EMBEDDINGS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
ACTIVATIONS = ("", "gelu_tanh", "gelu", "silu", "relu")
ROPE_SCALINGS = ("none", "linear", "llama3")

# The config fields that turn the GPT-2 defaults into a LLaMA-style decoder (add n_kv_head,
# intermediate_size, rope_theta, norm_eps to taste).
LLAMA_STYLE = dict(norm="rmsnorm", pos_embedding="rope", mlp="swiglu", bias=False, tie_embeddings=False)


@dataclass
class GPTConfig(ConfigDict):
    """Architecture of a GPT model: everything needed to rebuild it (saved as config.json).

    The defaults are GPT-2; see LLAMA_STYLE for the fields that make a LLaMA-style model.
    """

    MODEL_TYPE = "fromzero-gpt"

    vocab_size: int = 50304
    """Number of token ids. 0 means: take it from the prepared data's meta.json."""
    block_size: int = 1024
    """Context length: the most positions the model attends over."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block (n_embd must be divisible by it unless head_dim is set)."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2: True; a bit faster and as good: False)."""
    norm: str = "layernorm"
    """Normalisation: layernorm (GPT-2) | rmsnorm (LLaMA: no centring, no bias)."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance in every norm (GPT-2: 1e-5; LLaMA: 1e-5 or 1e-6)."""
    pos_embedding: str = "learned"
    """Positions: learned (GPT-2's wpe table) | rope (rotary embeddings on queries and keys)."""
    rope_theta: float = 10000.0
    """RoPE base: rotation wavelengths span 2 pi .. 2 pi theta (LLaMA 2: 1e4; LLaMA 3: 5e5)."""
    rope_scaling: str = "none"
    """RoPE frequency scaling for longer contexts: none | linear | llama3 (Llama 3.1+)."""
    rope_scaling_factor: float = 1.0
    """linear, llama3: how many times the context was stretched (slow rotations divided by it)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths longer than rope_original_block_size / this are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than rope_original_block_size / this are kept."""
    rope_original_block_size: int = 0
    """llama3: the context length the model was pretrained with, before scaling."""
    mlp: str = "gelu"
    """Feed-forward: gelu (GPT-2: expand, activate, project) | swiglu (LLaMA: gated, 3 matrices)."""
    activation: str = ""
    """MLP activation: gelu_tanh | gelu | silu | relu ('': gelu_tanh for mlp gelu, silu for swiglu)."""
    intermediate_size: int = 0
    """Hidden width of the MLP (0: 4 * n_embd)."""
    n_kv_head: int = 0
    """Key/value heads, for grouped-query attention (divides n_head; 0: n_head; 1: multi-query)."""
    head_dim: int = 0
    """Size of each attention head (0: n_embd // n_head)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projection even when bias is false (Qwen2)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head (GPT-2: true; LLaMA: false)."""

    def validate(self) -> None:
        """Raise ValueError for shapes that cannot be built."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("intermediate_size", "n_kv_head", "head_dim", "rope_original_block_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0 (0: default), got {getattr(self, name)}")
        if self.head_dim == 0 and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_kv_head and (self.n_kv_head > self.n_head or self.n_head % self.n_kv_head):
            raise ValueError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        choices = {"norm": NORMS, "pos_embedding": POS_EMBEDDINGS, "mlp": MLPS,
                   "activation": ACTIVATIONS, "rope_scaling": ROPE_SCALINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a or "''" for a in allowed)
                raise ValueError(f"model.{name} must be one of {shown}, got {getattr(self, name)!r}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"model.norm_eps must be a positive number, got {self.norm_eps}")
        if self.pos_embedding == "rope":
            if self.head_size % 2:
                raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}")
            if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
                raise ValueError(f"model.rope_theta must be a positive number, got {self.rope_theta}")
            if self.rope_scaling != "none" and not (
                self.rope_scaling_factor > 0 and math.isfinite(self.rope_scaling_factor)
            ):
                raise ValueError(f"model.rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
            if self.rope_scaling == "llama3" and not (
                self.rope_original_block_size > 0
                and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
            ):
                raise ValueError(
                    "llama3 rope scaling needs model.rope_original_block_size > 0 and "
                    "0 < model.rope_low_freq_factor < model.rope_high_freq_factor"
                )

    @property
    def head_size(self) -> int:
        """D: the width of one attention head."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """G: key/value heads (n_head unless grouped-query attention)."""
        return self.n_kv_head or self.n_head

    def to_dict(self) -> dict:
        """config.json's contents. ``rope_scaling`` is stored as ``rope_scaling_type``:
        transformers reads a checkpoint folder's config.json (``AutoTokenizer.from_pretrained``
        does too) and takes a ``rope_scaling`` key for its own dict of RoPE parameters."""
        d = super().to_dict()
        d["rope_scaling_type"] = d.pop("rope_scaling")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Inverse of :meth:`to_dict`; also reads checkpoints written before the rename."""
        d = dict(d)
        if "rope_scaling_type" in d:
            d["rope_scaling"] = d.pop("rope_scaling_type")
        return super().from_dict(d)


class GPT(nn.Module):
    """Decoder-only transformer language model (GPT-2 architecture, LLaMA options)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self._decode_layout = False  # Linear weights column-major (see generate)
        c = config
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(c.vocab_size, c.n_embd)}  # tokens
        if c.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(c.block_size, c.n_embd)  # position embedding
        modules["drop"] = nn.Dropout(c.dropout)
        modules["h"] = nn.ModuleList(
            Block(
                c.n_embd, c.n_head, c.dropout, c.bias, norm=c.norm, norm_eps=c.norm_eps, mlp=c.mlp,
                activation=c.activation, intermediate_size=c.intermediate_size,
                n_kv_head=c.n_kv_head, head_size=c.head_dim, qkv_bias=c.qkv_bias,
            )
            for _ in range(c.n_layer)
        )
        modules["ln_f"] = make_norm(c.norm, c.n_embd, c.norm_eps, c.bias)
        self.transformer = nn.ModuleDict(modules)
        # RoPE: cos/sin tables for every position, shared by all blocks (not saved).
        # Recompute each block in backward instead of storing its activations (train.activation_checkpointing).
        self.activation_checkpointing = False
        self.rotary = None
        if c.pos_embedding == "rope":
            inv_freq = rope_inverse_frequencies(
                c.head_size, c.rope_theta, c.rope_scaling, c.rope_scaling_factor,
                c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_block_size,
            )
            self.rotary = RotaryEmbedding(c.head_size, c.block_size, inv_freq)
        self.lm_head = Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            # Weight tying: the output projection reuses the token embedding (fewer parameters,
            # and what GPT-2 does, so its checkpoints have no separate lm_head).
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(init_normal)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer),
        # since every block adds two of them to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def train(self, mode: bool = True) -> "GPT":
        if mode and self._decode_layout:
            self.use_decode_layout(False)  # training-size matmuls are faster row-major
        return super().train(mode)

    def use_decode_layout(self, enabled: bool = True) -> None:
        """Store fp32 Linear weights column-major (True) or row-major (False, the default), in place.

        Same values, shapes and names; see :func:`fromzero.models.layers.set_linear_weight_layout`
        for the measured speeds. :meth:`generate` turns it on for cached CPU decoding of one or
        two rows (once: it costs one copy of the weights); ``train()`` turns it off. bf16/fp16
        weights stay row-major: their one-row products are fastest as matrix-vector products
        over row-major weights (see :class:`fromzero.models.layers.Linear`).
        """
        enabled = enabled and self.transformer.ln_f.weight.dtype == torch.float32
        if enabled != self._decode_layout:
            set_linear_weight_layout(self, column_major=enabled)
            self._decode_layout = enabled

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as in the GPT-2 paper).

        A tied token embedding is counted once: it doubles as the output head.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | RaggedKVCache | None = None, last_only: bool = False,
                target_logits_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (or only the last), and the mean cross-entropy loss.

        idx: (B, T) token ids. targets: (B, T) next-token ids, -100 = ignore.
        target_logits_only: with targets, apply the LM head only where targets != -100 and return
        those logits as (N, V), N = the number of such positions. The loss is the same; for chat
        SFT, where only the reply carries loss, it skips most of the head's matmul and memory.
        kv_cache: when given, idx continues the cached sequence (positions start at its length).
        A :class:`RaggedKVCache` (batched serving) holds B sequences of different lengths:
        row b's tokens then take positions ``lengths[b] ..`` of its own (see new_ragged_cache).
        """
        B, T = idx.shape
        ragged = isinstance(kv_cache, RaggedKVCache)
        if ragged:
            if B != kv_cache.rows:
                raise ValueError(f"batch of {B} rows for a ragged cache with {kv_cache.rows} rows in use")
            start = max(kv_cache.lengths) if kv_cache.lengths else 0  # the longest row
        else:
            start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if ragged:
            pos = kv_cache.begin(T)  # (B, T): every row continues from its own length
            if self.rotary is None:
                x = x + self.transformer.wpe(pos)
            else:
                rope = self.rotary.at(pos)
        elif self.rotary is None:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.rotary(start, T)  # positions enter inside attention, on q and k
        if rope is not None:
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))  # once, not in every block
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled():
                # Keep only each block's input; recompute its insides during backward (less memory,
                # ~1/3 more compute). RNG state is restored, so dropout masks are the same.
                x = torch.utils.checkpoint.checkpoint(block, x, None, i, rope, use_reentrant=False)
            else:
                x = block(x, kv_cache, i, rope)
        if ragged:
            kv_cache.advance(T)
        elif kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)

        if targets is not None and target_logits_only:
            keep = targets != -100
            logits = self.lm_head(x[keep])  # (N, V)
            if logits.size(0) == 0:  # nothing to learn from here: a zero that keeps the graph
                return logits, logits.sum() * 0.0
            return logits, F.cross_entropy(logits, targets[keep])
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            return logits, loss
        if last_only:
            # Generation needs only the next-token distribution: skip the head elsewhere.
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        return self.lm_head(x), None

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for ``max_len`` positions (default block_size) of every layer."""
        return self._new_cache(KVCache, batch_size, max_len)

    def new_ragged_cache(self, max_rows: int, max_len: int | None = None) -> RaggedKVCache:
        """An empty cache for up to ``max_rows`` sequences of different lengths, each up to
        ``max_len`` positions (default block_size): the batch of a serving engine."""
        return self._new_cache(RaggedKVCache, max_rows, max_len)

    def _new_cache(self, cls: type, rows: int, max_len: int | None) -> Any:
        p = self.transformer.ln_f.weight  # the compute device + dtype (float even when wte is int8-quantized)
        c = self.config
        return cls(c.n_layer, rows, c.kv_heads, max_len or c.block_size, c.head_size, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, lookup_tokens: int | None = None) -> torch.Tensor:
        """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

        temperature 0 means greedy decoding. top_k keeps the k most likely tokens; top_p keeps
        the smallest set whose probability reaches p (nucleus sampling). A row that produces
        ``eos_id`` (or any of several, e.g. LLaMA 3's end-of-text and end-of-turn) stops there
        and is padded with the (first) eos id; generation ends early once every row has stopped.

        With ``use_cache`` keys and values of past positions are kept, so each step runs the
        model on one new token. Past block_size the context is cropped to the last block_size
        tokens; positions then shift, cached keys go stale, and each step recomputes the cropped
        window, as the uncached path does (both paths produce the same tokens).

        ``lookup_tokens`` (greedy decoding of one row with the cache; default
        :data:`DEFAULT_LOOKUP_TOKENS`, 0 turns it off): prompt-lookup speculation. When the
        last few tokens occurred before, the tokens that followed them are proposed as a draft
        and checked in one forward pass, which reads the weights once, as a one-token step does;
        every draft token the model would have picked itself is kept, plus its own next token.
        In fp32 the tokens are those of one-token greedy steps; in bf16/fp16 a near-tie may flip
        (a pass over several positions rounds differently). See :class:`NgramIndex`.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError("idx must be a non-empty (batch, time) tensor of token ids")
        if lookup_tokens is None:
            lookup_tokens = DEFAULT_LOOKUP_TOKENS
        if (lookup_tokens > 0 and temperature == 0 and use_cache and idx.size(0) == 1 and max_new_tokens > 0
                and idx.size(1) + max_new_tokens <= self.config.block_size):
            return self._generate_lookup(idx, max_new_tokens, eos_id, lookup_tokens)
        was_training = self.training
        self.eval()
        if idx.device.type == "cpu" and not was_training:
            # One-token steps of one or two rows stream column-major weights faster on CPU;
            # bigger batches are faster row-major (a model being trained keeps its layout).
            self.use_decode_layout(use_cache and idx.size(0) <= 2)
        block_size = self.config.block_size
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
        stop_ids = torch.tensor(eos_ids, device=idx.device) if eos_ids else None
        pad_id = eos_ids[0] if eos_ids else 0
        # The cache holds only the positions this call can fill (zeroing a full block_size
        # cache of a big model costs more than a dozen decoding steps).
        cache_len = min(block_size, idx.size(1) + max_new_tokens)
        cache = self.new_kv_cache(idx.size(0), cache_len) if use_cache and max_new_tokens > 0 else None
        prefill_needed = True
        for _ in range(max_new_tokens):
            if cache is None or cache.length >= block_size:
                # No cache, or the context is full: past block_size every position shifts, so
                # cached keys are stale and the cropped window is recomputed (as uncached).
                logits, _ = self(idx[:, -block_size:], last_only=True)
            elif prefill_needed:
                logits, _ = self(idx[:, -block_size:], kv_cache=cache, last_only=True)
                prefill_needed = False
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache, last_only=True)
            next_id = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            if stop_ids is not None:
                next_id = torch.where(finished, torch.full_like(next_id, pad_id), next_id)
                finished |= torch.isin(next_id, stop_ids)
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            if stop_ids is not None and bool(finished.all()):
                break
        self.train(was_training)
        return idx

    @torch.no_grad()
    def _generate_lookup(self, idx: torch.Tensor, max_new_tokens: int, eos_id: int | Sequence[int] | None,
                         lookup_tokens: int) -> torch.Tensor:
        """Greedy decoding of one row with prompt-lookup drafts (see :meth:`generate`).

        Each pass feeds the last accepted token plus a draft of up to ``lookup_tokens`` tokens
        (positions L .. L+K), takes the model's greedy choice at every position, keeps the
        draft's longest prefix that agrees with those choices and then the model's own choice
        after it. The cache is rolled back over the rejected positions (their entries are
        overwritten later). The whole sequence fits the context (checked by the caller), so no
        position ever shifts.
        """
        was_training = self.training
        self.eval()
        if idx.device.type == "cpu" and not was_training:
            self.use_decode_layout(True)
        stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or [])
        tokens = idx[0].tolist()
        target = len(tokens) + max_new_tokens
        cache = self.new_kv_cache(1, target)
        logits, _ = self(idx, kv_cache=cache, last_only=True)  # the prefill
        next_id = int(logits[0, -1].argmax())
        index = NgramIndex(tokens)
        while True:
            tokens.append(next_id)
            index.add(tokens)
            if next_id in stops or len(tokens) >= target:
                break
            # The cache holds every token but the newest; the pass adds it and the draft.
            draft = index.draft(tokens, min(lookup_tokens, target - len(tokens) - 1))
            feed = torch.tensor([[next_id, *draft]], dtype=torch.long, device=idx.device)
            logits, _ = self(feed, kv_cache=cache)
            choices = logits[0].argmax(dim=-1).tolist()  # the greedy pick after each fed token
            accepted = 0
            while accepted < len(draft) and draft[accepted] == choices[accepted]:
                accepted += 1
            cache.length -= len(draft) - accepted  # forget the rejected draft positions
            for token in draft[:accepted]:
                tokens.append(token)
                index.add(tokens)
                if token in stops:
                    break
            if tokens[-1] in stops:
                break
            next_id = choices[accepted]
        self.train(was_training)
        return torch.tensor([tokens], dtype=idx.dtype, device=idx.device)


# Draft length of prompt-lookup decoding (GPT.generate's default lookup_tokens).
DEFAULT_LOOKUP_TOKENS = 8


class NgramIndex:
    """Where each n-gram (n = 1 .. max_n) of a token sequence last occurred, for prompt lookup.

    :meth:`draft` proposes the tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens, trying the longest n first (a longer match predicts better).
    Updated incrementally: adding a token costs O(max_n).
    """

    def __init__(self, tokens: list[int], max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.next_after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.pending: dict[tuple[int, ...], int] = {}  # n-grams ending at the last token
        self.size = 0
        self.add(tokens)

    def add(self, tokens: list[int]) -> None:
        """Index the tokens appended since the last call."""
        while self.size < len(tokens):
            # The n-grams ending just before this token now have a follower: publish them.
            self.next_after.update(self.pending)
            self.size += 1
            end = self.size
            self.pending = {tuple(tokens[end - n:end]): end for n in range(self.min_n, self.max_n + 1) if end >= n}

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier match of the sequence's tail."""
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            start = self.next_after.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + k]
        return []


def build_from_config(config: dict) -> GPT:
    """Rebuild a GPT from a checkpoint's config.json (see fromzero.models.build_model)."""
    return GPT(GPTConfig.from_dict(config))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of ``logits`` (B, V). Returns (B,) int64."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# What fine-tuning, LoRA and distillation need to know about this family (see fromzero.models).
FACTS = FamilyFacts(
    lora_targets=("attn.c_attn", "attn.c_proj"), peft_task_type="CAUSAL_LM", hf_mapping="fromzero.models.convert_gpt",
    depth_field="n_layer", layer_prefix="transformer.h.",
    layer_stack=lambda model: (list(model.transformer.h), [model.transformer.ln_f]),
    head_modules=lambda model: [model.lm_head],  # tied to the embedding: training it trains the embedding too
    attention=lambda model: ([block.attn for block in model.transformer.h], model),
    export_signature="causal-lm",
)
