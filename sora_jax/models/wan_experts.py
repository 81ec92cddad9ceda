r"""Wan 2.2 A14B: two experts switched at a timestep boundary (docs/wan.md, "Wan 2.2").

Wan2.2-A14B is two VideoDiTs of Wan 2.1 14B's shape (`dit.PRESETS['wan2_2_a14b']`): the
high-noise expert (diffusers' `transformer`) denoises the early, noisy part of the
trajectory, the low-noise expert (`transformer_2`) the rest. diffusers' `WanPipeline`
switches at

    boundary_timestep = boundary_ratio · num_train_timesteps      (0.875 · 1000 for T2V-A14B)
    expert(timestep) = high   if timestep >= boundary_timestep   else low

with diffusers' `timestep = 1000 t`, t in [0, 1] being sora_jax's time (x_t = (1 - t) x_0 +
t eps; t = 1 is pure noise). So in sora_jax time the high expert owns t in
[boundary_ratio, 1] and the low expert t in [0, boundary_ratio). The comparison is made on
diffusers' scale, as the pipeline makes it, so the boundary step itself (t = 0.875) goes to
the high expert.

Training follows from it: each expert only ever sees its own time range at inference, so
it is trained on that range (`time_range`); `restrict_time` maps a time drawn on [0, 1]
into an expert's range (the affine map, so a density over [0, 1] keeps its shape).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

HIGH, LOW = 0, 1  # expert indices: diffusers' `transformer`, `transformer_2`
EXPERT_NAMES = ("transformer", "transformer_2")  # their diffusers subfolders
NUM_TRAIN_TIMESTEPS = 1000  # diffusers' FlowMatchEulerDiscreteScheduler for Wan
# Wan2.2-T2V-A14B-Diffusers/model_index.json; I2V-A14B uses 0.9.
BOUNDARY_RATIO_T2V = 0.875
BOUNDARY_RATIO_I2V = 0.9


def check_boundary(boundary_ratio: float) -> float:
    """`boundary_ratio` as a float in (0, 1), or a ValueError naming the field."""
    b = float(boundary_ratio)
    if not 0.0 < b < 1.0:
        raise ValueError(
            f"model.boundary_ratio={boundary_ratio} must lie in (0, 1): the share of diffusers' "
            f"{NUM_TRAIN_TIMESTEPS} training timesteps above which the high-noise expert runs "
            f"(Wan2.2 T2V-A14B: {BOUNDARY_RATIO_T2V}, I2V-A14B: {BOUNDARY_RATIO_I2V})"
        )
    return b


def expert_index(t: jax.Array, boundary_ratio: float) -> jax.Array:
    """The expert of sora_jax time `t` (any shape): HIGH where `1000 t >= 1000 ratio`, else LOW.

    The comparison is WanPipeline's, on its timestep scale (module docstring).
    """
    boundary = check_boundary(boundary_ratio) * NUM_TRAIN_TIMESTEPS
    timestep = jnp.asarray(t, jnp.float32) * NUM_TRAIN_TIMESTEPS
    return jnp.where(timestep >= boundary, HIGH, LOW).astype(jnp.int32)


def time_range(expert: int, boundary_ratio: float) -> tuple[float, float]:
    """`(lo, hi)`: the sora_jax times the expert sees at inference (HIGH: [b, 1], LOW: [0, b))."""
    b = check_boundary(boundary_ratio)
    if expert not in (HIGH, LOW):
        raise ValueError(f"expert={expert} must be {HIGH} (high noise) or {LOW} (low noise)")
    return (b, 1.0) if expert == HIGH else (0.0, b)


def restrict_time(u: jax.Array, expert: int, boundary_ratio: float) -> jax.Array:
    """Times `u` drawn on [0, 1] mapped affinely into `time_range(expert)`."""
    lo, hi = time_range(expert, boundary_ratio)
    return lo + (hi - lo) * u


def two_expert_apply(
    apply: Callable[..., jax.Array],
    params_high,
    params_low,
    x_t: jax.Array,
    t: jax.Array,
    *args,
    boundary_ratio: float,
) -> jax.Array:
    """One denoiser call of the two-expert model: `apply(params, x_t, t, *args)` with the
    expert of `t`. `t` is one time for the whole batch (a sampler step; `[B]` with equal
    entries or a scalar): only the chosen expert runs (`lax.cond`)."""
    t = jnp.asarray(t, jnp.float32)
    first = t.reshape(-1)[0]
    high = expert_index(first, boundary_ratio) == HIGH
    return jax.lax.cond(
        high,
        lambda: apply(params_high, x_t, t, *args),
        lambda: apply(params_low, x_t, t, *args),
    )
