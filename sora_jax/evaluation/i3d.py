r"""An I3D video network in Flax (Carreira & Zisserman 2017, "Quo Vadis, Action
Recognition?"): Inception-v1 inflated to 3D, the feature network of FVD (Unterthiner et
al. 2018, "Towards Accurate Generative Models of Video").

Layout (the public kinetics-i3d release; every conv is a `Unit3D`: conv without bias,
batch norm in inference form, ReLU; 'SAME' padding throughout, the lower side getting
the smaller half as in TensorFlow and in the PyTorch port):

    Conv3d_1a_7x7   64, 7x7x7, stride 2     MaxPool3d_2a_3x3  1x3x3, stride 1x2x2
    Conv3d_2b_1x1   64, 1x1x1               Conv3d_2c_3x3     192, 3x3x3
    MaxPool3d_3a_3x3 1x3x3, stride 1x2x2    Mixed_3b, Mixed_3c
    MaxPool3d_4a_3x3 3x3x3, stride 2        Mixed_4b .. Mixed_4f
    MaxPool3d_5a_2x2 2x2x2, stride 2        Mixed_5b, Mixed_5c
    average pool 2x7x7, stride 1, VALID -> 1024-d 'pool' features per position
    Logits: 1x1x1 conv with bias to 400 classes (Kinetics-400), averaged over positions
    -> 400-d 'logits'

A mixed block has four branches concatenated on channels: 1x1x1; 1x1x1 -> 3x3x3;
1x1x1 -> 3x3x3; 3x3x3 max-pool (stride 1) -> 1x1x1 (widths in `MIXED`). Max pools pad
with -inf where the PyTorch port pads with zeros: their inputs are ReLU outputs (>= 0),
so the two agree. The head is the release's: a 2x7x7 average pool (VALID, stride 1) of
the last feature map, the logits conv at every remaining position, the mean over them.
On the FVD protocol's clips (16 x 224 x 224) the last map is 2x7x7, so this is one
position: the global average. A map smaller than the window (small test clips, which the
release cannot take) is pooled with the window clipped to it, i.e. globally.
`width_divisor` divides every width (not the RGB input or the classes): the parity test
runs the same architecture at 1/8 width (tests/evaluation/test_i3d_parity.py).

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
is an error naming it. Batch norm uses eps = 1e-3 (the release's); a source trained with
another eps is converted with it folded into `var` (sora_jax.evaluation.i3d_import, which
writes this file from the published PyTorch and TensorFlow checkpoints).
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
HEAD_WINDOW = (2, 7, 7)  # the release's average pool before the logits (T, H, W)


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
    """`[B, T, H, W, 3]` in [-1, 1] -> `{'pool': [B, 1024], 'logits': [B, 400]}` (widths
    divided by `width_divisor`)."""

    num_classes: int = NUM_CLASSES
    width_divisor: int = 1

    @nn.compact
    def __call__(self, video):
        k = self.width_divisor
        x = Unit3D(64 // k, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(video)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = Unit3D(64 // k, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192 // k, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        for name in ("Mixed_3b", "Mixed_3c"):
            x = Mixed(tuple(w // k for w in MIXED[name]), name=name)(x)
        x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = Mixed(tuple(w // k for w in MIXED[name]), name=name)(x)
        x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
        for name in ("Mixed_5b", "Mixed_5c"):
            x = Mixed(tuple(w // k for w in MIXED[name]), name=name)(x)
        # The release's head: 2x7x7 average pool, VALID, stride 1 (clipped to the map).
        window = tuple(min(w, n) for w, n in zip(HEAD_WINDOW, x.shape[1:4], strict=True))
        x = nn.avg_pool(x, window, strides=(1, 1, 1), padding="VALID")  # [B, T'', H'', W'', D]
        # Logits at every position, then their mean == logits of the mean (a linear map).
        pool = x.mean(axis=(1, 2, 3))  # [B, 1024 / k]
        logits = nn.Dense(self.num_classes, name="Logits")(pool)
        return {"pool": pool, "logits": logits}


def _flatten(variables) -> dict[str, np.ndarray]:
    """Variables -> {'params/Mixed_3b/Branch_0/Conv3d_0a_1x1/conv/kernel': array, ...}."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    return {"/".join(k): np.asarray(v) for k, v in flat.items()}


def init_variables(seed: int = 0, num_classes: int = NUM_CLASSES, width_divisor: int = 1):
    """Random variables of the network's shapes, drawn with numpy (instant, unlike a
    jitted `init` of 12M parameters): kernels ~ N(0, 1 / fan_in), batch-norm statistics
    and scales random near (0, 1, 1), biases ~ N(0, 0.1²). For tests and templates."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in template(num_classes, width_divisor).items():
        leaf = key[-1]
        if leaf == "kernel":
            a = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        elif leaf in ("var", "scale"):
            a = rng.uniform(0.5, 1.5, shape)
        else:  # mean, bias
            a = rng.normal(0.0, 0.1, shape)
        flat[key] = jnp.asarray(a, jnp.float32)
    return flax.traverse_util.unflatten_dict(flat)


@functools.cache
def template(
    num_classes: int = NUM_CLASSES, width_divisor: int = 1
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Variable path -> shape of the network (`('params', 'Logits', 'kernel')`: [D, classes])."""
    if width_divisor < 1 or any(w % width_divisor for w in (64, 192, *sum(MIXED.values(), ()))):
        raise ValueError(
            f"I3D width_divisor={width_divisor} must divide every width of the network "
            "(1, 2, 4 or 8)"
        )
    model = I3D(num_classes, width_divisor)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 32, 32, 3), jnp.float32)
    )
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    return {k: tuple(v.shape) for k, v in flat.items()}


def weight_names(num_classes: int = NUM_CLASSES, width_divisor: int = 1) -> dict[str, tuple]:
    """Every array name a weights file must hold, with its stored shape."""
    # Logits is a Dense over the pooled features: stored as the release's 1x1x1 conv.
    return {
        "/".join(k): _stored_shape("/".join(k), s)
        for k, s in template(num_classes, width_divisor).items()
    }


def _stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, 1, 1, *shape) if name == "params/Logits/kernel" else shape


def save_weights(path, variables) -> pathlib.Path:
    """Writes `variables` as the `.npz` that `load_weights` reads."""
    path = pathlib.Path(path)
    flat = _flatten(variables)
    np.savez(path, **{k: v.reshape(_stored_shape(k, v.shape)) for k, v in flat.items()})
    return path


def sizes(variables) -> tuple[int, int]:
    """`(num_classes, width_divisor)` of a variable tree, read from its shapes."""
    params = variables["params"]
    num_classes = int(np.shape(params["Logits"]["bias"])[0])
    width = int(np.shape(params["Conv3d_1a_7x7"]["conv"]["kernel"])[-1])
    if width < 1 or 64 % width:
        raise ValueError(f"I3D Conv3d_1a_7x7 has {width} output channels: expected 64 / 2^k")
    return num_classes, 64 // width


def load_weights(path):
    """The network's variables from a user-supplied `.npz` (module docstring for the names);
    nothing is downloaded. Every array is checked by name and shape; the class count and
    width divisor are read from `params/Logits/bias` and the stem's kernel."""
    path = pathlib.Path(path).expanduser() if path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"evaluate.fvd_weights={str(path or '')!r} is not a file: FVD with "
            "evaluate.fvd_features='i3d' needs I3D weights (Kinetics-400, RGB) converted to an "
            ".npz by `python -m sora_jax.evaluate --import_i3d=CHECKPOINT --i3d_out=OUT.npz` "
            "(docs/evaluation.md); no weights are downloaded. Use "
            "evaluate.fvd_features='random_conv' for a weight-free sanity metric"
        )
    with np.load(path, allow_pickle=False) as f:
        have = {k: f[k] for k in f.files}
    # The class count and width come from the file (a Kinetics-600 head, a narrow test net).
    bias = have.get("params/Logits/bias")
    num_classes = int(bias.shape[0]) if bias is not None and bias.ndim == 1 else NUM_CLASSES
    stem = have.get("params/Conv3d_1a_7x7/conv/kernel")
    width = int(stem.shape[-1]) if stem is not None and stem.ndim == 5 else 64
    divisor = 64 // width if width and 64 % width == 0 else 1
    want = weight_names(num_classes, divisor)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"I3D weights {path}: missing arrays {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f"; unexpected arrays {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            "(see sora_jax.evaluation.i3d.weight_names(); convert published checkpoints with "
            "`python -m sora_jax.evaluate --import_i3d=...`)"
        )
    flat = {}
    for key, shape in template(num_classes, divisor).items():
        name = "/".join(key)
        if tuple(have[name].shape) != want[name]:
            raise ValueError(
                f"I3D weights {path}: array {name} has shape {have[name].shape}, "
                f"expected {want[name]}"
            )
        flat[key] = jnp.asarray(have[name].astype(np.float32).reshape(shape))
    return flax.traverse_util.unflatten_dict(flat)


@jax.jit
def apply(variables, video) -> dict[str, jax.Array]:
    """`{'pool': [B, 1024 / k], 'logits': [B, classes]}` of `video` `[B, T, H, W, 3]`, the
    class count and width divisor `k` read from the variables' shapes; one compiled
    executable per input shape and network size, whatever the weights."""
    num_classes, width_divisor = sizes(variables)
    return I3D(num_classes, width_divisor).apply(variables, video)


def features_fn(variables, output: str = "logits"):
    """A `[B, T, H, W, 3] -> [B, D]` map: 'logits' (400-d, the FVD features) or 'pool'
    (1024-d)."""
    if output not in ("logits", "pool"):
        raise ValueError(f"I3D output={output!r}: use 'logits' or 'pool'")
    return lambda video: apply(variables, jnp.asarray(video, jnp.float32))[output]
