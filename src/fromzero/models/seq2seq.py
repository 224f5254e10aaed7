"""Encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need") for translation.

The layout is Marian's (the model behind Helsinki-NLP's opus-mt and Hugging Face's
``MarianMTModel``), which is the original post-norm Transformer: sinusoidal positions (sines in
the first half of each vector, cosines in the second), token embeddings scaled by sqrt(d_model),
``x = norm(x + sublayer(x))`` after self-attention, cross-attention and the feed-forward block,
and an output layer tied to the target embeddings plus a ``final_logits_bias``. Module names
follow Marian's, so converting weights either way is a rename (:mod:`fromzero.models.convert_seq2seq`).

Decoding: :meth:`Seq2Seq.generate` does greedy search and beam search with a length penalty
(finished hypotheses score ``sum log p / generated_length ** length_penalty``), with a cache of
each decoder layer's self-attention keys/values (grown one token per step) and cross-attention
keys/values (computed once from the encoder output). Its rules are those of
``transformers.generate`` for Marian (2K candidates per step, the early-stop heuristic,
``forced_eos`` at the last position, the pad id never generated), so the same weights decode to
the same tokens in both (tested).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.models import FamilyFacts

ACTIVATIONS = {"swish": F.silu, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}
NEG_INF_SCORE = -1.0e9  # the score transformers gives impossible beams (finite, so sums stay ordered)


@dataclass
class Seq2SeqConfig:
    """Architecture of an encoder-decoder Transformer (saved as config.json)."""

    src_vocab_size: int = 1000
    """Source token ids (with share_embeddings: the one vocabulary of both sides)."""
    tgt_vocab_size: int = 0
    """Target token ids (0: the source vocabulary; must be 0 or equal with share_embeddings)."""
    d_model: int = 256
    """Width of the residual stream of the encoder and the decoder."""
    n_head: int = 4
    """Attention heads in every attention layer (d_model must be divisible by it)."""
    encoder_layers: int = 3
    """Number of encoder layers."""
    decoder_layers: int = 3
    """Number of decoder layers."""
    ffn_dim: int = 1024
    """Hidden width of every feed-forward block."""
    activation: str = "swish"
    """Feed-forward activation: swish (Marian) | gelu | relu (Vaswani et al.)."""
    dropout: float = 0.1
    """Dropout on embeddings and on each sublayer's output before the residual sum."""
    attention_dropout: float = 0.0
    """Dropout on attention weights."""
    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation."""
    max_positions: int = 512
    """Longest source or target sequence (rows of the sinusoidal position table)."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(d_model) (Vaswani et al., Marian)."""
    share_embeddings: bool = True
    """One embedding table for source and target tokens (and the output layer)."""
    pad_id: int = 0
    """Padding id of both sides (never attended to, never generated)."""
    eos_id: int = 1
    """End-of-sequence id: ends every source and target sequence."""
    decoder_start_id: int = 0
    """First decoder input (Marian starts from the pad id)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.src_vocab_size

    def validate(self) -> None:
        """Raise ValueError for shapes that cannot be built."""
        for name in ("src_vocab_size", "d_model", "n_head", "encoder_layers", "decoder_layers", "ffn_dim",
                     "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.share_embeddings and self.tgt_vocab_size not in (0, self.src_vocab_size):
            raise ValueError("model.share_embeddings needs one vocabulary: tgt_vocab_size 0 or src_vocab_size")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_id", "eos_id", "decoder_start_id"):
            if not 0 <= getattr(self, name) < min(self.src_vocab_size, self.target_vocab):
                raise ValueError(f"model.{name} ({getattr(self, name)}) is not a token id of the vocabulary")

    def to_dict(self) -> dict:
        return {"model_type": "fromzero-seq2seq", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def sinusoidal_positions(n_positions: int, dim: int) -> torch.Tensor:
    """Marian's table: row p holds sin(p / 10000^(2i/dim)) in its first half and the cosines of
    the same angles in its second half (not interleaved as in Vaswani et al.; same information)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    half = (dim + 1) // 2
    table[:, :half] = torch.sin(angles)
    table[:, half:] = torch.cos(angles[:, : dim // 2])
    return table.float()


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections. Keys and values come from the
    queries' own sequence (self-attention) or from the encoder output (cross-attention); they
    are computed by :meth:`keys_values` so a decoder can cache them."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, C/H)."""
        return x.view(x.shape[0], x.shape[1], self.n_head, -1).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(source)), self._heads(self.v_proj(source))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """mask: (B, 1, 1|T, S) booleans, True where a query may attend; causal: the lower
        triangle (queries and keys are the same positions)."""
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(x)), keys, values, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class FeedForward(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.activation, self.dropout = ACTIVATIONS[cfg.activation], cfg.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.activation(self.fc1(x)), self.dropout, self.training))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = Attention(cfg), nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.ffn, self.final_layer_norm = FeedForward(cfg), nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.self_attn(x, *self.self_attn.keys_values(x), mask=mask)
        x = self.self_attn_layer_norm(x + F.dropout(attended, self.dropout, self.training))
        return self.final_layer_norm(x + F.dropout(self.ffn(x), self.dropout, self.training))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = Attention(cfg), nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.encoder_attn, self.encoder_attn_layer_norm = Attention(cfg), nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.ffn, self.final_layer_norm = FeedForward(cfg), nn.LayerNorm(cfg.d_model, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], memory_mask: torch.Tensor,
                cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x: the new target positions. Without ``cache`` they are the whole target (causal
        mask); with it, x holds the positions after those cached, and their keys/values are
        appended to ``cache`` (they attend to everything before them: no mask needed)."""
        keys, values = self.self_attn.keys_values(x)
        if cache is not None:
            if "keys" in cache:
                keys, values = torch.cat([cache["keys"], keys], 2), torch.cat([cache["values"], values], 2)
            cache["keys"], cache["values"] = keys, values
        causal = x.shape[1] > 1 and keys.shape[2] == x.shape[1]
        if x.shape[1] > 1 and not causal:
            raise ValueError("a cached decoder step takes one new position at a time")
        x = self.self_attn_layer_norm(x + F.dropout(self.self_attn(x, keys, values, causal=causal),
                                                    self.dropout, self.training))
        crossed = self.encoder_attn(x, *memory_kv, mask=memory_mask)
        x = self.encoder_attn_layer_norm(x + F.dropout(crossed, self.dropout, self.training))
        return self.final_layer_norm(x + F.dropout(self.ffn(x), self.dropout, self.training))


@dataclass
class Encoded:
    """The encoder's output for a batch, with what the decoder needs from it: the key padding
    mask and, per decoder layer, the cross-attention keys/values (computed once)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]

    def select(self, rows: torch.Tensor) -> "Encoded":
        """The encoding of batch rows ``rows`` (beam search repeats each source num_beams times)."""
        return Encoded(self.hidden[rows], self.mask[rows], [(k[rows], v[rows]) for k, v in self.memory_kv])


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer: ``forward(src, tgt_in) -> logits`` (teacher forcing),
    :meth:`loss` for training, :meth:`generate` for decoding."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model, cfg.pad_id)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(cfg.target_vocab, cfg.d_model,
                                                                                   cfg.pad_id)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.register_buffer("final_logits_bias", torch.zeros(cfg.target_vocab))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        if start + ids.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence of {start + ids.shape[1]} tokens is longer than model.max_positions "
                             f"({self.config.max_positions})")
        x = table(ids) * self.embed_scale + self.positions[start:start + ids.shape[1]]
        return F.dropout(x, self.config.dropout, self.training)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> Encoded:
        """src: (B, S) ids; src_mask: (B, S), 1 for real tokens (default: ids != pad_id)."""
        if src_mask is None:
            src_mask = src != self.config.pad_id
        mask = src_mask.bool()[:, None, None, :]
        x = self._embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return Encoded(x, mask, [layer.encoder_attn.keys_values(x) for layer in self.decoder_layers])

    def decode(self, tgt_in: torch.Tensor, encoded: Encoded, caches: list[dict] | None = None,
               start: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for decoder inputs ``tgt_in`` at positions start.. (with ``caches``,
        one dict per layer, the positions before ``start`` are in the caches)."""
        x = self._embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, encoded.memory_kv[i], encoded.mask, None if caches is None else caches[i])
        return F.linear(x, self.tgt_embed.weight, self.final_logits_bias)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src, src_mask))

    def shift_right(self, tgt: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for targets ``tgt`` (B, T): the start id, then tgt without its last token."""
        start = torch.full_like(tgt[:, :1], self.config.decoder_start_id)
        return torch.cat([start, tgt[:, :-1]], 1)

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
             label_smoothing: float = 0.0, forward: Callable[..., torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy of the target tokens (``tgt`` ends with eos, padded with pad_id,
        which is ignored) and the number of target tokens it averages over. ``forward``: what
        computes the logits instead of the model itself (its compiled version)."""
        logits = (forward or self)(src, self.shift_right(tgt), src_mask)
        targets = tgt.masked_fill(tgt == self.config.pad_id, -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)
        return loss, int((targets != -100).sum())

    # -------------------------------------------------------------------------------------------
    # Decoding

    def _next_log_probs(self, logits: torch.Tensor, step: int, max_length: int, forced_eos: bool,
                        suppress_pad: bool) -> torch.Tensor:
        """Log-probabilities of the next token (logits of the last position, (N, V)), with
        Marian's rules: never the pad id; the eos id forced at the last position."""
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if suppress_pad:
            log_probs[:, self.config.pad_id] = -math.inf
        if forced_eos and step == max_length - 1:
            log_probs[:] = -math.inf
            log_probs[:, self.config.eos_id] = 0.0
        return log_probs

    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 forced_eos: bool = True, suppress_pad: bool = True) -> list[list[int]]:
        """Decode each source sequence: greedy (num_beams 1) or beam search. Returns, per source,
        the generated ids without the start id, ending with eos unless max_new_tokens ran out.

        early_stopping: False (stop a source when no running beam can beat its finished ones, by
        transformers' heuristic), True (stop once num_beams hypotheses finished) or "never"."""
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be >= 1")
        encoded = self.encode(src, src_mask)
        rules = dict(max_length=max_new_tokens + 1, forced_eos=forced_eos, suppress_pad=suppress_pad)
        if num_beams == 1:
            return self._greedy(encoded, **rules)
        return self._beam_search(encoded, num_beams, length_penalty, early_stopping, **rules)

    def _greedy(self, encoded: Encoded, max_length: int, **rules: Any) -> list[list[int]]:
        batch, eos = encoded.hidden.shape[0], self.config.eos_id
        caches: list[dict] = [{} for _ in self.decoder_layers]
        tokens = torch.full((batch, 1), self.config.decoder_start_id, dtype=torch.long, device=encoded.hidden.device)
        running = torch.ones(batch, dtype=torch.bool, device=tokens.device)
        out: list[list[int]] = [[] for _ in range(batch)]
        for step in range(1, max_length):
            logits = self.decode(tokens[:, -1:], encoded, caches, start=step - 1)[:, -1]
            chosen = self._next_log_probs(logits, step, max_length, **rules).argmax(-1)
            for row in running.nonzero().flatten().tolist():
                out[row].append(int(chosen[row]))
            running &= chosen != eos
            if not running.any():
                break
            tokens = torch.cat([tokens, chosen[:, None]], 1)
        return out

    def _beam_search(self, encoded: Encoded, num_beams: int, length_penalty: float, early_stopping: bool | str,
                     max_length: int, **rules: Any) -> list[list[int]]:
        """Beam search as transformers does it (its rules decide ties and stopping, so both give
        the same hypotheses): each step takes the 2K best continuations of the K running beams;
        those ending in eos (or at max_length) among the first K compete for the K finished
        slots with score / generated_length ** length_penalty; the K best others run on."""
        batch, k, eos = encoded.hidden.shape[0], num_beams, self.config.eos_id
        device = encoded.hidden.device
        encoded = encoded.select(torch.arange(batch, device=device).repeat_interleave(k))
        caches: list[dict] = [{} for _ in self.decoder_layers]
        running = torch.full((batch, k, max_length), self.config.pad_id, dtype=torch.long, device=device)
        running[:, :, 0] = self.config.decoder_start_id
        running_scores = torch.zeros(batch, k, device=device)
        running_scores[:, 1:] = NEG_INF_SCORE  # at first all beams are the same: expand only one
        finished, finished_scores = running.clone(), torch.full((batch, k), NEG_INF_SCORE, device=device)
        finished_any = torch.zeros(batch, k, dtype=torch.bool, device=device)
        finished_lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
        improvable = torch.ones(batch, dtype=torch.bool, device=device)
        in_top_k = torch.arange(2 * k, device=device) < k
        for step in range(1, max_length):
            logits = self.decode(running[:, :, step - 1].reshape(-1, 1), encoded, caches, start=step - 1)[:, -1]
            log_probs = self._next_log_probs(logits, step, max_length, **rules)
            vocab = log_probs.shape[-1]
            totals = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
            top_scores, top_ids = totals.topk(2 * k, dim=1)
            parents, tokens = top_ids // vocab, top_ids % vocab
            candidates = running.gather(1, parents[:, :, None].expand(-1, -1, max_length)).clone()
            candidates[:, :, step] = tokens
            ends = (tokens == eos) | (step + 1 >= max_length)
            # the K best continuations that did not end run on
            still = top_scores + ends.float() * NEG_INF_SCORE
            keep = still.topk(k, dim=1).indices
            running = candidates.gather(1, keep[:, :, None].expand(-1, -1, max_length))
            running_scores = still.gather(1, keep)
            beam_rows = (parents.gather(1, keep) + torch.arange(batch, device=device)[:, None] * k).flatten()
            for cache in caches:
                cache["keys"], cache["values"] = cache["keys"][beam_rows], cache["values"][beam_rows]
            # hypotheses that ended compete for the finished slots
            ended_scores = top_scores / (step ** length_penalty)
            full = finished_any.all(1, keepdim=True) & (early_stopping is True)
            blocked = full | ~improvable[:, None] | ~(ends & in_top_k)
            ended_scores = ended_scores + blocked.float() * NEG_INF_SCORE
            merged_scores = torch.cat([finished_scores, ended_scores], 1)
            best = merged_scores.topk(k, dim=1).indices
            finished = torch.cat([finished, candidates], 1).gather(1, best[:, :, None].expand(-1, -1, max_length))
            finished_scores = merged_scores.gather(1, best)
            finished_any = torch.cat([finished_any, ends & in_top_k], 1).gather(1, best)
            finished_lengths = torch.cat([finished_lengths, torch.full_like(tokens, step)], 1).gather(1, best)
            # can a running beam still beat the worst finished one? (transformers' heuristic)
            horizon = max_length - 1 if (early_stopping == "never" and length_penalty > 0) else step
            best_possible = running_scores[:, 0] / (horizon ** length_penalty)
            worst = torch.where(finished_any, finished_scores.min(1, keepdim=True).values,
                                torch.full_like(finished_scores, NEG_INF_SCORE))
            improvable &= (best_possible[:, None] > worst).any(1)
            if not improvable.any() or (finished_any.all() and early_stopping is True) or ends.all():
                break
        return [finished[b, 0, 1:int(finished_lengths[b, 0]) + 1].tolist() for b in range(batch)]


def build_from_config(config: dict) -> Seq2Seq:
    """Rebuild a Seq2Seq from a checkpoint's config.json (see fromzero.models.build_model)."""
    return Seq2Seq(Seq2SeqConfig.from_dict(config))


# Full fine-tuning only for now: no LoRA targets or distillation layout declared yet.
FACTS = FamilyFacts()
