"""Transferability scores: LogME's evidence is the true marginal likelihood and is maximised;
kNN and the linear probe see separable features as separable and noise as noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from pipeline.assess import (
    _evidence,
    _maximise_evidence,
    gain_call,
    gain_verdict,
    knn_accuracy,
    linear_probe_accuracy,
    logme,
    verdict,
)


def _clusters(n_per=20, classes=4, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    feats = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centres])
    labels = np.repeat(np.arange(classes), n_per)
    return feats, labels


def _svd_parts(f, y):
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    z = u.T @ y
    return s, z, float(y @ y - z @ z)


def test_evidence_equals_gaussian_marginal_likelihood():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(30, 5))
    y = rng.normal(size=30)
    s, z, rest = _svd_parts(f, y)
    for alpha, beta in [(0.5, 2.0), (3.0, 0.7)]:
        cov = np.eye(30) / beta + f @ f.T / alpha
        direct = multivariate_normal(mean=np.zeros(30), cov=cov).logpdf(y)
        assert _evidence(s, z, rest, 30, 5, alpha, beta) == pytest.approx(direct, rel=1e-9)


def test_fixed_point_maximises_evidence():
    f, labels = _clusters()
    f = f - f.mean(axis=0)
    y = (labels == 1).astype(float)
    s, z, rest = _svd_parts(f, y)
    n, d = f.shape
    alpha, beta = _maximise_evidence(s, z, rest, n)
    best = _evidence(s, z, rest, n, d, alpha, beta)
    for da, db in [(1.3, 1), (0.7, 1), (1, 1.3), (1, 0.7)]:
        assert _evidence(s, z, rest, n, d, alpha * da, beta * db) < best


def test_scores_separate_signal_from_noise():
    feats, labels = _clusters()
    noise = np.random.default_rng(5).normal(size=feats.shape)
    assert knn_accuracy(feats, labels) == pytest.approx(1.0)
    assert linear_probe_accuracy(feats, labels) == pytest.approx(1.0)
    assert knn_accuracy(noise, labels) < 0.6
    assert linear_probe_accuracy(noise, labels) < 0.6
    assert logme(feats, labels) > logme(noise, labels)
    assert math.isfinite(logme(noise, labels))


def test_verdict_is_plain():
    pre = {"knn": 0.9, "linear_probe": 0.9, "logme": 1.0}
    rnd = {"knn": 0.62, "linear_probe": 0.6, "logme": 0.2}
    assert verdict(pre, rnd).startswith("pretrained features beat random ones by 28 points on kNN")
    assert "likely to help" in verdict(pre, rnd)
    assert "little" in verdict(pre, {**pre})


def test_gain_over_scratch_is_called_only_outside_the_noise():
    """Paired folds: a steady gain is called even when small; a gain that swings across zero
    from fold to fold is "uncertain" however large its mean; scratch near 100% is too easy."""
    steady = gain_call([0.62, 0.71, 0.66], [0.55, 0.63, 0.60])
    assert steady["call"] == "likely to help" and steady["gain"] == pytest.approx(0.07)
    assert steady["interval"][0] > 0
    assert gain_call([0.50, 0.55, 0.52], [0.60, 0.66, 0.61])["call"] == "likely to hurt"
    swing = gain_call([0.90, 0.40, 0.80], [0.50, 0.70, 0.50])
    assert swing["call"] == "uncertain" and swing["interval"][0] < 0 < swing["interval"][1]
    assert gain_call([0.99, 1.0, 1.0], [0.98, 1.0, 0.99])["call"] == "too easy to tell"
    assert gain_call([0.7, 0.7], [0.6, 0.6])["call"] == "likely to help"  # no spread: the gain is exact
    # ... unless a fold holds few images: one image each way is the least spread it can show.
    assert gain_call([0.7, 0.7, 0.7], [0.6, 0.6, 0.6], resolution=0.1)["call"] == "uncertain"
    assert gain_call([0.7], [0.6])["call"] == "uncertain"  # one fold: no interval
    g = {"strategy": "full", "folds": 3, "steps": 50, "finetuned": [0.62, 0.71, 0.66], "scratch": [0.55, 0.63, 0.60],
         **steady}
    assert gain_verdict(g).startswith("cross-validated on the training shots, full vs scratch: +7.0 points")
    assert gain_verdict(g).endswith("likely to help.")
