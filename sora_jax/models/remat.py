"""Rematerialization policies of the DiT blocks (`model.remat`): what the backward pass
keeps of the forward, recomputes, or offloads to host memory (models/dit.py applies them
with `nn.remat` per block; docs/perf.md has the memory each keeps)."""

from __future__ import annotations

import jax

from sora_jax.models import splash as splash_lib
from sora_jax.parallel import mesh as mesh_lib

REMAT_POLICIES = (
    "none",
    "full",
    "save_dots",
    "save_attention_out",
    "save_attention",
    "offload",
    "offload_attention",
)
# Primitives of `jax.nn.dot_product_attention(implementation='cudnn')` whose outputs (the
# attention output and its softmax statistics) are the fused kernel's residuals. JAX does
# not name them (its forward rule has no checkpoint_name), so the policies match the
# primitive by name; never run on a GPU yet.
CUDNN_FORWARD = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")
_ATTENTION_NAMES = (splash_lib.RESIDUALS,)


def _cudnn_forward(prim, *_, **__) -> bool:
    return getattr(prim, "name", None) in CUDNN_FORWARD


def _pinned_host_check(name: str) -> None:
    """Offloading needs host memory the device can address, asked of the platform compiled
    for: a TPU or GPU target (a plan for a TPU topology on a CPU host included) has it."""
    if mesh_lib.target_platform() in ("tpu", "gpu"):
        return
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(
            f"model.remat={name!r} needs a 'pinned_host' memory space; backend "
            f"{jax.default_backend()!r} has {sorted(kinds)}: use 'save_attention' or "
            "'save_attention_out'"
        )


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `model.remat` name (what the backward pass keeps).

    'full' keeps nothing (recomputes the block, attention forward included: two attention
    forwards per layer), 'save_dots' keeps matmul outputs without batch dims (the weight
    projections; attention is recomputed), 'save_attention_out' keeps only the attention
    output (the kernel's forward still reruns: its backward needs the softmax statistics),
    'save_attention' keeps the attention kernels' residuals (output and log-sum-exp of the
    blockwise and splash kernels, named `RESIDUALS`; the outputs of cuDNN's forward) so
    the backward recomputes the cheap projections but never the attention forward,
    'offload' moves the attention output to pinned host memory, 'offload_attention' the
    named kernel residuals (cuDNN's stay on the device: they carry no name to offload).

    Memory 'save_attention' keeps per block beyond 'full' (which keeps only the block
    inputs): for each of the two attentions, o `[B, L, N, E]` in the compute dtype (B L D
    values: 2 B L D bytes in bfloat16) and lse `[B, N, L]` float32 (4 B N L bytes). For the
    Wan-1.3B widths at 32k tokens that is ~0.2 GB per block, ~6 GB for 30 blocks per sample.
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "save_attention_out":
        return cp.save_only_these_names("attention_out")
    if name == "save_attention":
        return cp.save_from_both_policies(
            cp.save_only_these_names(*_ATTENTION_NAMES), _cudnn_forward
        )
    if name in ("offload", "offload_attention"):
        _pinned_host_check(name)
        names = ["attention_out"] if name == "offload" else list(_ATTENTION_NAMES)
        offload = cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=names,
            offload_src="device",
            offload_dst="pinned_host",
        )
        if name == "offload":
            return offload

        def policy(prim, *args, **params):
            return True if _cudnn_forward(prim) else offload(prim, *args, **params)

        return policy
    raise ValueError(f"model.remat={name!r} is unknown; choose one of {REMAT_POLICIES}")
