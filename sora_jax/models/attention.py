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

cuDNN takes no boolean mask here: a mask `[B, N, L, S]` would reach cuDNN as a bias whose
query length must equal L, which the text mask `[B, 1, 1, S]` does not have. Masks are key
padding only, `[B|1, 1, 1, S]` with the valid keys a prefix of each row (text encoders pad
on the right, sora_jax/models/text.py; context parallelism pads the video tokens at the
end), passed as `key_value_seq_lengths` (`cudnn_arguments`). A row with no valid key (a
dropped caption) runs with length 1 and is zeroed afterwards, as for every kernel. Masks
with a head or query axis are refused (use 'blockwise'); a key mask that is not a prefix is
refused when its values are known, and under `jit` its rows come back NaN instead of
silently wrong. Never run on a GPU yet (docs/perf.md).

Forward mode: the fused kernels define only a VJP; inside `attention_jvp.forward_mode()`
(the distillation step's `jax.jvp`) they get a JVP rule whose tangent is the blockwise
kernel's (models/attention_jvp.py), not under context parallelism.

Context parallelism: `context_parallel='ulysses' | 'allgather' | 'ring'` computes
self-attention with the video tokens split over the mesh axis `context`
(sora_jax/parallel/context.py, where the maths is), and `'queries'` cross-attention with
only the queries split; each reduces to the plain kernel without a mesh or with a `context`
axis of size 1. Ulysses, all-gather and 'queries' run the chosen kernel (cuDNN included)
per device; the ring merges blockwise kernels by their log-sum-exp.

Shapes: q `[B, L, N, E]` (L query tokens), k and v `[B, S, N, E]` (S key tokens: video
tokens for self-attention, text tokens for cross-attention). The optional boolean `mask`
broadcasts to `[B, N, L, S]`; True means "may attend". Keys that are masked out get
exactly zero weight; a query whose keys are all masked out gets an all-zero output (never
NaN, never a uniform average over padding).

Packed rows (several clips back to back in one sequence, sora_jax/data/packing.py):
`segment_ids` `[B, L]` (self-attention) or a pair (`[B, L]`, `[B, S]`) keeps only the keys
whose id equals the query's, on top of `mask`: attention is block-diagonal by clip. 'xla'
turns them into a dense mask, 'blockwise' and 'splash' take them as their own segment ids
(no `[L, S]` mask is stored), 'cudnn' refuses them (JAX exposes no packed form of the
cuDNN kernel through `jax.nn.dot_product_attention`), and so do the context-parallel
strategies (`segment_ids_check`).
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sora_jax.models import attention_jvp
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


CUDNN_FIX = (
    "set model.attention_impl='blockwise' (any mask, any platform) or 'auto' (which picks "
    "cuDNN only where it applies)"
)


def _key_padding(mask, q, k) -> jax.Array:
    """A `(q, k, v, mask)` mask as key padding `valid [B, S]` bool, or a ValueError when it
    has a head or query axis (cuDNN takes only sequence lengths)."""
    b, s = q.shape[0], k.shape[1]
    mask = jnp.asarray(mask, bool)
    if mask.ndim > 4:
        raise ValueError(f"attention mask has {mask.ndim} dims; at most 4 ([B, N, L, S])")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # -> [B|1, N|1, L|1, S|1]
    if mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, b):
        raise ValueError(
            f"model.attention_impl='cudnn' takes only key padding masks [B|1, 1, 1, S] (valid "
            f"keys first, as text masks are), got a mask of shape {mask.shape}; {CUDNN_FIX}"
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (b, s))


def _key_padding_or_none(mask, q, k) -> jax.Array:
    """A key padding mask `[B|1, 1, 1, S]` (or `[B|1, S]`-broadcastable) as `[B, S]` bool."""
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(
            f"with segment_ids, a mask must be key padding [B|1, 1, 1, S], got {mask.shape}"
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (q.shape[0], k.shape[1]))


def _is_prefix(valid: jax.Array, lengths: jax.Array) -> jax.Array:
    """`[B]` bool: row b of `valid [B, S]` is its first `lengths[b]` keys and nothing else."""
    return jnp.all(valid == (jnp.arange(valid.shape[1]) < lengths[:, None]), axis=-1)


def cudnn_arguments(q, k, v, mask=None) -> dict:
    """The keyword arguments the cuDNN path passes to `jax.nn.dot_product_attention`
    (besides `implementation`): q, k, v `[B, L|S, N, E]` as they are and, for a key padding
    `mask`, `key_value_seq_lengths [B]` int32 (the number of valid keys, at least 1: a row
    with none is zeroed by the caller) with `query_seq_lengths [B]` = L, which is what
    `jax.nn.dot_product_attention` would fill in. No `mask` or `bias` reaches cuDNN.

    A mask whose values are known here (not traced) must be a prefix per row; a traced one
    is checked by `_cudnn`, which cannot raise under `jit`.
    """
    args = dict(query=q, key=k, value=v)
    if mask is None:
        return args
    valid = _key_padding(mask, q, k)
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [B]
    try:
        concrete = np.asarray(valid)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None and not np.all(_is_prefix(valid, lengths)):
        rows = np.flatnonzero(~np.asarray(_is_prefix(valid, lengths))).tolist()
        raise ValueError(
            f"model.attention_impl='cudnn' needs key padding masks whose valid keys come "
            f"first (cuDNN takes a length per row), but rows {rows} have gaps; pad on the "
            f"right or {CUDNN_FIX}"
        )
    args["query_seq_lengths"] = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    args["key_value_seq_lengths"] = jnp.maximum(lengths, 1)
    return args


def _fused_attention(**kwargs) -> jax.Array:
    """cuDNN flash attention; a seam the tests replace with the XLA implementation of the
    same call (CI has no GPU)."""
    return jax.nn.dot_product_attention(**kwargs, implementation="cudnn")


def _cudnn(q, k, v, mask=None):
    """cuDNN flash attention behind the common `(q, k, v, mask)` call (module docstring)."""
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        raise ValueError(
            f"attention impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; set "
            "model.dtype='bfloat16' or use attention_impl='auto' (falls back to 'blockwise')"
        )
    args = cudnn_arguments(q, k, v, mask)
    out = _fused_attention(**args)
    if mask is not None:
        # A traced mask with gaps would be read as a shorter prefix: poison those rows so
        # the loss says so (NaN) instead of training on the wrong keys.
        valid = _key_padding(mask, q, k)
        ok = _is_prefix(valid, jnp.sum(valid, axis=-1, dtype=jnp.int32))  # [B]
        out = jnp.where(ok[:, None, None, None], out, jnp.asarray(jnp.nan, out.dtype))
    return out


def _splash(q, k, v, mask=None, *, block_size: int = splash_lib.DEFAULT_BLOCK, segment_ids=None):
    """Splash per device: under a mesh, `jax.shard_map` gives each device its own batch rows
    (over the batch axes) and heads (over `tensor`), as a Pallas kernel cannot be partitioned
    by the compiler. Dimensions that do not divide stay whole on every device."""
    kernel = functools.partial(splash_lib.splash_attention, block_size=block_size)
    mesh = jax.sharding.get_abstract_mesh()
    if segment_ids is not None:
        kernel = functools.partial(kernel, segment_ids=segment_ids)
        if not mesh.empty:
            return _splash_segments(q, k, v, mask, block_size, segment_ids, mesh)
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


def _segment_pair(segment_ids):
    """`segment_ids` as `(q_ids [B, L], kv_ids [B, S])` int32 (one array: self-attention)."""
    if isinstance(segment_ids, tuple | list):
        q_ids, kv_ids = segment_ids
    else:
        q_ids = kv_ids = segment_ids
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def segment_mask(segment_ids) -> jax.Array:
    """The dense mask `[B, 1, L, S]` of segment ids: key s kept for query l when their ids
    are equal (what 'xla' computes with; the other kernels never build it)."""
    q_ids, kv_ids = _segment_pair(segment_ids)
    return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def segment_ids_check(impl: str, context_parallel: str) -> None:
    """Raises a ValueError naming the field when packed rows cannot run on this kernel."""
    if impl == "cudnn":
        raise ValueError(
            "model.attention_impl='cudnn' cannot attend within packed rows: JAX exposes no "
            "segment-id (packed) form of the cuDNN kernel; set model.attention_impl to "
            "'blockwise' (GPU and CPU), 'splash' (TPU) or 'xla' for packed training"
        )
    if context_parallel != "none" and context_lib.context_degree() > 1:
        raise ValueError(
            f"model.context_parallel={context_parallel!r} with a context axis > 1 does not "
            "take segment ids yet: packed rows need mesh.ici_context=1 (or "
            "model.context_parallel='none'); shard packed rows over data/fsdp instead"
        )


def _with_segments(impl: str, fn, segment_ids):
    """`fn(q, k, v, mask)` of kernel `impl` that also keeps keys of the query's segment."""
    if impl == "xla":
        return lambda q, k, v, mask: fn(
            q, k, v, segment_mask(segment_ids) if mask is None else mask & segment_mask(segment_ids)
        )
    if impl == "blockwise":
        pair = _segment_pair(segment_ids)
        return lambda q, k, v, mask: blockwise_lib.blockwise_attention(
            q, k, v, segment_ids=pair, **_blockwise_masks(mask, k)
        )
    if impl == "splash":
        return functools.partial(fn, segment_ids=_segment_pair(segment_ids))
    raise ValueError(f"attention impl={impl!r} takes no segment ids")


def _splash_segments(q, k, v, mask, block_size, segment_ids, mesh):
    """`_splash` with segment ids under a mesh: the ids `[B, L]`, `[B, S]` split over the
    batch axes like the rows they label."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    batch = batch_axes if q.shape[0] % math.prod(sizes[a] for a in batch_axes) == 0 else ()
    heads = "tensor" if sizes.get("tensor", 1) > 1 and q.shape[2] % sizes["tensor"] == 0 else None
    qkv_spec, ids_spec = P(batch or None, None, heads, None), P(batch or None, None)
    keys = jnp.ones((q.shape[0], k.shape[1]), bool) if mask is None else mask
    keys = _key_padding_or_none(keys, q, k)  # [B, S]

    def local(q, k, v, keys, q_ids, kv_ids):
        return splash_lib.splash_attention(
            q, k, v, keys[:, None, None, :], block_size=block_size, segment_ids=(q_ids, kv_ids)
        )

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec,) * 3 + (ids_spec,) * 3,
        out_specs=qkv_spec,
        check_vma=False,
    )
    return fn(q, k, v, keys, *segment_ids)


def _forward_mode(whole):
    """A fused kernel `whole(q, k, v, mask[, segment_ids=])` with a JVP rule whose tangent
    is the blockwise kernel's, with the same masks (models/attention_jvp.py; only inside
    `attention_jvp.forward_mode()`, so gradients keep the fused kernel's own backward)."""

    def kernel(q, k, v, masks):
        mask, ids = masks
        return whole(q, k, v, mask) if ids is None else whole(q, k, v, mask, segment_ids=ids)

    def reference(q, k, v, masks):
        mask, ids = masks
        return blockwise_lib.blockwise_attention(
            q, k, v, segment_ids=ids, **_blockwise_masks(mask, k)
        )

    fused = attention_jvp.with_blockwise_jvp(kernel, reference)
    return lambda q, k, v, mask=None, segment_ids=None: fused(q, k, v, (mask, segment_ids))


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
    segment_ids=None,
):
    """Multi-head attention `[B, L, N, E] x [B, S, N, E] -> [B, L, N, E]`.

    `mask`: bool, broadcastable to `[B, N, L, S]` (True = attend), or None (attend to all).
    `segment_ids`: None, or int ids `[B, L]` (self-attention) or `([B, L], [B, S])`: keys
    kept only where their id equals the query's (packed rows; module docstring).
    Rows whose keys are all masked come back as zeros, whatever the implementation.
    `context_parallel`: 'none', 'ulysses', 'allgather' or 'ring' (self-attention, L = S the
    same tokens), or 'queries' (cross-attention); see sora_jax/parallel/context.py.
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
    if context_parallel in context_lib.SELF_ATTENTION and q.shape != k.shape:
        raise ValueError(
            f"context_parallel={context_parallel!r} is for self-attention (q and k of one "
            f"shape), got q {q.shape} and k {k.shape}; use 'queries' for cross-attention"
        )
    local, whole = _LOCAL_FNS[impl], _IMPL_FNS[impl]
    if impl == "splash":
        local = functools.partial(local, block_size=splash_block_size)
        whole = functools.partial(whole, block_size=splash_block_size)
    if impl in ("splash", "cudnn") and attention_jvp.active():
        whole = _forward_mode(whole)  # jax.jvp through the fused kernel (distillation)
    if segment_ids is not None:
        segment_ids_check(impl, context_parallel)
        keys = None if mask is None else _key_padding_or_none(mask, q, k)  # [B, S]
        out = _with_segments(impl, whole, segment_ids)(q, k, v, mask)
        if isinstance(segment_ids, tuple | list) or keys is not None:
            # Queries whose segment has no key (padding tokens, a dropped caption) get zeros.
            q_ids, kv_ids = _segment_pair(segment_ids)
            same = q_ids[:, :, None] == kv_ids[:, None, :]  # [B, L, S]
            if keys is not None:
                same = same & keys[:, None, :]
            out = out * jnp.any(same, axis=-1)[:, :, None, None].astype(out.dtype)
        return out
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


def count_forward_kernels(hlo: str) -> dict[str, int]:
    """Attention forward computations in the text of a compiled program (`.as_text()` of
    `jit(...).lower(...).compile()`), per kernel: 'cudnn', cuDNN's fused forward custom
    calls (`__cudnn$fmha…` without `Backward`; never run on a GPU yet), and 'blockwise',
    the distinct op-name paths of the blockwise kernel's forward
    (`blockwise_attention.FORWARD_SCOPE`; a rematerialized copy has a path of its own)
    among its exponentials, which depend on the scores and so are never hoisted out of a
    loop the way its mask arithmetic can be. Counts are per program text: a scanned stack
    of layers counts its body once. What the remat tests and benchmarks/accelerator.py
    compare.
    """
    cudnn = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo)
    path = re.compile(rf'op_name="([^"]*?/{re.escape(blockwise_lib.FORWARD_SCOPE)})/')
    blockwise = {
        match for line in hlo.splitlines() if "exponential(" in line for match in path.findall(line)
    }
    return {
        "cudnn": sum("Backward" not in target for target in cudnn),
        "blockwise": len(blockwise),
    }
