r"""ODE samplers for rectified flow with classifier-free guidance and conditioning frames.

Integrate dx/dt = v(x_t, t) from t = 1 (noise) to t = 0 (data) on the grid
`t_i = shift(1 - i / n)` (the training shift, so both see the same times). Euler:

    x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)

Heun adds the corrector `x_{i+1} = x_i + dt (v(x_i, t_i) + v(x'_{i+1}, t_{i+1})) / 2`.
Euler's error is O(1/n), Heun's O(1/n²) (tests/diffusion check both on Gaussian data).

Guidance: v = v_null + s (v_text - v_null), with both branches in one batched forward pass
(the batch doubled: conditional rows first, then the null conditioning of
`flow.null_conditioning`). `cfg_scale = 1` is the plain conditional sampler and skips the
unconditional half. `guidance_interval = (t_lo, t_hi)` guides only at grid times
t_lo <= t_i <= t_hi (after the shift) and uses the conditional v elsewhere (Kynkäänniemi et
al. 2024, "Applying guidance in a limited interval"); outside it the doubled pass is skipped.

Step-skipping cache (`cache_threshold > 0`, Euler), in the manner of TeaCache (Liu et al.
2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model") and MagCache
(Ma et al. 2025): the network's output changes little between neighbouring steps while its
input changes little, so a step may reuse the last computed (guided) velocity, which is the
step's residual x_{i+1} - x_i up to dt. Per sample, with x_{i-1} the state one step before,

    delta_i = ‖x_i - x_{i-1}‖₁ / ‖x_{i-1}‖₁        the relative L1 change of the input
    A_i     = A_{i-1} + delta_i                     accumulated since the last evaluation
    reuse   = A_i < cache_threshold;   if not: evaluate and set A_i = 0

with step 0 always evaluated. Each sample keeps its own decision (so a video does not depend
on its batch); the network runs in a step when any sample needs it (`lax.cond`), so the
saving is the steps every sample reuses. Departures from TeaCache: it measures the change
of the first block's timestep-modulated input and rescales it with a polynomial fitted per
model; here the change is that of the network's input x_t itself (no model hook, no fit),
and the last step is not forced to evaluate. `cache_threshold = 0` evaluates every step
(the same samples as without the cache); a huge threshold evaluates only step 0.

Conditioning frames (`cond_latents [B, T', H', W', C]`, `cond_mask [B, T']`, see
`sora_jax.diffusion.conditioning`): the given frames are re-imposed on x before every model
call and after every step, so they stay exactly `cond_latents`; the model gets per-frame
times `[B, T']` with t = 0 on them, and with `cond_channels = C + 1` also the channels
`[cond_latents · mask, mask]`, as in training. Both guidance branches keep the frames (the
null branch drops only the text). The sampler is deterministic: the same noise gives the
same sample.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import conditioning, flow


def time_grid(num_steps: int, alpha: float) -> jax.Array:
    """`[num_steps + 1]` times from 1 to 0 through the shift."""
    return flow.shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), alpha)


def guided_velocity(
    apply_fn: Callable, params, x_t, t, text, text_mask, cfg_scale: float
) -> jax.Array:
    """v with classifier-free guidance in one batched pass.

    x_t `[B, T', H', W', C_in]`; t a scalar, `[B]` or per-frame `[B, T']`.
    """
    b = x_t.shape[0]
    t = jnp.asarray(t)
    t_b = jnp.broadcast_to(t, (b,)) if t.ndim <= 1 else t
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
    guidance_interval: tuple[float, float] | None = None,
    cond_latents: jax.Array | None = None,
    cond_mask: jax.Array | None = None,
    cond_channels: int = 0,
    cache_threshold: float = 0.0,
    return_calls: bool = False,
):
    """Integrates from `noise [B, T', H', W', C]` (t = 1) to a sample (t = 0).

    `cond_latents`/`cond_mask` give frames (both or neither); `cond_channels` is the model's
    `model.cond_channels` (0 or C + 1). `cache_threshold`: the step-skipping cache's
    threshold on the accumulated relative input change (module doc; 0 = off). With
    `return_calls`, returns `(x, calls)`: calls (int32) the steps in which the network ran.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler={method!r} is unknown; use 'euler' or 'heun'")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if (cond_latents is None) != (cond_mask is None):
        raise ValueError("cond_latents and cond_mask come together: pass both or neither")
    if guidance_interval is not None:
        lo, hi = (float(v) for v in guidance_interval)
        if not lo <= hi:
            raise ValueError(f"guidance_interval={guidance_interval} needs t_lo <= t_hi")
    if cache_threshold < 0:
        raise ValueError(f"sample.cache_threshold={cache_threshold} must be >= 0 (0 = off)")
    if cache_threshold > 0 and method != "euler":
        raise ValueError(
            f"sample.cache_threshold={cache_threshold} (the step-skipping cache) runs with the "
            f"Euler sampler only, got sampler={method!r}: set sampler='euler' or the "
            "threshold to 0"
        )
    ts = time_grid(num_steps, alpha)
    b = noise.shape[0]
    given = None if cond_mask is None else cond_mask.astype(bool)
    cond = None if cond_latents is None else cond_latents.astype(jnp.float32)

    def hold(x):
        return x if given is None else conditioning.impose(x, cond, given)

    def velocity(x, t):
        t_b = jnp.full((b,), t)
        t_in = t_b if given is None else conditioning.frame_times(t_b, given)  # [B] | [B, T']
        x_in = conditioning.model_input(hold(x), cond, given, cond_channels)

        def guided(scale):
            return guided_velocity(apply_fn, params, x_in, t_in, text, text_mask, scale)

        if cfg_scale == 1.0 or guidance_interval is None:
            return guided(cfg_scale)
        inside = (t >= lo) & (t <= hi)
        return jax.lax.cond(inside, lambda: guided(cfg_scale), lambda: guided(1.0))

    def step(i, x):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        if method == "euler":
            return hold(x + dt * v)
        x_pred = x + dt * v
        return hold(x + dt * 0.5 * (v + velocity(x_pred, t_next)))

    x_init = hold(noise.astype(jnp.float32))
    if cache_threshold == 0:
        x = jax.lax.fori_loop(0, num_steps, step, x_init)
        return (x, jnp.asarray(num_steps, jnp.int32)) if return_calls else x

    def cached_step(i, carry):
        x, x_prev, v_last, acc, calls = carry
        t, t_next = ts[i], ts[i + 1]
        axes = tuple(range(1, x.ndim))
        change = jnp.sum(jnp.abs(x - x_prev), axes)  # [B]
        acc = acc + change / jnp.maximum(jnp.sum(jnp.abs(x_prev), axes), 1e-20)
        reuse = acc < cache_threshold  # [B]; step 0 has acc = inf
        keep = reuse.reshape((b,) + (1,) * (x.ndim - 1))
        v = jax.lax.cond(
            jnp.all(reuse),
            lambda: v_last,
            lambda: jnp.where(keep, v_last, velocity(x, t)),
        )
        acc = jnp.where(reuse, acc, 0.0)
        calls = calls + (~jnp.all(reuse)).astype(jnp.int32)
        return hold(x + (t_next - t) * v), x, v, acc, calls

    init = (
        x_init,
        x_init,
        jnp.zeros_like(x_init),  # the last computed velocity
        jnp.full((b,), jnp.inf, jnp.float32),  # A: inf evaluates step 0
        jnp.asarray(0, jnp.int32),
    )
    x, _, _, _, calls = jax.lax.fori_loop(0, num_steps, cached_step, init)
    return (x, calls) if return_calls else x
