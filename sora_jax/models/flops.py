"""Model FLOPs and MFU: the one place these numbers are computed (docs/design.md).

Forward FLOPs of one sample with `s` video tokens, `s_t` text tokens, width `d`, MLP width
`f` (`k` MLP matrices: 2 for GELU, 3 for SwiGLU) and `n` blocks:

    F = n [2s·4d² + 2s·k·d·f + 2s·2d² + 2s_t·2d² + 4s²d + 4s·s_t·d]

(self-attention q, k, v, o; MLP; cross-attention q, o; cross-attention k, v over text;
self-attention scores and values; cross-attention scores and values). Training is 3F.
Excluded: patch embedding, output head, adaLN / timestep MLPs, text embedding MLP,
norms and softmax, the text encoder and the VAE; rematerialization is not counted.

    MFU = 3F · global_batch / (step_time · devices · peak)
"""

from __future__ import annotations

import dataclasses
import math

from sora_jax.models import dit


def _fields(model_or_cfg) -> dict:
    """dim, mlp_dim, num_layers, mlp, patch_size of a VideoDiT or a model config."""
    names = ("dim", "mlp_dim", "num_layers", "mlp", "patch_size")
    if isinstance(model_or_cfg, dit.VideoDiT):
        return {k: getattr(model_or_cfg, k) for k in names}
    defaults = {f.name: f.default for f in dataclasses.fields(dit.VideoDiT)}
    given = dit.model_fields(model_or_cfg)
    return {k: given.get(k, defaults[k]) for k in names}


def tokens_per_sample(model_or_cfg, latent_shape) -> int:
    """Video tokens s of a latent `(T, H, W[, C])` bucket: `T H W / (pt ph pw)`."""
    patch = _fields(model_or_cfg)["patch_size"]
    return math.prod(dit.check_patchable(tuple(latent_shape)[:3], patch))


def model_flops_per_sample(model_or_cfg, tokens: int, text_tokens: int) -> float:
    """Forward FLOPs F of one sample (formula in the module docstring)."""
    cfg = _fields(model_or_cfg)
    d, f, n = cfg["dim"], cfg["mlp_dim"], cfg["num_layers"]
    k = {"gelu": 2, "swiglu": 3}[cfg["mlp"]]
    s, s_t = tokens, text_tokens
    per_block = (
        2 * s * 4 * d * d  # self-attention q, k, v, o projections
        + 2 * s * k * d * f  # MLP
        + 2 * s * 2 * d * d  # cross-attention q, o projections
        + 2 * s_t * 2 * d * d  # cross-attention k, v projections of the text
        + 4 * s * s * d  # self-attention q kᵀ and (softmax) v
        + 4 * s * s_t * d  # cross-attention q kᵀ and (softmax) v
    )
    return float(n * per_block)


def train_flops_per_sample(model_or_cfg, tokens: int, text_tokens: int) -> float:
    """3F: forward plus a backward pass that costs two forwards."""
    return 3.0 * model_flops_per_sample(model_or_cfg, tokens, text_tokens)


def mfu(train_flops: float, global_batch: int, step_time: float, devices: int, peak: float):
    """Model FLOPs utilization: `3F · global_batch / (step_time · devices · peak)`."""
    return train_flops * global_batch / (step_time * devices * peak)
