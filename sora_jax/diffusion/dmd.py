r"""Distribution matching distillation (DMD2) for rectified flow: the losses of a few-step
generator and of its fake-score network.

Method: DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image
Synthesis", arXiv:2405.14867), written in the rectified-flow parameterization (docs/design.md,
The diffusion convention: x_t = (1 - t) x_0 + t eps, t = 1 is noise, networks predict the
velocity v = eps - x_0, so the denoised estimate of a velocity network is x_t - t v).

Three networks, all the teacher's VideoDiT:

    G_θ   the generator (the student, initialized from the teacher): the clean estimate
          x̂_0 = G_θ(x_t, t) = x_t - t u_θ(x_t, t) at the times t of its few-step grid
    real  the frozen teacher, with classifier-free guidance s:
          x̂_real(x_τ, τ) = x_τ - τ (v_null + s (v_text - v_null))
    fake  the fake-score network φ (initialized from the teacher), trained to denoise the
          generator's outputs: x̂_fake(x_τ, τ) = x_τ - τ v_φ(x_τ, τ)

The generator's input (DMD2 §4.4, multi-step): t drawn uniformly from the grid t_0 = 1 >
t_1 > ... > t_{n-1} of the n-step sampler (`sampler.time_grid`, the teacher's shift), and
x_t = (1 - t) x_0 + t eps from a training clip x_0 (t_0 = 1: pure noise). Its output
x̂_0 is noised again at τ ~ U[t_min, t_max] (shifted like the teacher's times) with fresh
noise eps': x_τ = (1 - τ) x̂_0 + τ eps'. The distribution-matching gradient (DMD eq. 7
with its weighting, DMD2 eq. 2; the normalization as in the authors' code) per sample is

    grad  = (x̂_fake - x̂_real) / mean|x̂_0 - x̂_real|        mean over the sample's elements
    L_G   = ½ mean (x̂_0 - stop_gradient(x̂_0 - grad))²     so ∂L_G/∂x̂_0 = grad / D

(D the latent elements of a sample): the generator moves along the difference of the two
scores, towards the teacher's distribution and away from its own, and no gradient goes
into either score network. The fake-score network is trained with the teacher's own
objective on the generator's (stopped) samples, at τ and noise of its own:

    L_fake = mean ‖v_φ(x_τ, τ) - (eps' - stop_gradient(x̂_0))‖²

Two time-scale update rule (DMD2 §4.2): φ takes an optimizer step every training step, the
generator every `fake_updates_per_generator`-th (5 in DMD2's ImageNet runs), so the fake
score tracks the generator's distribution.

Departures from DMD2, named:
- No GAN term. DMD2 adds a discriminator head on the fake-score network's bottleneck
  features and a non-saturating GAN loss on real data; this needs a classifier head inside
  the DiT (a second output of models/dit.py) and real-data batches in the generator's
  update, and DMD2's ablation trains without it (with TTUR, at a higher FID). The losses
  here are the distribution-matching and fake-score terms only.
- No backward simulation (DMD2 §4.5): the generator's input at t_i > 0 is a noised training
  clip, not the generator's own i-step output, so multi-step inputs at inference differ
  from training's (the clips are the teacher's tokenized data, as for sCM).
- Text-to-video only, no caption dropout: the generator always sees its caption and the
  guidance lives in the real score (as in DMD2's text-to-image runs).
The student is sampled by the consistency sampler (diffusion/consistency.py): x̂_0 = x_t -
t u_θ at t_0 = 1, then re-noised to each t_i of the grid, the same parameterization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow, sampler

# Purposes folded into a row's key (after consistency's 16, 17): DMD2's draws.
PURPOSE_GEN_TIME, PURPOSE_GEN_NOISE, PURPOSE_SCORE_TIME, PURPOSE_SCORE_NOISE = 18, 19, 20, 21


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
    """`t [B]` broadcast against `x [B, T', H', W', C]`."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def denoised(v: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """x̂_0 = x_t - t v: the clean estimate of velocity `v` at `x_t [B, ...]`, t `[B]`."""
    return x_t - _expand(t, x_t) * v


def generator_time(key: jax.Array, num_steps: int, alpha) -> jax.Array:
    """One time drawn uniformly from the n-step grid's t_0 .. t_{n-1} (module doc)."""
    grid = sampler.time_grid(num_steps, alpha)[:num_steps]  # [n], t_0 = 1, without t_n = 0
    return grid[jax.random.randint(key, (), 0, num_steps)]


def score_time(key: jax.Array, t_min: float, t_max: float, alpha) -> jax.Array:
    """τ = shift(u, alpha), u ~ U[t_min, t_max]: where the scores are compared."""
    return flow.shift_time(jax.random.uniform(key, (), minval=t_min, maxval=t_max), alpha)


def dmd_gradient(x0: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> jax.Array:
    """grad = (x̂_fake - x̂_real) / mean|x̂_0 - x̂_real| per sample `[B, ...]` (module doc)."""
    axes = tuple(range(1, x0.ndim))
    weight = jnp.mean(jnp.abs(x0 - x0_real), axis=axes, keepdims=True)  # [B, 1, ...]
    return jnp.nan_to_num((x0_fake - x0_real) / weight)


def generator_loss(x0: jax.Array, grad: jax.Array) -> jax.Array:
    """`[B]`: ½ mean (x̂_0 - stop_gradient(x̂_0 - grad))², whose gradient w.r.t. x̂_0 is
    grad / D per sample."""
    target = jax.lax.stop_gradient(x0 - grad)
    return 0.5 * jnp.mean(jnp.square(x0 - target), axis=tuple(range(1, x0.ndim)))


def fake_score_loss(v: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
    """`[B]`: mean ‖v_φ - (eps - x̂_0)‖², the teacher's objective on generator samples."""
    target = eps - jax.lax.stop_gradient(x0)
    return jnp.mean(jnp.square(v - target), axis=tuple(range(1, v.ndim)))
