r"""Conditioning tasks: which latent frames of a clip are given, and how the model sees them.

Tasks, drawn per sample with the weights of `diffusion.tasks` (a name -> weight dict):

    t2v           text only; every latent frame is generated
    i2v           latent frame 0 is given (with a causal VAE, exactly pixel frame 0)
    last_frame    latent frame T'-1 is given (the last `compression` pixel frames)
    continuation  latent frames 0 .. k-1 are given, k ~ uniform{1 .. min(K, T'-1)} with
                  K = `diffusion.continuation_frames` (-1 = T'-1)
    image         T' = 1: one generated frame

The image task is decided by the bucket shape, not by a draw: every sample of a T' = 1
bucket is an image (conditioning on its only frame would leave nothing to learn), and
video buckets (T' >= 2) never draw it. The share of images in training is therefore the
weight of the 1-frame buckets in `data.buckets`; `diffusion.tasks.image` must stay 0.

Given frames, with `given [B, T']` (bool) and the clean latents `x_0 [B, T', H', W', C]`:

    t_j   = 0 where given[:, j], else t          per-frame times t [B, T']
    x_t,j = x_0,j where given[:, j]              (x_t = (1 - t_j) x_0 + t_j eps does this)
    loss  = sum_{j not given} |v_j - (eps - x_0)_j|^2 / (H' W' C · #{j not given})  per sample

so every sample weighs the same whatever the number of its given frames. Two ways for the
model to know which frames are given:

- per-frame times alone (`model.cond_channels = 0`): the given frames are clean and carry
  t = 0, as in LTX-Video's conditioning (HaCohen et al. 2024). This needs a temporal patch of
  1 latent frame (`model.patch_size[0] = 1`): VideoDiT averages the times inside a temporal
  patch, which would blur given and generated frames together.
- conditioning channels (`model.cond_channels = C + 1`): additionally
  `x_in = concat([x_t, cond_latents, cond_mask], -1)` with `cond_latents = x_0 · given`
  (zeros elsewhere) and `cond_mask = given` broadcast to `[B, T', H', W', 1]`; the model's
  patch-embedding rows for these channels start at zero, so a text-to-video checkpoint
  extends without changing its initial output.

`diffusion.cond_dropout` (independent of `caption_dropout`) turns a conditioning sample into
t2v: the null frame conditioning is "nothing given", exactly what t2v samples see.

Pixel frames and latent frames of a causal video VAE with temporal compression c (c = 4
for Wan2.1's and HunyuanVideo's VAE): latent frame 0 encodes pixel frame 0 alone and latent
frame j >= 1 encodes pixel frames c(j-1)+1 .. cj, so T pixel frames (T = 1 + c k) give
T' = 1 + (T - 1) / c latent frames. A latent frame is given only when all of its pixel
frames are.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("t2v", "i2v", "last_frame", "continuation", "image")
T2V, I2V, LAST_FRAME, CONTINUATION, IMAGE = range(len(TASKS))
DEFAULT_TASKS = {"t2v": 1.0}


# --- Config -----------------------------------------------------------------------------


def task_weights(config) -> tuple[float, ...]:
    """`diffusion.tasks` as one weight per entry of TASKS (missing names weigh 0)."""
    tasks = config.get("tasks", None)
    tasks = DEFAULT_TASKS if tasks is None else tasks
    tasks = dict(tasks.items())  # a dict or a ConfigDict
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"diffusion.tasks has unknown tasks {unknown}; known: {list(TASKS)}")
    weights = tuple(float(tasks.get(name, 0.0)) for name in TASKS)
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"diffusion.tasks={tasks} needs finite weights >= 0 with a positive sum, "
            f"e.g. {{'t2v': 1.0, 'i2v': 0.5}}"
        )
    if weights[IMAGE] > 0:
        raise ValueError(
            f"diffusion.tasks.image={weights[IMAGE]}: images are the T'=1 buckets (the bucket "
            f"shape decides the image task); set it to 0 and give a 1-frame bucket a weight "
            f"in data.buckets"
        )
    return weights


def conditioning_enabled(config) -> bool:
    """Whether any task with given frames (i2v, last_frame, continuation) has weight > 0."""
    w = task_weights(config)
    return w[I2V] + w[LAST_FRAME] + w[CONTINUATION] > 0


def config_errors(config, model_cfg, latent_channels: int | None) -> list[str]:
    """What is wrong with the conditioning fields of `diffusion` and `model` (empty if fine)."""
    errors = []
    try:
        enabled = conditioning_enabled(config)
    except ValueError as e:
        errors.append(str(e))
        enabled = False
    p = config.get("cond_dropout", 0.0)
    if not 0.0 <= p <= 1.0:
        errors.append(f"diffusion.cond_dropout={p} must be a probability in [0, 1]")
    k = config.get("continuation_frames", -1)
    if not isinstance(k, int | np.integer) or (k != -1 and k < 1):
        errors.append(f"diffusion.continuation_frames={k!r} must be an int >= 1, or -1 (= T'-1)")
    cond = int(model_cfg.get("cond_channels", 0) or 0)
    if latent_channels is not None and cond not in (0, latent_channels + 1):
        errors.append(
            f"model.cond_channels={cond} must be 0 (per-frame t = 0 only) or latent channels "
            f"+ 1 = {latent_channels + 1} (given latents and their mask as input channels)"
        )
    patch = model_cfg.get("patch_size", None) or (1, 1, 1)  # None: the preset's (all pt = 1)
    patch_t = int(tuple(patch)[0])
    if enabled and cond == 0 and patch_t > 1:
        errors.append(
            f"diffusion.tasks gives frames but model.cond_channels=0 and model.patch_size[0]="
            f"{patch_t}: per-frame t = 0 alone needs a temporal patch of 1; set "
            f"model.cond_channels to latent channels + 1, or model.patch_size[0] = 1"
        )
    return errors


# --- Drawing tasks ----------------------------------------------------------------------


def sample_tasks(key: jax.Array, batch: int, weights) -> jax.Array:
    """Task ids `[B]` int32, drawn with probabilities `weights / sum(weights)`."""
    logits = jnp.log(jnp.asarray(weights, jnp.float32))  # log 0 = -inf: never drawn
    return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)


def given_frames(tasks: jax.Array, num_given: jax.Array, frames: int) -> jax.Array:
    """`given [B, T']` bool from task ids `[B]` and continuation lengths k `[B]`."""
    j = jnp.arange(frames)[None, :]  # [1, T']
    tasks, num_given = tasks[:, None], num_given[:, None]  # [B, 1]
    return (
        ((tasks == I2V) & (j == 0))
        | ((tasks == LAST_FRAME) & (j == frames - 1))
        | ((tasks == CONTINUATION) & (j < num_given))
    )


def draw(
    key_task: jax.Array, key_frames: jax.Array, key_drop: jax.Array, batch: int, frames: int, config
) -> tuple[jax.Array, jax.Array]:
    """Per-sample tasks `[B]` int32 and given frames `[B, T']` for a batch of T' latent frames.

    Three independent streams: the task, the continuation length k, and the conditioning
    dropout (which turns a conditioning sample into t2v; the returned task is that one).
    """
    if frames == 1:  # the bucket shape decides: a T' = 1 batch is all images
        return jnp.full((batch,), IMAGE, jnp.int32), jnp.zeros((batch, 1), bool)
    tasks = sample_tasks(key_task, batch, task_weights(config))
    k_max = config.get("continuation_frames", -1)
    k_max = frames - 1 if k_max == -1 else min(int(k_max), frames - 1)
    num_given = jax.random.randint(key_frames, (batch,), 1, k_max + 1)  # k in [1, k_max]
    drop = jax.random.uniform(key_drop, (batch,)) < config.get("cond_dropout", 0.0)
    tasks = jnp.where(drop, T2V, tasks).astype(jnp.int32)
    return tasks, given_frames(tasks, num_given, frames)


def task_mask(task: str, batch: int, frames: int, num_given: int = 1) -> jax.Array | None:
    """`given [B, T']` of one named task for every sample (None for t2v and image)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; known: {list(TASKS)}")
    if task in ("t2v", "image"):
        return None
    if frames < 2:
        raise ValueError(f"task={task!r} needs T' >= 2 latent frames, the clip has {frames}")
    if not 1 <= num_given < frames:
        raise ValueError(f"num_given={num_given} must be in [1, T'-1] = [1, {frames - 1}]")
    ids = jnp.full((batch,), TASKS.index(task), jnp.int32)
    return given_frames(ids, jnp.full((batch,), num_given), frames)


# --- Model inputs -----------------------------------------------------------------------


def _frame_mask(given: jax.Array, like: jax.Array) -> jax.Array:
    """`given [B, T']` -> `[B, T', 1, 1, 1]` in the dtype of `like`."""
    return given.reshape(given.shape + (1,) * (like.ndim - 2)).astype(like.dtype)


def frame_times(t: jax.Array, given: jax.Array) -> jax.Array:
    """Per-frame times `[B, T']`: `t [B]` on generated frames, 0 on given ones."""
    return jnp.where(given, 0.0, t[:, None])


def impose(x: jax.Array, cond_latents: jax.Array, given: jax.Array) -> jax.Array:
    """x `[B, T', H', W', C]` with the given frames replaced by `cond_latents`."""
    return jnp.where(_frame_mask(given, x) > 0, cond_latents.astype(x.dtype), x)


def model_input(
    x_t: jax.Array, cond_latents: jax.Array | None, given: jax.Array | None, cond_channels: int
) -> jax.Array:
    """x_t `[B, T', H', W', C]` -> `[B, T', H', W', C + cond_channels]` the model reads.

    With `cond_channels = C + 1`: `[x_t, cond_latents · given, given]`; zeros for t2v
    (`given` None). With 0: x_t unchanged.
    """
    if cond_channels == 0:
        return x_t
    c = x_t.shape[-1]
    if cond_channels != c + 1:
        raise ValueError(
            f"model.cond_channels={cond_channels} must be 0 or latent channels + 1 = {c + 1}"
        )
    if given is None:
        return jnp.concatenate([x_t, jnp.zeros(x_t.shape[:-1] + (c + 1,), x_t.dtype)], -1)
    m = _frame_mask(given, x_t)  # [B, T', 1, 1, 1]
    mask = jnp.broadcast_to(m, x_t.shape[:-1] + (1,))  # [B, T', H', W', 1]
    return jnp.concatenate([x_t, cond_latents.astype(x_t.dtype) * m, mask], -1)


# --- Pixel frames <-> latent frames of a causal VAE -------------------------------------


def latent_frame_of_pixel(p: int, compression: int = 4) -> int:
    """The latent frame holding pixel frame p: 0 for p = 0, else ceil(p / compression)."""
    if p < 0 or compression < 1:
        raise ValueError(f"pixel frame {p} and compression {compression} must be >= 0 and >= 1")
    return -(-p // compression)


def pixel_frames_of_latent(j: int, compression: int = 4) -> range:
    """The pixel frames latent frame j encodes: [0] for j = 0, else c(j-1)+1 .. cj."""
    if j < 0 or compression < 1:
        raise ValueError(f"latent frame {j} and compression {compression} must be >= 0 and >= 1")
    return range(0, 1) if j == 0 else range(compression * (j - 1) + 1, compression * j + 1)


def num_latent_frames(pixel_frames: int, compression: int = 4) -> int:
    """T' = 1 + (T - 1) / c for T = 1 + c k pixel frames (a ValueError otherwise)."""
    if pixel_frames < 1 or (pixel_frames - 1) % compression:
        raise ValueError(
            f"{pixel_frames} pixel frames do not fill whole latent frames of a causal VAE with "
            f"temporal compression {compression}: use 1 + {compression} k frames"
        )
    return 1 + (pixel_frames - 1) // compression


def latent_given(pixel_given: np.ndarray, compression: int = 4) -> np.ndarray:
    """Pixel-frame mask `[..., T]` -> latent-frame mask `[..., T']`: all its pixels given."""
    pixel_given = np.asarray(pixel_given, bool)
    frames = num_latent_frames(pixel_given.shape[-1], compression)
    cols = [
        pixel_given[..., list(pixel_frames_of_latent(j, compression))].all(-1)
        for j in range(frames)
    ]
    return np.stack(cols, -1)
