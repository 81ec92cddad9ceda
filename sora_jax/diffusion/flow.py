r"""Rectified flow: interpolation, training times, timestep shift, weighting, dropout, loss.

Convention (docs/design.md, The diffusion convention), with the symbols of the code:

    x_t = (1 - t) x_0 + t eps,        t in [0, 1],  t = 1 is pure noise eps ~ N(0, I)
    v   = eps - x_0                   the velocity the network predicts, v = dx_t/dt

Training times (`diffusion.time_sampling`, SD3 §3.1, Esser et al. 2024), u ~ U(0, 1):

    uniform       t = u
    logit_normal  t = sigmoid(m + s z), z ~ N(0, 1)         m, s = logit_mean, logit_std
    mode          t = 1 - u - s_m (cos²(πu/2) - 1 + u)      s_m = mode_scale in [-1, 2/(π-2)]
    cosmap        t = 1 - 1 / (tan(πu/2) + 1)

`mode` is decreasing in u on that range of s_m, so its quantile is Q(p) = f_mode(1 - p); s_m > 0
puts mass in the middle while keeping a density 1/(1 + s_m) > 0 at both ends (heavier tails
than logit-normal, whose density vanishes there); SD3 found s_m = 1.29 best.

Shift. Times then go through t' = alpha t / (1 + (alpha - 1) t): monotone, fixes 0 and 1,
the identity at alpha = 1, and for alpha > 1 moves mass towards noise. The same function
maps the sampler's uniform grid, so training and sampling see the same times.
`diffusion.shift > 0` fixes alpha; `-1` derives it from the clip (`shift_alpha`):

    alpha = sqrt(tokens_per_frame / shift_base_tokens) · sqrt(T')

SD3 §5.3.2: a clip of n times more (redundant) values needs alpha = sqrt(n) for its noise
to destroy as much signal at t' as at t with the base size; applied to the n = L / base
tokens of a T' latent-frame clip this is the product above. SD3 used base = 256 tokens (256²
px, 8x VAE, 2x2 patches); the sqrt(latent frames) factor is Open-Sora 1.2's
`timestep_transform` (ratio_space · ratio_time, base 1 frame). alpha is clipped below at 1.

Loss weighting (`diffusion.loss_weighting`). With u ~ U(0, 1), weighting the per-sample loss
by a density pi(u) has the same expected gradient as drawing u ~ pi (SD3 §3.1):
E_{u~pi}[L(u)] = E_{u~U}[pi(u) L(u)]. 'none' (w = 1), 'logit_normal', 'mode' and 'cosmap' use
the densities of the samplers above (same parameters) evaluated at the unshifted u; this gives
their emphasis with the uniform sampler's coverage of all times, at a higher variance.
Combined with a non-uniform `time_sampling` the densities multiply.

Null conditioning (classifier-free guidance): text embeddings all zero and text mask all
False. Caption dropout replaces a sample's text with it with probability
`diffusion.caption_dropout`; the sampler's unconditional branch uses exactly the same.
Conditioning frames (tasks i2v, continuation, ...) are in `sora_jax.diffusion.conditioning`.

Loss: per sample, the mean squared error between predicted and true velocity over the
latent elements of the generated (non-given) frames; the batch loss is mean_b w_b l_b.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.config import ConfigError
from sora_jax.diffusion import conditioning

# Purposes folded into a step's key, so every random stream is independent of the others.
PURPOSE_TIME, PURPOSE_NOISE, PURPOSE_DROPOUT = 0, 1, 2
PURPOSE_TASK, PURPOSE_COND_DROPOUT, PURPOSE_CONTINUATION = 3, 4, 5

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
LOSS_WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # f_mode is monotone for mode_scale in [-1, this]


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


# --- Timestep shift ---------------------------------------------------------------------


def shift_time(t: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """t' = alpha t / (1 + (alpha - 1) t): monotone, fixes 0 and 1, identity at alpha = 1."""
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def shift_alpha(config: ml_collections.ConfigDict, latent_shape, patch_size) -> float:
    """alpha for a latent clip `[T', H', W', C]`: fixed (`shift > 0`) or from its size (`-1`).

    alpha = sqrt((H'/p_h)(W'/p_w) / shift_base_tokens) · sqrt(T'), at least 1 (module doc).
    """
    if config.shift > 0:
        return float(config.shift)
    frames, height, width = latent_shape[:3]
    tokens_per_frame = (height // patch_size[1]) * (width // patch_size[2])
    alpha = (tokens_per_frame / config.shift_base_tokens) ** 0.5 * frames**0.5
    return max(1.0, float(alpha))


# --- Training-time distributions and loss weights ---------------------------------------


def mode_time(u: jax.Array, scale: float) -> jax.Array:
    """f_mode(u) = 1 - u - scale (cos²(πu/2) - 1 + u) (SD3 eq. 20)."""
    return 1.0 - u - scale * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


def cosmap_time(u: jax.Array) -> jax.Array:
    """t = 1 - 1 / (tan(πu/2) + 1) (SD3 eq. 21)."""
    return 1.0 - 1.0 / (jnp.tan(0.5 * jnp.pi * u) + 1.0)


def _mode_scale(config) -> float:
    s = float(config.get("mode_scale", 1.29))
    if not -1.0 <= s <= MODE_SCALE_MAX:
        raise ValueError(
            f"diffusion.mode_scale={s} is outside [-1, {MODE_SCALE_MAX:.4f}] where f_mode is "
            f"monotone; SD3 used 1.29"
        )
    return s


def sample_time(key: jax.Array, shape: tuple[int, ...], config) -> jax.Array:
    """Training times before the shift, by `diffusion.time_sampling` (module doc)."""
    name = config.time_sampling
    if name == "uniform":
        return jax.random.uniform(key, shape)
    if name == "logit_normal":
        z = jax.random.normal(key, shape)
        return jax.nn.sigmoid(config.logit_mean + config.logit_std * z)
    if name == "mode":
        return mode_time(jax.random.uniform(key, shape), _mode_scale(config))
    if name == "cosmap":
        return cosmap_time(jax.random.uniform(key, shape))
    raise ValueError(f"diffusion.time_sampling={name!r} is unknown; use one of {TIME_SAMPLINGS}")


def time_density(t: jax.Array, name: str, config) -> jax.Array:
    """The density on (0, 1) of the `time_sampling` named `name` (before the shift)."""
    if name in ("uniform", "none"):
        return jnp.ones_like(t)
    if name == "logit_normal":
        m, s = config.logit_mean, config.logit_std
        z = (jnp.log(t) - jnp.log1p(-t) - m) / s
        return jnp.exp(-0.5 * z**2) / (s * math.sqrt(2 * math.pi) * t * (1.0 - t))
    if name == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    if name == "mode":
        # 1 / |f'(u)| at u = f^{-1}(t); f is decreasing, so invert it by bisection.
        s = _mode_scale(config)

        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = mode_time(mid, s) > t  # f(mid) > t: the root is right of mid
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, bisect, (jnp.zeros_like(t), jnp.ones_like(t)))
        u = 0.5 * (lo + hi)
        slope = 1.0 + s - 0.5 * jnp.pi * s * jnp.sin(jnp.pi * u)  # -f'(u) > 0
        return 1.0 / slope
    raise ValueError(f"diffusion.loss_weighting={name!r} is unknown; use one of {LOSS_WEIGHTINGS}")


def loss_weight(u: jax.Array, config) -> jax.Array:
    """Per-sample weights `[B]` of `diffusion.loss_weighting` at the unshifted times u `[B]`."""
    name = config.get("loss_weighting", "none")
    if name not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"diffusion.loss_weighting={name!r} is unknown; use one of {LOSS_WEIGHTINGS}"
        )
    return time_density(jnp.clip(u, 1e-6, 1.0 - 1e-6), name, config)


def time_range(config) -> tuple[float, float]:
    """`diffusion.time_range` (lo, hi), default (0, 1): training times are mapped affinely
    onto [lo, hi] after the shift, e.g. one Wan 2.2 expert's range
    (sora_jax.models.wan_experts.time_range)."""
    lo, hi = config.get("time_range", None) or (0.0, 1.0)
    return float(lo), float(hi)


def check_config(config, model_cfg, latent_channels: int | None = None) -> None:
    """Raises a ConfigError naming every bad field of `diffusion` (and `model.cond_channels`)."""
    errors = []
    if config.time_sampling not in TIME_SAMPLINGS:
        errors.append(
            f"diffusion.time_sampling={config.time_sampling!r} is unknown; use one of "
            f"{TIME_SAMPLINGS}"
        )
    weighting = config.get("loss_weighting", "none")
    if weighting not in LOSS_WEIGHTINGS:
        errors.append(
            f"diffusion.loss_weighting={weighting!r} is unknown; use one of {LOSS_WEIGHTINGS}"
        )
    if "mode" in (config.time_sampling, weighting):
        try:
            _mode_scale(config)
        except ValueError as e:
            errors.append(str(e))
    lo, hi = time_range(config)
    if not 0.0 <= lo < hi <= 1.0:
        errors.append(
            f"diffusion.time_range=({lo}, {hi}) needs 0 <= lo < hi <= 1 (e.g. a Wan 2.2 "
            "expert's range from sora_jax.models.wan_experts.time_range)"
        )
    if not 0.0 <= config.caption_dropout <= 1.0:
        errors.append(f"diffusion.caption_dropout={config.caption_dropout} must be in [0, 1]")
    errors += conditioning.config_errors(config, model_cfg, latent_channels)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


# --- Null conditioning and caption dropout ----------------------------------------------


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


# --- Loss -------------------------------------------------------------------------------


def per_sample_loss(
    apply_fn: Callable,
    params,
    x_0: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    given: jax.Array | None = None,
    cond_channels: int = 0,
) -> jax.Array:
    """Mean squared velocity error `[B]` over the generated frames of each sample.

    x_0, eps `[B, T', H', W', C]`; t `[B]`; `given [B, T']` (None: nothing given, and the
    model gets t `[B]`; else per-frame times `[B, T']`, 0 on given frames, which are clean).
    """
    if given is None:
        t_in = t
        x_t = interpolate(x_0, eps, t)
        x_in = conditioning.model_input(x_t, None, None, cond_channels)
        keep = jnp.ones(x_0.shape[:2], x_0.dtype)  # [B, T']
    else:
        t_in = conditioning.frame_times(t, given)  # [B, T']
        x_t = interpolate(x_0, eps, t_in)  # x_t = x_0 on the given frames
        x_in = conditioning.model_input(x_t, x_0, given, cond_channels)
        keep = (~given).astype(x_0.dtype)  # [B, T']
    v = apply_fn(params, x_in, t_in, text, text_mask)
    err = jnp.mean(jnp.square(v - velocity(x_0, eps)), axis=(2, 3, 4))  # [B, T']
    return jnp.sum(err * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1.0)  # [B]


def row_keys(key: jax.Array, batch: int, row_offset: int | jax.Array = 0) -> jax.Array:
    """`[B]` keys `fold_in(key, row_offset + b)`: sample b's random stream in the loss."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(row_offset + jnp.arange(batch))


def loss_fn(
    apply_fn: Callable,
    params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    config: ml_collections.ConfigDict,
    alpha: float = 1.0,
    *,
    cond_channels: int = 0,
    row_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rectified-flow loss of one batch `latents [B, T', H', W', C]`, `text`, `text_mask`.

    Sample `b`'s random draws (time, noise, caption dropout, task) come from
    `fold_in(key, row_offset + b)`: a micro-batch at `row_offset` draws exactly what its
    rows draw in the whole batch.

    Returns the scalar mean_b w_b l_b and `aux`: unweighted per-sample losses l `[B]`, times
    t `[B]` (after the shift; the generated frames' time) and task ids `[B]` (indices into
    `conditioning.TASKS`, after conditioning dropout), so the trainer can log loss per
    bucket, per timestep bin and per task. `cond_channels` is the model's
    `model.cond_channels` (0 or C + 1).
    """
    x_0 = batch["latents"].astype(jnp.float32)
    b, frames = x_0.shape[:2]
    # One key per sample, from its row in the global batch: the draws of a row do not
    # depend on how the batch is split (micro-batches, devices, processes).
    keys = row_keys(key, b, row_offset)  # [B] keys

    def per_row(purpose, draw):
        return jax.vmap(lambda k: draw(jax.random.fold_in(k, purpose)))(keys)

    u = per_row(PURPOSE_TIME, lambda k: sample_time(k, (), config))  # [B]
    t = shift_time(u, alpha)
    lo, hi = time_range(config)
    t = lo + (hi - lo) * t  # one expert's share of [0, 1] (models/wan_experts.py); else t
    eps = per_row(PURPOSE_NOISE, lambda k: jax.random.normal(k, x_0.shape[1:], x_0.dtype))
    keep = per_row(PURPOSE_DROPOUT, jax.random.uniform) >= config.caption_dropout  # [B]
    text = jnp.where(keep[:, None, None], batch["text"], 0.0)
    text_mask = jnp.logical_and(batch["text_mask"], keep[:, None])
    tasks, given = jax.vmap(
        lambda k: conditioning.draw(
            jax.random.fold_in(k, PURPOSE_TASK),
            jax.random.fold_in(k, PURPOSE_CONTINUATION),
            jax.random.fold_in(k, PURPOSE_COND_DROPOUT),
            1,
            frames,
            config,
        )
    )(keys)
    tasks, given = tasks[:, 0], given[:, 0]  # [B], [B, T']
    if not conditioning.conditioning_enabled(config):
        given = None  # t2v only: the model gets t [B], as before conditioning tasks existed
    per_sample = per_sample_loss(
        apply_fn, params, x_0, eps, t, text, text_mask, given, cond_channels
    )
    loss = jnp.mean(loss_weight(u, config) * per_sample)
    return loss, {"per_sample_loss": per_sample, "t": t, "task": tasks}
