"""PSNR and SSIM against closed forms and a hand-summed window."""

import numpy as np
import pytest

from sora_jax.evaluation import metrics


def _from_unit(x):
    """[0, 1] -> the [-1, 1] range the metrics take."""
    return np.asarray(x) * 2.0 - 1.0


def test_psnr_of_a_known_error():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.2, 0.8, (3, 8, 8, 3))
    # A uniform error of 0.1 in [0, 1] units: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert metrics.psnr(_from_unit(ref + 0.1), _from_unit(ref)) == pytest.approx(20.0, abs=1e-9)
    assert metrics.psnr(_from_unit(ref), _from_unit(ref)) == pytest.approx(100.0)  # floor


def test_ssim_identical_is_one():
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3))
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a, b", [(0.2, 0.7), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_of_constant_images_is_the_luminance_term(a, b):
    # Zero variance and covariance: SSIM = (2ab + C1) / (a² + b² + C1) (C2 cancels).
    x, y = np.full((12, 12, 3), a), np.full((12, 12, 3), b)
    c1 = (metrics.K1 * 1.0) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim(_from_unit(x), _from_unit(y)) == pytest.approx(want, rel=1e-9)


def test_ssim_matches_a_hand_summed_window():
    # An 11 x 11 single-channel image has exactly one valid window position: SSIM is the
    # formula over Gaussian-weighted moments, summed here with explicit loops.
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 1, (11, 11)), rng.uniform(0, 1, (11, 11))
    w = np.zeros((11, 11))
    for i in range(11):
        for j in range(11):
            w[i, j] = np.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5**2))
    w /= w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    want = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    rgb_x, rgb_y = (_from_unit(np.repeat(a[..., None], 3, -1)) for a in (x, y))
    got = metrics.ssim(rgb_x, rgb_y)
    assert got == pytest.approx(want, rel=1e-9)
    assert 0.0 < got < 0.5  # independent noise images are far from similar


def test_ssim_falls_with_noise():
    x = np.random.default_rng(3).uniform(-1, 1, (16, 16, 3))
    noise = np.random.default_rng(4).normal(size=x.shape)
    values = [metrics.ssim(np.clip(x + s * noise, -1, 1), x) for s in (0.0, 0.05, 0.2, 0.5)]
    assert values[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values, values[1:]))
