"""Model surgery: a text-to-video parameter tree -> one with conditioning input channels.

`VideoDiT(cond_channels=C_cond)` concatenates `C_cond` conditioning channels to the latent
`x_t` before patch embedding (sora_jax/diffusion/conditioning.py: given latents and their
mask). Patchify lays each token's features out as `(pt, ph, pw, C)` with channels fastest
(sora_jax/models/layers.py), so the patch kernel `[P·C_in, D]` (P = pt·ph·pw) has rows

    row(p, c) = p · C_in + c          p < P, c < C_in = C + C_cond

`add_input_channels` reshapes a t2v kernel `[P·C, D] -> [P, C, D]`, appends `C_cond` zero
rows per patch position `-> [P, C + C_cond, D]` and flattens back. The new rows multiply the
conditioning channels only, so the model's output equals the t2v model's for any
conditioning input (to float round-off): fine-tuning then learns to use them. Every other
leaf is unchanged.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

PATCH_KERNEL = "patch_embedding/kernel"


class SurgeryError(ValueError):
    """A parameter tree cannot be extended as asked; the message names the shapes."""


def added_channels(saved_rows: int, model_rows: int, patch) -> int:
    """Conditioning channels a patch kernel of `saved_rows` needs to reach `model_rows`
    rows, or 0 when the shapes are not a channel extension (not a multiple of P)."""
    p = math.prod(tuple(patch))
    if model_rows <= saved_rows or saved_rows % p or model_rows % p:
        return 0
    return (model_rows - saved_rows) // p


def expand_patch_kernel(kernel, patch, cond_channels: int):
    """`[P·C, D] -> [P·(C + cond_channels), D]` with zero rows for the new channels."""
    p = math.prod(tuple(patch))
    rows, dim = kernel.shape
    if rows % p:
        raise SurgeryError(
            f"{PATCH_KERNEL} has {rows} rows, not a multiple of the patch's {p} positions "
            f"(model.patch_size={tuple(patch)}): it is not this model's patch kernel"
        )
    if cond_channels < 0:
        raise SurgeryError(f"cond_channels={cond_channels} must be >= 0")
    k = kernel.reshape(p, rows // p, dim)  # [P·C, D] -> [P, C, D]
    zeros = jnp.zeros((p, cond_channels, dim), kernel.dtype)
    return jnp.concatenate([k, zeros], axis=1).reshape(-1, dim)  # -> [P·(C + C_cond), D]


def add_input_channels(params: dict, patch, cond_channels: int) -> dict:
    """A t2v parameter tree (plain nested dicts) for `VideoDiT(cond_channels=...)`: the patch
    kernel gets zero rows for the conditioning channels, every other leaf is shared."""
    if "patch_embedding" not in params or "kernel" not in params["patch_embedding"]:
        raise SurgeryError(f"the parameter tree has no {PATCH_KERNEL} (keys {sorted(params)})")
    embed = dict(params["patch_embedding"])
    embed["kernel"] = expand_patch_kernel(embed["kernel"], patch, cond_channels)
    return {**params, "patch_embedding": embed}
