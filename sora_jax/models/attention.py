"""The one place attention is computed: `dot_product_attention(q, k, v, mask, impl)`.

    o = softmax(q kᵀ / sqrt(E) + log mask) v,      per batch element and head.

Every attention in the model (video self-attention, text cross-attention) calls this
function, so it is the seam where kernels (cuDNN flash, Pallas splash) and context-parallel
strategies (Ulysses all-to-all, ring attention over `jax.shard_map`) plug in (DESIGN.md §5).

Shapes: q `[B, L, N, E]` (L query tokens), k and v `[B, S, N, E]` (S key tokens: video
tokens for self-attention, text tokens for cross-attention). The optional boolean `mask`
broadcasts to `[B, N, L, S]`; True means "may attend". Keys that are masked out get
exactly zero weight; a query whose keys are all masked out gets an all-zero output (never
NaN, never a uniform average over padding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "splash", "auto")
# cuDNN's fused attention only takes half-precision inputs.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_impl(impl: str, dtype=jnp.float32, backend: str | None = None) -> str:
    """The concrete implementation for `impl` ('auto' picks by platform and dtype)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is unknown; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return "cudnn"
    # TPU splash attention is not wired in yet (see `_splash`): XLA is correct everywhere.
    return "xla"


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


def _cudnn(q, k, v, mask=None):
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        raise ValueError(
            f"attention impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; set "
            "model.dtype='bfloat16' or use attention_impl='auto' (falls back to 'xla')"
        )
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _splash(q, k, v, mask=None):
    del q, k, v, mask
    backend = jax.default_backend()
    where = "on TPU only" if backend != "tpu" else "but is not wired into sora_jax yet"
    raise NotImplementedError(
        f"attention impl='splash' (Pallas splash attention) runs {where}; this backend is "
        f"{backend!r}: use attention_impl='xla' or 'auto'"
    )


_IMPL_FNS = {"xla": xla_attention, "cudnn": _cudnn, "splash": _splash}


def dot_product_attention(q, k, v, mask=None, impl: str = "xla"):
    """Multi-head attention `[B, L, N, E] x [B, S, N, E] -> [B, L, N, E]`.

    `mask`: bool, broadcastable to `[B, N, L, S]` (True = attend), or None (attend to all).
    Rows whose keys are all masked come back as zeros, whatever the implementation.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::3] != k.shape[::3]:
        raise ValueError(
            f"attention expects q [B, L, N, E] and k, v [B, S, N, E] with equal B and E, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    out = _IMPL_FNS[resolve_impl(impl, q.dtype)](q, k, v, mask)
    if mask is not None:
        # Fully masked query rows: zero output instead of an average over padding.
        any_key = jnp.any(jnp.broadcast_to(mask, (*mask.shape[:-1], k.shape[1])), axis=-1)
        any_key = jnp.broadcast_to(any_key, (q.shape[0], q.shape[2], q.shape[1]))  # [B, N, L]
        out = out * jnp.transpose(any_key, (0, 2, 1))[..., None].astype(out.dtype)
    return out
