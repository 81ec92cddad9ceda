r"""An I3D video network in Flax (Carreira & Zisserman 2017, "Quo Vadis, Action
Recognition?"): Inception-v1 inflated to 3D, the feature network of FVD (Unterthiner et
al. 2018, "Towards Accurate Generative Models of Video").

Layout (the public kinetics-i3d release; every conv is a `Unit3D`: conv without bias,
batch norm in inference form, ReLU; 'SAME' padding throughout):

    Conv3d_1a_7x7   64, 7x7x7, stride 2     MaxPool3d_2a_3x3  1x3x3, stride 1x2x2
    Conv3d_2b_1x1   64, 1x1x1               Conv3d_2c_3x3     192, 3x3x3
    MaxPool3d_3a_3x3 1x3x3, stride 1x2x2    Mixed_3b, Mixed_3c
    MaxPool3d_4a_3x3 3x3x3, stride 2        Mixed_4b .. Mixed_4f
    MaxPool3d_5a_2x2 2x2x2, stride 2        Mixed_5b, Mixed_5c
    global average pool -> 1024-d 'pool' features
    Logits: 1x1x1 conv with bias to 400 classes (Kinetics-400) -> 400-d 'logits'

A mixed block has four branches concatenated on channels: 1x1x1; 1x1x1 -> 3x3x3;
1x1x1 -> 3x3x3; 3x3x3 max-pool (stride 1) -> 1x1x1 (widths in `MIXED`). The original
averages the logits over the temporal positions of the final feature map; here the pool is
over time and space before the logits conv, which is the same linear map.

Input: `[B, T, H, W, 3]` RGB in [-1, 1] (the range of the release). FVD resamples clips to
16 frames of 224 x 224 first (`features.resample`, `fvd_frames`, `fvd_resize`).

Weights are never downloaded: `load_weights(path)` reads a user-supplied `.npz` whose
array names are the '/'-joined variable paths of this module, e.g.

    params/Conv3d_1a_7x7/conv/kernel        [7, 7, 7, 3, 64]   (T, H, W, in, out)
    batch_stats/Conv3d_1a_7x7/bn/mean       [64]
    batch_stats/Conv3d_1a_7x7/bn/var        [64]
    params/Conv3d_1a_7x7/bn/scale           [64]   (ones where the source has none)
    params/Conv3d_1a_7x7/bn/bias            [64]
    params/Mixed_3b/Branch_1/Conv3d_0b_3x3/conv/kernel ...
    params/Logits/kernel [1, 1, 1, 1024, 400], params/Logits/bias [400]

`weight_names()` lists every name with its shape; a missing, misnamed or misshaped array
is an error naming it. Batch norm uses eps = 1e-3 (the release's).
"""

from __future__ import annotations

import functools
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

BN_EPS = 1e-3
# Mixed blocks: (branch0 1x1, branch1 1x1 -> 3x3, branch2 1x1 -> 3x3, branch3 pool -> 1x1).
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
NUM_CLASSES = 400


def _max_pool(x, window, strides):
    return nn.max_pool(x, window, strides=strides, padding="SAME")


class Unit3D(nn.Module):
    """Conv3d (no bias) -> batch norm (inference, running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    strides: tuple[int, int, int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features, self.kernel, self.strides, padding="SAME", use_bias=False, name="conv"
        )(x)
        x = BatchNormInference(name="bn")(x)
        return nn.relu(x)


class BatchNormInference(nn.Module):
    """`(x - mean) / sqrt(var + eps) * scale + bias` with fixed statistics."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        var = self.variable("batch_stats", "var", jnp.ones, (c,))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return (x - mean.value) * jax.lax.rsqrt(var.value + BN_EPS) * scale + bias


class Mixed(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        w0, w1a, w1b, w2a, w2b, w3 = self.widths
        b0 = Unit3D(w0, name="Branch_0/Conv3d_0a_1x1")(x)
        b1 = Unit3D(w1a, name="Branch_1/Conv3d_0a_1x1")(x)
        b1 = Unit3D(w1b, (3, 3, 3), name="Branch_1/Conv3d_0b_3x3")(b1)
        b2 = Unit3D(w2a, name="Branch_2/Conv3d_0a_1x1")(x)
        b2 = Unit3D(w2b, (3, 3, 3), name="Branch_2/Conv3d_0b_3x3")(b2)
        b3 = _max_pool(x, (3, 3, 3), (1, 1, 1))
        b3 = Unit3D(w3, name="Branch_3/Conv3d_0b_1x1")(b3)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nn.Module):
    """`[B, T, H, W, 3]` in [-1, 1] -> `{'pool': [B, 1024], 'logits': [B, 400]}`."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, video):
        x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(video)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = Unit3D(64, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        x = Mixed(MIXED["Mixed_3b"], name="Mixed_3b")(x)
        x = Mixed(MIXED["Mixed_3c"], name="Mixed_3c")(x)
        x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = Mixed(MIXED[name], name=name)(x)
        x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
        x = Mixed(MIXED["Mixed_5b"], name="Mixed_5b")(x)
        x = Mixed(MIXED["Mixed_5c"], name="Mixed_5c")(x)
        pool = x.mean(axis=(1, 2, 3))  # [B, 1024]
        logits = nn.Dense(self.num_classes, name="Logits")(pool)
        return {"pool": pool, "logits": logits}


def _flatten(variables) -> dict[str, np.ndarray]:
    """Variables -> {'params/Mixed_3b/Branch_0/Conv3d_0a_1x1/conv/kernel': array, ...}."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    return {"/".join(k): np.asarray(v) for k, v in flat.items()}


def init_variables(seed: int = 0, num_classes: int = NUM_CLASSES):
    """Random variables of the network's shapes, drawn with numpy (instant, unlike a
    jitted `init` of 12M parameters): kernels ~ N(0, 1 / fan_in), batch-norm statistics
    and scales random near (0, 1, 1), biases ~ N(0, 0.1²). For tests and templates."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in _template(num_classes).items():
        leaf = key[-1]
        if leaf == "kernel":
            a = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        elif leaf in ("var", "scale"):
            a = rng.uniform(0.5, 1.5, shape)
        else:  # mean, bias
            a = rng.normal(0.0, 0.1, shape)
        flat[key] = jnp.asarray(a, jnp.float32)
    return flax.traverse_util.unflatten_dict(flat)


def _template(num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = I3D(num_classes)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 32, 32, 3), jnp.float32)
    )
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    return {k: tuple(v.shape) for k, v in flat.items()}


def weight_names(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """Every array name a weights file must hold, with its stored shape."""
    # Logits is a Dense over the pooled features: stored as the release's 1x1x1 conv.
    return {"/".join(k): _stored_shape("/".join(k), s) for k, s in _template(num_classes).items()}


def _stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, 1, 1, *shape) if name == "params/Logits/kernel" else shape


def save_weights(path, variables) -> pathlib.Path:
    """Writes `variables` as the `.npz` that `load_weights` reads."""
    path = pathlib.Path(path)
    flat = _flatten(variables)
    np.savez(path, **{k: v.reshape(_stored_shape(k, v.shape)) for k, v in flat.items()})
    return path


def load_weights(path, num_classes: int = NUM_CLASSES):
    """The network's variables from a user-supplied `.npz` (module docstring for the names);
    nothing is downloaded. Every array is checked by name and shape."""
    path = pathlib.Path(path).expanduser() if path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"evaluate.fvd_weights={str(path or '')!r} is not a file: FVD with "
            "evaluate.fvd_features='i3d' needs I3D weights (Kinetics-400, RGB) converted to an "
            ".npz with the names of sora_jax.evaluation.i3d.weight_names(); no weights are "
            "downloaded. Use evaluate.fvd_features='random_conv' for a weight-free sanity metric"
        )
    template = _template(num_classes)
    want = {"/".join(k): _stored_shape("/".join(k), s) for k, s in template.items()}
    with np.load(path, allow_pickle=False) as f:
        have = {k: f[k] for k in f.files}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"I3D weights {path}: missing arrays {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f"; unexpected arrays {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            "(see sora_jax.evaluation.i3d.weight_names())"
        )
    flat = {}
    for key, shape in template.items():
        name = "/".join(key)
        if tuple(have[name].shape) != want[name]:
            raise ValueError(
                f"I3D weights {path}: array {name} has shape {have[name].shape}, "
                f"expected {want[name]}"
            )
        flat[key] = jnp.asarray(have[name].astype(np.float32).reshape(shape))
    return flax.traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnames="num_classes")
def apply(variables, video, num_classes: int = NUM_CLASSES) -> dict[str, jax.Array]:
    """`{'pool': [B, 1024], 'logits': [B, num_classes]}` of `video` `[B, T, H, W, 3]`;
    one compiled executable per input shape, whatever the weights."""
    return I3D(num_classes).apply(variables, video)


def features_fn(variables, output: str = "logits", num_classes: int = NUM_CLASSES):
    """A `[B, T, H, W, 3] -> [B, D]` map: 'logits' (400-d, the FVD features) or 'pool'
    (1024-d)."""
    if output not in ("logits", "pool"):
        raise ValueError(f"I3D output={output!r}: use 'logits' or 'pool'")
    return lambda video: apply(variables, jnp.asarray(video, jnp.float32), num_classes)[output]
