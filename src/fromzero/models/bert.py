"""BERT: a bidirectional transformer encoder (BERT, MiniLM), written from scratch.

The architecture is BERT's: word + learned position + token-type (segment) embeddings summed and
LayerNormed, then a stack of *post*-LayerNorm encoder layers (unlike GPT-2's pre-LN blocks, the
LayerNorm comes after each residual addition), every token attending to every non-padding
token. On top sit optional pieces:

* the pooler: dense + tanh on the first ([CLS]) token, which BERT's classifier reads;
* one head, chosen by ``BertConfig.head``:
    - ``"embedding"``: a sentence embedding, the mean of the token states over the attention
      mask (or the [CLS] state), L2-normalised as sentence-transformers does (all-MiniLM-L6-v2);
    - ``"classification"``: pooler output -> dropout -> linear (HF BertForSequenceClassification);
    - ``"mlm"``: masked-language-model logits: dense + activation + LayerNorm, then a decoder
      tied to the word embedding plus a per-token bias (HF BertForMaskedLM);
    - ``"qa"``: extractive question answering: one linear layer ``qa_outputs`` gives every token
      a start and an end logit of the answer span (HF BertForQuestionAnswering; no pooler);
    - ``"none"``: the last hidden states themselves.

Parameter names map one to one onto Hugging Face's (see ``convert_bert.HF_NAMES``).

Try it::

    from fromzero.models.bert import Bert, BertConfig
    model = Bert(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=37, head="embedding")).eval()
    emb, _ = model(input_ids, attention_mask)       # (B, T) ids and 1/0 mask -> (B, C) unit vectors
    hidden = model.encode(input_ids, attention_mask)  # (B, T, C)

or, on a converted checkpoint (``fromzero convert from-hf <all-MiniLM-L6-v2 dir> minilm``)::

    vectors = embed_checkpoint(Path("minilm"), ["A man is eating.", "Someone eats."])

Shapes: B = batch, T = sequence length, C = hidden size, H = heads, D = head size (C / H unless
``head_dim`` is set), V = vocabulary size.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.errors import FromzeroError, first_line
from fromzero.models import ConfigDict, FamilyFacts
from fromzero.models.layers import HF_ACTIVATIONS, attention, init_normal

HEADS = ("embedding", "classification", "mlm", "qa", "none")
POOLINGS = ("mean", "cls")
# Activations by their HF names (``hidden_act``); see fromzero.models.layers.HF_ACTIVATIONS.
ACTIVATIONS = tuple(HF_ACTIVATIONS)


@dataclass
class BertConfig(ConfigDict):
    """Architecture of a BERT encoder: everything needed to rebuild it (saved as config.json).

    The first block of fields has Hugging Face's names and meanings (so a HF ``config.json`` reads
    across); the rest choose what sits on top of the encoder.
    """

    MODEL_TYPE = "fromzero-bert"

    vocab_size: int = 30522
    """Number of token ids."""
    hidden_size: int = 768
    """Width of the residual stream (C)."""
    num_hidden_layers: int = 12
    """Number of encoder layers."""
    num_attention_heads: int = 12
    """Attention heads per layer (hidden_size must be divisible by it unless head_dim is set)."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer inside each encoder layer."""
    head_dim: int = 0
    """Size of each attention head (0: hidden_size // num_attention_heads). Set by structured
    pruning (``fromzero prune``), which removes heads but keeps each head's width, so that
    num_attention_heads * head_dim < hidden_size. Not a Hugging Face BERT field."""
    hidden_act: str = "gelu"
    """Feed-forward activation: gelu (exact, erf) | gelu_new (tanh approximation) | gelu_pytorch_tanh | relu."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings and on each residual branch (training only)."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention weights (training only)."""
    max_position_embeddings: int = 512
    """Longest input in tokens (learned position embeddings)."""
    type_vocab_size: int = 2
    """Number of token types (segments A / B of a sentence pair)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm (BERT: 1e-12)."""
    pad_token_id: int | None = 0
    """Id of the padding token; its embedding row gets no gradient (as in HF)."""
    initializer_range: float = 0.02
    """Std of the normal init of weight matrices and embeddings."""
    head: str = "none"
    """What forward() returns: embedding (sentence vectors) | classification | mlm | qa (answer-span start/end
    logits) | none (hidden states)."""
    num_labels: int = 2
    """Classes of the classification head (1 = regression with an MSE loss)."""
    labels: list[str] | None = None
    """Optional class names of the classification head, index = class id."""
    classifier_dropout: float | None = None
    """Dropout before the classifier; None means hidden_dropout_prob (as in HF)."""
    pooler: bool = True
    """Keep BERT's pooler (dense + tanh on [CLS]); the classification head needs it."""
    pooling: str = "mean"
    """Sentence embedding of the embedding head: mean (over the attention mask) | cls (first token)."""
    normalize: bool = True
    """L2-normalise sentence embeddings (sentence-transformers' Normalize module)."""

    def validate(self) -> None:
        """Raise ValueError for configs that cannot be built."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ValueError(f"model.head_dim must be an integer >= 0 (0: hidden_size // num_attention_heads), "
                             f"got {self.head_dim!r}")
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"model.hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {value}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"model.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"model.pad_token_id {self.pad_token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        if self.head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.head == "classification":
            n = self.num_labels
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"model.num_labels must be a positive integer, got {self.num_labels!r}")
            if not self.pooler:
                raise ValueError("model.head 'classification' reads the pooler output: set model.pooler to true")
            if self.labels is not None and len(self.labels) != self.num_labels:
                raise ValueError(
                    f"model.labels names {len(self.labels)} classes, model.num_labels is {self.num_labels}"
                )
        if self.head == "qa" and self.pooler:
            raise ValueError("model.head 'qa' reads every token, not the pooler (Hugging Face's "
                             "BertForQuestionAnswering has none): set model.pooler to false")

    @property
    def head_size(self) -> int:
        """D: the width of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not d["head_dim"]:
            del d["head_dim"]  # the default: config.json stays as it was (and as HF's BERT has it)
        return d


class BertEmbeddings(nn.Module):
    """Token + position + token-type embeddings, summed, LayerNormed, dropped out."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, C)
        self.token_type = nn.Embedding(config.type_vocab_size, C)
        self.norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.size(1)
        pos = torch.arange(T, device=input_ids.device)  # (T,): padding is on the right, so 0.. T-1
        # Summed in HF's order (word + type, then + position) so fp32 results match bit for bit.
        x = self.word(input_ids) + self.token_type(token_type_ids)  # (B, T, C)
        x = x + self.position(pos)
        return self.dropout(self.norm(x))


class Packing:
    """Where the real tokens of a right-padded batch sit among its B * T positions.

    Everything in an encoder layer except attention works token by token, so it can run on the
    N real tokens alone, (N, C), and skip the padding: with sentences padded to 128 tokens that
    is most of the work. Attention needs the (B, T) layout back; :meth:`unpack` gives it (zeros
    at padded positions, which the key mask hides), :meth:`pack` returns to (N, C).
    """

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.B, self.T = attention_mask.shape
        self.rows = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,) indices into B * T

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.B * self.T, -1).index_select(0, self.rows)  # (B, T, C) -> (N, C)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.B * self.T, x.size(-1))
        return out.index_copy_(0, self.rows, x).view(self.B, self.T, -1)  # (N, C) -> (B, T, C)


def dense_enough(attention_mask: torch.Tensor, threshold: float = 0.9) -> bool:
    """True when at least ``threshold`` of the positions are real tokens: then packing them
    (gather / scatter copies around attention in every layer) costs more than it saves."""
    return bool(attention_mask.float().mean() >= threshold)


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention; padding keys are masked out."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.n_head = config.num_attention_heads
        self.head_size = config.head_size
        inner = self.n_head * self.head_size  # H * D: C, unless heads were pruned away
        self.query = nn.Linear(C, inner)
        self.key = nn.Linear(C, inner)
        self.value = nn.Linear(C, inner)
        self.out = nn.Linear(inner, C)  # back into the residual stream
        self.dropout = config.attention_probs_dropout_prob

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x. One GEMM against the three weights stacked when they are plain Linear
        layers: a bigger matmul, and under autocast x is cast to bf16 once instead of three
        times. Adapted layers (e.g. peft's LoRA wrappers) are called one by one, as they must."""
        plain = all(type(m) is nn.Linear for m in (self.query, self.key, self.value))
        if not plain:
            return self.query(x), self.key(x), self.value(x)
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3 H D, C)
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        return F.linear(x, weight, bias).chunk(3, dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                first_query_only: bool = False) -> torch.Tensor:
        """x: (B, T, C), or (N, C) real tokens only when ``packing`` says where they sit.

        mask: (B, 1, 1, T) bool, True = may be attended to (None = all).
        first_query_only: compute the output of the first token only, (B, 1, C) (it still attends
        to every token): all that a [CLS] classifier reads from the last layer.
        """
        q, k, v = self.project_qkv(x)  # 3 x (B, T, C) or (N, C)
        if packing is not None:  # attention needs the (B, T) layout: zeros at padded positions
            q, k, v = packing.unpack(q), packing.unpack(k), packing.unpack(v)
        if first_query_only:
            q = q[:, :1]
        B, T, _ = k.shape
        # (B, T, H * D) -> (B, H, T, D): every head attends independently.
        q = q.view(B, q.size(1), self.n_head, self.head_size).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        y = attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, q.size(2), self.n_head * self.head_size)  # re-assemble the heads
        if packing is not None:
            y = packing.pack(y)  # (N, C)
        return self.out(y)


class FeedForward(nn.Module):
    """Position-wise feed-forward: expand to intermediate_size, activation, project back."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = HF_ACTIVATIONS[config.hidden_act]
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class EncoderLayer(nn.Module):
    """Post-LayerNorm encoder layer: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                first_token_only: bool = False) -> torch.Tensor:
        """x (B, T, C) or packed (N, C) -> the same shape; (B, 1, C) with ``first_token_only``."""
        # BERT normalises *after* adding the branch (post-LN): the residual stream is renormalised
        # twice per layer, which is why BERT needs warmup where pre-LN GPTs need less.
        attended = self.attn(x, mask, packing, first_query_only=first_token_only)
        if first_token_only:
            x = x[:, :1]  # token-wise from here on: only the first token's row is needed
        x = self.attn_norm(x + self.dropout(attended))
        x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first ([CLS]) token, trained by next-sentence prediction."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, C) -> (B, C)


class MaskedLMHead(nn.Module):
    """Transform (dense + activation + LayerNorm), then logits over the vocabulary.

    ``decoder.weight`` is tied to the word embedding by :class:`Bert` (as in BERT), so only the
    transform and the per-token ``decoder.bias`` are this head's own parameters.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = HF_ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))  # (B, T, C) -> (B, T, V)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the token states over the attention mask, in fp32: (B, T, C) -> (B, C).

    As sentence-transformers computes it: sum(h * m) / max(sum(m), 1e-9), so a row with no
    tokens at all gives a zero vector rather than NaN.
    """
    hidden = hidden.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class Bert(nn.Module):
    """BERT encoder with an optional pooler and one head (see the module docstring)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config) if config.pooler else None
        self.classifier: nn.Linear | None = None
        self.mlm_head: MaskedLMHead | None = None
        self.qa_outputs: nn.Linear | None = None
        if config.head == "classification":
            p = config.classifier_dropout
            self.classifier_dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        elif config.head == "mlm":
            self.mlm_head = MaskedLMHead(config)
        elif config.head == "qa":
            self.qa_outputs = nn.Linear(config.hidden_size, 2)  # per token: (start, end) logits
        self.apply(lambda module: init_normal(module, config.initializer_range))
        if self.mlm_head is not None:
            # Weight tying: predicting a token reuses its input embedding (BERT does this; the
            # checkpoint stores the matrix once).
            self.mlm_head.decoder.weight = self.embeddings.word.weight

    def num_params(self) -> int:
        """Parameter count (the tied MLM decoder counted once)."""
        return sum(p.numel() for p in self.parameters())

    # -- the encoder ---------------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, skip_padding: bool = False,
               first_token_only: bool = False, layers: nn.ModuleList | None = None) -> torch.Tensor:
        """Last hidden states (B, T, C) of ``input_ids`` (B, T).

        attention_mask: (B, T), 1 for real tokens, 0 for padding (on the right); None = no padding.
        token_type_ids: (B, T) segment ids; None = all 0.
        skip_padding: compute only the real tokens (see :class:`Packing`); the states of real
            tokens are the same, padded positions hold zeros instead of (meaningless) values.
            Ignored under torch.compile, whose graphs want static shapes.
        first_token_only: the last layer computes the first token's state only, (B, 1, C): what
            the [CLS] pooler reads, for ~1/6 less work in a 6-layer model (same values).
        layers: run these layers instead of all (used internally).
        """
        B, T = input_ids.shape
        if first_token_only and skip_padding and attention_mask is not None and not torch.compiler.is_compiling():
            # The packed layers end before the last one, which needs the (B, T) layout anyway.
            hidden = self.encode(input_ids, attention_mask, token_type_ids, True, layers=self.layers[:-1])
            return self.layers[-1](hidden, self._attention_mask(attention_mask), first_token_only=True)
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {T} tokens is longer than max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        mask = self._attention_mask(attention_mask)
        layers = self.layers if layers is None else layers
        if mask is None or not skip_padding or torch.compiler.is_compiling() or dense_enough(attention_mask):
            for i, layer in enumerate(layers):
                x = layer(x, mask, first_token_only=first_token_only and i == len(layers) - 1)
            return x
        packing = Packing(attention_mask.bool())
        h = packing.pack(x)  # (N, C): the real tokens only
        for layer in layers:
            h = layer(h, mask, packing)
        return packing.unpack(h)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) 1/0 -> (B, 1, 1, T) bool for SDPA (True = attend), or None when nothing is padded."""
        if attention_mask is None:
            return None
        keep = attention_mask.bool()
        if not torch.compiler.is_compiling() and bool(keep.all()):
            return None  # no padding: the unmasked kernels are faster
        # A row that is all padding would have every key masked: softmax over nothing is NaN.
        # Let such rows attend everywhere instead; their outputs are never used (pooling
        # gives them a zero vector), they just stay finite.
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        return keep[:, None, None, :]

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler output (B, C) from hidden states (B, T, C)."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (config.pooler is false)")
        return self.pooler(hidden)

    def sentence_embedding(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                           normalize: bool | None = None) -> torch.Tensor:
        """Sentence vectors (B, C), fp32: mean over the mask or the [CLS] state, optionally L2-normalised."""
        if self.config.pooling == "cls":
            emb = hidden[:, 0].float()
        else:
            emb = mean_pool(hidden, attention_mask)
        if self.config.normalize if normalize is None else normalize:
            emb = F.normalize(emb, p=2.0, dim=-1)  # a zero vector stays zero (eps in the norm)
        return emb

    # -- heads ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's output and, given ``labels``, its loss.

        head embedding:      (B, C) sentence vectors (no loss)
        head classification: (B, num_labels) logits; labels (B,) class ids, or (B,) floats for
                             num_labels == 1 (regression, MSE loss)
        head mlm:            (B, T, V) logits; labels (B, T) token ids, -100 = not masked/ignore
        head qa:             (B, T, 2) logits, [..., 0] answer start, [..., 1] answer end; labels
                             (B, 2) token positions of the start and end (0 = [CLS]: no answer in
                             this window); the loss is the mean of the two cross-entropies over T
        head none:           (B, T, C) last hidden states (no loss)
        """
        head = self.config.head
        if head == "qa":
            return self._answer_spans(input_ids, attention_mask, token_type_ids, labels)
        # Sentence embeddings and the classifier never read padded positions: skip computing them.
        skip = head in ("embedding", "classification")
        # The classifier reads the [CLS] state only: the last layer computes nothing else.
        hidden = self.encode(input_ids, attention_mask, token_type_ids, skip_padding=skip,
                             first_token_only=head == "classification")  # (B, T, C) or (B, 1, C)
        if head in ("embedding", "none"):
            if labels is not None:
                raise ValueError(f"head {head!r} has no loss: labels must be None")
            out = self.sentence_embedding(hidden, attention_mask) if head == "embedding" else hidden
            return out, None
        if head == "classification":
            assert self.classifier is not None
            logits = self.classifier(self.classifier_dropout(self.pool(hidden)))  # (B, num_labels)
            if labels is None:
                return logits, None
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
            return logits, loss
        assert self.mlm_head is not None
        logits = self.mlm_head(hidden)  # (B, T, V)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        return logits, loss


    def _answer_spans(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None,
                      labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The qa head: start / end logits of every token and, given labels, HF's span loss."""
        assert self.qa_outputs is not None
        # Every position is computed (no packing): the logits equal HF's at padded positions too,
        # and QA windows are nearly full anyway.
        hidden = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        logits = self.qa_outputs(hidden)  # (B, T, 2)
        if labels is None:
            return logits, None
        T = logits.size(1)
        # As HF: positions outside the sequence are clamped to T and ignored.
        positions = labels.clamp(0, T)  # (B, 2)
        start = F.cross_entropy(logits[..., 0].float(), positions[:, 0], ignore_index=T)
        end = F.cross_entropy(logits[..., 1].float(), positions[:, 1], ignore_index=T)
        return logits, (start + end) / 2


def build_from_config(config: dict) -> Bert:
    """Rebuild a Bert from a checkpoint's config.json (see fromzero.models.build_model)."""
    return Bert(BertConfig.from_dict(config))


# ---------------------------------------------------------------------------------------------
# Sentence embeddings from a checkpoint directory (``fromzero embed``)


def encoder_limit(directory: Path, config: BertConfig) -> int:
    """Longest input: the model's position limit, lowered by the tokenizer's declared limits."""
    limit = config.max_position_embeddings
    declared = (("tokenizer_config.json", "model_max_length"), ("sentence_bert_config.json", "max_seq_length"))
    for name, key in declared:
        path = directory / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise FromzeroError(f"{path} is not a valid JSON object") from None
        # transformers writes a huge sentinel (1e30) for "no limit"
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < limit:
            limit = value
    return limit


def load_encoder_tokenizer(directory: Path, config: BertConfig):
    """The checkpoint's ``tokenizer.json`` (a ``tokenizers.Tokenizer``), truncating to the model's limit.

    Special tokens ([CLS] ... [SEP]) come from the file's post-processor; the file's own padding
    setting is dropped (batches are padded per batch, to their longest sentence).
    """
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FromzeroError(f"{directory} has no tokenizer.json: cannot turn text into token ids")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on bad JSON
        first = first_line(e)
        raise FromzeroError(f"{path} is not a valid tokenizer.json: {first}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=encoder_limit(directory, config))
    return tokenizer


@torch.inference_mode()
def embed_checkpoint(directory: Path, texts: list[str], normalize: bool = True, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> list[list[float]]:
    """Sentence embeddings of ``texts`` from an encoder checkpoint, in input order.

    Mean-pooled over the attention mask (or the [CLS] state if the checkpoint's config says
    ``pooling: cls``) and, with ``normalize``, L2-normalised: what sentence-transformers computes
    for all-MiniLM-L6-v2. Texts are sorted by length into batches so each batch pads little.
    """
    from fromzero.checkpoint import CONFIG_FILE, load_model, read_json

    directory = Path(directory)
    if not directory.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {directory}")
    raw = read_json(directory / CONFIG_FILE, "model config")
    if raw.get("model_type") != "fromzero-bert":
        raise FromzeroError(
            f"{directory} holds a {raw.get('model_type')!r} model, not an encoder: embed needs a "
            "fromzero-bert checkpoint (e.g. `fromzero convert from-hf` of all-MiniLM-L6-v2)"
        )
    if batch_size <= 0:
        raise FromzeroError("batch size must be positive")
    config = BertConfig.from_dict(raw)
    tokenizer = load_encoder_tokenizer(directory, config)
    model = load_model(directory, device)
    assert isinstance(model, Bert)
    return embed_texts(model, tokenizer, config, texts, normalize, batch_size, where=f"{directory}/tokenizer.json")


def embed_texts(model: "Bert", tokenizer: Any, config: BertConfig, texts: Sequence[str], normalize: bool = True,
                batch_size: int = 32, where: str = "the tokenizer", encodings: list | None = None) -> list[list[float]]:
    """Sentence vectors of ``texts`` with a loaded encoder: batches of similar length (sorted,
    padded per batch), mean pooling over the attention mask, optional L2 normalisation.
    encodings: the tokenizer's encodings of ``texts`` when the caller already has them."""
    device = next(model.parameters()).device
    if encodings is None:
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    too_big = max((max(e.ids, default=0) for e in encodings), default=0)
    if too_big >= config.vocab_size:
        raise FromzeroError(
            f"{where} produces token id {too_big}, but the model's vocabulary has "
            f"{config.vocab_size} entries: tokenizer and weights do not belong together"
        )
    pad_id = config.pad_token_id or 0
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids), reverse=True)
    result: list[list[float]] = [[] for _ in texts]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            T = max(1, max(len(encodings[i].ids) for i in rows))
            ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
            types = torch.zeros((len(rows), T), dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n] = torch.tensor(encodings[i].ids, dtype=torch.long)
                types[r, :n] = torch.tensor(encodings[i].type_ids, dtype=torch.long)
                mask[r, :n] = 1
            ids, types, mask = ids.to(device), types.to(device), mask.to(device)
            hidden = model.encode(ids, mask, types, skip_padding=True)
            vectors = model.sentence_embedding(hidden, mask, normalize=normalize).cpu().tolist()
            for r, i in enumerate(rows):
                result[i] = vectors[r]
    return result


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """What a frozen fine-tune trains: the classifier (+ the pooler it reads) or the span head."""
    classifier, qa = getattr(model, "classifier", None), getattr(model, "qa_outputs", None)
    if qa is not None:
        return [qa]
    if classifier is not None:
        return [m for m in (classifier, getattr(model, "pooler", None)) if m is not None]
    return []


# What fine-tuning, LoRA and distillation need to know about this family (see fromzero.models).
FACTS = FamilyFacts(
    lora_targets=("query", "key", "value", "out"), peft_task_type="SEQ_CLS",
    hf_mapping="fromzero.models.convert_bert", depth_field="num_hidden_layers", layer_prefix="layers.",
    layer_stack=lambda model: (list(model.layers), []),  # post-LN: no final norm
    head_modules=lambda model: _head_modules(model),
    # the encoder over every token: the classifier's last layer otherwise attends from [CLS] only
    attention=lambda model: ([layer.attn for layer in model.layers],
                             functools.partial(model.encode, skip_padding=False, first_token_only=False)),
    export_signature="encoder",
)
