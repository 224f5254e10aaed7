"""Evaluation plots: the confusion matrix as a PNG (matplotlib, Agg backend, no display needed).

    plot_confusion_matrix(m["confusion_matrix"], m["labels"], run_dir / "plots" / "confusion.png")
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fromzero.checkpoint import atomic_write_bytes
from fromzero.errors import FromzeroError

if TYPE_CHECKING:
    import torch


def plot_confusion_matrix(
    matrix: Any, labels: Sequence[str], path: Path, normalize: bool = False
) -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted) to ``path`` as PNG.

    Every cell is annotated with its count; with ``normalize=True`` the colour and the main
    number are the fraction of the true class (row) and the count is shown underneath. Rows with
    no samples stay 0. The figure grows with the number of classes and the font shrinks, so 3
    and 10+ classes both stay readable. Written atomically (a reader never sees half a PNG).
    Returns ``path``.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise FromzeroError(f"confusion matrix must be square and non-empty, got shape {counts.shape}")
    n = counts.shape[0]
    names = [str(x) for x in labels]
    if len(names) != n:
        raise FromzeroError(f"confusion matrix is {n}x{n} but {len(names)} labels were given")
    if not np.all(np.isfinite(counts.astype(np.float64))) or np.any(counts < 0):
        raise FromzeroError("confusion matrix entries must be finite, non-negative counts")

    if normalize:
        row_sums = counts.sum(axis=1, keepdims=True).astype(np.float64)
        values = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)
        vmax = 1.0
    else:
        values = counts.astype(np.float64)
        vmax = max(float(values.max()), 1.0)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = min(max(4.5, 0.6 * n + 2.5), 16.0)  # inches; 3 classes -> 4.5, 10 -> 8.5
    font = max(7.0, min(12.0, 15.0 - 0.6 * n))
    long_names = max(len(x) for x in names) > 6
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=110)
    try:
        im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
        ax.set_xticks(range(n), labels=names, rotation=45 if (long_names or n > 6) else 0,
                      ha="right" if (long_names or n > 6) else "center", fontsize=font)
        ax.set_yticks(range(n), labels=names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix" + (" (normalized by true class)" if normalize else ""))
        for i in range(n):
            for j in range(n):
                count = counts[i, j]
                count_text = f"{int(count)}" if float(count).is_integer() else f"{float(count):.3g}"
                text = f"{values[i, j]:.2f}\n({count_text})" if normalize else count_text
                color = "white" if values[i, j] > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=font * (0.85 if normalize else 1.0))
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        atomic_write_bytes(Path(path), png.getvalue())
    finally:
        plt.close(fig)
    return Path(path)


def image_grid_png(images: "torch.Tensor", nrow: int, pad: int = 2) -> bytes:
    """PNG bytes of a grid of images (N, C, H, W) with pixels in [-1, 1], ``nrow`` per row
    (torchvision's make_grid); grayscale stays one channel. Write it with atomic_write_bytes."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=pad, pad_value=0.5)
    array = (grid * 255).round().to(torch.uint8)
    mode = "L" if images.shape[1] == 1 else "RGB"
    pixels = array[0].numpy() if mode == "L" else array.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()
