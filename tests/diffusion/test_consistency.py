"""Consistency distillation maths against closed forms on Gaussian data, and the tangent's
JVP through the real DiT against central finite differences (blockwise, XLA and splash
attention, the last through its JVP rule, models/attention_jvp.py).

For x_0 ~ N(mu, sigma²) elementwise the rectified-flow ODE is affine: x_t = (1 - t) mu +
s(t) z with s(t) = sqrt((1 - t)² sigma² + t²), so the exact consistency function is
f*(x, t) = mu + sigma (x - (1 - t) mu) / s(t) and the teacher velocity is
v*(x, t) = -mu + s'(t) (x - (1 - t) mu) / s(t)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import consistency
from sora_jax.models import attention_jvp, dit

MU, SIGMA = 0.7, 0.4
SHAPE = (2, 3, 4, 4, 2)  # [B, T', H', W', C]


def _s(t):
    return jnp.sqrt((1.0 - t) ** 2 * SIGMA**2 + t**2)


def _v_exact(x, t):
    t = consistency._expand(t, x)
    ds = ((t - 1.0) * SIGMA**2 + t) / _s(t)
    return -MU + ds * (x - (1.0 - t) * MU) / _s(t)


def _u_exact(x, t):
    """u* = (x - f*) / t: the student that is exactly consistent."""
    te = consistency._expand(t, x)
    f = MU + SIGMA * (x - (1.0 - te) * MU) / _s(te)
    return (x - f) / te


def _points(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    t = jax.random.uniform(k1, (SHAPE[0],), minval=0.1, maxval=0.95)
    x = (1.0 - consistency._expand(t, jnp.zeros(SHAPE))) * MU + _s(
        consistency._expand(t, jnp.zeros(SHAPE))
    ) * jax.random.normal(k2, SHAPE)
    return x, t


def test_the_exact_consistency_function_has_zero_tangent_and_a_flow_velocity_does_not():
    x, t = _points()
    v = _v_exact(x, t)
    u, du_dt = consistency.tangent(_u_exact, x, t, v)
    u_tgt, norm = consistency.target(u, du_dt, v, t, norm_c=-1.0)
    np.testing.assert_allclose(norm, 0.0, atol=1e-4)
    np.testing.assert_allclose(u_tgt, u, atol=1e-5)
    # The teacher's instantaneous velocity is not the map to t = 0: its tangent is not 0,
    # and its target moves towards u*.
    u_v, du_v = consistency.tangent(_v_exact, x, t, v)
    tgt_v, norm_v = consistency.target(u_v, du_v, v, t, norm_c=-1.0)
    assert float(jnp.min(norm_v)) > 0.1
    assert float(jnp.mean(jnp.square(tgt_v - _u_exact(x, t)))) < float(
        jnp.mean(jnp.square(u_v - _u_exact(x, t)))
    )
    # Tangent normalization keeps the direction and bounds the step below 1.
    _, n = consistency.target(u_v, du_v, v, t, norm_c=0.1)
    np.testing.assert_allclose(n, norm_v, rtol=1e-6)


def test_tangent_warmup_scales_only_the_time_derivative_term():
    x, t = _points(1)
    v = _v_exact(x, t)
    u, du_dt = consistency.tangent(_v_exact, x, t, v)
    at0, _ = consistency.target(u, du_dt, v, t, tangent_scale=0.0, norm_c=-1.0)
    np.testing.assert_allclose(at0, v, atol=1e-6)  # r = 0: the target is the teacher's v


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_with_the_exact_student_draws_the_data_distribution(steps):
    n = 4096
    noise = jax.random.normal(jax.random.key(1), (n, 1, 1, 1, 1))
    keys = jax.random.split(jax.random.key(2), n)
    text, mask = jnp.zeros((n, 1, 1)), jnp.ones((n, 1), bool)
    out = consistency.sample(
        lambda p, x, t, s, m: _u_exact(x, t), None, noise, text, mask, keys,
        num_steps=steps, alpha=3.0,
    )  # fmt: skip
    if steps == 1:  # one step is f*(eps, 1) = mu + sigma eps, exactly
        np.testing.assert_allclose(out, MU + SIGMA * noise, rtol=1e-5, atol=1e-5)
    assert abs(float(out.mean()) - MU) < 0.03
    assert abs(float(out.std()) - SIGMA) < 0.02


def test_multistep_sampling_renoises_per_sample_and_is_deterministic():
    noise = jax.random.normal(jax.random.key(1), (4, 1, 2, 2, 1))
    keys = jax.random.split(jax.random.key(2), 4)
    text, mask = jnp.zeros((4, 1, 1)), jnp.ones((4, 1), bool)

    def run(noise, keys):
        return consistency.sample(
            lambda p, x, t, s, m: _v_exact(x, t), None, noise, text[: len(noise)],
            mask[: len(noise)], keys, num_steps=3,
        )  # fmt: skip

    full = run(noise, keys)
    np.testing.assert_array_equal(full, run(noise, keys))
    # A sample does not depend on the batch it is in.
    np.testing.assert_allclose(full[2:], run(noise[2:], keys[2:]), rtol=1e-6, atol=1e-6)
    # Other re-noising keys give another sample (the re-noising is used).
    other = run(noise, jax.random.split(jax.random.key(3), 4))
    assert float(jnp.max(jnp.abs(other - full))) > 1e-3


@pytest.mark.parametrize("impl", ["blockwise", "xla", "splash"])
def test_tangent_through_the_dit_matches_central_finite_differences(impl):
    model = dit.VideoDiT(
        in_channels=4, out_channels=4, text_dim=8, dim=32, num_layers=2, num_heads=2, mlp_dim=64,
        patch_size=(1, 2, 2), attention_impl=impl, pos_embed="sincos",
    )  # fmt: skip
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (2, 2, 4, 4, 4))
    t = jnp.array([0.3, 0.8])
    text = jax.random.normal(k[1], (2, 3, 8))
    mask = jnp.array([[True, True, False], [True, False, False]])
    params = model.init(k[2], x, t, text, mask)["params"]
    # Non-zero output head (adaLN-zero initializes it to 0, which would make u constant).
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(k[3], p.shape), params)
    v = jax.random.normal(k[4], x.shape)

    @jax.jit
    def u(x_, t_):
        return model.apply({"params": params}, x_, t_, text, mask)

    with attention_jvp.forward_mode():  # splash: the fused kernel's JVP rule
        _, jvp = consistency.tangent(u, x, t, v)
    scale = float(jnp.max(jnp.abs(jvp)))
    assert scale > 1e-2  # a tangent worth comparing
    # The time enters as sinusoids of 1000 t (models/layers.py), so d/dt has frequencies up
    # to 1000: the central difference needs eps = 1e-4 (its error falls as eps², ~9x per 3x).
    eps = 1e-4
    fd = (u(x + eps * v, t + eps) - u(x - eps * v, t - eps)) / (2 * eps)
    np.testing.assert_allclose(jvp, fd, atol=3e-3 * scale, rtol=0)
    # Along x alone (through the attention's JVP rule) a coarser step is exact to 1e-4.
    with attention_jvp.forward_mode():
        _, jvp_x = jax.jvp(lambda x_: u(x_, t), (x,), (v,))
    fd_x = (u(x + 1e-2 * v, t) - u(x - 1e-2 * v, t)) / 2e-2
    np.testing.assert_allclose(jvp_x, fd_x, atol=1e-4 * float(jnp.max(jnp.abs(jvp_x))), rtol=0)
