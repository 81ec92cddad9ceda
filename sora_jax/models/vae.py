r"""Causal 3D convolutional VAE: the learned video tokenizer (docs/vae.md). Its layers are in
sora_jax.models.vae_layers; this module holds the config, presets, encoder, decoder and
the pure functions of the parameters.

Pixels `x [B, T, H, W, 3]` in [-1, 1] <-> latents `z [B, T', H', W', C]`, with
`T' = 1 + (T - 1) / r`, `H' = H / s`, `W' = W / s`; `r = 2^(temporal downsamples)` and
`s = 2^(levels - 1)`, 4 and 8 with the defaults (Wan 2.1's VAE).

Causality. Every 3-frame kernel is fed the two previous frames' inputs; before frame 0 they
are zeros (zero causal padding, as Wan 2.1's CausalConv3d: replicating frame 0 would make
the padding depend on the content). Temporal resampling keeps frame 0 alone: downsampling
maps frames (0 | 1 2 | 3 4 | ...) to (0 | 1 | 2 | ...), output j >= 1 being a stride-2
conv over frames 2j-2 .. 2j; upsampling maps frame 0 to one frame and frame i >= 1 to
frames 2i-1, 2i. So a clip of 1 + 4k frames has 1 + k latent frames, latent frame 0 sees
pixel frame 0 only (an image is a 1-frame clip, same weights), latent frame j sees pixel
frames <= 4j, and decoded frame 4j sees latent frames <= j.

Distribution. The encoder gives `mean, logvar` per latent element; training decodes
`z = mean + exp(logvar / 2) eps`, the tokenizer encodes `mean`. Per element,
`kl = (mean² + exp(logvar) - 1 - logvar) / 2` (KL to N(0, 1)).

Normalization. `encode` returns `(mean - mu_c) / sigma_c` with per-channel `mu, sigma`
measured on data (`measure_norm`) and stored with the weights; `decode` undoes it.

Chunked decoding. Each causal layer keeps its last input frames in the `cache` collection;
`decode(..., chunk_frames=n)` runs n latent frames at a time carrying that cache, so memory
is bounded by the chunk. It is the whole decode up to round-off: 1e-14 in float64; in
float32 XLA blocks convolutions of other shapes differently (~1e-5; tests hold 1e-4).
`tile=n` further splits the decoder after its mid block (whose attention is global over
H', W') into n x n latent tiles with `decoder_halo` latent pixels of context: exact by
receptive field, to the same round-off.

Wan 2.1 correspondence. `PRESETS['wan2_1']` is Wan 2.1's architecture (Wan2.1 `vae.py`:
dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False,
True, True], attn_scales=[]). Names follow diffusers' `AutoencoderKLWan`, so importing its
weights is a renaming (sora_jax.models.wan_vae_import): `encoder.down_blocks.3.conv1.weight`
-> `encoder/down_blocks_3/conv1/kernel` with torch `[O, I, *K]` transposed to `[*K, I, O]`;
norms' `gamma` -> `scale` (squeezed to `[C]`); `resample.1` -> `conv`; attention
`to_qkv`/`proj` 1x1 convs -> dense `[I, O]`; `latents_mean`/`latents_std` -> `norm.json`.
The RMS norm is `config.norm`: 'rms' `x · rsqrt(mean(x²) + 1e-6)` (the default, which
existing artifacts keep) or 'l2' `x / max(‖x‖, 1e-12) · sqrt(C)`, Wan's (the wan2_1 preset
and imports); they differ only for near-zero activations. Everything else is Wan's as is:
zero causal padding, the resamplers' frame-0 handling, per-frame mid-block attention,
quant/post_quant convs, logvar clamp and pixel clamp. With 'l2', imported weights
reproduce diffusers' chunked encode (posterior mean) and frame-by-frame decode to float32
round-off (tests/models/test_wan_vae_import.py: ~1e-7 and ~1e-6).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from sora_jax.models.vae_layers import (
    CausalConv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    ResidualUpBlock,
    RMSNorm,
)

NORMS = ("rms", "l2")  # RMSNorm's formulas over C per position (local, so tiles are exact)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture. Level i has `base_dim * dim_mult[i]` channels; between levels i and
    i + 1 space halves, and time too when `temporal_downsample[i]`."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    mid_attention: bool = True
    # RMS norm formula (`NORMS`): 'rms' x·rsqrt(mean(x²) + 1e-6), sora_jax's own; 'l2'
    # x / max(‖x‖, 1e-12) · sqrt(C), Wan 2.1's exactly (imported weights need it).
    norm: str = "rms"
    # Pixels are cut into p x p patches stacked on channels before the encoder and put back
    # after the decoder (Wan 2.2: 2, so the spatial compression is p · 2^(levels - 1) = 16).
    patch_size: int = 1
    # Wan 2.2's residual levels: every encoder level is `blocks + downsampler` plus a
    # parameter-free averaging shortcut, every decoder level `blocks + upsampler` (which
    # keeps the width) plus a duplicating shortcut (vae_layers.ResidualDownBlock / UpBlock).
    residual: bool = False
    # Decoder width `decoder_base_dim · dim_mult[i]`; 0 = base_dim (Wan 2.2: 256 vs 160).
    decoder_base_dim: int = 0

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(
            self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample)
        )
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAE temporal_downsample={self.temporal_downsample} needs one flag per level "
                f"transition, len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        if min(self.base_dim, self.z_dim, *self.dim_mult) < 1 or self.num_res_blocks < 0:
            raise ValueError(f"VAE config {self}: dims must be >= 1, num_res_blocks >= 0")
        if self.patch_size < 1 or self.decoder_base_dim < 0:
            raise ValueError(
                f"VAE patch_size={self.patch_size} must be >= 1 and decoder_base_dim="
                f"{self.decoder_base_dim} >= 0 (0 = base_dim)"
            )
        if self.norm not in NORMS:
            raise ValueError(f"VAE norm={self.norm!r} is unknown; choose one of {list(NORMS)}")

    @property
    def spatial(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def pixel_channels(self) -> int:
        """Channels the encoder sees and the decoder gives: 3 per pixel of a patch."""
        return 3 * self.patch_size**2

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def temporal(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VAE config fields {unknown} are unknown; known: {sorted(known)}")
        return cls(**d)


PRESETS = {
    # Tests: 8x spatial, 4x temporal like Wan 2.1, 0.2 M parameters.
    "tiny": VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # Wan 2.1's VAE (Wan2.1 repository, wan/modules/vae.py `_video_vae`), with its norm so
    # that imported weights (sora_jax.models.wan_vae_import) reproduce it.
    "wan2_1": VAEConfig(norm="l2"),
    # Wan 2.2's VAE (TI2V-5B; diffusers `AutoencoderKLWan` with base_dim=160,
    # decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in/out channels 12):
    # 4x16x16 compression to 48 channels, 704,688,668 parameters (docs/wan.md).
    "wan2_2": VAEConfig(
        base_dim=160,
        z_dim=48,
        decoder_base_dim=256,
        patch_size=2,
        residual=True,
        norm="l2",
    ),
}


def config_from_model(model) -> VAEConfig:
    """The VAEConfig of a run's `model` section: `model.preset` (a key of PRESETS, or None
    for the defaults) with the section's fields that are not None on top."""
    if model.get("preset") and model.preset not in PRESETS:
        raise ValueError(f"model.preset={model.preset!r} is unknown; known: {list(PRESETS)}")
    base = PRESETS[model.preset].to_dict() if model.get("preset") else {}
    fields = VAEConfig().to_dict()
    overrides = {k: model[k] for k in fields if k in model and model[k] is not None}
    return VAEConfig.from_dict({**base, **overrides})


class LatentNorm(NamedTuple):
    """Per-channel statistics of the encoder means: `z = (mean - self.mean) / self.std`."""

    mean: jax.Array  # [C]
    std: jax.Array  # [C]

    @classmethod
    def identity(cls, channels: int) -> LatentNorm:
        return cls(jnp.zeros((channels,), jnp.float32), jnp.ones((channels,), jnp.float32))


# --- Encoder and decoder ------------------------------------------------------------


def patchify_pixels(x, p: int):
    """`[B, T, H, W, 3] -> [B, T, H / p, W / p, 3 p²]`, channels ordered (c, dw, dh) as
    diffusers' Wan `patchify` (the width offset before the height offset)."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c)  # [B, T, H', dh, W', dw, C]
    x = x.transpose(0, 1, 2, 4, 6, 5, 3)  # [B, T, H', W', C, dw, dh]
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify_pixels(x, p: int):
    """The inverse of `patchify_pixels`: `[B, T, H', W', 3 p²] -> [B, T, H' p, W' p, 3]`."""
    if p == 1:
        return x
    b, t, h, w, cp = x.shape
    x = x.reshape(b, t, h, w, cp // (p * p), p, p)  # [B, T, H', W', C, dw, dh]
    x = x.transpose(0, 1, 2, 6, 3, 5, 4)  # [B, T, H', dh, W', dw, C]
    return x.reshape(b, t, h * p, w * p, cp // (p * p))


class Encoder(nn.Module):
    """`[B, T, H, W, 3] -> [B, T', H', W', 2 z_dim]` (mean and logvar before quant_conv)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dims = [cfg.base_dim * m for m in cfg.dim_mult]
        x = CausalConv3d(dims[0], name="conv_in")(x)
        if cfg.residual:
            x = self._residual_levels(x, dims)
        else:
            x = self._levels(x, dims)
        x = MidBlock(cfg.mid_attention, cfg.norm, name="mid_block")(x)
        x = nn.silu(RMSNorm(cfg.norm, name="norm_out")(x))
        return CausalConv3d(2 * cfg.z_dim, name="conv_out")(x)

    def _residual_levels(self, x, dims):
        """Wan 2.2: level i is `down_blocks_i` (blocks, downsampler, shortcut)."""
        cfg = self.config
        for i, dim in enumerate(dims):
            last = i == len(dims) - 1
            x = ResidualDownBlock(
                dim,
                cfg.num_res_blocks,
                temporal=not last and cfg.temporal_downsample[i],
                down=not last,
                norm=cfg.norm,
                name=f"down_blocks_{i}",
            )(x)
        return x

    def _levels(self, x, dims):
        """Wan 2.1: blocks and resamplers in one list `down_blocks_k`."""
        cfg = self.config
        k = 0  # diffusers numbers residual blocks and resamplers in one list
        for i, dim in enumerate(dims):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(dim, cfg.norm, name=f"down_blocks_{k}")(x)
                k += 1
            if i < len(dims) - 1:
                mode = "down3d" if cfg.temporal_downsample[i] else "down2d"
                x = Resample(mode, name=f"down_blocks_{k}")(x)
                k += 1
        return x


class UpBlock(nn.Module):
    features: int
    num_res_blocks: int
    upsample: str | None
    norm: str = "rms"

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.features, self.norm, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Resample(self.upsample, name="upsamplers_0")(x)
        return x


class Decoder(nn.Module):
    """`[B, T', H', W', z_dim] -> [B, T, H, W, 3]` as `up(stem(z))`; `stem` (conv_in, mid
    block) is global over H', W', `up` is local and so can run on spatial tiles."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        dims = [cfg.decoder_dim * m for m in reversed(cfg.dim_mult)]
        ups = list(reversed(cfg.temporal_downsample))
        self.conv_in = CausalConv3d(dims[0])
        self.mid_block = MidBlock(cfg.mid_attention, cfg.norm)
        self.up_blocks = (
            self._residual_levels(dims, ups)
            if cfg.residual
            else [
                UpBlock(
                    dim,
                    cfg.num_res_blocks,
                    ("up3d" if ups[i] else "up2d") if i < len(ups) else None,
                    cfg.norm,
                )
                for i, dim in enumerate(dims)
            ]
        )
        self.norm_out = RMSNorm(cfg.norm)
        self.conv_out = CausalConv3d(cfg.pixel_channels)

    def _residual_levels(self, dims, ups):
        """Wan 2.2: level i maps dims[i - 1] (dims[0] for i = 0) to dims[i] channels."""
        cfg = self.config
        return [
            ResidualUpBlock(
                dim,
                cfg.num_res_blocks,
                temporal=i < len(ups) and ups[i],
                up=i < len(ups),
                norm=cfg.norm,
            )
            for i, dim in enumerate(dims)
        ]

    def stem(self, z):
        return self.mid_block(self.conv_in(z))

    def up(self, h):
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(nn.silu(self.norm_out(h)))

    def __call__(self, z):
        return self.up(self.stem(z))


class CausalVAE(nn.Module):
    """`__call__(x, key) -> (x_hat, mean, logvar)`: decodes a sample (the mean if key is
    None). Methods `encode`, `decode`, `decode_stem`, `decode_up` for `apply(method=...)`."""

    config: VAEConfig

    def setup(self):
        z = self.config.z_dim
        self.encoder = Encoder(self.config)
        self.quant_conv = CausalConv3d(2 * z, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(z, (1, 1, 1))
        self.decoder = Decoder(self.config)

    def encode(self, x):
        """x `[B, T, H, W, 3]` -> mean, logvar `[B, T', H', W', C]` (logvar in [-30, 20])."""
        x = patchify_pixels(x, self.config.patch_size)
        mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # exp(logvar) stays finite (LDM's clamp)

    def decode_stem(self, z):
        return self.decoder.stem(self.post_quant_conv(z))

    def decode_up(self, h):
        return unpatchify_pixels(self.decoder.up(h), self.config.patch_size)

    def decode(self, z):
        return self.decode_up(self.decode_stem(z))

    def __call__(self, x, key=None):
        mean, logvar = self.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


# --- Pure functions of the parameters ---------------------------------------------------


def example_input(config: VAEConfig, batch: int = 1):
    """Zeros `[B, 1 + r, s, s, 3]`: the smallest clip that builds every temporal layer."""
    s = config.spatial
    return jnp.zeros((batch, 1 + config.temporal, s, s, 3), jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: VAEConfig, rng: jax.Array, boxed: bool = False):
    """Parameters with the modules' initializers' distributions, drawn in one random op.

    XLA:CPU compiles every random draw of `model.init` apart (~0.3 s each, up to 40 s for the
    tiny preset on 2 cores), so this draws one standard normal vector and slices it over the
    kernels: `kernel ~ N(0, 1 / fan_in)` (lecun, as `vae_layers.KERNEL_INIT`) except
    zero-initialized ones (`proj`), `bias = 0`, `scale = 1`. `boxed` keeps the logical axis
    names (the leaves of `jax.eval_shape(model.init)`), for `state.abstract_state`.
    """
    abstract = jax.eval_shape(CausalVAE(config).init, jax.random.key(0), example_input(config))
    is_box = lambda v: isinstance(v, nn.LogicallyPartitioned)  # noqa: E731
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract["params"], is_leaf=is_box)
    kernels = [
        (i, leaf)
        for i, (path, leaf) in enumerate(paths)
        if path[-1].key == "kernel" and path[-2].key != "proj"
    ]
    noise = jax.random.normal(rng, (sum(nn.meta.unbox(v).size for _, v in kernels),), jnp.float32)
    values = [
        (jnp.ones if path[-1].key == "scale" else jnp.zeros)(v.shape, jnp.float32)
        for path, v in ((p, nn.meta.unbox(leaf)) for p, leaf in paths)
    ]
    offset = 0
    for i, leaf in kernels:
        shape = nn.meta.unbox(leaf).shape
        size, fan_in = math.prod(shape), math.prod(shape[:-1])
        values[i] = noise[offset : offset + size].reshape(shape) / math.sqrt(fan_in)
        offset += size
    boxes = [leaf.replace_boxed(v) if is_box(leaf) else v for (_, leaf), v in zip(paths, values)]
    params = jax.tree_util.tree_unflatten(treedef, boxes)
    return params if boxed else nn.meta.unbox(params)


@functools.partial(jax.jit, static_argnums=0)
def encode_moments(config: VAEConfig, params, video):
    """video `[B, T, H, W, 3]` -> (mean, logvar) `[B, T', H', W', C]`, unnormalized."""
    return CausalVAE(config).apply({"params": params}, video, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def encode(config: VAEConfig, params, norm: LatentNorm, video):
    """video `[B, T, H, W, 3]` in [-1, 1] -> normalized latents `(mean - mu) / sigma`."""
    mean, _ = CausalVAE(config).apply({"params": params}, video, method="encode")
    return (mean - norm.mean) / norm.std


@functools.partial(jax.jit, static_argnums=0)
def _decode_whole(config, params, norm, latents):
    z = latents * norm.std + norm.mean
    video = CausalVAE(config).apply({"params": params}, z, method="decode")
    return jnp.clip(video, -1.0, 1.0)  # Wan 2.1 clamps decoded pixels too


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_cached(config, method, params, cache, x):
    """One chunk through `method` with the causal cache of the chunks before: (y, cache)."""
    variables = {"params": params, **({"cache": cache} if cache else {})}
    y, state = CausalVAE(config).apply(variables, x, method=method, mutable=["cache"])
    return y, state.get("cache", {})


def decoder_halo(config: VAEConfig) -> int:
    """Latent pixels of context each side of a tile that make `decode_up` exact: its spatial
    receptive radius, each 3x3 conv adding 1 pixel of its own level (2^i per latent pixel)."""
    levels = len(config.dim_mult)
    radius = 0.0
    for i in range(levels):
        radius += 2 * (config.num_res_blocks + 1) / 2**i  # two 3x3 convs per residual block
        if i < levels - 1:
            radius += 1 / 2 ** (i + 1)  # the upsampler's conv, after the 2x repeat
    return math.ceil(radius + 1 / 2 ** (levels - 1))  # + conv_out


def decode(
    config: VAEConfig, params, norm: LatentNorm, latents, *, chunk_frames=0, tile=0, halo=-1
):
    """Normalized latents `[B, T', H', W', C]` -> video `[B, T, H, W, 3]` in [-1, 1].

    `chunk_frames > 0` decodes that many latent frames at a time with the causal cache;
    `tile > 0` decodes `tile x tile` latent tiles with `halo` latent pixels of context
    (-1 = `decoder_halo`, exact; less trades seams for speed) after the mid block. Both
    give the whole decode to float32 round-off (the tests hold them to 1e-4).
    """
    if chunk_frames <= 0 and tile <= 0:
        return _decode_whole(config, params, norm, latents)
    z = latents * norm.std + norm.mean
    b, t, h, w, _ = z.shape
    chunk = chunk_frames if chunk_frames > 0 else t
    size, s = (tile if tile > 0 else max(h, w)), config.spatial
    halo = decoder_halo(config) if halo < 0 else halo
    tiles = [(i, j) for i in range(0, h, size) for j in range(0, w, size)]
    stem_cache, caches, out = {}, {}, []
    for lo in range(0, t, chunk):
        feat, stem_cache = _apply_cached(
            config, "decode_stem", params, stem_cache, z[:, lo : lo + chunk]
        )
        rows = []
        for i, j in tiles:
            i0, j0 = max(i - halo, 0), max(j - halo, 0)
            crop = feat[:, :, i0 : min(i + size + halo, h), j0 : min(j + size + halo, w)]
            y, caches[i, j] = _apply_cached(config, "decode_up", params, caches.get((i, j)), crop)
            di, dj = (i - i0) * s, (j - j0) * s  # the tile's own pixels inside the crop
            y = y[:, :, di : di + size * s, dj : dj + size * s]
            if j == 0:
                rows.append([])
            rows[-1].append(y)
        out.append(jnp.concatenate([jnp.concatenate(r, axis=3) for r in rows], axis=2))
    return jnp.clip(jnp.concatenate(out, axis=1), -1.0, 1.0)
