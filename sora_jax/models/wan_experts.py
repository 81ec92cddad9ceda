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
it is trained on that range. One expert per run: `time_range` and `restrict_time` (maps a
time drawn on [0, 1] into an expert's range; the affine map, so a density over [0, 1] keeps
its shape). Both experts in one run: `TwoExpertDiT`, one Flax module whose parameters are
`{'high': expert tree, 'low': expert tree}` and whose output for sample b is the output of
the expert of b's time; `sampling_apply_fn` runs only the expert of the step's time.

A sample's time is its generated frames' time: with given frames (per-frame times
`[B, T']`, 0 on given frames) that is the largest entry of its row (`sample_time`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

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
    entries, per-frame `[B, T']` with 0 on given frames, or a scalar): only the chosen expert
    runs (`lax.cond`)."""
    t = jnp.asarray(t, jnp.float32)
    # The step's time: given frames carry t = 0, every generated token the step's time.
    high = expert_index(jnp.max(t), boundary_ratio) == HIGH
    return jax.lax.cond(
        high,
        lambda: apply(params_high, x_t, t, *args),
        lambda: apply(params_low, x_t, t, *args),
    )


def sample_time(t: jax.Array) -> jax.Array:
    """`[B]`: each sample's generated time from `t [B]` or per-frame `t [B, T']` (given frames
    carry 0, generated frames the sample's time)."""
    t = jnp.asarray(t, jnp.float32)
    return t if t.ndim == 1 else jnp.max(t, axis=tuple(range(1, t.ndim)))


class TwoExpertDiT(nn.Module):
    """Wan 2.2 A14B as one model: `high` and `low` are two VideoDiTs of the same fields
    (clones of one; their parameters are the subtrees `high` and `low`).

    `__call__(x_t [B, T', H', W', C_in], t [B] | [B, T'], text, text_mask) -> v`: both experts
    run on the whole batch and sample b takes `v_high[b]` where `expert_index(t_b) = HIGH`,
    else `v_low[b]`. Under a gradient, an expert receives exactly the gradient of the loss
    restricted to its samples (the other rows' cotangents are zero): per-sample routing with
    static shapes, at the cost of both forwards and backwards on every sample (docs/wan.md,
    "Both experts in one run"). Sampling runs one expert per step (`sampling_apply_fn`).
    """

    high: nn.Module
    low: nn.Module
    boundary_ratio: float = BOUNDARY_RATIO_T2V

    @property
    def out_channels(self) -> int:
        return self.high.out_channels

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.high.patch_size

    @property
    def cond_channels(self) -> int:
        return self.high.cond_channels

    def __call__(self, x_t, t, text, text_mask) -> jax.Array:
        high = expert_index(sample_time(t), self.boundary_ratio) == HIGH  # [B]
        v_high = self.high(x_t, t, text, text_mask)
        v_low = self.low(x_t, t, text, text_mask)
        return jnp.where(high.reshape(-1, *([1] * (v_high.ndim - 1))), v_high, v_low)


def two_experts(expert: nn.Module, boundary_ratio: float) -> TwoExpertDiT:
    """The two-expert model of one VideoDiT `expert` (the shape both experts share)."""
    return TwoExpertDiT(
        high=expert.clone(), low=expert.clone(), boundary_ratio=check_boundary(boundary_ratio)
    )


def sampling_apply_fn(model: TwoExpertDiT) -> Callable[..., jax.Array]:
    """`apply(params, x_t, t, text, text_mask) -> v` over `{'high': ..., 'low': ...}` that runs
    only the expert of the step's time (`two_expert_apply`); the sampler's model function.
    Equal to `model.apply` whenever every sample of the batch has the same time."""
    expert = model.high

    def one(params, x_t, t, text, text_mask):
        return expert.apply({"params": params}, x_t, t, text, text_mask)

    def apply(params: dict[str, Any], x_t, t, text, text_mask):
        return two_expert_apply(
            one, params["high"], params["low"], x_t, t, text, text_mask,
            boundary_ratio=model.boundary_ratio,
        )  # fmt: skip

    return apply
