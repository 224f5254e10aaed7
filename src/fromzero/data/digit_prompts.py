"""Text prompts for handwritten digits: templates over the digit and a *measured* style.

A text-conditioned generator needs a caption per training image. MNIST has none, so each image
gets prompts from templates over its digit ("a handwritten seven", "number 8") and, where it
is clearly one or the other, its stroke thickness, measured on the image: the ink pixel count
(pixels >= 128) against the median of its digit's training images. The thickest third of each
digit is "thick", the thinnest third "thin" ("the digit 3 written thickly", "a thin 1"); the
middle third gets only the plain templates.

Some templates are held out of training (:data:`HELD_OUT_TEMPLATES`): the benchmark prompts
with them to measure how the model generalises to phrasings it never saw (the sentence
encoder maps them near the seen ones, or it does not).

:func:`prompt_table` gives every prompt string of a digit set and, per (digit, style), the
indices of the prompts an image of that kind may be captioned with; training draws one of them
per image and step.
"""

from __future__ import annotations

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("plain", "thick", "thin")
"""Style index of an image: 0 = middle third of its digit's ink counts, 1 = thickest, 2 = thinnest."""

# {w}: the digit's word ("seven"), {n}: its numeral ("7"), {a}: "a" or "an" before the word.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "plain": ("a handwritten {w}", "the digit {n}", "number {n}", "{a} {w}", "the number {w}", "digit {w}",
              "an image of the digit {n}", "handwritten digit {n}", "{w}", "{n}", "a {n} written by hand",
              "the handwritten number {w}"),
    "thick": ("the digit {n} written thickly", "a thick {w}", "a bold {n}", "{a} {w} drawn with a thick pen",
              "a thick handwritten {n}"),
    "thin": ("a thin {n}", "the digit {w} written thinly", "a thin {w}", "{a} {w} drawn with a fine pen",
             "a thin handwritten {n}"),
}
HELD_OUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "plain": ("a picture of a handwritten {w}", "please draw the number {n}", "{w}, written by hand",
              "write {a} {w}", "the numeral {n}"),
    "thick": ("a heavy, bold {w}",),
    "thin": ("a skinny {n}",),
}


def render(template: str, digit: int) -> str:
    """The template filled in for ``digit``."""
    word = DIGIT_WORDS[digit]
    article = "an" if word[0] in "aeiou" else "a"
    return template.format(w=word, n=digit, a=article)


def prompts_for(digit: int, style: str = "plain", held_out: bool = False) -> list[str]:
    """The prompts of one digit and style (the plain ones describe any image of the digit)."""
    table = HELD_OUT_TEMPLATES if held_out else TEMPLATES
    return [render(t, digit) for t in table[style]]


def measure_styles(images: torch.Tensor, labels: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]
                   | None = None) -> torch.Tensor:
    """Style index per image (0 plain, 1 thick, 2 thin) from its ink count (pixels >= 128) against
    the thirds of its digit's counts in ``reference`` (images, labels; default: these images)."""
    ink = ink_counts(images)
    ref_images, ref_labels = reference if reference is not None else (images, labels)
    ref_ink = ink_counts(ref_images)
    styles = torch.zeros(len(labels), dtype=torch.long)
    for d in range(10):
        counts = ref_ink[ref_labels == d].float()
        if counts.numel() == 0:
            continue
        low, high = torch.quantile(counts, 1 / 3), torch.quantile(counts, 2 / 3)
        rows = labels == d
        styles[rows & (ink > high)] = 1
        styles[rows & (ink < low)] = 2
    return styles


def ink_counts(images: torch.Tensor) -> torch.Tensor:
    """Pixels with ink (>= 128 of 255) per uint8 image (N, 1, H, W) -> (N,)."""
    return (images >= 128).flatten(1).sum(1)


def prompt_table() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(prompts, candidates, counts) for training: ``prompts`` every training prompt of the ten
    digits; ``candidates[d * 3 + s, :counts[d * 3 + s]]`` the indices of the prompts an image of
    digit d and style s may get (its plain prompts + those of its style), padded with -1."""
    prompts: list[str] = []
    index: dict[str, int] = {}

    def idx(text: str) -> int:
        if text not in index:
            index[text] = len(prompts)
            prompts.append(text)
        return index[text]

    rows: list[list[int]] = []
    for d in range(10):
        plain = [idx(p) for p in prompts_for(d)]
        for s, style in enumerate(STYLES):
            rows.append(plain + ([idx(p) for p in prompts_for(d, style)] if s else []))
    width = max(len(r) for r in rows)
    candidates = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        candidates[i, : len(r)] = torch.tensor(r)
    counts = torch.tensor([len(r) for r in rows])
    return prompts, candidates, counts
