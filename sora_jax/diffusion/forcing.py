r"""Diffusion forcing: the rectified-flow loss with a time per frame chunk (causal models).

A causal VideoDiT (`model.causal_chunk_frames = F > 0`, sora_jax/models/causal.py) cuts
the T' latent frames into C = T' / F chunks and attends block-causally over them. It is
trained as in Diffusion Forcing (Chen et al. 2024, arXiv:2407.01392): every chunk c of a
sample has its own time t_c, so the model learns to denoise a chunk whatever the noise of
its past, which includes the clean past of an autoregressive rollout
(sora_jax/diffusion/rollout.py). Per chunk, with the symbols of sora_jax/diffusion/flow.py:

    x_t[c] = (1 - t_c) x_0[c] + t_c eps[c],     v[c] = eps[c] - x_0[c]
    l_b    = mean_c w(u_c) mean_{T_c, H, W, C} (v_theta(x_t, t)[c] - v[c])²

Chunk times (`diffusion.forcing_schedule`), each u_c drawn by `diffusion.time_sampling`
then shifted (`diffusion.shift`, the alpha of the whole clip) and mapped to
`diffusion.time_range` as flow.py does for one time per sample:

    independent   every chunk's u_c independent (Diffusion Forcing's schedule)
    prefix        as 'independent', then the first k chunks, k ~ U{0, .., C - 1} per
                  sample, get t = `diffusion.forcing_context_t` (the noise level of the
                  rollout's context, t_ctx): the rollout's situation, a (slightly noisy)
                  clean past and a noisy present, is trained directly (k = 0: all
                  independent). Context chunks keep their loss (a denoising target at
                  t_ctx like any other).

The per-sample aux `t` is the mean of the chunk times. Caption dropout is flow.py's. Only
text-to-video: the past enters through the causal attention, so conditioning tasks
(`diffusion.tasks` other than t2v) and `model.cond_channels` are refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.config import ConfigError
from sora_jax.diffusion import flow

SCHEDULES = ("independent", "prefix")
# The rollout's default noise level of its context chunks (CausVid and Self-Forcing
# condition on the generated past re-noised slightly; a small t keeps it close to clean).
DEFAULT_CONTEXT_T = 0.05


def chunk_frames(model_cfg) -> int:
    """`model.causal_chunk_frames` (0 when absent: not a causal model)."""
    return int(model_cfg.get("causal_chunk_frames", 0) or 0)


def config_errors(config: ml_collections.ConfigDict, model_cfg) -> list[str]:
    """Every bad field of a causal run's diffusion forcing (empty for other runs)."""
    if chunk_frames(model_cfg) <= 0:
        return []
    errors = []
    schedule = config.get("forcing_schedule", "independent")
    if schedule not in SCHEDULES:
        errors.append(f"diffusion.forcing_schedule={schedule!r} is unknown; use one of {SCHEDULES}")
    t_ctx = float(config.get("forcing_context_t", DEFAULT_CONTEXT_T))
    if not 0.0 <= t_ctx < 1.0:
        errors.append(f"diffusion.forcing_context_t={t_ctx} must be in [0, 1)")
    tasks = {k: v for k, v in dict(config.get("tasks", {}) or {}).items() if v}
    if set(tasks) - {"t2v"}:
        errors.append(
            f"diffusion.tasks={tasks} with model.causal_chunk_frames > 0: a causal model "
            "conditions on its past through attention; set diffusion.tasks={'t2v': 1.0}"
        )
    if int(model_cfg.get("cond_channels", 0) or 0):
        errors.append("model.cond_channels must be 0 with model.causal_chunk_frames > 0")
    return errors


def chunk_times(key: jax.Array, chunks: int, config, alpha: float) -> tuple[jax.Array, jax.Array]:
    """One sample's `(u [C], t [C])`: unshifted draws and chunk times (module docstring)."""
    u = flow.sample_time(jax.random.fold_in(key, 0), (chunks,), config)
    t = flow.shift_time(u, alpha)
    lo, hi = flow.time_range(config)
    t = lo + (hi - lo) * t
    if config.get("forcing_schedule", "independent") == "prefix":
        k = jax.random.randint(jax.random.fold_in(key, 1), (), 0, chunks)
        t_ctx = float(config.get("forcing_context_t", DEFAULT_CONTEXT_T))
        t = jnp.where(jnp.arange(chunks) < k, t_ctx, t)
    return u, t


def loss_fn(
    apply_fn: Callable,
    params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    config: ml_collections.ConfigDict,
    alpha: float = 1.0,
    *,
    chunk: int,
    cond_channels: int = 0,
    row_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion-forcing loss of a batch: `flow.loss_fn`'s call and outputs, with a time per
    chunk of `chunk` latent frames. Row b's draws come from `fold_in(key, row_offset + b)`
    with flow.py's purposes (time, noise, caption dropout), so micro-batches draw what
    their rows draw in the whole batch."""
    if cond_channels:
        raise ConfigError("model.cond_channels must be 0 with model.causal_chunk_frames > 0")
    x_0 = batch["latents"].astype(jnp.float32)  # [B, T', H, W, C]
    b, frames = x_0.shape[:2]
    if frames % chunk:
        raise ValueError(
            f"{frames} latent frames are not whole chunks of model.causal_chunk_frames={chunk}"
        )
    chunks = frames // chunk
    keys = flow.row_keys(key, b, row_offset)

    def per_row(purpose, draw):
        return jax.vmap(lambda k: draw(jax.random.fold_in(k, purpose)))(keys)

    u, t = per_row(flow.PURPOSE_TIME, lambda k: chunk_times(k, chunks, config, alpha))  # [B, C]
    t_frames = jnp.repeat(t, chunk, axis=1)  # [B, C] -> [B, T']
    eps = per_row(flow.PURPOSE_NOISE, lambda k: jax.random.normal(k, x_0.shape[1:], x_0.dtype))
    keep = per_row(flow.PURPOSE_DROPOUT, jax.random.uniform) >= config.caption_dropout  # [B]
    text = jnp.where(keep[:, None, None], batch["text"], 0.0)
    text_mask = jnp.logical_and(batch["text_mask"], keep[:, None])
    x_t = flow.interpolate(x_0, eps, t_frames)
    v = apply_fn(params, x_t, t_frames, text, text_mask)
    err = jnp.mean(jnp.square(v - flow.velocity(x_0, eps)), axis=(2, 3, 4))  # [B, T']
    err = err.reshape(b, chunks, chunk).mean(-1)  # [B, C]
    per_sample = err.mean(-1)  # [B]
    weights = flow.loss_weight(u, config)  # [B, C]
    loss = jnp.mean(jnp.mean(weights * err, axis=-1))
    tasks = jnp.zeros((b,), jnp.int32)  # conditioning.TASKS[0], text-to-video
    return loss, {"per_sample_loss": per_sample, "t": t.mean(-1), "task": tasks}


def loss_for(config: ml_collections.ConfigDict) -> Callable:
    """The loss of a run's step: this module's for a causal model (`loss_fn` with its chunk
    and its config checked), else `flow.loss_fn`."""
    chunk = chunk_frames(config.model)
    if chunk <= 0:
        return flow.loss_fn
    errors = config_errors(config.diffusion, config.model)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return functools.partial(loss_fn, chunk=chunk)
