r"""Validation loss: the rectified-flow loss at fixed times with fixed noise.

The training loss draws t, eps and dropout afresh each step, so its value on a held-out
batch is noisy and depends on the draw. Here every sample is evaluated at each time of a
fixed grid, with one noise eps from a fixed key shared by all times, no caption dropout
and a fixed task:

    L(t_k) = mean_b l_b(t_k),   l_b = |v_theta(x_t, t_k) - (eps - x_0)|² over generated frames
    loss   = mean_k L(t_k)

Two runs with the same key, batch, grid and alpha evaluate the same x_t, so their
difference is the difference of the models, not of the draws. The grid `times` are points
u of the sampler's uniform grid and go through the same shift, t_k = shift(u_k, alpha);
with alpha = 1 they are the noise levels themselves. The default grid 1/8 .. 7/8 avoids
the ends, where the loss is dominated by the irreducible variance of eps (t -> 1) or
of x_0 (t -> 0) rather than by the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from sora_jax.diffusion import conditioning, flow

DEFAULT_TIMES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def validation_loss(
    apply_fn: Callable,
    params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    config,
    alpha: float = 1.0,
    times: Sequence[float] = DEFAULT_TIMES,
    *,
    task: str = "t2v",
    num_given: int = 1,
    cond_channels: int = 0,
) -> dict[str, jax.Array]:
    """`{'loss': mean over times, 'loss_t=<u>': mean over the batch at each u}` (scalars).

    batch: `latents [B, T', H', W', C]`, `text [B, S, D]`, `text_mask [B, S]` (replace the
    text by `flow.null_conditioning` for the unconditional loss). `task` is one of
    `conditioning.TASKS` for every sample (`num_given` frames for 'continuation');
    `cond_channels` is the model's `model.cond_channels`. `config` (`diffusion`) keeps the
    call convention of `flow.loss_fn`; nothing is drawn from it and the loss is unweighted,
    so runs with different time samplings or weightings compare directly.
    """
    del config
    if not times:
        raise ValueError("times must hold at least one time in (0, 1)")
    x_0 = batch["latents"].astype(jnp.float32)
    b, frames = x_0.shape[:2]
    eps = jax.random.normal(jax.random.fold_in(key, flow.PURPOSE_NOISE), x_0.shape, x_0.dtype)
    given = conditioning.task_mask(task, b, frames, num_given)
    ts = flow.shift_time(jnp.asarray(times, jnp.float32), alpha)  # [K]

    def at(t):
        return flow.per_sample_loss(
            apply_fn,
            params,
            x_0,
            eps,
            jnp.full((b,), t),
            batch["text"],
            batch["text_mask"],
            given,
            cond_channels,
        )

    per_time = jax.lax.map(at, ts).mean(axis=1)  # [K, B] -> [K]
    out = {"loss": per_time.mean()}
    for k, u in enumerate(times):
        out[f"loss_t={float(u):g}"] = per_time[k]
    return out
