r"""Video feature networks for Fréchet distances between sets of clips, chosen by
`evaluate.fvd_features`; the score's key names the network (`score_key`), so a number
made with random features is never reported as FVD:

- `i3d` -> `fvd_i3d`: the I3D network (sora_jax.evaluation.i3d) with weights from the
  user-supplied `evaluate.fvd_weights` .npz (converted from a published checkpoint by
  sora_jax.evaluation.i3d_import), on clips resampled to the protocol of Unterthiner et
  al. 2018, "Towards Accurate Generative Models of Video": 16 frames
  (`evaluate.fvd_frames`; evenly spaced source frames, nearest index, so shorter clips
  repeat frames) at 224 x 224 (`evaluate.fvd_resize`; bilinear with half-pixel centres and
  no antialiasing, aspect ratio not kept: the resize of the PyTorch FVD code, checked
  against it in tests/evaluation/test_i3d_parity.py), RGB in [-1, 1], mapped to the 400-d
  logits. The network matches an independent PyTorch implementation of the release
  (the same test); with converted Kinetics-400 weights this is the published protocol
  (docs/evaluation.md).
- `random_conv` -> `fd_random_conv`: a weight-free sanity metric: three 3x3x3
  convolutions (32, 64, 128 channels, stride 2 in space, ReLU) with weights drawn from
  the fixed seed 0 (LeCun normal), then mean and standard deviation over time and space
  -> 256-d. It moves when clips' colours, shapes or motion move, so it tracks progress
  within one setup, but its numbers are NOT comparable to published FVD values.

Each entry maps `[N, T, H, W, 3]` float clips in [-1, 1] to `[N, D]` float64 features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sora_jax.evaluation import i3d

RANDOM_CONV_SEED = 0
FVD_FRAMES, FVD_SIZE = 16, 224  # the FVD protocol's clip (Unterthiner et al. 2018)
SCORE_KEYS = {"i3d": "fvd_i3d", "random_conv": "fd_random_conv"}


class RandomConv3D(nn.Module):
    @nn.compact
    def __call__(self, video):
        x = video
        for i, width in enumerate((32, 64, 128)):
            x = nn.Conv(width, (3, 3, 3), (1, 2, 2), padding="SAME", name=f"conv{i}")(x)
            x = nn.relu(x)
        return jnp.concatenate([x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))], -1)


def resample(
    video: np.ndarray, frames: int, height: int, width: int, antialias: bool = True
) -> np.ndarray:
    """`[N, T, H, W, 3]` -> `[N, frames, height, width, 3]`: `frames` evenly spaced source
    frames (index `round(j (T - 1) / (frames - 1))`), then bilinear in space with half-pixel
    centres (antialiased when shrinking unless `antialias` is False)."""
    video = np.asarray(video, np.float32)
    n, t, h, w, c = video.shape
    if frames and frames != t:
        video = video[:, np.round(np.linspace(0, t - 1, frames)).astype(int)]  # [N, F, H, W, C]
    if (height, width) != (h, w):
        shape = (n, video.shape[1], height, width, c)
        video = np.asarray(_resize(jnp.asarray(video), shape, antialias))
    return video


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize(video: jax.Array, shape: tuple[int, ...], antialias: bool) -> jax.Array:
    return jax.image.resize(video, shape, "bilinear", antialias=antialias)


def random_conv(config) -> Callable[[np.ndarray], np.ndarray]:
    model = RandomConv3D()
    variables = model.init(jax.random.key(RANDOM_CONV_SEED), jnp.zeros((1, 1, 8, 8, 3)))
    fn = jax.jit(lambda v: model.apply(variables, v))
    return lambda clips: np.asarray(fn(jnp.asarray(clips, jnp.float32)), np.float64)


def i3d_features(config) -> Callable[[np.ndarray], np.ndarray]:
    variables = i3d.load_weights(config.evaluate.get("fvd_weights", ""))
    size = int(config.evaluate.get("fvd_resize", FVD_SIZE))
    frames = int(config.evaluate.get("fvd_frames", FVD_FRAMES))
    fn = jax.jit(lambda v: i3d.apply(variables, v)["logits"])

    def features(clips: np.ndarray) -> np.ndarray:
        _, _, h, w, _ = np.shape(clips)
        # The PyTorch FVD code's resize: bilinear, half-pixel centres, no antialiasing.
        clips = resample(
            clips, frames, size or h, size or w, antialias=False
        )  # [N, 16, 224, 224, 3]
        return np.asarray(fn(jnp.asarray(clips)), np.float64)

    return features


def score_key(config) -> str:
    """The report's key of the distance: `fvd_i3d` or `fd_random_conv`."""
    return SCORE_KEYS[config.evaluate.get("fvd_features", "random_conv")]


FEATURES = {"i3d": i3d_features, "random_conv": random_conv}


def build(config) -> Callable[[np.ndarray], np.ndarray]:
    """The feature function named by `evaluate.fvd_features`."""
    name = config.evaluate.get("fvd_features", "random_conv")
    if name not in FEATURES:
        raise ValueError(f"evaluate.fvd_features={name!r} is unknown; known: {sorted(FEATURES)}")
    return FEATURES[name](config)
