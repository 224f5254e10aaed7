"""Attention maps of fromzero's transformers (BERT, ViT, GPT), per layer and head, and their PNG grid.

The models compute attention with ``F.scaled_dot_product_attention``, which never materialises
the attention probabilities. Rather than give every model a second, slower attention path, this
module puts a forward pre-hook on each attention module that reads the module's input and
recomputes ``softmax(q k^T / sqrt(D) + mask)`` from the module's own query/key projections (plus
rotary positions and grouped-query head sharing for LLaMA-style GPTs). The model code stays
untouched and the forward pass itself is unchanged; ``tests/inference/test_explain.py`` checks
the recomputed probabilities against Hugging Face's ``output_attentions`` for BERT, ViT, GPT-2
and LLaMA, so a change in a model's attention that the hooks do not follow fails a test.
Shapes: L = layers, H = heads, T = tokens (queries x keys), D = head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError

# Tick labels are drawn on the panels of sequences up to this many tokens (more are unreadable).
MAX_LABELLED_TOKENS = 24
# Inches per panel of the grid, and the resolution the PNG is rendered at.
PANEL_INCHES = 1.6
DPI = 100


def _probabilities(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None = None,
                   causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) in fp32 for q (B, H, T, D), k (B, G, S, D) -> (B, H, T, S).

    keep: bool mask broadcastable to (B, H, T, S), True = may be attended to. causal: query i
    sees keys 0..i. G < H (grouped-query attention): query head h reads key head h // (H / G).
    """
    q, k = q.float(), k.float()
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if causal:
        T, S = scores.shape[-2:]
        future = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu(diagonal=S - T + 1)
        scores = scores.masked_fill(future, float("-inf"))
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A forward argument given by position or by keyword."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _bert_hook(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """fromzero.models.bert.SelfAttention: forward(x, mask, packing=None, first_query_only=False)."""
    x, mask = args[0], _arg(args, kwargs, 1, "mask")
    if _arg(args, kwargs, 2, "packing") is not None or _arg(args, kwargs, 3, "first_query_only", False):
        raise RuntimeError("attention maps need the plain (B, T, C) encoder path")
    q, k, _ = module.project_qkv(x)
    B, T, _ = q.shape
    H, D = module.n_head, module.head_size
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, H, D).transpose(1, 2)
    return _probabilities(q, k, keep=mask)  # mask: (B, 1, 1, T) bool or None


def _vit_hook(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """fromzero.models.vit.ViTSelfAttention: forward(x), fused qkv (rows q, then k, then v)."""
    x = args[0]
    B, T, _ = x.shape
    H, D = module.n_head, module.head_size
    q, k, _ = module.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    return _probabilities(q, k)


def _gpt_hook(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """fromzero.models.layers.CausalSelfAttention: forward(x, kv_cache=None, layer=0, rope=None)."""
    from fromzero.models.layers import apply_rope

    x = args[0]
    if _arg(args, kwargs, 1, "kv_cache") is not None:
        raise RuntimeError("attention maps are computed without a KV cache")
    rope = _arg(args, kwargs, 3, "rope")
    B, T, _ = x.shape
    H, G, D = module.n_head, module.n_kv_head, module.head_size
    q, k, _ = module.c_attn(x).split((H * D, G * D, G * D), dim=2)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, G, D).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return _probabilities(q, k, causal=True)


def _attention_modules(model: nn.Module) -> tuple[list[tuple[nn.Module, Callable]], Callable]:
    """The attention module of every layer, in order (the model family's ``attention`` fact),
    each with the hook that reads its class of attention; and the forward pass that runs them."""
    from fromzero.models import MODEL_REGISTRY, family_facts
    from fromzero.models.bert import SelfAttention
    from fromzero.models.layers import CausalSelfAttention
    from fromzero.models.vit import ViTSelfAttention

    facts = family_facts(model)
    if facts.attention is None:
        supported = ", ".join(t for t in sorted(MODEL_REGISTRY) if family_facts(t).attention is not None)
        raise FromzeroError(f"attention maps need a transformer ({supported}), not a {type(model).__name__}")
    hooks = {SelfAttention: _bert_hook, ViTSelfAttention: _vit_hook, CausalSelfAttention: _gpt_hook}
    modules, run = facts.attention(model)
    return [(module, hooks[type(module)]) for module in modules], run


@torch.no_grad()
def attention_maps(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (L, H, T, T) of one input, float32 on the CPU.

    inputs: token ids (1, T) for BERT and GPT, pixels (1, Ch, Hi, Wi) for a ViT. BERT runs its
    encoder over every token (not the classifier's [CLS]-only last layer); GPT is causal, so
    row i of each map has zeros beyond column i. Every row sums to 1.
    """
    if inputs.size(0) != 1:
        raise ValueError(f"attention maps are drawn for one input at a time, got a batch of {inputs.size(0)}")
    recorded: list[torch.Tensor] = []
    handles = []
    modules, run = _attention_modules(model)
    for module, compute in modules:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, compute=compute) -> None:
            recorded.append(compute(mod, args, kwargs)[0].cpu())  # (H, T, T)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        run(inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack(recorded)


def attention_figure(maps: torch.Tensor, tokens: Sequence[str] | None = None, title: str = "") -> Any:
    """A matplotlib Figure: one panel per (layer, head), L rows x H columns, one colour scale (0 to max).

    Rows are queries, columns keys. Token labels are drawn on the left column and bottom row when
    the sequence has at most MAX_LABELLED_TOKENS tokens. Built with ``matplotlib.figure.Figure``
    (no pyplot, no global state), so it is safe to call from any thread.
    """
    from matplotlib.figure import Figure

    L, H, T, _ = maps.shape
    labelled = tokens is not None and len(tokens) == T and T <= MAX_LABELLED_TOKENS
    margin = 0.9 if labelled else 0.5  # inches for tick labels / layer and head captions
    width, height = H * PANEL_INCHES + margin + 0.8, L * PANEL_INCHES + margin + (0.5 if title else 0.2)
    fig = Figure(figsize=(width, height), dpi=DPI)
    grid = fig.add_gridspec(L, H, left=margin / width, right=1 - 0.8 / width, bottom=margin / height,
                            top=1 - (0.5 if title else 0.2) / height, wspace=0.08, hspace=0.08)
    font = 5 if T > 12 else 6
    # One colour scale for every panel, up to the largest weight: with many tokens the weights are
    # small, and a fixed [0, 1] scale would draw every panel dark.
    top = max(float(maps.max()), 1e-6)
    image = None
    for layer in range(L):
        for head in range(H):
            ax = fig.add_subplot(grid[layer, head])
            image = ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=top,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if labelled and head == 0:
                ax.set_yticks(range(T), labels=list(tokens), fontsize=font)
            if labelled and layer == L - 1:
                ax.set_xticks(range(T), labels=list(tokens), fontsize=font, rotation=90)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8, labelpad=2 if labelled else 4)
    if image is not None:
        cax = fig.add_axes((1 - 0.6 / width, margin / height, 0.15 / width, 1 - (margin + 0.7) / height))
        fig.colorbar(image, cax=cax).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def figure_png(fig: Any) -> bytes:
    """The PNG bytes of a matplotlib Figure (rendered with the Agg backend, at the figure's dpi)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


def maps_summary(maps: torch.Tensor, max_values: int = 200_000) -> dict[str, Any]:
    """JSON-ready description of attention maps: their shape and, when small enough, the weights.

    ``weights`` is [layer][head][query][key] rounded to 5 decimals; left out (with the reason)
    above ``max_values`` numbers, so a 12-layer, 12-head, 197-token ViT does not write 5.6 million.
    """
    L, H, T, S = maps.shape
    out: dict[str, Any] = {"layers": L, "heads": H, "tokens_count": T, "shape": [L, H, T, S]}
    if maps.numel() <= max_values:
        out["weights"] = [[[[round(float(v), 5) for v in row] for row in head] for head in layer]
                          for layer in maps.tolist()]
    else:
        out["weights_omitted"] = f"{maps.numel()} values (more than {max_values}); see the PNG"
    return out


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Mean attention entropy per (layer, head) in nats, (L, H): low = sharply focused heads."""
    p = maps.clamp_min(1e-12)
    return -(maps * p.log()).sum(-1).mean(-1)
