r"""The rectified-flow objective on packed rows (sora_jax/data/packing.py): one sample per clip.

A packed batch holds `B` rows of `L` tokens; row `b` holds up to `K` clips ("samples"),
clip `k` being the tokens with `segment_ids == k + 1` and patch grid `segment_shapes[b, k]`
(`(0, 0, 0)`: no clip). Every sample is treated as the bucketed objective
(diffusion/flow.py) treats one clip alone:

- **its own draws**, from `fold_in(key, (row_offset + b) K + k)`: time `u`, caption
  dropout, task, continuation length and conditioning dropout (the purposes of flow.py);
  noise per token from `fold_in(sample key, PURPOSE_NOISE)` folded with the token's index
  inside its clip, so a clip's noise does not depend on where it was packed;
- **its own shift** `alpha` from its own shape (`flow.shift_alpha`'s formula per sample);
- **its own task**: a clip of one latent frame is an image, others draw from
  `diffusion.tasks`; given latent frames take `t = 0` and `x_t = x_0`, and with
  `model.cond_channels = C + 1` the token features carry `[x_t, x_0 · given, given]` per
  latent pixel, the layout `conditioning.model_input` gives the clip alone;
- **its own loss**: `l_k = Σ |v - (eps - x_0)|² / n_k` over the elements of its generated
  (non-given) latent frames, `n_k` their number.

Batch loss (`diffusion.packed_loss`):

    'sample' (default)  mean over samples:  Σ_k w_k l_k / #samples      (as bucketed)
    'token'             token-weighted:     Σ_k w_k n_k l_k / Σ_k n_k

`w_k` the `diffusion.loss_weighting` of its `u`. 'sample' weighs a 1-frame image as much as
an 81-frame clip, as a bucketed run does per sample; 'token' weighs every generated latent
element the same (a long clip counts more). Padding tokens and empty sample slots
contribute nothing.

Metrics (`aux`, flattened over the `B K` sample slots, empty slots with `t = -1` so no
timestep bin counts them): `per_sample_loss`, `t`, `task` and `shape_class`, an index into
`SHAPE_CLASSES` (image, or a video's orientation) that the trainer reports as
`train/loss_class/<name>`, the packed run's stand-in for per-bucket losses.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import conditioning, flow

PACKED_LOSSES = ("sample", "token")
# Shape classes of a packed sample, for metrics: an image (one latent frame), or a video by
# orientation of its patch grid (H' vs W').
SHAPE_CLASSES = ("image", "landscape", "portrait", "square")


def packed_loss_mode(config) -> str:
    """`diffusion.packed_loss` ('sample' by default), or a ValueError naming the choices."""
    mode = config.get("packed_loss", "sample")
    if mode not in PACKED_LOSSES:
        raise ValueError(f"diffusion.packed_loss={mode!r} is unknown; use one of {PACKED_LOSSES}")
    return mode


def shape_classes(grids: jax.Array, patch_t: int) -> jax.Array:
    """`[..., 3]` patch grids -> class ids `[...]` into SHAPE_CLASSES (-1: no clip)."""
    gt, gh, gw = grids[..., 0], grids[..., 1], grids[..., 2]
    video = jnp.where(gw > gh, 1, jnp.where(gh > gw, 2, 3))
    cls = jnp.where(gt * patch_t == 1, 0, video)
    return jnp.where(gt > 0, cls, -1).astype(jnp.int32)


def sample_alpha(config, grids: jax.Array, patch) -> jax.Array:
    """`alpha [B, K]` of each sample's shape: `flow.shift_alpha` per sample (`shift > 0`:
    that constant; `-1`: sqrt(H' W' / (p_h p_w base)) sqrt(T'), at least 1)."""
    if config.shift > 0:
        return jnp.full(grids.shape[:-1], float(config.shift), jnp.float32)
    g = grids.astype(jnp.float32)
    frames = g[..., 0] * patch[0]  # latent frames T'
    alpha = jnp.sqrt(g[..., 1] * g[..., 2] / config.shift_base_tokens) * jnp.sqrt(frames)
    return jnp.maximum(1.0, alpha)


def sample_keys(key: jax.Array, rows: int, k: int, row_offset: int | jax.Array = 0) -> jax.Array:
    """`[B, K]` keys `fold_in(key, (row_offset + b) K + j)`: sample (b, j)'s stream."""
    idx = (row_offset + jnp.arange(rows))[:, None] * k + jnp.arange(k)[None]  # [B, K]
    return jax.vmap(jax.vmap(lambda i: jax.random.fold_in(key, i)))(idx)


def token_index(positions: jax.Array, segment_ids: jax.Array, grids: jax.Array) -> jax.Array:
    """Each token's index `[B, L]` in its own clip's (t, h, w) row-major order."""
    grid = _per_token(grids, segment_ids)  # [B, L, 3]
    return (positions[..., 0] * grid[..., 1] + positions[..., 1]) * grid[..., 2] + positions[..., 2]


def _per_token(per_sample: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """`[B, K, ...]` -> `[B, L, ...]`: each token's sample's value (padding: sample 0's)."""
    idx = jnp.maximum(segment_ids - 1, 0)  # [B, L]
    return jax.vmap(lambda x, i: x[i])(per_sample, idx)


def token_noise(keys: jax.Array, segment_ids, positions, grids, features: int) -> jax.Array:
    """eps `[B, L, features]`: token i of sample (b, k) draws
    `normal(fold_in(fold_in(key_bk, PURPOSE_NOISE), i))` (0 on padding)."""
    idx = token_index(positions, segment_ids, grids)  # [B, L]
    tok_keys = _per_token(keys, segment_ids)  # [B, L] keys

    def draw(k, i):
        k = jax.random.fold_in(jax.random.fold_in(k, flow.PURPOSE_NOISE), i)
        return jax.random.normal(k, (features,), jnp.float32)

    eps = jax.vmap(jax.vmap(draw))(tok_keys, idx)
    return eps * (segment_ids > 0)[..., None]


def draw_tasks(keys: jax.Array, frames: jax.Array, config) -> tuple[jax.Array, jax.Array]:
    """Per-sample tasks `[B, K]` and continuation lengths `[B, K]` (conditioning.draw per
    sample, for its own number of latent frames `frames [B, K]`; 1 frame: an image)."""
    weights = conditioning.task_weights(config)
    k_cfg = config.get("continuation_frames", -1)

    def one(key, n):
        task = conditioning.sample_tasks(jax.random.fold_in(key, flow.PURPOSE_TASK), 1, weights)[0]
        k_max = n - 1 if k_cfg == -1 else jnp.minimum(k_cfg, n - 1)
        k_key = jax.random.fold_in(key, flow.PURPOSE_CONTINUATION)
        num = jax.random.randint(k_key, (), 1, jnp.maximum(k_max, 1) + 1)
        drop_key = jax.random.fold_in(key, flow.PURPOSE_COND_DROPOUT)
        drop = jax.random.uniform(drop_key, ()) < config.get("cond_dropout", 0.0)
        task = jnp.where(drop, conditioning.T2V, task)
        return jnp.where(n == 1, conditioning.IMAGE, task).astype(jnp.int32), num

    return jax.vmap(jax.vmap(one))(keys, frames)


def packed_loss_fn(
    apply_fn: Callable,
    params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    config,
    *,
    patch,
    cond_channels: int = 0,
    row_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of a packed batch (module docstring): `tokens [B, L, P·C]`, `segment_ids
    [B, L]`, `positions [B, L, 3]`, `segment_shapes [B, K, 3]`, `text [B, K, S, D]`,
    `text_mask [B, K, S]`. Returns the scalar loss and `aux` (per sample slot, flattened)."""
    x_0 = batch["tokens"].astype(jnp.float32)
    seg, pos = batch["segment_ids"].astype(jnp.int32), batch["positions"].astype(jnp.int32)
    grids = batch["segment_shapes"].astype(jnp.int32)  # [B, K, 3]
    b, length, feat = x_0.shape
    k = grids.shape[1]
    pt, area = int(patch[0]), int(patch[1]) * int(patch[2])
    c = feat // (pt * area)
    real = jnp.prod(grids, axis=-1) > 0  # [B, K]
    keys = sample_keys(key, b, k, row_offset)  # [B, K]

    def per_sample(purpose, draw):
        return jax.vmap(jax.vmap(lambda kk: draw(jax.random.fold_in(kk, purpose))))(keys)

    # --- Draws: time, caption dropout, task (per sample); noise (per token) ------------
    u = per_sample(flow.PURPOSE_TIME, lambda kk: flow.sample_time(kk, (), config))  # [B, K]
    t = flow.shift_time(u, sample_alpha(config, grids, patch))
    lo, hi = flow.time_range(config)
    t = lo + (hi - lo) * t
    keep_text = per_sample(flow.PURPOSE_DROPOUT, jax.random.uniform) >= config.caption_dropout
    frames = grids[..., 0] * pt  # [B, K] latent frames
    tasks, num_given = draw_tasks(keys, frames, config)
    if not conditioning.conditioning_enabled(config):
        tasks = jnp.where(frames == 1, conditioning.IMAGE, conditioning.T2V).astype(jnp.int32)
    eps = token_noise(keys, seg, pos, grids, feat)  # [B, L, P·C]

    # --- Per token: given latent frames, times, inputs ---------------------------------
    j = pos[..., 0:1] * pt + jnp.arange(pt)  # [B, L, pt] the token's latent frames
    task_tok, num_tok = _per_token(tasks, seg)[..., None], _per_token(num_given, seg)[..., None]
    frames_tok = _per_token(frames, seg)[..., None]
    given = (
        ((task_tok == conditioning.I2V) & (j == 0))
        | ((task_tok == conditioning.LAST_FRAME) & (j == frames_tok - 1))
        | ((task_tok == conditioning.CONTINUATION) & (j < num_tok))
    )  # [B, L, pt]
    t_frame = jnp.where(given, 0.0, _per_token(t, seg)[..., None])  # [B, L, pt]
    shape = (b, length, pt, area * c)  # token features by latent frame
    x0f, epsf = x_0.reshape(shape), eps.reshape(shape)
    x_t = (1.0 - t_frame[..., None]) * x0f + t_frame[..., None] * epsf  # x_0 where given
    # Token time: the mean over its temporal patch, t_k g / pt with g of its pt latent frames
    # generated (0 for padding). The model takes the row's K (pt + 1) distinct values and a
    # slot per token, so its time MLP runs per slot, not per token (models/dit.py time_ids).
    g_tok = jnp.sum(~given, axis=-1)  # [B, L] in [0, pt]
    time_ids = jnp.where(seg > 0, (seg - 1) * (pt + 1) + g_tok, 0)  # [B, L] slot of a token
    t_slots = (t[..., None] * jnp.arange(pt + 1) / pt).reshape(b, k * (pt + 1))  # [B, K(pt+1)]
    if cond_channels:
        g = given[..., None, None].astype(jnp.float32)  # [B, L, pt, 1, 1]
        x5, c5 = x_t.reshape(b, length, pt, area, c), x0f.reshape(b, length, pt, area, c)
        cond = [x5, c5 * g, jnp.broadcast_to(g, (b, length, pt, area, 1))]
        x_in = jnp.concatenate(cond, -1).reshape(b, length, -1)  # [B, L, P·(2C + 1)]
    else:
        x_in = x_t.reshape(b, length, feat)

    # --- Text: each clip's caption (or the null one), concatenated per row -------------
    s = batch["text_mask"].shape[-1]
    text = jnp.where(keep_text[..., None, None], batch["text"], 0.0).reshape(b, k * s, -1)
    text_mask = (batch["text_mask"] & keep_text[..., None]).reshape(b, k * s)
    text_seg = jnp.broadcast_to(jnp.repeat(jnp.arange(1, k + 1), s), (b, k * s))

    v = apply_fn(
        params, x_in, t_slots, text, text_mask,
        segment_ids=seg, positions=pos, text_segment_ids=text_seg, time_ids=time_ids,
    )  # fmt: skip
    # --- Per-sample loss over generated elements ---------------------------------------
    err = jnp.sum(jnp.square(v.reshape(shape) - (epsf - x0f)), axis=-1)  # [B, L, pt]
    keep = (~given) & (seg > 0)[..., None]  # [B, L, pt]
    onehot = jax.nn.one_hot(seg - 1, k, dtype=jnp.float32)  # [B, L, K] (padding: zeros)
    sums = jnp.einsum("BLK,BL->BK", onehot, jnp.sum(err * keep, -1))
    counts = jnp.einsum("BLK,BL->BK", onehot, jnp.sum(keep, -1).astype(jnp.float32)) * area * c
    losses = sums / jnp.maximum(counts, 1.0)  # [B, K]
    w = flow.loss_weight(u, config) * real
    if packed_loss_mode(config) == "token":
        loss = jnp.sum(w * losses * counts) / jnp.maximum(jnp.sum(counts * real), 1.0)
    else:
        loss = jnp.sum(w * losses) / jnp.maximum(jnp.sum(real), 1)
    aux = {
        "per_sample_loss": losses.reshape(-1),
        "t": jnp.where(real, t, -1.0).reshape(-1),
        "task": jnp.where(real, tasks, -1).reshape(-1),
        "shape_class": shape_classes(grids, pt).reshape(-1),
    }
    return loss, aux
