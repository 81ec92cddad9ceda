r"""Autoregressive rollout of a causal VideoDiT: chunk by chunk over a rolling KV cache.

A causal model (`model.causal_chunk_frames = F`, sora_jax/models/causal.py), trained with
diffusion forcing (sora_jax/diffusion/forcing.py), generates a video of any number of
chunks C. For c = 0, 1, ..., C - 1, with the cache holding the last W chunks:

    x ~ N(0, I)  [B, F, H', W', C]                          noise of chunk c
    for i = 0 .. n-1:  x += (t_{i+1} - t_i) v(x, t_i | cache)   Euler on flow's time grid
    x_ctx = (1 - t_ctx) x + t_ctx eps_ctx                   the chunk as context
    cache = push(cache, kv(x_ctx, t_ctx | cache))           its keys/values, oldest dropped

`v(x, t | cache)` is one cached call (`VideoDiT(..., cache=cache)`): the chunk's tokens
attend to themselves and to the cache; text cross-attention is unchanged. The context
pass re-runs the finished chunk at the small noise level t_ctx (`sample.context_t`,
default the run's `diffusion.forcing_context_t`), the level the model saw its past at in
training ('prefix' schedule); t_ctx = 0 conditions on the clean chunk. Its (k, v) enter the
cache; the sample itself is x.

Guidance: with `cfg_scale != 1` the batch is doubled (conditional rows, then the null
conditioning) and so is the cache: the null branch conditions on the same frames through
its own keys and values, computed with the null text, and v = v_null + s (v_text - v_null)
as in sora_jax/diffusion/sampler.py.

Noise: chunk c of sample b draws from `fold_in(fold_in(key_b, c), 0)` and its context
noise from `fold_in(fold_in(key_b, c), 1)`, so a video's first chunks do not depend on how
long it is and no array grows with the length but the output. The loop over chunks is a
`lax.scan` with a fixed-shape cache: one compiled program for any C, and memory besides
the output flat in C (tests/diffusion/test_rollout.py measures it).

`reference_rollout` computes the same chunks without a cache: at every denoising step it
runs the full block-causal model over the context chunks and the current one. With a
window W >= C - 1 the two agree (float32 tolerance): the cache is exact, not an
approximation. With W < C - 1 the rollout forgets chunks older than the window, and
(through the cached keys of the chunks it keeps) sees them only as they were seen when
those chunks were made.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow, sampler
from sora_jax.models import causal as causal_lib


def _guided(v: jax.Array, b: int, cfg_scale: float) -> jax.Array:
    """`v [2B or B, ...]` -> guided `[B, ...]` (conditional rows first)."""
    if cfg_scale == 1.0:
        return v
    v_text, v_null = v[:b], v[b:]
    return v_null + cfg_scale * (v_text - v_null)


def _conditioning(text, text_mask, cfg_scale: float):
    """Text and mask of the (doubled when guided) batch."""
    if cfg_scale == 1.0:
        return text, text_mask
    null_text, null_mask = flow.null_conditioning(text, text_mask)
    return jnp.concatenate([text, null_text]), jnp.concatenate([text_mask, null_mask])


def _draws(keys: jax.Array, c, shape) -> tuple[jax.Array, jax.Array]:
    """Chunk c's noise and context noise `[B, *shape]` from the per-sample keys `[B]`."""
    ck = jax.vmap(lambda k: jax.random.fold_in(k, c))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(ck)
    ctx = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(ck)
    return noise, ctx


def rollout(
    apply_cached: Callable,
    params,
    keys: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    cache: causal_lib.KVCache,
    *,
    num_chunks: int,
    chunk_shape: tuple[int, int, int, int],
    num_steps: int,
    cfg_scale: float = 1.0,
    alpha: float = 1.0,
    context_t: float = 0.05,
) -> jax.Array:
    """Latents `[B, C·F, H', W', C_lat]` of `num_chunks` chunks (module docstring).

    `apply_cached(params, x [B', F, H', W', C], t [B', F], text, mask, cache) -> (v, kv)`
    is a causal VideoDiT's cached call (`cached_apply_fn`); `keys` `[B]` one key per
    sample; `cache` an empty `KVCache` of batch B' (2B when guided; `causal.empty_cache`)
    whose window is what the rollout keeps; `chunk_shape` `(F, H', W', C)`.
    """
    if num_chunks < 1 or num_steps < 1:
        raise ValueError(f"num_chunks={num_chunks} and num_steps={num_steps} must be >= 1")
    if not 0.0 <= context_t < 1.0:
        raise ValueError(f"sample.context_t={context_t} must be in [0, 1)")
    b = keys.shape[0]
    want = b if cfg_scale == 1.0 else 2 * b
    if cache.k.shape[1] != want:
        raise ValueError(f"the cache has batch {cache.k.shape[1]}, expected {want} (2B if guided)")
    text, text_mask = _conditioning(text, text_mask, cfg_scale)
    ts = sampler.time_grid(num_steps, alpha)
    frames = chunk_shape[0]
    double = (lambda x: x) if cfg_scale == 1.0 else (lambda x: jnp.concatenate([x, x]))

    def chunk_step(carry, _):
        cache, video, c = carry
        noise, ctx_noise = _draws(keys, c, chunk_shape)

        def ode_step(x, i):
            t = jnp.full((want, frames), ts[i])
            v, _ = apply_cached(params, double(x), t, text, text_mask, cache)
            return x + (ts[i + 1] - ts[i]) * _guided(v, b, cfg_scale), None

        x, _ = jax.lax.scan(ode_step, noise, jnp.arange(num_steps))
        x_ctx = flow.interpolate(x, ctx_noise, jnp.full((b,), context_t))
        t_ctx = jnp.full((want, frames), context_t)
        _, kv = apply_cached(params, double(x_ctx), t_ctx, text, text_mask, cache)
        # Written in place into the output (no stacked copy of the chunks to transpose).
        video = jax.lax.dynamic_update_slice_in_dim(video, x, c * frames, axis=1)
        return (causal_lib.push(cache, kv), video, c + 1), None

    video = jnp.zeros((b, num_chunks * frames, *chunk_shape[1:]), jnp.float32)
    # The chunk index is carried (not scanned over an arange): nothing has length C but
    # the output.
    start = (cache, video, jnp.zeros((), jnp.int32))
    (_, video, _), _ = jax.lax.scan(chunk_step, start, None, length=num_chunks)
    return video  # [B, C·F, H', W', C_lat]


def reference_rollout(
    apply_fn: Callable,
    params,
    keys: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    *,
    num_chunks: int,
    chunk_shape: tuple[int, int, int, int],
    num_steps: int,
    cfg_scale: float = 1.0,
    alpha: float = 1.0,
    context_t: float = 0.05,
) -> jax.Array:
    """`rollout` without a cache: every step recomputes the full block-causal model
    `apply_fn(params, x [B', T, ...], t [B', T], text, mask) -> v` over all context chunks
    (at t_ctx, with the same context noise) and the current chunk; the reference of the
    cache (equal to `rollout` with a window of at least C - 1 chunks)."""
    b, frames = keys.shape[0], chunk_shape[0]
    text, text_mask = _conditioning(text, text_mask, cfg_scale)
    want = text.shape[0]
    double = (lambda x: x) if cfg_scale == 1.0 else (lambda x: jnp.concatenate([x, x]))
    ts = sampler.time_grid(num_steps, alpha)
    contexts, outputs = [], []
    for c in range(num_chunks):
        noise, ctx_noise = _draws(keys, c, chunk_shape)
        x = noise
        for i in range(num_steps):
            seq = jnp.concatenate([*contexts, x], axis=1)  # [B, (c + 1) F, ...]
            t = jnp.concatenate(
                [jnp.full((want, c * frames), context_t), jnp.full((want, frames), ts[i])], 1
            )
            v = apply_fn(params, double(seq), t, text, text_mask)[:, c * frames :]
            x = x + (ts[i + 1] - ts[i]) * _guided(v, b, cfg_scale)
        outputs.append(x)
        contexts.append(flow.interpolate(x, ctx_noise, jnp.full((b,), context_t)))
    return jnp.concatenate(outputs, axis=1)


def cached_apply_fn(model) -> Callable:
    """`apply(params, x, t, text, mask, cache) -> (v, (k, v))`: a causal VideoDiT's cached
    call over a plain parameter tree (blocks unstacked: `dit.unstack_layers`)."""

    def apply(params, x, t, text, text_mask, cache):
        return model.apply({"params": params}, x, t, text, text_mask, cache=cache)

    return apply


def new_cache(model, batch: int, window: int, chunk_grid: tuple[int, int, int], dtype=None):
    """An empty `KVCache` for `model` (a causal VideoDiT) of `window` chunks whose token grid
    is `chunk_grid` `(F', H'', W'')` (after patching)."""
    heads = model.num_heads
    return causal_lib.empty_cache(
        model.num_layers,
        batch,
        window,
        chunk_grid[0] * chunk_grid[1] * chunk_grid[2],
        heads,
        model.dim // heads,
        dtype or model.dtype,
    )
