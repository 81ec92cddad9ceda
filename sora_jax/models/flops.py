"""Model FLOPs of the VideoDiT: the one place the formula lives (docs/design.md). MFU and
throughput from these numbers are sora_jax/training/perf.py.

Forward FLOPs of one sample with `s` video tokens, `s_t` text tokens, width `d`, MLP width
`f` (`k` MLP matrices: 2 for GELU, 3 for SwiGLU) and `n` blocks:

    F = n [2s·4d² + 2s·k·d·f + 2s·2d² + 2s_t·2d² + 4s²d + 4s·s_t·d]

(self-attention q, k, v, o; MLP; cross-attention q, o; cross-attention k, v over text;
self-attention scores and values; cross-attention scores and values). Each kernel term is
`2 · tokens · in · out` for the tokens it maps (`KERNELS`).

Training FLOPs per sample:

    full training:  3F            (forward F; backward: activation gradients F and
                                   weight gradients F)
    LoRA:           2F + F_T + 6r Σ_T in·out / global_batch

A LoRA run (sora_jax/models/lora.py) has no weight gradients for the frozen base: the
backward pass costs the activation gradients (F) plus, because the step merges
`W' = W + scale · A B` inside jit and differentiates through the merge, the full weight
gradient `dW' = xᵀ dy` of every targeted kernel (`F_T`: the sum of their forward terms),
from which `dA = dW' Bᵀ` and `dB = Aᵀ dW'` follow. The merge itself (`A B`) and those two
products cost `6 r · in · out` per targeted kernel and step, shared by the global batch.
Targets outside the blocks (patch embedding, head) are left out, like their layers in F.

Excluded: patch embedding, output head, adaLN / timestep MLPs, text embedding MLP,
norms and softmax, the optimizer update, the text encoder and the VAE; rematerialization
is not counted (MFU counts model FLOPs, not the FLOPs a recomputation adds).
"""

from __future__ import annotations

import dataclasses
import math
import re

from sora_jax.models import dit
from sora_jax.models import lora as lora_lib


def _fields(model_or_cfg) -> dict:
    """dim, mlp_dim, num_layers, mlp, patch_size of a VideoDiT or a model config."""
    names = ("dim", "mlp_dim", "num_layers", "mlp", "patch_size", "scan_layers")
    if isinstance(model_or_cfg, dit.VideoDiT):
        return {k: getattr(model_or_cfg, k) for k in names}
    defaults = {f.name: f.default for f in dataclasses.fields(dit.VideoDiT)}
    given = dit.model_fields(model_or_cfg)
    return {k: given.get(k, defaults[k]) for k in names}


def tokens_per_sample(model_or_cfg, latent_shape) -> int:
    """Video tokens s of a latent `(T, H, W[, C])` bucket: `T H W / (pt ph pw)`."""
    patch = _fields(model_or_cfg)["patch_size"]
    return math.prod(dit.check_patchable(tuple(latent_shape)[:3], patch))


def kernels(model_or_cfg, tokens: int, text_tokens: int) -> dict[str, float]:
    """Forward FLOPs of one sample through each kernel of one block, by its path inside
    the block (`self_attn/query/kernel`): `2 · tokens · in · out`."""
    cfg = _fields(model_or_cfg)
    d, f = cfg["dim"], cfg["mlp_dim"]
    s, s_t = tokens, text_tokens
    out = {f"self_attn/{k}/kernel": 2 * s * d * d for k in ("query", "key", "value", "out")}
    out |= {f"cross_attn/{k}/kernel": 2 * s * d * d for k in ("query", "out")}
    out |= {f"cross_attn/{k}/kernel": 2 * s_t * d * d for k in ("key", "value")}
    mlp_in = ("wi",) if cfg["mlp"] == "gelu" else ("wi_0", "wi_1")
    out |= {f"ffn/{k}/kernel": 2 * s * d * f for k in mlp_in}
    out["ffn/wo/kernel"] = 2 * s * f * d
    return {k: float(v) for k, v in out.items()}


def model_flops_per_sample(model_or_cfg, tokens: int, text_tokens: int) -> float:
    """Forward FLOPs F of one sample (formula in the module docstring)."""
    cfg = _fields(model_or_cfg)
    d, n = cfg["dim"], cfg["num_layers"]
    s, s_t = tokens, text_tokens
    per_block = sum(kernels(model_or_cfg, tokens, text_tokens).values()) + (
        4 * s * s * d  # self-attention q kᵀ and (softmax) v
        + 4 * s * s_t * d  # cross-attention q kᵀ and (softmax) v
    )
    return float(n * per_block)


def lora_targets(model_or_cfg, lora: lora_lib.LoraConfig) -> dict[str, int]:
    """Block kernels the LoRA targets match, with the number of blocks each is targeted in
    (the paths as the model names them: `blocks_<i>/...`, or `blocks/...` when scanned)."""
    cfg = _fields(model_or_cfg)
    pattern = re.compile(lora.targets)
    out = {}
    for kernel in kernels(model_or_cfg, 1, 1):
        if cfg["scan_layers"]:
            hits = cfg["num_layers"] if pattern.fullmatch(f"blocks/{kernel}") else 0
        else:
            hits = sum(
                bool(pattern.fullmatch(f"blocks_{i}/{kernel}")) for i in range(cfg["num_layers"])
            )
        if hits:
            out[kernel] = hits
    return out


def train_flops_per_sample(
    model_or_cfg,
    tokens: int,
    text_tokens: int,
    lora: lora_lib.LoraConfig | None = None,
    global_batch: int = 1,
) -> float:
    """Training FLOPs of one sample: 3F, or for a LoRA run `2F + F_T + 6r Σ_T in·out /
    global_batch` (module docstring)."""
    forward = model_flops_per_sample(model_or_cfg, tokens, text_tokens)
    if lora is None or not lora.enabled:
        return 3.0 * forward
    per_kernel = kernels(model_or_cfg, tokens, text_tokens)
    targets = lora_targets(model_or_cfg, lora)
    weight_grads = sum(per_kernel[k] * hits for k, hits in targets.items())
    # in · out of a kernel: its forward FLOPs over 2 · tokens (1 token, 1 text token).
    sizes = kernels(model_or_cfg, 1, 1)
    merge = sum(6 * lora.rank * sizes[k] / 2 * hits for k, hits in targets.items())
    return 2.0 * forward + weight_grads + merge / global_batch
