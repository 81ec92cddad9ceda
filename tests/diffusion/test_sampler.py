"""Samplers against the closed-form velocity field of Gaussian data: N(mu, Sigma), the order
of Euler and Heun, guidance (batched, scale 1, interval) and image-to-video conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import conditioning, flow, sampler

MU = np.array([1.5, -0.5, 0.25], np.float32)
A = np.array([[0.6, 0.0, 0.0], [0.3, 0.5, 0.0], [-0.2, 0.1, 0.3]], np.float32)
SIGMA = A @ A.T  # a full covariance over the C = 3 channels


def gaussian_velocity(mu, sigma):
    """Exact v(x, t) = E[eps - x_0 | x_t = x] for x_0 ~ N(mu, sigma) over the channels.

    x_t ~ N(a mu, a² Sigma + t² I) with a = 1 - t. In the eigenbasis Sigma = Q diag(lam) Q^T,
    y = Q^T (x - a mu): E[x_0 | x] = mu + Q (a lam / s) y, E[eps | x] = Q (t / s) y, with
    s = a² lam + t². t is `[B]` or per-frame `[B, T']`.
    """
    lam, q = np.linalg.eigh(sigma)
    lam, q, mu = jnp.asarray(lam), jnp.asarray(q), jnp.asarray(mu)

    def apply(params, x, t, text, mask):
        del params, text, mask
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
        a = 1.0 - t
        y = (x - a * mu) @ q  # [..., C] in the eigenbasis
        return ((t - a * lam) / (a**2 * lam + t**2) * y) @ q.T - mu

    return apply


def exact_map(noise):
    """The flow's endpoint: z -> mu + Sigma^{1/2} z (the ODE acts per eigen-direction)."""
    lam, q = np.linalg.eigh(SIGMA)
    root = q @ np.diag(np.sqrt(lam)) @ q.T
    return MU + np.asarray(noise) @ root


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_sampler_reproduces_gaussian(method, alpha):
    n = 4096
    noise = jax.random.normal(jax.random.key(0), (n, 1, 1, 1, 3))
    text, mask = jnp.zeros((n, 1, 1)), jnp.ones((n, 1), bool)
    apply = gaussian_velocity(MU, SIGMA)
    exact = exact_map(noise)

    def run(steps):
        x = sampler.sample(
            apply, None, noise, text, mask, num_steps=steps, method=method, alpha=alpha
        )
        return np.asarray(x)

    def error(steps):
        return float(np.mean(np.abs(run(steps) - exact)))

    # 4096 samples: sampling error of the mean ~0.01, of the covariance ~0.01; Euler's bias
    # at 64 steps adds up to ~0.02 (more with the shift, which spends steps near t = 1).
    x = run(64).reshape(n, 3)
    np.testing.assert_allclose(x.mean(0), MU, atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), SIGMA, atol=0.04)
    # Mean error against the exact transport of the same noise (measured 0.0095 / 0.018 for
    # Euler, 5.9e-5 / 2.2e-4 for Heun at alpha 1 / 3).
    bound = {("euler", 1.0): 0.012, ("euler", 3.0): 0.025, ("heun", 1.0): 8e-5}
    assert error(64) < bound.get((method, alpha), 3e-4)
    # Halving the step: Euler's error about halves (order 1), Heun's about quarters (order 2).
    ratio = error(16) / error(32)
    assert (1.7 < ratio < 2.3) if method == "euler" else ratio > 3.3, ratio


def linear_model(params, x, t, text, mask):
    t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return 0.5 * x * text.mean(axis=(1, 2))[:, None, None, None, None] + t


def test_cfg_scale_one_is_conditional_and_batched_equals_separate():
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 2, 1))
    text = jax.random.normal(jax.random.key(1), (3, 4, 2))
    mask = jnp.ones((3, 4), bool)
    t = jnp.float32(0.4)
    cond = linear_model(None, x, jnp.full(3, t), text, mask)
    np.testing.assert_allclose(
        sampler.guided_velocity(linear_model, None, x, t, text, mask, 1.0), cond
    )
    null = linear_model(None, x, jnp.full(3, t), *flow.null_conditioning(text, mask))
    expected = null + 4.0 * (cond - null)
    np.testing.assert_allclose(
        sampler.guided_velocity(linear_model, None, x, t, text, mask, 4.0), expected, rtol=1e-5
    )


def test_guidance_interval():
    noise = jax.random.normal(jax.random.key(0), (3, 2, 2, 2, 1))
    text = jax.random.normal(jax.random.key(1), (3, 4, 2))
    mask = jnp.ones((3, 4), bool)
    kw = dict(num_steps=4, method="euler", alpha=1.0)
    plain = sampler.sample(linear_model, None, noise, text, mask, cfg_scale=1.0, **kw)
    guided = sampler.sample(linear_model, None, noise, text, mask, cfg_scale=3.0, **kw)
    assert float(jnp.max(jnp.abs(guided - plain))) > 1e-2  # guidance matters here

    def run(interval):
        return sampler.sample(
            linear_model, None, noise, text, mask, cfg_scale=3.0, guidance_interval=interval, **kw
        )

    np.testing.assert_allclose(run((0.0, 1.0)), guided, rtol=1e-6)
    np.testing.assert_allclose(run((1.5, 2.0)), plain, rtol=1e-6)  # no grid time inside
    # Grid 1, 0.75, 0.5, 0.25: (0.4, 0.8) guides the steps from 0.75 and 0.5 only.
    x = noise
    for t, t_next in [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]:
        scale = 3.0 if 0.4 <= t <= 0.8 else 1.0
        x = x + (t_next - t) * sampler.guided_velocity(
            linear_model, None, x, jnp.float32(t), text, mask, scale
        )
    np.testing.assert_allclose(run((0.4, 0.8)), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("cond_channels", [0, 4])
def test_image_to_video_holds_the_given_frame_exactly(method, cond_channels):
    b, frames, c = 2, 3, 3
    noise = jax.random.normal(jax.random.key(0), (b, frames, 2, 2, c))
    cond = jax.random.normal(jax.random.key(1), (b, frames, 2, 2, c))
    given = conditioning.task_mask("i2v", b, frames)
    seen = []

    def apply(params, x, t, text, mask):
        seen.append((x.shape, t.shape))  # static shapes, recorded while tracing
        v = gaussian_velocity(MU, SIGMA)(params, x[..., :c], t, text, mask)
        return v + 7.0  # a velocity that would move the given frame if it were integrated

    text, mask = jnp.ones((b, 1, 1)), jnp.ones((b, 1), bool)
    x = sampler.sample(
        apply,
        None,
        noise,
        text,
        mask,
        num_steps=4,
        method=method,
        cfg_scale=2.0,
        cond_latents=cond * given[..., None, None, None],
        cond_mask=given,
        cond_channels=cond_channels,
    )
    np.testing.assert_array_equal(x[:, 0], cond[:, 0])  # exactly the condition
    assert float(jnp.min(jnp.abs(x[:, 1:] - noise[:, 1:]))) > 0  # the rest was integrated
    assert seen[0] == ((2 * b, frames, 2, 2, c + cond_channels), (2 * b, frames))
    again = sampler.sample(
        apply,
        None,
        noise,
        text,
        mask,
        num_steps=4,
        method=method,
        cfg_scale=2.0,
        cond_latents=cond * given[..., None, None, None],
        cond_mask=given,
        cond_channels=cond_channels,
    )
    np.testing.assert_array_equal(again, x)  # deterministic


def test_image_to_video_samples_the_conditional_gaussian():
    # Two latent frames (a, b), unit variances, correlation rho. With frame 0 given (t = 0,
    # clean) the exact velocity of frame 1 is that of b | a ~ N(rho a, 1 - rho²).
    rho, n = 0.8, 4096
    cov = np.array([[1.0, rho], [rho, 1.0]], np.float32)

    def apply(params, x, t, text, mask):  # x [B, 2, 1, 1, 1], per-frame t [B, 2]
        a_, t_ = 1.0 - t, t
        xs = x[:, :, 0, 0, 0]  # [B, 2]
        s = a_[:, :, None] * cov * a_[:, None, :] + jnp.eye(2) * t_[:, :, None] ** 2  # [B,2,2]
        y = jnp.linalg.solve(s, xs[..., None])[..., 0]  # S^{-1} x_t
        x0 = jnp.einsum("ij,bj->bi", cov, a_ * y)  # Sigma A S^{-1} x_t
        return (t_ * y - x0)[:, :, None, None, None]

    cond_a = jax.random.normal(jax.random.key(3), (n,))
    cond = jnp.zeros((n, 2, 1, 1, 1)).at[:, 0, 0, 0, 0].set(cond_a)
    given = conditioning.task_mask("i2v", n, 2)
    noise = jax.random.normal(jax.random.key(4), (n, 2, 1, 1, 1))
    text, mask = jnp.zeros((n, 1, 1)), jnp.ones((n, 1), bool)
    x = sampler.sample(
        apply,
        None,
        noise,
        text,
        mask,
        num_steps=32,
        method="heun",
        cond_latents=cond,
        cond_mask=given,
    )
    b = np.asarray(x[:, 1, 0, 0, 0])
    resid = b - rho * np.asarray(cond_a)
    assert abs(resid.mean()) < 0.04 and abs(resid.var() - (1 - rho**2)) < 0.03
    assert abs(np.corrcoef(resid, np.asarray(cond_a))[0, 1]) < 0.05


def _cached(threshold, noise, steps=12, **kw):
    n = noise.shape[0]
    text, mask = jnp.zeros((n, 1, 1)), jnp.ones((n, 1), bool)
    run = jax.jit(
        lambda z: sampler.sample(
            gaussian_velocity(MU, SIGMA), None, z, text, mask, num_steps=steps, alpha=3.0,
            cache_threshold=threshold, return_calls=True, **kw,
        )
    )  # fmt: skip
    return run(noise)


def test_step_cache_thresholds_zero_and_huge():
    noise = jax.random.normal(jax.random.key(0), (64, 1, 1, 2, 3))
    plain, calls = _cached(0.0, noise)
    assert int(calls) == 12
    # A threshold below every change: the cached loop evaluates every step, same samples.
    every, calls = _cached(1e-30, noise)
    assert int(calls) == 12
    np.testing.assert_allclose(every, plain, rtol=1e-6, atol=1e-6)
    # A huge one: step 0's velocity reused to the end, x = eps + (0 - 1) v(eps, 1).
    once, calls = _cached(1e9, noise)
    assert int(calls) == 1
    v0 = gaussian_velocity(MU, SIGMA)(None, noise, jnp.ones((64,)), None, None)
    np.testing.assert_allclose(once, noise - v0, rtol=1e-5, atol=1e-5)


def test_step_cache_skips_steps_per_sample_and_stays_near_the_flow():
    noise = jax.random.normal(jax.random.key(1), (64, 1, 1, 2, 3))
    exact = exact_map(noise)
    plain, _ = _cached(0.0, noise, steps=24)
    cached, calls = _cached(0.15, noise, steps=24)
    assert 1 < int(calls) < 24  # some steps reused, not all
    # Each sample follows its own decisions: a sub-batch gives the same samples.
    part, _ = _cached(0.15, noise[:5], steps=24)
    np.testing.assert_allclose(part, cached[:5], rtol=1e-6, atol=1e-6)
    # Reusing a velocity costs accuracy, but the result stays a sample of the flow.
    err_plain = float(np.mean(np.abs(np.asarray(plain) - exact)))
    err_cached = float(np.mean(np.abs(np.asarray(cached) - exact)))
    assert err_plain < err_cached < 0.3
    with pytest.raises(ValueError, match="sample.cache_threshold.*Euler"):
        _cached(0.15, noise, method="heun")
