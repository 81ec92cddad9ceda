"""Fréchet distance: sampling consistency, closed forms, symmetry/invariances, errors."""

from __future__ import annotations

import numpy as np
import pytest

from sora_jax.evaluation import frechet


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = frechet.gaussian_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_two_samples_of_one_gaussian_are_close():
    rng = np.random.default_rng(1)
    d = 4
    mu = rng.normal(size=d)
    chol = np.linalg.cholesky(_random_spd(rng, d))
    a = mu + rng.normal(size=(20_000, d)) @ chol.T
    b = mu + rng.normal(size=(20_000, d)) @ chol.T
    # The estimator's bias and spread at N = 20k, D = 4 are O(D² tr(sigma) / N) ~ 1e-2
    # relative to tr(sigma); shifting every mean by 1 must give ≈ D = 4.
    value = frechet.frechet_distance_from_features(a, b)
    assert 0.0 <= value < 0.02 * np.trace(chol @ chol.T)
    shifted = frechet.frechet_distance_from_features(a, b + 1.0)
    np.testing.assert_allclose(shifted, d * 1.0, rtol=0.05)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_diagonal_covariances_closed_form(d):
    """Commuting covariances: d² = |mu1 - mu2|² + Σ_i (sqrt(a_i) - sqrt(b_i))²."""
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 5.0, size=d), rng.uniform(0.1, 5.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_non_commuting_2d_closed_form():
    """For 2x2 PSD M, Tr(M^{1/2}) = sqrt(Tr M + 2 sqrt(det M)); here Tr M = Tr(sigma1 sigma2)
    and det M = det sigma1 det sigma2, an independent formula without any matrix root."""
    sigma1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    sigma2 = np.array([[1.0, -0.7], [-0.7, 3.0]])
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)  # really non-commuting
    mu1, mu2 = np.array([0.5, -1.0]), np.array([1.5, 2.0])
    tr_sqrt = np.sqrt(
        np.trace(sigma1 @ sigma2) + 2 * np.sqrt(np.linalg.det(sigma1) * np.linalg.det(sigma2))
    )
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    got = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_symmetry_identity_and_rotation_invariance():
    rng = np.random.default_rng(7)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    value = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert value > 0
    np.testing.assert_allclose(frechet.frechet_distance(mu2, s2, mu1, s1), value, rtol=1e-9)
    assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # A common orthogonal change of basis (and a common shift) leaves the distance unchanged.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shift = rng.normal(size=d)
    rotated = frechet.frechet_distance(q @ mu1 + shift, q @ s1 @ q.T, q @ mu2 + shift, q @ s2 @ q.T)
    np.testing.assert_allclose(rotated, value, rtol=1e-9)


def test_singular_covariance_is_finite():
    """Rank-deficient covariances (N <= D features) still give a finite, clipped value."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 10)), rng.normal(size=(5, 10))
    value = frechet.frechet_distance_from_features(a, b)
    assert np.isfinite(value) and value >= 0


def test_errors_name_the_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"a has D=3 .* b has D=4"):
        frechet.frechet_distance_from_features(rng.normal(size=(5, 3)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match=r"b has N=1"):
        frechet.frechet_distance_from_features(rng.normal(size=(5, 3)), rng.normal(size=(1, 3)))
    with pytest.raises(ValueError, match=r"a must be features \[N, D\]"):
        frechet.frechet_distance_from_features(rng.normal(size=5), rng.normal(size=(5, 1)))
    with pytest.raises(ValueError, match=r"N=1"):
        frechet.gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"mu2 has D=2"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match=r"sigma2 must be \[D, D\]"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
