"""GPT: a decoder-only transformer language model, written from scratch.

The architecture is GPT-2's: token + learned position embeddings, a stack of pre-LayerNorm
blocks (causal self-attention, GELU MLP, residual connections), a final LayerNorm and a
language-model head tied to the token embedding. Parameter names are GPT-2's
(``transformer.wte``, ``transformer.h.0.attn.c_attn``, ..., ``lm_head``) so GPT-2 weights map
directly.

Try it::

    from fromzero.models.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(idx, targets)            # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=40)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.models.layers import Block, KVCache


@dataclass
class GPTConfig:
    """Architecture of a GPT model: everything needed to rebuild it (saved as config.json)."""

    vocab_size: int = 50304
    """Number of token ids. 0 means: take it from the prepared data's meta.json."""
    block_size: int = 1024
    """Context length: the most positions the model attends over."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block (n_embd must be divisible by it)."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2: True; a bit faster and as good: False)."""

    def validate(self) -> None:
        """Raise ValueError for shapes that cannot be built."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return {"model_type": "fromzero-gpt", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in fields})


class GPT(nn.Module):
    """Decoder-only transformer language model (GPT-2 architecture)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(
                    Block(config.n_embd, config.n_head, config.dropout, config.bias)
                    for _ in range(config.n_layer)
                ),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output projection reuses the token embedding (fewer parameters,
        # and what GPT-2 does, so its checkpoints have no separate lm_head).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer),
        # since every block adds two of them to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as in the GPT-2 paper).

        The token embedding is counted once: it doubles as the output head.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position (or only the last), and the mean cross-entropy loss.

        idx: (B, T) token ids. targets: (B, T) next-token ids, -100 = ignore.
        kv_cache: when given, idx continues the cached sequence (positions start at its length).
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
            return logits, loss
        if last_only:
            # Generation needs only the next-token distribution: skip the head elsewhere.
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        return self.lm_head(x), None

    def new_kv_cache(self, batch_size: int) -> KVCache:
        p = self.transformer.wte.weight
        c = self.config
        return KVCache(
            c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, p.device, p.dtype
        )

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

        temperature 0 means greedy decoding. top_k keeps the k most likely tokens; top_p keeps
        the smallest set whose probability reaches p (nucleus sampling). A row that produces
        ``eos_id`` stops there and is padded with ``eos_id``; generation ends early once every
        row has stopped.

        With ``use_cache`` keys and values of past positions are kept, so each step runs the
        model on one new token. Once the sequence is longer than block_size, the context is
        cropped to the last block_size tokens exactly as the uncached path does; since learned
        position embeddings then shift and cached keys go stale, so from there on each step
        recomputes the cropped window, exactly as the uncached path does (both paths always
        produce the same tokens; the cache speeds up generation inside the window).
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError("idx must be a non-empty (batch, time) tensor of token ids")
        was_training = self.training
        self.eval()
        block_size = self.config.block_size
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache = self.new_kv_cache(idx.size(0)) if use_cache else None
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
            if eos_id is not None:
                next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                finished |= next_id == eos_id
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        self.train(was_training)
        return idx


def build_from_config(config: dict) -> GPT:
    """Rebuild a GPT from a checkpoint's config.json (see fromzero.models.build_model)."""
    return GPT(GPTConfig.from_dict(config))


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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
