r"""ODE samplers for rectified flow with classifier-free guidance.

Integrate dx/dt = v(x_t, t) from t = 1 (noise) to t = 0 (data) on the grid
`t_i = shift(1 - i / n)` (the training shift, so both see the same times). Euler:

    x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)

Heun adds the corrector `x_{i+1} = x_i + dt (v(x_i, t_i) + v(x'_{i+1}, t_{i+1})) / 2`.

Guidance: v = v_null + s (v_text - v_null), with both branches in one batched forward pass
(the batch doubled: conditional rows first, then the null conditioning of
`flow.null_conditioning`). `cfg_scale = 1` is the plain conditional sampler and skips the
unconditional half.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow


def time_grid(num_steps: int, alpha: float) -> jax.Array:
    """`[num_steps + 1]` times from 1 to 0 through the shift."""
    return flow.shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), alpha)


def guided_velocity(
    apply_fn: Callable, params, x_t, t, text, text_mask, cfg_scale: float
) -> jax.Array:
    """v with classifier-free guidance in one batched pass."""
    b = x_t.shape[0]
    t_b = jnp.broadcast_to(t, (b,))
    if cfg_scale == 1.0:
        return apply_fn(params, x_t, t_b, text, text_mask)
    null_text, null_mask = flow.null_conditioning(text, text_mask)
    v = apply_fn(
        params,
        jnp.concatenate([x_t, x_t]),
        jnp.concatenate([t_b, t_b]),
        jnp.concatenate([text, null_text]),
        jnp.concatenate([text_mask, null_mask]),
    )
    v_text, v_null = v[:b], v[b:]
    return v_null + cfg_scale * (v_text - v_null)


def sample(
    apply_fn: Callable,
    params,
    noise: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    *,
    num_steps: int,
    cfg_scale: float = 1.0,
    alpha: float = 1.0,
    method: str = "euler",
) -> jax.Array:
    """Integrates from `noise` (t = 1) to a sample (t = 0). Deterministic given the noise."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler={method!r} is unknown; use 'euler' or 'heun'")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    ts = time_grid(num_steps, alpha)

    def velocity(x, t):
        return guided_velocity(apply_fn, params, x, t, text, text_mask, cfg_scale)

    def step(i, x):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        if method == "euler":
            return x + dt * v
        x_pred = x + dt * v
        return x + dt * 0.5 * (v + velocity(x_pred, t_next))

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))
