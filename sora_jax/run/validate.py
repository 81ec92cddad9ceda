"""The cross-section check of a run config, before anything is compiled.

`validate(config)` asks each component for its own section's errors (`dit.config_errors`,
`mesh.config_errors`, `context.config_errors`, `lora.config_errors`, `text.config_errors`)
and adds what no one section can check alone: every bucket against the tokenizer's
strides and the model's patch. It raises one `ConfigError` listing every fault, each
naming the field (and bucket) and the fix. A causal-VAE run (`model.name='causal_vae'`)
has sections of its own, checked by `validate_vae`.
"""

from __future__ import annotations

import math

import jax

from sora_jax.config import REQUIRED_FIELDS, ConfigDict, ConfigError
from sora_jax.data import buckets as buckets_lib
from sora_jax.models import dit, text
from sora_jax.models import lora as lora_lib
from sora_jax.models import tokenizer as tokenizer_lib
from sora_jax.models import vae as vae_lib
from sora_jax.parallel import context as context_lib
from sora_jax.parallel import mesh as mesh_lib


def validate(config: ConfigDict, devices=None) -> None:
    """Checks cross-field constraints of a training config before anything is compiled.

    `devices`: the devices the run will use (default: this host's); a plan for a TPU
    topology passes that slice's. Raises ConfigError naming every field (and bucket) at
    fault and what to change.
    """
    if "model" in config and config.model.get("name") == "causal_vae":
        validate_vae(config)  # a VAE run has its own sections
        return
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ConfigError(f"config lacks required top-level fields {missing} (docs/design.md)")
    errors = []
    for field in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
        if config[field] <= 0:
            errors.append(f"{field}={config[field]} must be positive")
    bucket_errors, bucket_tokens = _bucket_errors(config)
    errors.extend(bucket_errors)
    errors.extend(dit.config_errors(config.model))
    explicit = {b: e.get("global_batch_size", 0) for b, e in config.data.buckets.items()}
    errors.extend(
        mesh_lib.config_errors(
            config.mesh,
            config.data.global_batch_size,
            bucket_batches={b: g for b, g in explicit.items() if g},  # rows over batch shards
            devices=devices,
        )
    )
    errors.extend(
        context_lib.config_errors(
            config.model.get("context_parallel", "none"),
            _mesh_shape(config.mesh, devices),
            bucket_tokens,
            num_heads=lambda: dit.num_heads(config.model),
        )
    )
    errors.extend(lora_lib.config_errors(config))
    errors.extend(text.config_errors(config.text_encoder))
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _bucket_errors(config: ConfigDict) -> tuple[list[str], dict[str, int]]:
    """Each bucket against the tokenizer (frame count, latent shape) and the model's patch.

    Returns the errors and the video tokens `L = T' H' W'` of each bucket whose latent
    shape the patch divides (for the context-parallel check).
    """
    tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
    patch = tuple(config.model.patch_size)
    errors, bucket_tokens = [], {}
    for bucket in buckets_lib.buckets_from_config(config.data):
        try:
            tokenizer.check_frames(bucket.frames)
            latent = tokenizer.latent_shape(bucket.frames, bucket.height, bucket.width)
        except ValueError as e:
            errors.append(f"data.buckets.{bucket.name}: {e}")
            continue
        for axis, size, p in zip("THW", latent[:3], patch, strict=True):
            if size % p:
                errors.append(
                    f"data.buckets.{bucket.name}: latent {axis}={size} (latent shape {latent}) "
                    f"is not divisible by model.patch_size {patch}; pick a bucket size that is "
                    f"a multiple of tokenizer stride x patch"
                )
        grid = [size // p for size, p in zip(latent[:3], patch, strict=True) if size % p == 0]
        if len(grid) == 3:
            bucket_tokens[bucket.name] = math.prod(grid)  # L = T' H' W'
    return errors, bucket_tokens


def _mesh_shape(mesh_config: ConfigDict, devices=None) -> dict[str, int] | None:
    """The mesh's axis sizes on `devices` (default: this machine's), or None when they do
    not fit them (`mesh.config_errors` reports that)."""
    try:
        return mesh_lib.mesh_shape_on(mesh_config, devices)
    except ValueError:
        return None


def validate_vae(config: ConfigDict) -> vae_lib.VAEConfig:
    """Checks a causal-VAE training config before anything compiles; returns its VAEConfig.

    Raises ConfigError naming every field at fault."""
    try:
        cfg = vae_lib.config_from_model(config.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    d, errors = config.data, []
    if d.frames < 1 or (d.frames - 1) % cfg.temporal:
        errors.append(f"data.frames={d.frames} is not 1 + {cfg.temporal}k (temporal compression)")
    for field in ("height", "width"):
        if d[field] % cfg.spatial:
            errors.append(f"data.{field}={d[field]} is not a multiple of the spatial {cfg.spatial}")
    if config.loss.recon not in ("l1", "l2"):
        errors.append(f"loss.recon={config.loss.recon!r} must be 'l1' or 'l2'")
    if d.source.name != "synthetic":
        errors.append(f"data.source.name={d.source.name!r}: only 'synthetic' is supported")
    shape = mesh_lib.mesh_shape(config.mesh)
    shards = shape["data"] * shape["fsdp"] * jax.process_count()
    if d.global_batch_size % shards:
        errors.append(
            f"data.global_batch_size={d.global_batch_size} is not divisible by the batch shards "
            f"data x fsdp x processes = {shards}"
        )
    if errors:
        raise ConfigError("invalid VAE config:\n  - " + "\n  - ".join(errors))
    return cfg
