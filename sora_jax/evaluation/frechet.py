r"""Fréchet distance between two Gaussians fitted to feature sets (the FID/FVD statistic).

Each feature set `[N, D]` is summarized by its mean `mu` `[D]` and sample covariance
`sigma` `[D, D]` (divisor N - 1). The squared Fréchet (2-Wasserstein) distance between
N(mu1, sigma1) and N(mu2, sigma2) is

    d² = |mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 (sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})

(Dowson & Landau 1982; Heusel et al. 2017 for FID). The trace of the matrix square root is
computed with numpy's symmetric eigendecomposition only, in float64: S = sigma1^{1/2}
from `eigh` with the eigenvalues clipped at 0, M = S sigma2 S (symmetrized against
round-off), and Tr(M^{1/2}) = sum of sqrt of the clipped eigenvalues of M. Because M is
symmetric positive semi-definite this avoids the complex results and `scipy.linalg.sqrtm`
dependency of the usual implementation, and it is symmetric in its arguments up to
round-off (Tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}) equals the same with 1 and 2 swapped).

The function returns d², the value reported as FID/FVD. The feature network is pluggable:
this module takes any `[N, D]` features; the `fvd` evaluator (sora_jax.evaluation.evaluators)
gets them from sora_jax.evaluation.features and reports d² under a key naming the network:
`fvd_i3d` (I3D) or `fd_random_conv` (a fixed random 3D conv net, not FVD).
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `mu` `[D]` and sample covariance `sigma` `[D, D]` (N - 1) of `features` `[N, D]`."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D]; got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(
            f"features has N={x.shape[0]} rows; a sample covariance needs N >= 2 feature vectors"
        )
    mu = x.mean(axis=0)
    centered = x - mu  # [N, D]
    sigma = centered.T @ centered / (x.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, negative eigenvalues clipped to 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Fréchet distance d² between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if mu.ndim != 1:
            raise ValueError(f"{name} must be a vector [D]; got shape {mu.shape}")
    d = mu1.shape[0]
    if mu2.shape[0] != d:
        raise ValueError(f"mu1 has D={d} but mu2 has D={mu2.shape[0]}: features must match")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must be [D, D] = [{d}, {d}]; got shape {sigma.shape}")
    s = _sqrt_psd((sigma1 + sigma1.T) / 2)  # sigma1^{1/2}
    m = s @ sigma2 @ s
    m = (m + m.T) / 2  # symmetric up to round-off; eigh reads one triangle only
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt
    return float(max(d2, 0.0))  # >= 0 in exact arithmetic; clip the round-off


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """d² between Gaussians fitted to feature sets `a` `[N1, D]` and `b` `[N2, D]`."""
    a = np.asarray(a)
    b = np.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be features [N, D]; got shape {x.shape}")
        if x.shape[0] < 2:
            raise ValueError(
                f"{name} has N={x.shape[0]} feature vectors; a covariance needs N >= 2"
            )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a has D={a.shape[1]} features but b has D={b.shape[1]}: use the same feature network"
        )
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
