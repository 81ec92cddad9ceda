"""The one place attention is computed: `dot_product_attention(q, k, v, mask, impl)`.

    o = softmax(q kᵀ / sqrt(E) + log mask) v,      per batch element and head.

Every attention in the model (video self-attention, text cross-attention) calls this
function, so it is the seam where kernels (cuDNN flash, Pallas splash) and context-parallel
strategies (Ulysses all-to-all, ring attention over `jax.shard_map`) plug in (docs/parallelism.md).

Kernels (`impl`): 'blockwise' (sora_jax/models/blockwise_attention.py: pure JAX, blocked
over queries and keys with an online softmax, memory linear in L; the portable default),
'xla' (dense einsums that materialize the float32 scores `[B, N, L, S]`: the reference),
'cudnn' (fused flash attention on NVIDIA GPUs, bfloat16/float16), 'splash' (Pallas, TPU).
'auto' picks cuDNN for half precision on GPUs, splash on TPUs, and 'blockwise' elsewhere.

Context parallelism: `context_parallel='ulysses' | 'ring'` computes self-attention with the
video tokens split over the mesh axis `context` (sora_jax/parallel/context.py, where the
maths is), and `'queries'` cross-attention with only the queries split; each reduces to the
plain kernel without a mesh or with a `context` axis of size 1.

Shapes: q `[B, L, N, E]` (L query tokens), k and v `[B, S, N, E]` (S key tokens: video
tokens for self-attention, text tokens for cross-attention). The optional boolean `mask`
broadcasts to `[B, N, L, S]`; True means "may attend". Keys that are masked out get
exactly zero weight; a query whose keys are all masked out gets an all-zero output (never
NaN, never a uniform average over padding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sora_jax.models import blockwise_attention as blockwise_lib
from sora_jax.models import splash as splash_lib
from sora_jax.parallel import context as context_lib
from sora_jax.parallel import mesh as mesh_lib

IMPLS = ("blockwise", "xla", "cudnn", "splash", "auto")
# cuDNN's fused attention only takes half-precision inputs.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_impl(impl: str, dtype=jnp.float32, backend: str | None = None) -> str:
    """The concrete implementation for `impl`. 'auto' picks by platform and dtype: a fused
    kernel where one applies (cuDNN for half precision on GPUs, splash on TPUs), else the
    memory-efficient 'blockwise' (CPUs, float32 on GPUs). The platform is `backend`, else
    that of the mesh being compiled for (a TPU plan on a CPU host gets splash)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is unknown; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or mesh_lib.target_platform()
    if backend == "gpu" and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "blockwise"


def xla_attention(q, k, v, mask=None):
    """Plain einsum attention; logits, softmax statistics and the normalizer in float32.

    q `[B, L, N, E]`, k/v `[B, S, N, E]`, mask broadcastable to `[B, N, L, S]` -> `[B, L, N, E]`.
    As flash attention does, the scale is folded into q and the softmax normalizer is
    applied to the `[B, L, N, E]` output rather than to the `[B, N, L, S]` weights: the same
    result with two fewer elementwise passes over the scores.
    """
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    logits = jnp.einsum("BLNE,BSNE->BNLS", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        # The most negative float32: exp(min - max) underflows to exactly 0 for masked keys.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    logits_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - logits_max)  # [B, N, L, S] unnormalized, in (0, 1]
    norm = jnp.sum(weights, axis=-1)  # [B, N, L] float32
    out = jnp.einsum(
        "BNLS,BSNE->BLNE", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / jnp.transpose(norm, (0, 2, 1))[..., None]).astype(v.dtype)


def _blockwise_masks(mask, k) -> dict:
    """A `(q, k, v, mask)` mask as the blockwise kernel's arguments: one without head and
    query axes (`[B|1, 1, 1, S]`: key padding, the text mask) as `kv_mask [B|1, S]`, any
    other passed dense (sliced per block)."""
    if mask is None:
        return {}
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # -> [B|1, N|1, L|1, S|1]
    if mask.shape[1] == 1 and mask.shape[2] == 1:
        return dict(kv_mask=jnp.broadcast_to(mask[:, 0, 0, :], (mask.shape[0], k.shape[1])))
    return dict(mask=mask)


def blockwise_attention(q, k, v, mask=None):
    """`blockwise_attention.blockwise_attention` behind the common `(q, k, v, mask)` call."""
    return blockwise_lib.blockwise_attention(q, k, v, **_blockwise_masks(mask, k))


def blockwise_attention_with_lse(q, k, v, mask=None):
    """`(o [B, L, N, E], lse [B, N, L])` of the blockwise kernel: what ring attention merges."""
    return blockwise_lib.blockwise_attention_with_lse(q, k, v, **_blockwise_masks(mask, k))


def _cudnn(q, k, v, mask=None):
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        raise ValueError(
            f"attention impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; set "
            "model.dtype='bfloat16' or use attention_impl='auto' (falls back to 'blockwise')"
        )
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _splash(q, k, v, mask=None, *, block_size: int = splash_lib.DEFAULT_BLOCK):
    """Splash per device: under a mesh, `jax.shard_map` gives each device its own batch rows
    (over the batch axes) and heads (over `tensor`), as a Pallas kernel cannot be partitioned
    by the compiler. Dimensions that do not divide stay whole on every device."""
    kernel = functools.partial(splash_lib.splash_attention, block_size=block_size)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, mask)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    batch = batch_axes if q.shape[0] % math.prod(sizes[a] for a in batch_axes) == 0 else ()
    heads = "tensor" if sizes.get("tensor", 1) > 1 and q.shape[2] % sizes["tensor"] == 0 else None
    qkv_spec = P(batch or None, None, heads, None)
    if mask is None:
        fn = jax.shard_map(
            lambda q, k, v: kernel(q, k, v),
            mesh=mesh,
            in_specs=(qkv_spec,) * 3,
            out_specs=qkv_spec,
            check_vma=False,
        )
        return fn(q, k, v)
    mask = jnp.broadcast_to(mask, (q.shape[0], *jnp.shape(mask)[1:]))
    fn = jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(qkv_spec,) * 3 + (P(batch or None, None, None, None),),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return fn(q, k, v, mask)


_IMPL_FNS = {
    "blockwise": blockwise_attention,
    "xla": xla_attention,
    "cudnn": _cudnn,
    "splash": _splash,
}
# Per-device kernels for context-parallel strategies, which run them inside their own
# `jax.shard_map` (so splash here is the kernel itself, not its shard_map wrapper).
_LOCAL_FNS = {**_IMPL_FNS, "splash": splash_lib.splash_attention}
# What ring attention runs per K/V block: the blockwise kernel with its log-sum-exp (the
# fused kernels return no softmax statistics to merge); the dense reference 'xla' keeps
# the ring's own einsum step (sora_jax/parallel/context.py).
_LSE_FNS = {"blockwise": blockwise_attention_with_lse, "xla": None}


def dot_product_attention(
    q,
    k,
    v,
    mask=None,
    impl: str = "xla",
    *,
    context_parallel="none",
    splash_block_size: int = splash_lib.DEFAULT_BLOCK,
):
    """Multi-head attention `[B, L, N, E] x [B, S, N, E] -> [B, L, N, E]`.

    `mask`: bool, broadcastable to `[B, N, L, S]` (True = attend), or None (attend to all).
    Rows whose keys are all masked come back as zeros, whatever the implementation.
    `context_parallel`: 'none', 'ulysses' or 'ring' (self-attention, L = S the same tokens),
    or 'queries' (cross-attention); see sora_jax/parallel/context.py.
    `splash_block_size`: the splash kernel's tile (sora_jax/models/splash.py).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::3] != k.shape[::3]:
        raise ValueError(
            f"attention expects q [B, L, N, E] and k, v [B, S, N, E] with equal B and E, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    impl = resolve_impl(impl, q.dtype)
    if context_parallel not in context_lib.MODES:
        raise ValueError(
            f"context_parallel={context_parallel!r} is unknown; choose one of "
            f"{context_lib.STRATEGIES} (model.context_parallel)"
        )
    if context_parallel in ("ulysses", "ring") and q.shape != k.shape:
        raise ValueError(
            f"context_parallel={context_parallel!r} is for self-attention (q and k of one "
            f"shape), got q {q.shape} and k {k.shape}; use 'queries' for cross-attention"
        )
    local, whole = _LOCAL_FNS[impl], _IMPL_FNS[impl]
    if impl == "splash":
        local = functools.partial(local, block_size=splash_block_size)
        whole = functools.partial(whole, block_size=splash_block_size)
    if context_parallel != "none" and context_lib.context_degree() > 1:
        out = context_lib.context_parallel_attention(
            q,
            k,
            v,
            mask,
            mode=context_parallel,
            attend=local,
            attend_lse=_LSE_FNS.get(impl, blockwise_attention_with_lse),
        )
    else:
        out = whole(q, k, v, mask)
    if mask is not None:
        # Fully masked query rows: zero output instead of an average over padding.
        any_key = jnp.any(jnp.broadcast_to(mask, (*mask.shape[:-1], k.shape[1])), axis=-1)
        any_key = jnp.broadcast_to(any_key, (q.shape[0], q.shape[2], q.shape[1]))  # [B, N, L]
        out = out * jnp.transpose(any_key, (0, 2, 1))[..., None].astype(out.dtype)
    return out
