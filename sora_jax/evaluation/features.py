r"""Video feature networks for the Fréchet video distance, chosen by
`evaluate.fvd_features`:

- `i3d`: the I3D network (sora_jax.evaluation.i3d) with weights from the user-supplied
  `evaluate.fvd_weights` .npz; clips are resized to `evaluate.fvd_resize` pixels square
  (224 in the FVD protocol of Unterthiner et al. 2018) and mapped to 400-d logits. With
  Kinetics-400 weights this is the published FVD protocol up to the resize filter.
- `random_conv`: a weight-free sanity metric: three 3x3x3 convolutions (32, 64, 128
  channels, stride 2 in space, ReLU) with weights drawn from the fixed seed 0 (LeCun
  normal), then mean and standard deviation over time and space -> 256-d. It moves when
  clips' colours, shapes or motion move, so it tracks progress within one setup, but its
  numbers are NOT comparable to published FVD values.

Each entry maps `[N, T, H, W, 3]` float clips in [-1, 1] to `[N, D]` float64 features.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sora_jax.evaluation import i3d

RANDOM_CONV_SEED = 0


class RandomConv3D(nn.Module):
    @nn.compact
    def __call__(self, video):
        x = video
        for i, width in enumerate((32, 64, 128)):
            x = nn.Conv(width, (3, 3, 3), (1, 2, 2), padding="SAME", name=f"conv{i}")(x)
            x = nn.relu(x)
        return jnp.concatenate([x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))], -1)


def _resize(video: jax.Array, size: int) -> jax.Array:
    """`[N, T, H, W, 3]` -> `[N, T, size, size, 3]` bilinear (antialiased when shrinking)."""
    if not size or video.shape[2:4] == (size, size):
        return video
    n, t, _, _, c = video.shape
    return jax.image.resize(video, (n, t, size, size, c), "bilinear")


def random_conv(config) -> Callable[[np.ndarray], np.ndarray]:
    model = RandomConv3D()
    variables = model.init(jax.random.key(RANDOM_CONV_SEED), jnp.zeros((1, 1, 8, 8, 3)))
    fn = jax.jit(lambda v: model.apply(variables, v))
    return lambda clips: np.asarray(fn(jnp.asarray(clips, jnp.float32)), np.float64)


def i3d_features(config) -> Callable[[np.ndarray], np.ndarray]:
    variables = i3d.load_weights(config.evaluate.get("fvd_weights", ""))
    size = int(config.evaluate.get("fvd_resize", 224))
    resize = jax.jit(_resize, static_argnums=1)
    return lambda clips: np.asarray(
        i3d.apply(variables, resize(jnp.asarray(clips, jnp.float32), size))["logits"], np.float64
    )


FEATURES = {"i3d": i3d_features, "random_conv": random_conv}


def build(config) -> Callable[[np.ndarray], np.ndarray]:
    """The feature function named by `evaluate.fvd_features`."""
    name = config.evaluate.get("fvd_features", "random_conv")
    if name not in FEATURES:
        raise ValueError(f"evaluate.fvd_features={name!r} is unknown; known: {sorted(FEATURES)}")
    return FEATURES[name](config)
