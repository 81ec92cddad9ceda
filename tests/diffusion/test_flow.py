"""Rectified flow: interpolation, shift, training-time distributions against their analytic
quantiles and densities, loss weighting, caption dropout and the loss."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from sora_jax.config import ConfigError
from sora_jax.diffusion import flow


def diffusion_config(**overrides):
    fields = dict(
        time_sampling="uniform",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        caption_dropout=0.0,
        shift=1.0,
        shift_base_tokens=256,
    )
    return ml_collections.ConfigDict({**fields, **overrides})


def test_shift_properties():
    t = jnp.linspace(0.0, 1.0, 101)
    for alpha in (0.5, 1.0, 3.0):
        s = flow.shift_time(t, alpha)
        assert float(s[0]) == 0.0 and float(s[-1]) == pytest.approx(1.0)
        assert bool(jnp.all(jnp.diff(s) > 0))
    np.testing.assert_allclose(flow.shift_time(t, 1.0), t, atol=1e-7)
    assert bool(jnp.all(flow.shift_time(t[1:-1], 3.0) > t[1:-1]))  # alpha > 1 moves to noise


@pytest.mark.parametrize(
    "latent, alpha",
    [
        ((1, 32, 32, 16), 1.0),  # 256 tokens, one frame: the base
        ((1, 64, 64, 16), 2.0),  # 4x the tokens per frame: sqrt(4)
        ((4, 32, 32, 16), 2.0),  # 4 latent frames: sqrt(4)
        ((9, 64, 64, 16), 6.0),  # both: 2 x 3
        ((1, 16, 16, 16), 1.0),  # fewer tokens than the base: clipped at 1
    ],
)
def test_shift_alpha_from_tokens_and_frames(latent, alpha):
    config = diffusion_config(shift=-1.0)
    assert flow.shift_alpha(config, latent, (1, 2, 2)) == pytest.approx(alpha)
    assert flow.shift_alpha(diffusion_config(shift=3.0), latent, (1, 2, 2)) == 3.0


def test_interpolation_endpoints_and_velocity():
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (2, 3, 4, 4, 5))
    eps = jax.random.normal(k2, x0.shape)
    np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.zeros(2)), x0)
    np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.ones(2)), eps)
    # d x_t / dt = v, exactly (x_t is linear in t).
    dx = flow.interpolate(x0, eps, jnp.full(2, 0.7)) - flow.interpolate(x0, eps, jnp.full(2, 0.2))
    np.testing.assert_allclose(dx / 0.5, flow.velocity(x0, eps), rtol=1e-5, atol=1e-5)
    # Per-frame times [B, T'] broadcast per latent frame.
    t = jnp.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
    xt = flow.interpolate(x0, eps, t)
    np.testing.assert_allclose(xt[0, 0], x0[0, 0])
    np.testing.assert_allclose(xt[0, 1], eps[0, 1])


# Analytic quantile functions Q(p), written independently of the code under test.
def mode_quantile(p, s):
    u = 1.0 - p  # f_mode is decreasing in u: P(t <= f(1 - p)) = p
    return 1.0 - u - s * (np.cos(0.5 * np.pi * u) ** 2 - 1.0 + u)


QUANTILES = {
    "uniform": (dict(), lambda p: p),
    "logit_normal": (
        dict(logit_mean=0.5, logit_std=0.7),
        lambda p: special.expit(0.5 + 0.7 * special.ndtri(p)),
    ),
    "mode": (dict(mode_scale=1.29), lambda p: mode_quantile(p, 1.29)),
    "mode_negative": (dict(mode_scale=-0.5), lambda p: mode_quantile(p, -0.5)),
    "cosmap": (dict(), lambda p: 1.0 - 1.0 / (np.tan(0.5 * np.pi * p) + 1.0)),
}


@pytest.mark.parametrize("name", list(QUANTILES))
def test_time_sampling_matches_analytic_quantiles(name):
    fields, quantile = QUANTILES[name]
    config = diffusion_config(time_sampling=name.removesuffix("_negative"), **fields)
    t = np.asarray(flow.sample_time(jax.random.key(0), (100_000,), config))
    assert t.min() >= 0.0 and t.max() <= 1.0
    p = np.linspace(0.02, 0.98, 49)
    # Quantile standard error sqrt(p(1-p)/N)/density <= ~0.004 here; 0.01 is > 2.5 sigma.
    np.testing.assert_allclose(np.quantile(t, p), quantile(p), atol=0.01)


@pytest.mark.parametrize("name", list(QUANTILES))
def test_time_density_is_the_derivative_of_the_cdf(name):
    # density(Q(p)) Q'(p) = 1 for the analytic quantile Q: the weights are true densities.
    fields, quantile = QUANTILES[name]
    config = diffusion_config(**fields)
    p, h = np.linspace(0.02, 0.98, 97), 1e-5
    dq = (quantile(p + h) - quantile(p - h)) / (2 * h)
    dens = np.asarray(
        flow.time_density(jnp.asarray(quantile(p)), name.removesuffix("_negative"), config)
    )
    np.testing.assert_allclose(dens * dq, 1.0, rtol=2e-3)


def test_mode_scale_outside_monotone_range_is_an_error():
    with pytest.raises(ValueError, match="diffusion.mode_scale"):
        flow.sample_time(
            jax.random.key(0), (4,), diffusion_config(time_sampling="mode", mode_scale=2)
        )
    with pytest.raises(ConfigError, match="diffusion.loss_weighting"):
        flow.check_config(diffusion_config(loss_weighting="snr"), ml_collections.ConfigDict())


def test_caption_dropout_uses_null_conditioning():
    text = jnp.ones((1000, 4, 8))
    mask = jnp.ones((1000, 4), bool)
    t2, m2 = flow.drop_captions(jax.random.key(1), text, mask, 0.3)
    dropped = ~m2.any(axis=1)
    assert 0.25 < float(dropped.mean()) < 0.35
    null_t, null_m = flow.null_conditioning(text[:1], mask[:1])
    np.testing.assert_array_equal(t2[dropped][:1], null_t)
    np.testing.assert_array_equal(m2[dropped][:1], null_m)
    np.testing.assert_array_equal(t2[~dropped], text[~dropped])


def loss_batch(b=4):
    return {
        "latents": jax.random.normal(jax.random.key(0), (b, 2, 2, 2, 3)),
        "text": jnp.ones((b, 3, 5)),
        "text_mask": jnp.ones((b, 3), bool),
    }


@pytest.mark.parametrize("weighting", ["none", "cosmap", "logit_normal"])
def test_loss_matches_manual_computation(weighting):
    config = diffusion_config(loss_weighting=weighting, logit_mean=0.3)
    batch = loss_batch()
    apply = lambda p, x, t, text, m: p * x
    key = jax.random.key(7)
    loss, aux = flow.loss_fn(apply, 0.5, batch, key, config, alpha=2.0)
    rows = flow.row_keys(key, 4)  # sample b draws from fold_in(key, b)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, flow.PURPOSE_TIME)))(rows)
    t = 2.0 * u / (1.0 + u)
    eps = jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, flow.PURPOSE_NOISE), (2, 2, 2, 3))
    )(rows)
    xt = flow.interpolate(batch["latents"], eps, t)
    per_sample = jnp.mean((0.5 * xt - (eps - batch["latents"])) ** 2, axis=(1, 2, 3, 4))
    w = {
        "none": jnp.ones(4),
        "cosmap": 2.0 / (math.pi * (1.0 - 2.0 * u + 2.0 * u**2)),
        "logit_normal": jnp.exp(-0.5 * (special.logit(u) - 0.3) ** 2)
        / (math.sqrt(2 * math.pi) * u * (1.0 - u)),
    }[weighting]
    np.testing.assert_allclose(loss, jnp.mean(w * per_sample), rtol=1e-5)
    np.testing.assert_allclose(aux["per_sample_loss"], per_sample, rtol=1e-5)
    np.testing.assert_allclose(aux["t"], t, rtol=1e-6)
    np.testing.assert_array_equal(aux["task"], 0)  # t2v


def test_weighting_by_a_density_equals_sampling_from_it():
    # E_{u~U}[pi(u) f(u)] = E_{u~pi}[f(u)] (SD3 §3.1): both Monte Carlo means agree.
    config = diffusion_config(
        time_sampling="logit_normal", loss_weighting="logit_normal", logit_mean=-0.4, logit_std=0.8
    )
    f = lambda t: jnp.sin(3.0 * t) + t**2
    u = jax.random.uniform(jax.random.key(0), (400_000,))
    weighted = jnp.mean(flow.loss_weight(u, config) * f(u))
    t = flow.sample_time(jax.random.key(1), (400_000,), config)
    assert float(weighted) == pytest.approx(float(jnp.mean(f(t))), rel=5e-3)
