"""The Frechet distance (fromzero.evaluation.fid) against hand-made Gaussians, and classifier features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fromzero.errors import FromzeroError
from fromzero.evaluation.fid import ClassifierFeatures, fid_from_features, frechet_distance, gaussian_stats


def test_identical_sets_are_at_distance_zero() -> None:
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_one_dimensional_gaussians() -> None:
    # N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 sqrt(1 * 4) = 2
    d = frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([1.0]), np.array([[4.0]]))
    assert d == pytest.approx(2.0)


def test_known_means_and_covariances() -> None:
    # diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 5.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # the same Gaussians in a rotated basis: the distance does not change
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected)


def test_sample_statistics_converge_to_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(20000, 2))
    y = rng.normal(1.0, 2.0, size=(20000, 2))
    assert fid_from_features(x, y) == pytest.approx(2 * 2.0, rel=0.05)  # 2 dimensions of the 1-D case
    mu, sigma = gaussian_stats(torch.from_numpy(x))
    assert mu.shape == (2,) and sigma.shape == (2, 2)


def test_the_eigen_method_matches_scipys_matrix_square_root() -> None:
    from scipy import linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    reference = m1 @ m1 - 2 * m1 @ m2 + m2 @ m2 + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(float(reference), rel=1e-6)
    # rank-deficient (a dead feature, fewer samples than dimensions): finite, identical sets still 0
    few = np.concatenate([rng.normal(size=(5, 8)), np.zeros((5, 1))], axis=1)
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-6)


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(FromzeroError, match="at least 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(FromzeroError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_classifier_features_are_the_input_of_the_last_linear(tmp_path: Path) -> None:
    from fromzero.checkpoint import save_checkpoint
    from fromzero.models.cnn import CNNConfig, build_cnn

    torch.manual_seed(0)
    model = build_cnn("simple", 10, in_channels=1)
    config = CNNConfig(arch="simple", num_classes=10, in_channels=1).to_dict()
    save_checkpoint(tmp_path / "cls", model, config,
                    info={"task": "image-classification", "image_size": 28, "channels": 1, "mean": [0.5],
                          "std": [0.25]})
    features = ClassifierFeatures(tmp_path / "cls")
    images = torch.rand(5, 1, 28, 28)
    logits, feats = features(images, batch_size=2)
    head = features.head
    assert logits.shape == (5, 10) and feats.shape == (5, head.in_features)
    with torch.no_grad():  # the head applied to the features gives the logits
        torch.testing.assert_close(head(feats), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, features.model((images - 0.5) / 0.25), atol=1e-5, rtol=1e-5)
    save_checkpoint(tmp_path / "other", model, config, info={"task": "image-generation"})
    with pytest.raises(FromzeroError, match="not an image classifier"):
        ClassifierFeatures(tmp_path / "other")
