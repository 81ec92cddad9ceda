r"""Rectified flow: interpolation, training times, timestep shift, caption dropout, loss.

Convention (DESIGN.md §4.5), with the symbols of the code:

    x_t = (1 - t) x_0 + t eps,        t in [0, 1],  t = 1 is pure noise eps ~ N(0, I)
    v   = eps - x_0                   the velocity the network predicts, v = dx_t/dt

Training times: t ~ uniform(0, 1), or logit-normal `t = sigmoid(m + s z)`, z ~ N(0, 1)
(SD3, Esser et al. 2024). Then the shift

    t' = alpha t / (1 + (alpha - 1) t)

moves mass towards noise for larger clips (alpha > 1); alpha = 1 is the identity. The same
function maps the uniform sampling grid, so training and sampling agree. `diffusion.shift`
> 0 fixes alpha; `-1` derives it from the clip's token count:
alpha = sqrt(tokens_per_frame / shift_base_tokens) * sqrt(latent_frames), clipped below at 1
(resolution-dependent shifting as in SD3 §5.3.2; the duration factor follows Open-Sora).

Null conditioning (classifier-free guidance): text embeddings all zero and text mask all
False. Caption dropout replaces a sample's text with it with probability
`diffusion.caption_dropout`; the sampler's unconditional branch uses exactly the same.

The loss is the mean squared error between the predicted and the true velocity, averaged
over latent elements; per-frame timesteps `t [B, T']` are supported by the interpolation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

# Purposes folded into a step's key, so noise, times and dropout are independent streams.
PURPOSE_TIME, PURPOSE_NOISE, PURPOSE_DROPOUT = 0, 1, 2


def _expand(t: jax.Array, x: jax.Array) -> jax.Array:
    """`t [B]` or `[B, T']` broadcast against `x [B, T', H', W', C]`."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x_0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x_0 + t eps."""
    t = _expand(t, x_0)
    return (1.0 - t) * x_0 + t * eps


def velocity(x_0: jax.Array, eps: jax.Array) -> jax.Array:
    """v = eps - x_0."""
    return eps - x_0


def shift_time(t: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """t' = alpha t / (1 + (alpha - 1) t): monotone, fixes 0 and 1, identity at alpha = 1."""
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def shift_alpha(config: ml_collections.ConfigDict, latent_shape, patch_size) -> float:
    """alpha for a latent clip `[T', H', W', C]`: fixed (`shift > 0`) or from tokens (`-1`)."""
    if config.shift > 0:
        return float(config.shift)
    frames, height, width = latent_shape[:3]
    tokens_per_frame = (height // patch_size[1]) * (width // patch_size[2])
    latent_frames = frames // patch_size[0]
    alpha = (tokens_per_frame / config.shift_base_tokens) ** 0.5 * latent_frames**0.5
    return max(1.0, float(alpha))


def sample_time(key: jax.Array, shape: tuple[int, ...], config) -> jax.Array:
    """Training times before the shift, by `diffusion.time_sampling`."""
    name = config.time_sampling
    if name == "uniform":
        return jax.random.uniform(key, shape)
    if name == "logit_normal":
        z = jax.random.normal(key, shape)
        return jax.nn.sigmoid(config.logit_mean + config.logit_std * z)
    raise ValueError(
        f"diffusion.time_sampling={name!r} is unknown; use 'uniform' or 'logit_normal'"
    )


def null_conditioning(text: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The one null conditioning: zero embeddings, nothing attended."""
    return jnp.zeros_like(text), jnp.zeros_like(text_mask)


def drop_captions(
    key: jax.Array, text: jax.Array, text_mask: jax.Array, p: float
) -> tuple[jax.Array, jax.Array]:
    """Replaces each sample's text by the null conditioning with probability p."""
    keep = jax.random.uniform(key, text.shape[:1]) >= p  # [B]
    text = jnp.where(keep[:, None, None], text, 0.0)
    text_mask = jnp.logical_and(text_mask, keep[:, None])
    return text, text_mask


def loss_fn(
    apply_fn: Callable,
    params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    config: ml_collections.ConfigDict,
    alpha: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rectified-flow loss of one batch.

    Returns the scalar loss and `aux` with per-sample losses `[B]` and times `[B]`, so the
    trainer can log loss per bucket and per timestep bin.
    """
    x_0 = batch["latents"].astype(jnp.float32)
    b = x_0.shape[0]
    t = shift_time(sample_time(jax.random.fold_in(key, PURPOSE_TIME), (b,), config), alpha)
    eps = jax.random.normal(jax.random.fold_in(key, PURPOSE_NOISE), x_0.shape, x_0.dtype)
    text, text_mask = drop_captions(
        jax.random.fold_in(key, PURPOSE_DROPOUT),
        batch["text"],
        batch["text_mask"],
        config.caption_dropout,
    )
    x_t = interpolate(x_0, eps, t)
    v = apply_fn(params, x_t, t, text, text_mask)
    per_sample = jnp.mean(jnp.square(v - velocity(x_0, eps)), axis=tuple(range(1, x_0.ndim)))
    return jnp.mean(per_sample), {"per_sample_loss": per_sample, "t": t}
