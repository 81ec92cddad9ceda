"""The layers of the causal 3D VAE (sora_jax.models.vae, whose docstring gives the
whole model): causal 3D convolutions with zero causal padding and a per-layer frame cache
for chunked decoding, the RMS norms ('rms' and Wan 2.1's 'l2'), residual and per-frame
attention blocks, and the resamplers that keep frame 0 alone.

Parameters are float32 with logical axis names (`conv_in`, `conv_out`); activations keep
the input's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

KERNEL_INIT = nn.initializers.lecun_normal()
ZEROS = nn.initializers.zeros_init()


def _conv(mod: nn.Module, x, features, kernel_size, strides=None, padding=None):
    """N-d convolution (N = len(kernel_size), channel-last) with `mod`'s params `kernel
    [*K, C_in, C_out]` and `bias [C_out]`; `padding` per spatial axis, default none."""
    nd = len(kernel_size)
    names = (None,) * nd + ("conv_in", "conv_out")
    init = nn.with_logical_partitioning(KERNEL_INIT, names)
    kernel = mod.param("kernel", init, (*kernel_size, x.shape[-1], features), jnp.float32)
    zeros = nn.with_logical_partitioning(ZEROS, ("conv_out",))
    bias = mod.param("bias", zeros, (features,), jnp.float32)
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)  # float32 params, x's compute
    strides, padding = tuple(strides or (1,) * nd), tuple(padding or ((0, 0),) * nd)
    if nd == 2:
        return _conv2d(x, kernel, strides, padding) + bias
    if jax.default_backend() != "cpu":
        y = jax.lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )
        return y + bias
    # XLA:CPU runs a 3D convolution 5-8x slower (forward + backward, measured at this VAE's
    # shapes) than the sum over the kernel's frames of 2D ones; T is never padded here.
    b, t, kt, st = x.shape[0], x.shape[1], kernel_size[0], strides[0]
    t_out = (t - kt) // st + 1
    y = 0.0
    for dt in range(kt):
        frames = x[:, dt : dt + st * (t_out - 1) + 1 : st]  # [B, T_out, H, W, C_in]
        frames = frames.reshape(b * t_out, *x.shape[2:])  # frames apart: fold T into B
        y = y + _conv2d(frames, kernel[dt], strides[1:], padding[1:])
    return y.reshape(b, t_out, *y.shape[1:]) + bias


def _conv2d(x, kernel, strides, padding):
    """`[N, H, W, C_in] * [kh, kw, C_in, C_out] -> [N, H', W', C_out]`."""
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dims)


def _with_past(mod: nn.Module, x, n: int):
    """`concat(past, x)` along T, `past` being the n input frames before x: the layer's cache
    when decoding in chunks (mutable `cache`), else zeros (zero causal padding)."""
    b, _, h, w, c = x.shape
    if not mod.is_mutable_collection("cache"):
        return jnp.concatenate([jnp.zeros((b, n, h, w, c), x.dtype), x], axis=1)
    past = mod.variable("cache", "past", jnp.zeros, (b, n, h, w, c), x.dtype)
    ext = jnp.concatenate([past.value, x], axis=1)  # [B, n + T, H, W, C]
    past.value = ext[:, -n:]  # the next chunk's past
    return ext


def _first_chunk(mod: nn.Module) -> bool:
    """Whether x starts at frame 0: a whole clip, or the first chunk (no cache yet)."""
    return not mod.has_variable("cache", "past")


class CausalConv3d(nn.Module):
    """`[B, T, H, W, C_in] -> [B, T, H, W, features]`; 'same' in space, causal in time."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel_size
        if kt > 1:
            x = _with_past(self, x, kt - 1)  # [B, kt - 1 + T, H, W, C_in]
        pad = [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)]
        return _conv(self, x, self.features, self.kernel_size, padding=pad)


class Conv(nn.Module):
    """A plain convolution with explicit strides and padding (resampling layers)."""

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None

    @nn.compact
    def __call__(self, x):
        return _conv(self, x, self.features, self.kernel_size, self.strides, self.padding)


class RMSNorm(nn.Module):
    """`kind='rms'`: `y = x · rsqrt(mean_C(x²) + 1e-6) · scale`; `kind='l2'`: Wan 2.1's
    `y = x / max(‖x‖_C, 1e-12) · sqrt(C) · scale` (torch `F.normalize`, in its operation
    order). Equal up to the epsilons: they differ only for near-zero activations."""

    kind: str = "rms"

    @nn.compact
    def __call__(self, x):
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",))
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in >= float32
        if self.kind == "l2":
            norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
            y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1])
        else:
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
        return (y * self.param("scale", ones, x.shape[-1:], jnp.float32)).astype(x.dtype)


class ResidualBlock(nn.Module):
    """`x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, 1x1x1 shortcut when C changes."""

    features: int
    norm: str = "rms"

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(RMSNorm, self.norm)
        h = CausalConv3d(self.features, name="conv1")(nn.silu(norm(name="norm1")(x)))
        h = CausalConv3d(self.features, name="conv2")(nn.silu(norm(name="norm2")(h)))
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, (1, 1, 1), name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (so causal in T);
    the output projection starts at zero (Wan 2.1)."""

    norm: str = "rms"

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = RMSNorm(self.norm, name="norm")(x).reshape(
            b * t, h * w, c
        )  # frames apart: fold T into B
        dense = functools.partial(
            nn.Dense,
            bias_init=nn.with_logical_partitioning(ZEROS, ("conv_out",)),
        )
        init = nn.with_logical_partitioning(KERNEL_INIT, ("conv_in", "conv_out"))
        qkv = dense(3 * c, kernel_init=init, name="to_qkv")(y)  # [B·T, L, 3C]
        q, k, v = jnp.split(qkv[:, :, None, :], 3, axis=-1)  # each [B·T, L, N=1, C]
        y = jax.nn.dot_product_attention(q, k, v)[:, :, 0]  # [B·T, L, C]
        zero = nn.with_logical_partitioning(ZEROS, ("conv_in", "conv_out"))
        y = dense(c, kernel_init=zero, name="proj")(y)
        return x + y.reshape(b, t, h, w, c)


class Resample(nn.Module):
    """Halve (`down2d`, `down3d`) or double (`up2d`, `up3d`) H and W, and T for `*3d`
    keeping frame 0 alone. Downsampling keeps C; upsampling gives `up_features` channels,
    0 = half of C (Wan 2.1; Wan 2.2's residual up blocks keep C)."""

    mode: str
    up_features: int = 0

    @nn.compact
    def __call__(self, x):
        if self.mode == "up3d":
            x = self._time_up(x)
        b, t, h, w, c = x.shape
        y = x.reshape(b * t, h, w, c)  # the spatial part is per frame: fold T into B
        if self.mode.startswith("up"):
            y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)  # nearest 2x
            out = self.up_features or c // 2
            y = Conv(out, (3, 3), padding=((1, 1), (1, 1)), name="conv")(y)
        else:  # Wan's ZeroPad2d((0, 1, 0, 1)) and a valid stride-2 conv
            y = Conv(c, (3, 3), (2, 2), ((0, 1), (0, 1)), name="conv")(y)
        x = y.reshape(b, t, *y.shape[1:])  # [B, T, H', W', C']
        if self.mode == "down3d":
            x = self._time_down(x)
        return x

    def _time_up(self, x):
        """`[B, T, H, W, C] -> [B, 2T - 1, ...]` (or 2T on chunks after the first): frame 0
        passes; a causal 3-frame conv to 2C channels makes frames 2i-1, 2i from frame i."""
        first = _first_chunk(self)
        x0, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
        ext = _with_past(self, rest, 2)  # Wan: the past of frame 1 is zeros, not frame 0
        if rest.shape[1] == 0:
            return x0
        b, t, h, w, c = rest.shape
        y = Conv(2 * c, (3, 1, 1), name="time_conv")(ext)  # [B, t, H, W, 2C]
        y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)  # [B, t, 2, H, W, C]
        return jnp.concatenate([x0, y.reshape(b, 2 * t, h, w, c)], axis=1)

    def _time_down(self, x):
        """`[B, 1 + 2m, ...] -> [B, 1 + m, ...]` (chunks after the first: 2m -> m): frame 0
        passes; output j >= 1 is a stride-2 conv over frames 2j-2, 2j-1, 2j."""
        first = _first_chunk(self)
        b, t, h, w, c = x.shape
        if (t - first) % 2:
            raise ValueError(f"temporal downsampling got {t} frames; it needs 1 + 2m")
        x0, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
        if self.is_mutable_collection("cache"):
            past = self.variable("cache", "past", jnp.zeros, (b, 1, h, w, c), x.dtype)
            ext = jnp.concatenate([x0 if first else past.value, rest], axis=1)
            past.value = ext[:, -1:]
        else:
            ext = x
        if rest.shape[1] == 0:
            return x0
        y = Conv(c, (3, 1, 1), (2, 1, 1), name="time_conv")(ext)  # [B, m, H, W, C]
        return jnp.concatenate([x0, y], axis=1)


class MidBlock(nn.Module):
    attention: bool = True
    norm: str = "rms"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResidualBlock(c, self.norm, name="resnets_0")(x)
        if self.attention:
            x = AttentionBlock(self.norm, name="attentions_0")(x)
        return ResidualBlock(c, self.norm, name="resnets_1")(x)


# --- Wan 2.2's residual resampling blocks ---------------------------------------------


def avg_down(x, features: int, factor_t: int, factor_s: int):
    """Wan 2.2's parameter-free shortcut (diffusers `AvgDown3D`): `[B, T, H, W, C] ->
    [B, ceil(T / f_t), H / f_s, W / f_s, features]`.

    T is zero-padded in front to a multiple of f_t (a 1 + 2m clip: frame 0 pairs with a zero
    frame, as in the resampler that keeps frame 0 alone); each position's `C · f_t · f_s²`
    values, ordered (c, dt, dh, dw), are split into `features` consecutive groups and averaged.
    """
    b, t, h, w, c = x.shape
    factor = factor_t * factor_s * factor_s
    if (c * factor) % features:
        raise ValueError(
            f"avg_down: {c} channels x factor {factor} is not divisible by {features} features"
        )
    pad = (factor_t - t % factor_t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    tt, hh, ww = (t + pad) // factor_t, h // factor_s, w // factor_s
    x = x.reshape(b, tt, factor_t, hh, factor_s, ww, factor_s, c)  # split each axis
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # [B, T', H', W', C, f_t, f_s, f_s]
    x = x.reshape(b, tt, hh, ww, features, (c * factor) // features)  # groups of (c, dt, dh, dw)
    return x.mean(axis=-1)


def dup_up(x, features: int, factor_t: int, factor_s: int, frames: int):
    """Wan 2.2's parameter-free shortcut up (diffusers `DupUp3D`): `[B, T, H, W, C] ->
    [B, frames, H f_s, W f_s, features]`.

    Each channel is repeated `features · f_t · f_s² / C` times; the result, ordered
    (c', dt, dh, dw), spreads over `features` channels and the f_t x f_s x f_s block. The
    first `T f_t - frames` frames are dropped: on a clip's first chunk frame 0 gives one frame
    (diffusers' `first_chunk`), so the shortcut matches the main path's frame count.
    """
    b, t, h, w, c = x.shape
    factor = factor_t * factor_s * factor_s
    if (features * factor) % c:
        raise ValueError(f"dup_up: {features} features x factor {factor} not divisible by {c}")
    x = jnp.repeat(x, (features * factor) // c, axis=-1)  # torch repeat_interleave on C
    x = x.reshape(b, t, h, w, features, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # [B, T, f_t, H, f_s, W, f_s, C']
    x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, features)
    return x[:, t * factor_t - frames :]


class ResidualDownBlock(nn.Module):
    """Wan 2.2's encoder level: `main(x) + avg_down(x)`, main = `num_res_blocks` residual
    blocks to `features` then the downsampler (`down3d` if `temporal`, `down2d`), or the
    blocks alone on the last level (`down=False`, where the shortcut is the identity)."""

    features: int
    num_res_blocks: int
    temporal: bool = False
    down: bool = False
    norm: str = "rms"

    @nn.compact
    def __call__(self, x):
        h = x
        for j in range(self.num_res_blocks):
            h = ResidualBlock(self.features, self.norm, name=f"resnets_{j}")(h)
        if self.down:
            h = Resample("down3d" if self.temporal else "down2d", name="downsampler")(h)
        factor_t, factor_s = (2 if self.temporal and self.down else 1), (2 if self.down else 1)
        return h + avg_down(x, self.features, factor_t, factor_s).astype(h.dtype)


class ResidualUpBlock(nn.Module):
    """Wan 2.2's decoder level: `main(x) + dup_up(x)`, main = `num_res_blocks + 1` residual
    blocks to `features` then the upsampler (`up3d` if `temporal`, `up2d`) keeping
    `features`; the last level (`up=False`) has the blocks alone and no shortcut."""

    features: int
    num_res_blocks: int
    temporal: bool = False
    up: bool = False
    norm: str = "rms"

    @nn.compact
    def __call__(self, x):
        h = x
        for j in range(self.num_res_blocks + 1):
            h = ResidualBlock(self.features, self.norm, name=f"resnets_{j}")(h)
        if not self.up:
            return h
        mode = "up3d" if self.temporal else "up2d"
        h = Resample(mode, up_features=self.features, name="upsampler")(h)
        factor_t = 2 if self.temporal else 1
        return h + dup_up(x, self.features, factor_t, 2, h.shape[1]).astype(h.dtype)
