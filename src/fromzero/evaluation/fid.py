"""Frechet distance between two sets of feature vectors, and the features of a fromzero classifier.

FID (Heusel et al. 2017) fits a Gaussian to each set of features and measures

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)),

the squared 2-Wasserstein distance between the two Gaussians (:func:`frechet_distance`). The
trace of the matrix square root is taken with symmetric eigendecompositions:
Tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(S_1^(1/2) S_2 S_1^(1/2))), whose argument is symmetric
positive semi-definite, so rank-deficient covariances (dead ReLU features, fewer samples than
dimensions) need no offset and give no complex parts. The standard FID uses Inception-v3's pool features of ImageNet;
here the features come from a domain classifier instead (:class:`ClassifierFeatures`: the input
of the last Linear layer of a fromzero image-classification checkpoint, e.g. an MNIST CNN), so
its values are comparable between models scored with the *same* classifier, and not with
published FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fromzero.errors import FromzeroError


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), float64, unbiased covariance."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise FromzeroError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from rounding are taken as 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise FromzeroError(f"mismatched Gaussian statistics: means {mu1.shape} / {mu2.shape}, "
                            f"covariances {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """The Frechet distance between two sets of features (N_a, D) and (N_b, D)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


class ClassifierFeatures:
    """An image-classification checkpoint as a feature extractor: for images with pixels in
    [0, 1] it gives the logits and the penultimate features (the input of its last Linear
    layer), after the checkpoint's own resizing and normalisation (info.json)."""

    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        from fromzero.checkpoint import checkpoint_info, load_model
        from fromzero.models import family_facts

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FromzeroError(f"classifier checkpoint not found: {self.directory}")
        info = checkpoint_info(self.directory)
        if info.get("task") != "image-classification":
            raise FromzeroError(f"{self.directory} is not an image classifier (its task is "
                                f"{info.get('task')!r}); the features come from an image-classification "
                                "checkpoint")
        self.model = load_model(self.directory, device).eval()
        self.device = next(self.model.parameters()).device
        head = family_facts(self.model).head_modules(self.model)
        if len(head) != 1 or not isinstance(head[0], torch.nn.Linear):
            raise FromzeroError(f"cannot find the last Linear layer of {type(self.model).__name__}")
        self.head = head[0]
        self.image_size = int(info.get("image_size") or 28)
        self.channels = int(info.get("channels") or 1)
        mean, std = info.get("mean"), info.get("std")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) if mean else None
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) if std else None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixels in [0, 1] -> what the classifier takes (channels, size, normalisation)."""
        x = images.float()
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), features (N, D)) of images (N, C, H, W) with pixels in [0, 1]."""
        logits, feats = [], []
        captured: dict[str, Any] = {}
        hook = self.head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
        try:
            for start in range(0, len(images), batch_size):
                x = self.prepare(images[start : start + batch_size]).to(self.device)
                logits.append(self.model(x).float().cpu())
                feats.append(captured["x"].float().flatten(1).cpu())
        finally:
            hook.remove()
        return torch.cat(logits), torch.cat(feats)
