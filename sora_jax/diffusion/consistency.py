r"""Continuous-time consistency distillation for rectified flow, and its few-step sampler.

Method: sCM (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models") in the rectified-flow parameterization, with classifier-free guidance
distilled into the student as in rCM (Zheng et al. 2025, "Large Scale Diffusion
Distillation via Score-Regularized Continuous-Time Consistency"), whose teachers are
rectified-flow video models. Symbols as in the code (docs/design.md, The diffusion
convention):

    x_t = (1 - t) x_0 + t eps,   t in [0, 1],   t = 1 is pure noise
    v_T(x_t, t) = v_null + s (v_text - v_null)        the guided teacher velocity, s = cfg_scale

The student network u_θ(x_t, t) (a VideoDiT, initialized from the teacher) parameterizes the
consistency function, which maps any point of a teacher trajectory to its end at t = 0:

    f_θ(x_t, t) = x_t - t u_θ(x_t, t)        f_θ(x, 0) = x holds by construction

Consistency along the teacher's ODE dx_t/dt = v_T means df_θ/dt = 0:

    df_θ/dt = v_T - u_θ - t du_θ/dt,    du_θ/dt = ∂_t u_θ + (∇_x u_θ) v_T

where du_θ/dt is one forward-mode product, `jax.jvp` of u_θ at (x_t, t) along (v_T, 1)
(`tangent`). sCM's continuous-time objective has the gradient E[w(t) ∇_θ f_θᵀ df_θ⁻/dt]
(θ⁻ = stop_gradient(θ)); with f_θ = x_t - t u_θ that is, up to the weight t, the gradient of
the squared error to a fixed target

    g     = v_T - u_θ⁻ - r t du_θ⁻/dt                     the tangent (0 when consistent)
    ĝ     = g / (‖g‖ + c)                                  sCM's tangent normalization
    loss  = mean ‖u_θ - stop_gradient(u_θ⁻ + ĝ)‖² / D      D = latent elements of a sample

with `r` ramped linearly from 0 to 1 over `tangent_warmup_steps` (sCM's tangent warmup) and
c = `tangent_norm_c` (0.1 in sCM; c < 0 leaves g unnormalized, the plain flow-map target
u_θ⁻ + g of MeanFlow-style training at r = 0). In TrigFlow terms (sCM §2) with σ_d = 1 the
same trajectories are x^trig = x_t / sqrt((1 - t)² + t²) at tan τ = t / (1 - t), so sCM's
proposal over τ, ln tan τ ~ N(P_mean, P_std²), is the logit-normal t = sigmoid(P_mean +
P_std z) used here (`sample_times`), then the run's timestep shift (which adds ln alpha to
the mean).

Departures from the papers: no learned adaptive weighting w_φ(t) (sCM §4.3: an auxiliary
network) — every time weighs 1; no DMD-style score regularizer of rCM (a fake-score network);
θ⁻ is the current student, as in sCM; data times are t2v only (no given frames) and no
caption dropout (the student always sees the caption; guidance is in its weights).

Sampler (Song et al. 2023, "Consistency Models", Algorithm 1, multistep), on the grid
t_0 = 1 > t_1 > ... > t_{n-1} > 0 of the ODE sampler (`sampler.time_grid`, the training shift):

    x_0^(0) = f_θ(eps, 1);   x_0^(i) = f_θ((1 - t_i) x_0^(i-1) + t_i eps_i, t_i)

with fresh noise eps_i drawn from each sample's own key (so a video does not depend on its
batch); the result is x_0^(n-1). One step is a single network evaluation from pure noise.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import conditioning, flow, sampler

# Purposes folded into a step's key (after flow's 0..5): the distillation draws.
PURPOSE_DISTILL_TIME, PURPOSE_DISTILL_NOISE = 16, 17
# Folded into a sample's noise key for the re-noising of the multistep sampler.
PURPOSE_RENOISE = 1


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
    """`t [B]` broadcast against `x [B, T', H', W', C]`."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def consistency_fn(u: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """f = x_t - t u: the clean-video estimate `[B, T', H', W', C]`; t `[B]`."""
    return x_t - _expand(t, x_t) * u


def tangent(fn: Callable, x_t: jax.Array, t: jax.Array, v: jax.Array):
    """`(u, du/dt)` of `u = fn(x_t, t)` along the trajectory dx/dt = v: one `jax.jvp` at
    (x_t, t) with tangents (v, 1). x_t, v `[B, T', H', W', C]`; t `[B]`."""
    return jax.jvp(fn, (x_t, t), (v, jnp.ones_like(t)))


def sample_times(key: jax.Array, batch: int, logit_mean: float, logit_std: float, alpha):
    """`[B]` times: t = shift(sigmoid(logit_mean + logit_std z), alpha) (module doc)."""
    z = jax.random.normal(key, (batch,))
    return flow.shift_time(jax.nn.sigmoid(logit_mean + logit_std * z), alpha)


def target(
    u: jax.Array,
    du_dt: jax.Array,
    v_teacher: jax.Array,
    t: jax.Array,
    *,
    tangent_scale: float | jax.Array = 1.0,
    norm_c: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """`(u + ĝ, ‖g‖ [B])`: the regression target of the student and the tangent's norm.

    g = v_T - u - r t du/dt, ĝ = g / (‖g‖ + c) per sample (c < 0: ĝ = g); module doc."""
    g = v_teacher - u - tangent_scale * _expand(t, u) * du_dt
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))  # [B]
    if norm_c >= 0:
        g = g / _expand(norm + norm_c, g)
    return u + g, norm


def sample(
    apply_fn: Callable,
    params,
    noise: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    keys: jax.Array,
    *,
    num_steps: int,
    alpha: float = 1.0,
    cond_channels: int = 0,
) -> jax.Array:
    """Few-step consistency sampling from `noise [B, T', H', W', C]` (t = 1) to t = 0.

    `apply_fn(params, x, t, text, text_mask) -> u` is the student; `keys [B]` are the
    samples' noise keys (each re-noising draws from `fold_in(fold_in(key, 1), i)`)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    ts = sampler.time_grid(num_steps, alpha)  # [n + 1], t_0 = 1, t_n = 0
    b = noise.shape[0]
    renoise = jax.vmap(lambda k: jax.random.fold_in(k, PURPOSE_RENOISE))(keys)

    def clean(x, t):
        t_b = jnp.full((b,), t)
        x_in = conditioning.model_input(x, None, None, cond_channels)
        return consistency_fn(apply_fn(params, x_in, t_b, text, text_mask), x, t_b)

    def step(i, x_0):
        t = ts[i]
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x_0.shape[1:]))(
            renoise
        )
        return clean((1.0 - t) * x_0 + t * eps, t)

    x_0 = clean(noise.astype(jnp.float32), ts[0])
    return jax.lax.fori_loop(1, num_steps, step, x_0)
