r"""Reconstruction metrics of pixel clips: PSNR and SSIM, in float64 numpy.

Clips are `[T, H, W, 3]` in [-1, 1] (the models' range) and are mapped to [0, 1] first,
so the peak value (data range) is L = 1.

PSNR of a clip: `10 log10(L² / MSE)` with the MSE over all its pixels and channels. A
perfect reconstruction has MSE 0; the MSE is floored at `MSE_FLOOR` = 1e-10, so PSNR is at
most 100 dB (a finite number for the JSON report).

SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from error
visibility to structural similarity"), per frame and channel, with their constants and
Gaussian window (11 x 11, sigma 1.5, normalized to sum 1; the window side shrinks to the
largest odd size that fits frames smaller than 11 pixels):

    mu_x = w * x,  sigma_x² = w * x² - mu_x²,  sigma_xy = w * (x y) - mu_x mu_y
    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x² + mu_y² + C1)(sigma_x² + sigma_y² + C2))
    C1 = (0.01 L)², C2 = (0.03 L)²

averaged over the 'valid' positions of the window (as the authors' reference ssim.m),
then over channels and frames. Identical clips give exactly 1; two constant images a, b
give (2ab + C1) / (a² + b² + C1) (tests/evaluation/test_metrics.py checks both and a
hand-summed window).
"""

from __future__ import annotations

import numpy as np

MSE_FLOOR = 1e-10
K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def _unit(video) -> np.ndarray:
    """[-1, 1] -> [0, 1] float64."""
    return (np.asarray(video, np.float64) + 1.0) / 2.0


def psnr(video, reference) -> float:
    """PSNR in dB of `video` against `reference` (both `[..., H, W, 3]` in [-1, 1])."""
    x, y = _unit(video), _unit(reference)
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes {x.shape} and {y.shape} differ")
    mse = max(float(np.mean((x - y) ** 2)), MSE_FLOOR)
    return float(10.0 * np.log10(1.0 / mse))


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """`[size, size]` Gaussian weights summing to 1."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def _filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """'valid' correlation of `[N, H, W]` with the window `[k, k]` -> `[N, H-k+1, W-k+1]`."""
    k = w.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # [N, H', W', k, k]
    return np.einsum("nhwij,ij->nhw", windows, w)


def ssim(video, reference, *, data_range: float = 1.0) -> float:
    """Mean SSIM of `video` against `reference` (`[T, H, W, 3]` or `[H, W, 3]`, in [-1, 1])."""
    x, y = _unit(video), _unit(reference)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes {x.shape} and {y.shape} differ")
    if x.ndim == 3:
        x, y = x[None], y[None]
    t, h, wd, c = x.shape
    size = min(WINDOW, h, wd)
    size -= 1 - size % 2  # the largest odd side that fits
    w = gaussian_window(size)
    # [T, H, W, C] -> [T·C, H, W]: every channel of every frame is one image.
    x = x.transpose(0, 3, 1, 2).reshape(t * c, h, wd)
    y = y.transpose(0, 3, 1, 2).reshape(t * c, h, wd)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mu_x**2
    syy = _filter(y * y, w) - mu_y**2
    sxy = _filter(x * y, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))
