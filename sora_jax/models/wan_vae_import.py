r"""Wan 2.1 / 2.2 VAE weights (diffusers `AutoencoderKLWan`) -> a sora_jax VAE tokenizer artifact.

    python -m sora_jax.models.wan_vae_import --src=Wan2.1-T2V-1.3B-Diffusers/vae --out=DIR

`--src` is a diffusers model directory: `config.json` and `diffusion_pytorch_model.
safetensors` (or shards listed by `diffusion_pytorch_model.safetensors.index.json`). `--out`
receives the artifact of sora_jax.models.vae_artifact (weights, config, norm, hash) that
`tokenizer.name='vae'`, `tokenizer.path=DIR` loads; the CLI prints the load report.

Config. `base_dim, z_dim, dim_mult, num_res_blocks, temperal_downsample` map onto
`VAEConfig` with `norm='l2'` (Wan's RMS norm formula, `vae_layers.RMSNorm`), and Wan 2.2's
`is_residual`, `patch_size`, `decoder_base_dim` onto `residual`, `patch_size`,
`decoder_base_dim` (the `wan2_2` preset); `latents_mean`, `latents_std` become norm.json,
so `encode` gives `(mean - latents_mean) / latents_std`, what Wan pipelines feed the
transformer. Variants sora_jax's VAE does not have (attention in down blocks, pixel
channels other than 3 p², a first level wider than `base_dim`) are refused with the
field named. Wan 2.2's shortcuts (`avg_shortcut`) have no parameters.

Names (vae.py module docstring, docs/vae.md): `a.b.3.c` -> `a/b_3/c`; a resampler's
`resample.1` -> `conv`; `weight` -> `kernel` with torch `[O, I, *K]` -> `[*K, I, O]` (1x1
attention convs -> dense `[I, O]`); norms' `gamma [C, 1, 1(, 1)]` -> `scale [C]`.

Every name and shape is checked from the safetensors headers first: the report lists the
missing, unexpected and wrong-shaped tensors, and any of them is an error naming them,
before a byte is written. The weights are then streamed: each tensor is read, converted
and appended to weights.msgpack alone, so memory holds one tensor, never the model.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sora_jax.models import safetensors_io, vae, vae_artifact

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"

# diffusers config fields that must hold these values: sora_jax's VAE has no other variant.
_FIXED = {
    "attn_scales": [],  # attention only in the mid blocks (Wan 2.1 and 2.2)
}


class WanVAEImportError(ValueError):
    """The source directory does not hold weights sora_jax's Wan VAE can import."""


def weight_files(src: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a diffusers model directory: the index's shards or one file."""
    return safetensors_io.checkpoint_files(
        src,
        single=WEIGHTS,
        index=INDEX,
        hint="point --src at the `vae` folder of a diffusers Wan 2.1 or 2.2 repository "
        "(e.g. Wan2.1-T2V-1.3B-Diffusers/vae, Wan2.2-TI2V-5B-Diffusers/vae)",
    )


def config_from_diffusers(
    hf: dict, source: str = "config.json"
) -> tuple[vae.VAEConfig, vae.LatentNorm]:
    """`(VAEConfig, LatentNorm)` of an `AutoencoderKLWan` config.json."""
    cls = hf.get("_class_name", "AutoencoderKLWan")
    if cls != "AutoencoderKLWan":
        raise WanVAEImportError(
            f"{source}: _class_name={cls!r}; this imports AutoencoderKLWan only"
        )
    for key, want in _FIXED.items():
        if key in hf and hf[key] != want:
            raise WanVAEImportError(
                f"{source}: {key}={hf[key]!r}, but sora_jax's VAE supports only {key}={want!r} "
                "(attention in the mid blocks alone, as Wan 2.1 and 2.2)"
            )
    base = hf.get("base_dim", 96)
    patch = hf.get("patch_size") or 1  # None: no patchify (Wan 2.1); Wan 2.2: 2
    for key in ("in_channels", "out_channels"):
        if hf.get(key, 3) != 3 * patch * patch:
            raise WanVAEImportError(
                f"{source}: {key}={hf[key]} but patch_size={hf.get('patch_size')} needs "
                f"3 x {patch}² = {3 * patch * patch} (RGB pixels cut into patches); other "
                "pixel channel counts are not supported"
            )
    decoder_base = hf.get("decoder_base_dim") or base
    dim_mult = tuple(hf.get("dim_mult", (1, 2, 4, 4)))
    if dim_mult[0] != 1:  # diffusers' encoder.conv_in has base_dim channels, sora_jax's dims[0]
        raise WanVAEImportError(
            f"{source}: dim_mult={list(dim_mult)} must start with 1 (Wan 2.1's)"
        )
    config = vae.VAEConfig(
        base_dim=base,
        z_dim=hf.get("z_dim", 16),
        dim_mult=dim_mult,
        num_res_blocks=hf.get("num_res_blocks", 2),
        temporal_downsample=tuple(hf.get("temperal_downsample", (False, True, True))),
        mid_attention=True,
        norm="l2",
        patch_size=patch,
        residual=bool(hf.get("is_residual", False)),
        decoder_base_dim=0 if decoder_base == base else decoder_base,
    )
    spatial = hf.get("scale_factor_spatial")
    if spatial is not None and spatial != config.spatial:
        raise WanVAEImportError(
            f"{source}: scale_factor_spatial={spatial}, but patch_size={patch} and "
            f"{len(dim_mult)} levels give {config.spatial}; check the config"
        )
    stats = {k: hf.get(k) for k in ("latents_mean", "latents_std")}
    for key, value in stats.items():
        if value is None or len(value) != config.z_dim:
            raise WanVAEImportError(
                f"{source}: {key} must list z_dim={config.z_dim} per-channel values, got {value}"
            )
    if min(stats["latents_std"]) <= 0:
        raise WanVAEImportError(f"{source}: latents_std={stats['latents_std']} must be positive")
    norm = vae.LatentNorm(
        jnp.asarray(stats["latents_mean"], jnp.float32),
        jnp.asarray(stats["latents_std"], jnp.float32),
    )
    return config, norm


def abstract_params(config: vae.VAEConfig) -> dict:
    """The sora_jax parameter tree of `config` as `jax.ShapeDtypeStruct`s (nothing computed)."""
    init = vae.CausalVAE(config).init
    shapes = jax.eval_shape(init, jax.random.key(0), vae.example_input(config))["params"]
    return nn.meta.unbox(shapes)


def diffusers_name(path: tuple[str, ...]) -> str:
    """The diffusers tensor name of a sora_jax parameter path (module docstring)."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    parts = ["resample.1" if p == "conv" else p for p in parts]  # only resamplers have `conv`
    leaf = {"kernel": "weight", "scale": "gamma", "bias": "bias"}[path[-1]]
    return ".".join([*parts, leaf])


def diffusers_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a sora_jax parameter of `shape` at `path`."""
    if path[-1] == "scale":  # WanRMS_norm: images=True in attention, else a video norm
        return (*shape, 1, 1) if path[-2] == "norm" else (*shape, 1, 1, 1)
    if path[-1] == "kernel":
        if len(shape) == 2:  # attention's 1x1 Conv2d as a dense [I, O]
            return (shape[1], shape[0], 1, 1)
        return (shape[-1], shape[-2], *shape[:-2])
    return shape


def to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A torch tensor in sora_jax's layout (float32)."""
    value = np.asarray(value, np.float32)
    if path[-1] == "scale":
        return value.reshape(-1)
    if path[-1] == "kernel":
        if value.ndim == 4 and path[-2] in ("to_qkv", "proj"):
            return np.ascontiguousarray(value[:, :, 0, 0].T)
        return np.ascontiguousarray(value.transpose(*range(2, value.ndim), 1, 0))
    return value


def check(
    checkpoint: safetensors_io.Checkpoint, params: dict, source: str
) -> tuple[dict[tuple[str, ...], str], safetensors_io.LoadReport]:
    """`({sora_jax path: diffusers name}, report)` from the headers alone."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names, missing, mismatched = {}, [], []
    for key_path, leaf in leaves:
        path = tuple(k.key for k in key_path)
        name, want = diffusers_name(path), diffusers_shape(path, tuple(leaf.shape))
        if name not in checkpoint.shapes:
            missing.append(name)
        elif checkpoint.shapes[name] != want:
            mismatched.append((name, want, checkpoint.shapes[name]))
        else:
            names[path] = name
    expected = {diffusers_name(tuple(k.key for k in p)) for p, _ in leaves}
    unexpected = sorted(set(checkpoint.shapes) - expected)
    report = safetensors_io.LoadReport(
        source, sorted(names.values()), sorted(missing), unexpected, mismatched, []
    )
    return names, report


def convert(src, out, *, name: str = "") -> tuple[str, safetensors_io.LoadReport]:
    """Writes the artifact of the diffusers directory `src` to `out`; `(hash, report)`.

    Raises WanVAEImportError (a ValueError) naming every missing, unexpected and wrong-shaped
    tensor before anything is written.
    """
    src, out = pathlib.Path(src), pathlib.Path(out)
    config_file = src / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{src} has no config.json: point --src at a diffusers AutoencoderKLWan directory"
        )
    hf = json.loads(config_file.read_text())
    config, norm = config_from_diffusers(hf, str(config_file))
    files = weight_files(src)
    checkpoint = safetensors_io.Checkpoint(files)
    params = abstract_params(config)
    names, report = check(checkpoint, params, str(src))
    if not report.ok:
        raise WanVAEImportError(
            f"{src} does not match the VAE built from {config_file}:\n{report}\n"
            "Check that config.json belongs to these weights (base_dim, z_dim, dim_mult, "
            "num_res_blocks) and that no shard is missing or foreign."
        )

    def read(path: tuple[str, ...]) -> np.ndarray:
        return to_flax(path, checkpoint.read([names[path]])[names[path]])

    info = {
        "imported_from": str(src.resolve()),
        "diffusers_class": "AutoencoderKLWan",
        "weights_sha256": safetensors_io.sha256_files(files),
    }
    default = "wan2_2" if config.residual else "wan2_1"
    digest = vae_artifact.export_tokenizer_streamed(
        out, params, read, config, norm, name=name or default, info=info
    )
    return digest, report


def cli(src: str, out: str, name: str = "") -> int:
    """The command line's work: converts, prints the load report; the exit status."""
    if not src or not out:
        print(
            "usage: python -m sora_jax.models.wan_vae_import --src=DIR --out=DIR", file=sys.stderr
        )
        return 2
    try:
        digest, report = convert(src, out, name=name)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report)
    print(f"wrote {out} (hash {digest[:16]}): use tokenizer.name='vae', tokenizer.path={out}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    # Defined here, not at import: the module is a library too, and flags are global.
    flags.DEFINE_string("src", "", "diffusers AutoencoderKLWan directory (config.json + weights)")
    flags.DEFINE_string("out", "", "artifact directory to write")
    flags.DEFINE_string("name", "", "artifact name (tokenizer id causal_vae-NAME); default wan2_1")
    app.run(lambda argv: sys.exit(cli(flags.FLAGS.src, flags.FLAGS.out, flags.FLAGS.name)))
