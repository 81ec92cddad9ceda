"""Rectified flow: shift, interpolation, loss masking of dropout, and the samplers against
the closed-form velocity field of Gaussian data."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax.diffusion import flow, sampler


def test_shift_properties():
    t = jnp.linspace(0.0, 1.0, 101)
    for alpha in (0.5, 1.0, 3.0):
        s = flow.shift_time(t, alpha)
        assert float(s[0]) == 0.0 and float(s[-1]) == pytest.approx(1.0)
        assert bool(jnp.all(jnp.diff(s) > 0))
    np.testing.assert_allclose(flow.shift_time(t, 1.0), t, atol=1e-7)
    assert bool(jnp.all(flow.shift_time(t[1:-1], 3.0) > t[1:-1]))  # alpha > 1 moves to noise


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


def gaussian_velocity(mu, sigma):
    """Exact v(x, t) = E[eps - x_0 | x_t = x] for x_0 ~ N(mu, sigma^2) per element."""

    def apply(params, x, t, text, mask):
        del params, text, mask
        t = t.reshape(t.shape + (1,) * (x.ndim - 1))
        a = 1.0 - t
        var = a**2 * sigma**2 + t**2
        x0_hat = mu + a * sigma**2 / var * (x - a * mu)
        eps_hat = t / var * (x - a * mu)
        return eps_hat - x0_hat

    return apply


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_reproduces_gaussian(method):
    mu, sigma = 1.5, 0.5
    noise = jax.random.normal(jax.random.key(0), (4096, 1, 1, 1, 4))
    text, mask = jnp.zeros((4096, 1, 1)), jnp.ones((4096, 1), bool)

    # The exact flow maps noise z to mu + sigma z (monotone transport of N(0,1) to N(mu, s^2)).
    exact = mu + sigma * noise

    def error(steps):
        x = sampler.sample(
            gaussian_velocity(mu, sigma), None, noise, text, mask, num_steps=steps, method=method
        )
        return float(jnp.mean(jnp.abs(x - exact)))

    x = sampler.sample(gaussian_velocity(mu, sigma), None, noise, text, mask, num_steps=64)
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - sigma) < 0.02
    assert error(64) < (0.015 if method == "euler" else 1e-4)
    # Halving the step: Euler's error about halves (order 1), Heun's about quarters (order 2).
    ratio = error(16) / error(32)
    assert (1.7 < ratio < 2.3) if method == "euler" else ratio > 3.3, ratio


def test_cfg_scale_one_is_conditional_and_batched_equals_separate():
    def apply(params, x, t, text, mask):
        return x * text.mean(axis=(1, 2))[:, None, None, None, None] + t[:, None, None, None, None]

    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 2, 1))
    text = jax.random.normal(jax.random.key(1), (3, 4, 2))
    mask = jnp.ones((3, 4), bool)
    t = jnp.float32(0.4)
    cond = apply(None, x, jnp.full(3, t), text, mask)
    np.testing.assert_allclose(sampler.guided_velocity(apply, None, x, t, text, mask, 1.0), cond)
    null = apply(None, x, jnp.full(3, t), *flow.null_conditioning(text, mask))
    expected = null + 4.0 * (cond - null)
    np.testing.assert_allclose(
        sampler.guided_velocity(apply, None, x, t, text, mask, 4.0), expected, rtol=1e-5
    )


def test_loss_matches_manual_computation():
    config = ml_collections.ConfigDict(
        dict(time_sampling="uniform", logit_mean=0.0, logit_std=1.0, caption_dropout=0.0)
    )
    batch = {
        "latents": jax.random.normal(jax.random.key(0), (4, 2, 2, 2, 3)),
        "text": jnp.ones((4, 3, 5)),
        "text_mask": jnp.ones((4, 3), bool),
    }
    apply = lambda p, x, t, text, m: p * x
    key = jax.random.key(7)
    loss, aux = flow.loss_fn(apply, 0.5, batch, key, config)
    t = jax.random.uniform(jax.random.fold_in(key, flow.PURPOSE_TIME), (4,))
    eps = jax.random.normal(jax.random.fold_in(key, flow.PURPOSE_NOISE), (4, 2, 2, 2, 3))
    xt = flow.interpolate(batch["latents"], eps, t)
    manual = jnp.mean((0.5 * xt - (eps - batch["latents"])) ** 2)
    np.testing.assert_allclose(loss, manual, rtol=1e-6)
    np.testing.assert_allclose(aux["t"], t)
