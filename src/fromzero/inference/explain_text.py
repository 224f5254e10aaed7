"""Token attributions of a text classifier with Integrated Gradients, and their HTML page.

Integrated Gradients (Sundararajan et al., 2017) averages the gradient of the output along the
straight path from a *baseline* input to the input, times (input - baseline): the attributions
sum to F(input) - F(baseline) up to the *convergence delta* of the numerical integral (reported,
so a user can raise ``--steps``). Here the features are the tokens' word embeddings (captum's
``LayerIntegratedGradients`` on ``embeddings.word``, summed over the hidden dimension). The
baseline keeps the special tokens and replaces every other by [PAD] (a zero embedding row in
BERT) or [MASK], with the same positions and segments, so only "which words are there" is
attributed. F is the target class's *logit*: a softmax saturates, where gradients vanish.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError

BASELINES = ("pad", "mask")


@dataclass
class TokenAttribution:
    """One text's token attributions (JSON-ready through :meth:`to_json`)."""

    text: str
    """The input text."""
    tokens: list[str]
    """The tokens the model saw, [CLS] and [SEP] included."""
    spans: list[list[int]]
    """Character [start, end) of each token in ``text`` ([0, 0] for special tokens)."""
    special: list[bool]
    """True for tokens the tokenizer added ([CLS], [SEP]): kept in the baseline, not attributed."""
    attributions: list[float]
    """Integrated Gradients per token (sum over the embedding dimension); positive = for the target."""
    label: str
    """The predicted class."""
    target: str
    """The class whose logit is explained."""
    probabilities: dict[str, float]
    """Softmax probability of every class."""
    delta: float
    """Convergence delta: sum(attributions) - (F(input) - F(baseline)); small = a good integral."""
    logit_difference: float
    """F(input) - F(baseline): what the attributions add up to, up to ``delta``."""
    steps: int
    """Integration steps (captum's Gauss-Legendre rule)."""
    baseline: str
    """pad | mask: the token that replaced every non-special token in the baseline."""
    truncated: bool = False
    """True when the text was cut to the model's max_length."""
    method: str = field(default="ig", init=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def top_tokens(self, n: int = 5) -> list[tuple[str, float]]:
        """The n non-special tokens with the largest (signed) attribution, largest first."""
        scored = [(t, a) for t, a, s in zip(self.tokens, self.attributions, self.special) if not s]
        return sorted(scored, key=lambda ta: ta[1], reverse=True)[:n]


def check_ids(ids: list[int], vocab: int) -> None:
    """One-line errors for a text of no tokens, or of ids beyond the model's vocabulary (0: unknown)."""
    if not ids:
        raise FromzeroError("the tokenizer turned the text into no tokens")
    if vocab and max(ids) >= vocab:
        raise FromzeroError(f"the tokenizer produces token id {max(ids)}, but the model's vocabulary has "
                            f"{vocab} entries: tokenizer and weights do not belong together")


def _baseline_id(tokenizer: Any, pad_id: int, baseline: str) -> int:
    if baseline not in BASELINES:
        raise FromzeroError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline == "pad":
        return pad_id
    mask_id = tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        raise FromzeroError("this tokenizer has no [MASK] token: use the pad baseline")
    return int(mask_id)


def integrated_gradients(model: nn.Module, tokenizer: Any, text: str, labels: list[str],
                         target: str | None = None, steps: int = 50, baseline: str = "pad",
                         max_length: int | None = None) -> TokenAttribution:
    """Integrated Gradients of one text's tokens for a fromzero-bert classifier.

    model: a :class:`fromzero.models.bert.Bert` with ``head="classification"`` (eval mode; fp32).
    tokenizer: its ``tokenizers.Tokenizer`` (``load_encoder_tokenizer``): adds [CLS] ... [SEP].
    target: the class to explain (None = the predicted one). steps: points of the path integral.
    """
    from captum.attr import LayerIntegratedGradients

    if steps <= 0:
        raise FromzeroError(f"--steps must be positive, got {steps}")
    if not text.strip():
        raise FromzeroError("cannot explain an empty text")
    device = next(model.parameters()).device
    if max_length is not None:
        tokenizer.enable_truncation(max_length=max_length)  # [SEP] is kept, as in training
    tokenizer.no_padding()
    encoding = tokenizer.encode(text, add_special_tokens=True)
    check_ids(encoding.ids, model.config.vocab_size)
    special = [bool(s) for s in encoding.special_tokens_mask]
    fill = _baseline_id(tokenizer, model.config.pad_token_id or 0, baseline)
    ids = torch.tensor([encoding.ids], dtype=torch.long, device=device)  # (1, T)
    base = torch.tensor([[i if s else fill for i, s in zip(encoding.ids, special)]], dtype=torch.long,
                        device=device)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = model(input_ids)  # one unpadded text: no attention mask needed
        return logits.float()  # (B, K)

    model.eval()
    with torch.no_grad():
        logits = forward(torch.cat([ids, base]))
    probs = torch.softmax(logits[0], dim=-1)
    predicted = int(probs.argmax())
    target_index = predicted if target is None else labels.index(target)
    lig = LayerIntegratedGradients(forward, model.embeddings.word)
    attributions, delta = lig.attribute(ids, baselines=base, target=target_index, n_steps=steps,
                                        internal_batch_size=min(steps, 64), return_convergence_delta=True)
    per_token = attributions.sum(dim=-1)[0].detach().float().cpu()  # (T,)
    return TokenAttribution(
        text=text,
        tokens=list(encoding.tokens),
        spans=[[int(s), int(e)] for s, e in encoding.offsets],
        special=special,
        attributions=[float(a) for a in per_token],
        label=labels[predicted],
        target=labels[target_index],
        probabilities={name: round(float(p), 6) for name, p in zip(labels, probs)},
        delta=float(delta.reshape(-1)[0]),
        logit_difference=float(logits[0, target_index] - logits[1, target_index]),
        steps=steps,
        baseline=baseline,
        truncated=bool(encoding.overflowing),
    )


# ---------------------------------------------------------------------------------------------
# HTML


def _colour(value: float, scale: float) -> str:
    """Background for an attribution: green for the target, red against, white near zero."""
    strength = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0)
    alpha = round(0.85 * strength, 3)
    return f"rgba(22, 163, 74, {alpha})" if value >= 0 else f"rgba(220, 38, 38, {alpha})"


def render_html(result: TokenAttribution, title: str = "") -> str:
    """A self-contained HTML page: the text with each token highlighted by its attribution.

    Green = evidence for the target class, red = against, intensity relative to the largest
    |attribution|. Hovering a token shows its value. The original text is shown as it was
    written (characters between tokens kept), the special tokens in grey at the ends; every
    piece of text is HTML-escaped, so the input can never inject markup.
    """
    e = html.escape
    scale = max((abs(a) for a, s in zip(result.attributions, result.special) if not s), default=0.0)
    pieces: list[str] = []
    cursor = 0
    for token, (start, end), attribution, special in zip(result.tokens, result.spans, result.attributions,
                                                         result.special):
        if special or end <= start:
            pieces.append(f'<span class="special" title="{attribution:+.4f}">{e(token)}</span>')
            continue
        if start > cursor:
            pieces.append(e(result.text[cursor:start]))
        pieces.append(f'<span class="tok" style="background:{_colour(attribution, scale)}" '
                      f'title="{e(token)}: {attribution:+.4f}">{e(result.text[start:end])}</span>')
        cursor = max(cursor, end)
    rows = "".join(
        f'<tr class="{"target" if name == result.target else ""}"><td>{e(name)}</td><td>{p:.4f}</td>'
        f'<td><div class="bar" style="width:{100 * p:.1f}%"></div></td></tr>'
        for name, p in result.probabilities.items()
    )
    top = ", ".join(f"{e(t)} ({a:+.3f})" for t, a in result.top_tokens(5))
    heading = e(title) if title else "Integrated Gradients"
    note = " The text was truncated to the model's max_length." if result.truncated else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{heading}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 50em; margin: 2em auto; color: #222; }}
.text {{ font-size: 1.3em; line-height: 2.1; padding: 0.8em; border: 1px solid #ddd; border-radius: 6px;
         white-space: pre-wrap; }}
.tok {{ padding: 0.1em 0.15em; border-radius: 3px; }}
.special {{ color: #999; font-size: 0.75em; margin: 0 0.3em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td {{ padding: 0.2em 0.8em 0.2em 0; }}
tr.target td {{ font-weight: bold; }}
.bar {{ background: #2563eb; height: 0.8em; min-width: 1px; }}
.legend span {{ padding: 0.1em 0.5em; border-radius: 3px; }}
.meta {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{heading}</h1>
<p>Predicted: <b>{e(result.label)}</b>. Explained class: <b>{e(result.target)}</b>.</p>
<div class="text">{''.join(pieces)}</div>
<p class="legend"><span style="background:{_colour(1, 1)}">for {e(result.target)}</span>
<span style="background:{_colour(-1, 1)}">against {e(result.target)}</span></p>
<table>{rows}</table>
<p>Top tokens: {top or '(none)'}</p>
<p class="meta">Integrated Gradients on the word embeddings of the class logit, {result.steps} steps,
baseline: every non-special token replaced by [{e(result.baseline.upper())}]. The attributions add up to
the logit difference {result.logit_difference:+.4f} up to the convergence delta {result.delta:+.2e}.{note}</p>
</body>
</html>
"""
