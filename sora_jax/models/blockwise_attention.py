"""Memory-efficient attention in pure JAX: blocks of queries and keys, an online softmax.

    o = softmax(q kᵀ / sqrt(E) + log keep) v          per batch element and head

with q `[B, L, N, E]`, k and v `[B, S, N, E]`, and `keep [B, N, L, S]` never stored: it is
built per block from structured masks (key padding, segment ids, block-causal ids, or a
dense mask sliced block by block). The `[B, N, L, S]` scores are never materialized either:
memory grows with L·S only through what the caller passes in (Rabe & Staats 2021,
arXiv:2112.05682; FlashAttention, Dao et al. 2022, arXiv:2205.14135). It is the portable
path of `models.attention` (`attention_impl='blockwise'`, what 'auto' picks where no fused
kernel applies) and the local kernel of the context-parallel strategies there.

**Blocks.** S is split into the fewest key blocks of at most `block_kv` columns, of equal
size K (a multiple of 8; an exact split of S when one exists within twice the fewest blocks,
so no padded key needs a mask), and L likewise into query blocks of Q rows, at most
`block_q`, except that all of L is one query block when its scores fit the budget of a
default block (L·K <= block_q·block_kv: short videos, cross-attention to a caption).
L and S are padded to whole blocks; padded keys are masked, padded query rows are dropped.
The blocks are head-major (`[B, N, Q, E]`), so every product below is a batched
`[X, Y] @ [Y, Z]` or `[X, Y] @ [Z, Y]ᵀ` matmul (a matmul that contracts the leading axis of
both operands ran ~3× slower on the CPU of docs/perf.md). A `lax.map` over the L_pad / Q
query blocks runs a `lax.scan` over the S_pad / K key blocks, so one `[B, N, Q, K]` score
block is live at a time.

**Skipped blocks.** With segment ids, block-causal ids or a dense mask, a (query block,
key block) pair where no query keeps any key (another clip of a packed row, a later frame)
is skipped by a `lax.cond` in the forward, the backward and the tangent: packed rows and
causal videos cost the pairs they use, not L·S.

**Forward** (per query block; the online softmax of Milakov & Gimelshein 2018), with
statistics in float32, from m = f32 min, z = 0, acc = 0:

    s     = q k_jᵀ / sqrt(E)                               [B, N, Q, K]
    m'    = max(m, rowmax(s over kept keys))               [B, N, Q]
    p     = exp(s - m') where kept, else exactly 0
    z     = exp(m - m') z + rowsum(p)
    acc   = exp(m - m') acc + p v_j                        [B, N, Q, E]
    o     = acc / z,   lse = m + log z                     (o = 0, lse = f32 min where z = 0)

A query row with no kept key (an all-padding caption, a dropped one) has z = 0 and gets
o = 0, the convention of `models.attention.dot_product_attention`, with finite gradients.

**Reverse mode** is a `jax.custom_vjp`: FlashAttention-2's backward (Dao 2023,
arXiv:2307.08691), key blocks outside and query blocks inside, recomputing P = exp(s - lse)
per block from q, k and the saved lse. With a cotangent dlse of the log-sum-exp (ring
attention merges through it) entering D:

    D  = rowsum(dO ⊙ o) - dlse,   dP = dO v_jᵀ,   dS = P ⊙ (dP - D) / sqrt(E)
    dq = Σ_j dS k_j,   dk_jᵀ = Σ_i q_iᵀ dS,   dv_jᵀ = Σ_i dO_iᵀ P

dkᵀ and dvᵀ are accumulated `[E, K]` from the transposed q and dO blocks (plain matmuls).
Residuals are q, k, v, o and lse: O(L + S).

**Forward mode** (`jax.jvp`, needed by consistency distillation) is a `jax.custom_jvp`
whose tangent rule is itself blockwise and linear in the tangents (dq, dk, dv); with
ds = (dq kᵀ + q dkᵀ) / sqrt(E):

    do   = Σ_j [ (P ⊙ ds) v_j + P dv_j ]  -  o ⊙ r,    r = Σ_j rowsum(P ⊙ ds) = dlse

A function is either a custom VJP or a custom JVP in JAX, so the kernel is the custom JVP
only while traced inside `models.attention_jvp.forward_mode()` (the distillation step opens
it around its one `jax.jvp`; tests/models/test_blockwise_attention.py checks both against
the dense reference). Outside it, `jax.jvp` through the kernel raises JAX's error about
custom_vjp functions: wrap the call in `forward_mode()`.

**Remat.** Under differentiation the forward names o and lse `RESIDUALS`
(`jax.ad_checkpoint.checkpoint_name`, the name the splash kernel gives its own), so a remat
policy that saves that name (`model.remat='save_attention'`, models/dit.py) keeps them and
the backward recomputes only the cheap projections around the kernel, not its forward
scans.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sora_jax.models import attention_jvp
from sora_jax.models.splash import RESIDUALS

# Block sizes: Q × K float32 scores per (sample, head) are live at a time (256 × 2048 × 4 B =
# 2 MiB per head). On the 2-core CPU of docs/perf.md, forward + backward `[2, L, 4, 64]`, keys
# of 2048 against 512 cut the wall time by 10-29% at L = 640 to 4,096 (fewer, larger key blocks
# keep both cores busy inside the loops); of the other pairs benchmarks/cpu_kernels.py tries,
# none is better at every length. Other platforms may prefer other sizes: tune with the
# arguments.
BLOCK_Q, BLOCK_KV = 256, 2048
_MIN = float(jnp.finfo(jnp.float32).min)


class _QMasks(NamedTuple):
    """Per query block (leading axis nq): what decides which keys each query row keeps."""

    segment_ids: jax.Array | None  # [nq, B|1, Q] int
    block_ids: jax.Array | None  # [nq, B|1, Q] int: keeps keys with kv_block_ids <= these
    dense: jax.Array | None  # [nq, nk, B|1, N|1, Q, K] bool


class _KVMasks(NamedTuple):
    """Per key block (leading axis nk)."""

    valid: jax.Array | None  # [nk, B|1, K] bool (key padding and block padding)
    segment_ids: jax.Array | None  # [nk, B|1, K] int
    block_ids: jax.Array | None  # [nk, B|1, K] int
    dense: jax.Array | None  # [nk, B|1, N|1, 1, K] bool: a dense mask without a query axis


def _and(a, b):
    return b if a is None else a & b


def _keep(qm: _QMasks, km: _KVMasks, dense_ij) -> jax.Array | None:
    """`[B|1, N|1, Q|1, K]` bool for one (query block, key block), or None (keep all)."""
    keep = None if km.valid is None else km.valid[:, None, None, :]
    if km.dense is not None:
        keep = _and(keep, km.dense)
    if qm.segment_ids is not None:
        same = qm.segment_ids[:, :, None] == km.segment_ids[:, None, :]  # [B, Q, K]
        keep = _and(keep, same[:, None])
    if qm.block_ids is not None:
        causal = km.block_ids[:, None, :] <= qm.block_ids[:, :, None]  # [B|1, Q, K]
        keep = _and(keep, causal[:, None])
    if dense_ij is not None:
        keep = _and(keep, dense_ij)
    return keep


def _scores(q_scaled, k_j):
    return jnp.einsum("BNQE,BNKE->BNQK", q_scaled, k_j, preferred_element_type=jnp.float32)


def _matmul(a, b):  # [B, N, X, Y] @ [B, N, Y, Z] in float32: the layout fast matmuls want
    return jnp.einsum("BNXY,BNYZ->BNXZ", a, b.astype(a.dtype), preferred_element_type=jnp.float32)


def _scale(q):
    return jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def _probabilities(q_i, k_j, lse_i, keep):
    """P = exp(q kᵀ - lse) of one block, exactly 0 where `keep` is False."""
    shifted = _scores(q_i, k_j) - lse_i[..., None]
    return jnp.exp(shifted if keep is None else jnp.where(keep, shifted, -jnp.inf))


def _when(live, fn, skip, *operands):
    """`fn(*operands)` where the block pair is live, else `skip(*operands)`; no branch when
    every pair is live (`live` None: no structured mask)."""
    return fn(*operands) if live is None else jax.lax.cond(live, fn, skip, *operands)


FORWARD_SCOPE = "blockwise_attention_forward"  # the forward scans' op names (tests count them)


@jax.named_scope(FORWARD_SCOPE)
def _forward(qb, kb, vb, qm: _QMasks, km: _KVMasks, live):
    """o `[nq, B, N, Q, E]` (v's dtype) and lse `[nq, B, N, Q]` float32 from blocked inputs
    (`live` `[nq, nk]` bool or None: which block pairs have a kept key)."""
    scale = _scale(qb)

    def query_block(xs):
        q_i, qm_i, live_i = xs  # [B, N, Q, E]
        q_i = q_i * scale
        b, n, nq_rows, e = q_i.shape

        def key_block(carry, xs):
            k_j, v_j, km_j, dense_ij, live_ij = xs

            def update(carry):
                m, z, acc = carry
                s = _scores(q_i, k_j)  # [B, N, Q, K]
                keep = _keep(qm_i, km_j, dense_ij)
                kept = s if keep is None else jnp.where(keep, s, _MIN)
                m_new = jnp.maximum(m, jnp.max(kept, axis=-1))
                corr = jnp.exp(m - m_new)
                shifted = s - m_new[..., None]
                p = jnp.exp(shifted if keep is None else jnp.where(keep, shifted, -jnp.inf))
                pv = _matmul(p.astype(v_j.dtype), v_j)
                return m_new, corr * z + jnp.sum(p, axis=-1), corr[..., None] * acc + pv

            return _when(live_ij, update, lambda c: c, carry), None

        init = (
            jnp.full((b, n, nq_rows), _MIN, jnp.float32),  # m, running row max
            jnp.zeros((b, n, nq_rows), jnp.float32),  # z, running sum of exp(s - m)
            jnp.zeros((b, n, nq_rows, e), jnp.float32),  # acc, running sum of exp(s - m) v
        )
        (m, z, acc), _ = jax.lax.scan(key_block, init, (kb, vb, km, qm_i.dense, live_i))
        z_safe = jnp.where(z > 0, z, 1.0)
        o = acc / z_safe[..., None]  # [B, N, Q, E]
        lse = jnp.where(z > 0, m + jnp.log(z_safe), _MIN)  # [B, N, Q]
        return o.astype(vb.dtype), lse

    return jax.lax.map(query_block, (qb, qm, live))


# --- Reverse mode: a custom VJP (FlashAttention's backward) ------------------------------


@jax.custom_vjp
def _attention_vjp(qb, kb, vb, qm: _QMasks, km: _KVMasks, live):
    return _forward(qb, kb, vb, qm, km, live)


def _attention_vjp_fwd(qb, kb, vb, qm, km, live):
    ob, lse = _forward(qb, kb, vb, qm, km, live)
    # What the backward needs of the forward, named for remat (module docstring).
    ob, lse = checkpoint_name(ob, RESIDUALS), checkpoint_name(lse, RESIDUALS)
    return (ob, lse), (qb, kb, vb, qm, km, live, ob, lse)


def _attention_vjp_bwd(residuals, cotangents):
    """dq, dk, dv by key block (outer scan) and query block (inner scan); dKᵀ and dVᵀ are
    accumulated transposed, `[E, K]`, so every product is a plain `[X, Y] @ [Y, Z]` matmul
    (a transposed operand runs ~3x slower on the CPU; docs/perf.md)."""
    qb, kb, vb, qm, km, live, ob, lse = residuals
    dob, dlse = cotangents
    scale = _scale(qb)
    # D = rowsum(dO ⊙ o) - dlse: a cotangent of lse adds to every score's, dS = P ⊙ (dP - D).
    delta = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1) - dlse
    qs = qb * scale
    qs_t, do_t = jnp.swapaxes(qs, -1, -2), jnp.swapaxes(dob, -1, -2)  # [nq, B, N, E, Q]
    by_key = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # [nq, nk, ...] -> [nk, nq]

    def key_block(dq, xs):
        k_j, v_j, km_j, dense_j, live_j = xs

        def query_block(carry, xs):
            q_i, q_t, do_i, do_t_i, lse_i, d_i, qm_i, dense_ij, live_ij = xs

            def grads(carry):
                dk_t, dv_t = carry
                p = _probabilities(q_i, k_j, lse_i, _keep(qm_i, km_j, dense_ij))
                dv_t = dv_t + _matmul(do_t_i, p)  # [E, Q] @ [Q, K]
                ds = p * (_scores(do_i, v_j) - d_i[..., None])  # dP = dO vᵀ
                dk_t = dk_t + _matmul(q_t, ds)
                return (dk_t, dv_t), _matmul(ds, k_j)  # dq_i = dS k

            skip = lambda c: (c, jnp.zeros(q_i.shape, jnp.float32))
            return _when(live_ij, grads, skip, carry)

        zeros = jnp.zeros(jnp.swapaxes(k_j, -1, -2).shape, jnp.float32)  # [B, N, E, K]
        xs = (qs, qs_t, dob, do_t, lse, delta, qm._replace(dense=None), dense_j, live_j)
        (dk_t, dv_t), dq_j = jax.lax.scan(query_block, (zeros, zeros), xs)
        return dq + dq_j, (dk_t, dv_t)

    xs = (kb, vb, km, by_key(qm.dense), by_key(live))
    dq, (dk_t, dv_t) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), xs)
    dk, dv = jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)
    return (dq * scale).astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None


_attention_vjp.defvjp(_attention_vjp_fwd, _attention_vjp_bwd)


# --- Forward mode: a custom JVP, blockwise and linear in the tangents --------------------


def _tangent(qb, kb, vb, qm, km, live, ob, lse, dqb, dkb, dvb):
    """(do `[nq, B, N, Q, E]`, dlse `[nq, B, N, Q]`): the rule of the module docstring."""
    scale = _scale(qb)

    def query_block(xs):
        q_i, dq_i, o_i, lse_i, qm_i, live_i = xs
        q_i, dq_i = q_i * scale, dq_i * scale

        def key_block(carry, xs):
            k_j, v_j, dk_j, dv_j, km_j, dense_ij, live_ij = xs

            def update(carry):
                acc, r = carry
                p = _probabilities(q_i, k_j, lse_i, _keep(qm_i, km_j, dense_ij))
                pds = p * (_scores(dq_i, k_j) + _scores(q_i, dk_j))  # P ⊙ ds
                acc = acc + _matmul(pds.astype(v_j.dtype), v_j) + _matmul(p, dv_j)
                return acc, r + jnp.sum(pds, axis=-1)

            return _when(live_ij, update, lambda c: c, carry), None

        b, n, nq_rows, e = q_i.shape
        init = (jnp.zeros((b, n, nq_rows, e), jnp.float32), jnp.zeros((b, n, nq_rows), jnp.float32))
        xs = (kb, vb, dkb, dvb, km, qm_i.dense, live_i)
        (acc, r), _ = jax.lax.scan(key_block, init, xs)
        do = acc - r[..., None] * o_i.astype(jnp.float32)
        return do.astype(ob.dtype), r

    return jax.lax.map(query_block, (qb, dqb, ob, lse, qm, live))


@jax.custom_jvp
def _attention_jvp(qb, kb, vb, qm: _QMasks, km: _KVMasks, live):
    return _forward(qb, kb, vb, qm, km, live)


@_attention_jvp.defjvp
def _attention_jvp_rule(primals, tangents):
    qb, kb, vb, qm, km, live = primals
    dqb, dkb, dvb = tangents[:3]  # the masks are integer/bool: no tangents
    ob, lse = _forward(qb, kb, vb, qm, km, live)
    return (ob, lse), _tangent(qb, kb, vb, qm, km, live, ob, lse, dqb, dkb, dvb)


def _blocked_attention(qb, kb, vb, qm: _QMasks, km: _KVMasks, live):
    """Reverse mode by the custom VJP; forward mode (inside `attention_jvp.forward_mode()`,
    where the distillation step takes its `jax.jvp`) by the custom JVP."""
    kernel = _attention_jvp if attention_jvp.active() else _attention_vjp
    return kernel(qb, kb, vb, qm, km, live)


# --- Padding to whole blocks and the public functions -------------------------------------


def _live(qm: _QMasks, km: _KVMasks, nq: int, nk: int) -> jax.Array | None:
    """`[nq, nk]` bool: False where no query of block i can keep any key of block j, so the
    kernel skips the pair (packed rows: other clips' blocks; block-causal: future frames).
    Segment ids are compared by their range per block (exact for the contiguous segments of
    packed rows, and never skips a pair that has a kept key). None when no mask but key
    padding is given: every pair is computed, without a branch."""
    if qm.segment_ids is None and qm.block_ids is None and qm.dense is None and km.dense is None:
        return None
    live = True
    any_b = lambda x: jnp.any(x, axis=-1)  # over the batch axis
    if qm.segment_ids is not None:
        q_lo, q_hi = jnp.min(qm.segment_ids, -1), jnp.max(qm.segment_ids, -1)  # [nq, B]
        k_lo, k_hi = jnp.min(km.segment_ids, -1), jnp.max(km.segment_ids, -1)  # [nk, B]
        lo = jnp.maximum(q_lo[:, None], k_lo[None])
        live = live & any_b(lo <= jnp.minimum(q_hi[:, None], k_hi[None]))
    if qm.block_ids is not None:  # some query's id at least some key's
        q_hi, k_lo = jnp.max(qm.block_ids, -1), jnp.min(km.block_ids, -1)  # [nq, B|1], [nk, B|1]
        live = live & any_b(q_hi[:, None] >= k_lo[None])
    if km.valid is not None:
        live = live & jnp.any(km.valid, axis=(1, 2))[None, :]
    if km.dense is not None:
        live = live & jnp.any(km.dense, axis=(1, 2, 3, 4))[None, :]
    if qm.dense is not None:
        live = live & jnp.any(qm.dense, axis=(2, 3, 4, 5))
    return jnp.broadcast_to(live, (nq, nk))


def _pad(x, axis: int, length: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _split(x, axis: int, block: int):
    """Pads `axis` to whole blocks and moves the block index to the front:
    `[..., L, ...]` -> `[L_pad / block, ..., block, ...]`."""
    length = -(-x.shape[axis] // block) * block
    x = _pad(x, axis, length)
    x = x.reshape(*x.shape[:axis], length // block, block, *x.shape[axis + 1 :])  # split L
    return jnp.moveaxis(x, axis, 0)


def _block(length: int, block: int) -> int:
    """The size of the fewest equal blocks of at most `block` covering `length`, rounded up
    to a multiple of 8 where that stays within `block`; an exact split into multiples of 8
    (up to twice as many blocks) when there is one, so no padded key needs a mask. Equal
    blocks waste less on padding than blocks of `block`: 320 tokens in blocks of 256 are two
    blocks of 160, not 512 rows of which 192 are padding (docs/perf.md, "CPU step against
    PyTorch")."""
    block = max(1, min(block, length))
    count = -(-length // block)
    for m in range(count, 2 * count + 1):  # an exact split (no padded keys to mask) if any
        if length % m == 0 and (length // m) % 8 == 0:
            return length // m
    size = -(-length // count)  # ceil(length / number of blocks)
    return min(block, -(-size // 8) * 8) if size > 8 else size


def block_shape(lq: int, s: int, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV):
    """`(Q, K)`: the query and key block sizes the kernel uses for L = `lq` queries and
    S = `s` keys (module docstring, "Blocks")."""
    bk = _block(s, block_kv)
    return (lq if lq * bk <= block_q * block_kv else _block(lq, block_q)), bk


def _pair(ids, name: str):
    """`ids` as (query ids, key ids): a pair as given, or one array for self-attention."""
    if ids is None:
        return None, None
    if isinstance(ids, tuple | list):
        if len(ids) != 2:
            raise ValueError(f"{name} must be one array or a (q_ids, kv_ids) pair")
        return jnp.asarray(ids[0]), jnp.asarray(ids[1])
    return jnp.asarray(ids), jnp.asarray(ids)


def _ids_2d(ids, length: int, name: str):
    """Integer ids `[L]`, `[1, L]` or `[B, L]` as `[B|1, L]` int32."""
    ids = jnp.asarray(ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] != length:
        raise ValueError(f"{name} has shape {ids.shape}; expected [B, {length}] or [{length}]")
    return ids.astype(jnp.int32)


def frame_causal_ids(frames: int, tokens_per_frame: int) -> jax.Array:
    """Block-causal ids `[frames · tokens_per_frame]` for tokens in (t, h, w) order: token i
    belongs to frame i // tokens_per_frame, and a query attends to keys of its own frame and
    the frames before it (`block_causal=frame_causal_ids(T', H' W')`)."""
    return jnp.repeat(jnp.arange(frames, dtype=jnp.int32), tokens_per_frame)


def blockwise_attention_with_lse(
    q,
    k,
    v,
    *,
    kv_mask=None,
    segment_ids=None,
    block_causal=None,
    mask=None,
    block_q: int = BLOCK_Q,
    block_kv: int = BLOCK_KV,
):
    """`(o [B, L, N, E], lse [B, N, L] float32)`: attention and each row's log-sum-exp.

    q `[B, L, N, E]`, k and v `[B, S, N, E]`. A key is kept for a query when every given
    mask keeps it:
      kv_mask       `[B|1, S]` bool, True = a real key (key padding, a caption's length);
      segment_ids   `[B, L]` (self-attention) or a pair (`[B, L]`, `[B, S]`) of ints: only
                    keys of the query's own segment (packed sequences);
      block_causal  `[L]`/`[B|1, L]` (self-attention) or a pair of ints: keys whose id is at
                    most the query's (frames of a long video: `frame_causal_ids`);
      mask          a dense bool mask broadcastable to `[B, N, L, S]`, sliced per block (it
                    is the caller's L·S bytes; prefer the structured masks above).
    Rows that keep no key give o = 0 and lse = f32 min. Both outputs are differentiable
    (forward and reverse mode); `lse` lets callers merge attention over key subsets (ring
    attention): o = Σ_j exp(lse_j - lse) o_j, lse = logsumexp_j lse_j.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::3] != k.shape[::3]:
        raise ValueError(
            f"attention expects q [B, L, N, E] and k, v [B, S, N, E] with equal B and E, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    b, lq, n, _ = q.shape
    s = k.shape[1]
    bq, bk = block_shape(lq, s, block_q, block_kv)
    lp, sp = -(-lq // bq) * bq, -(-s // bk) * bk

    valid = None
    if kv_mask is not None:
        valid = jnp.asarray(kv_mask, bool)
        valid = valid[None] if valid.ndim == 1 else valid
        if valid.ndim != 2 or valid.shape[1] != s or valid.shape[0] not in (1, b):
            raise ValueError(f"kv_mask has shape {valid.shape}; expected [{b}, {s}]")
    if sp > s:  # keys padded to whole blocks: masked
        valid = (jnp.arange(sp) < s)[None] if valid is None else _pad(valid, 1, sp, False)
    q_seg, kv_seg = _pair(segment_ids, "segment_ids")
    q_blk, kv_blk = _pair(block_causal, "block_causal")
    if q_seg is not None:
        q_seg, kv_seg = _ids_2d(q_seg, lq, "segment_ids"), _ids_2d(kv_seg, s, "segment_ids")
    if q_blk is not None:
        q_blk, kv_blk = _ids_2d(q_blk, lq, "block_causal"), _ids_2d(kv_blk, s, "block_causal")

    kv_dense = qkv_dense = None
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if any(m not in (1, f) for m, f in zip(mask.shape, (b, n, lq, s), strict=True)):
            raise ValueError(f"attention mask {mask.shape} does not broadcast to [B, N, L, S]")
        mask = jnp.broadcast_to(mask, (*mask.shape[:3], s))
        if mask.shape[2] == 1:  # no query axis: a per-key mask, blocked with the keys
            kv_dense = _split(mask, 3, bk)  # [nk, B|1, N|1, 1, K]
        else:  # [B|1, N|1, L, S] -> [nq, nk, B|1, N|1, Q, K]
            qkv_dense = _split(_split(mask, 3, bk), 3, bq)

    split_q = lambda x: None if x is None else _split(x, 1, bq)
    split_kv = lambda x: None if x is None else _split(x, 1, bk)
    qm = _QMasks(split_q(q_seg), split_q(q_blk), qkv_dense)
    km = _KVMasks(
        None if valid is None else jnp.moveaxis(valid.reshape(valid.shape[0], sp // bk, bk), 1, 0),
        split_kv(kv_seg),
        split_kv(kv_blk),
        kv_dense,
    )
    heads = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, L, N, E] <-> [B, N, L, E]
    qb, kb, vb = _split(heads(q), 2, bq), _split(heads(k), 2, bk), _split(heads(v), 2, bk)
    ob, lse = _blocked_attention(qb, kb, vb, qm, km, _live(qm, km, lp // bq, sp // bk))
    o = heads(jnp.moveaxis(ob, 0, 2).reshape(b, n, lp, -1)[:, :, :lq])  # [nq, B, N, Q, E]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, n, lp)[..., :lq]  # [nq, B, N, Q] -> [B, N, L]
    return o, lse


def blockwise_attention(q, k, v, **kwargs) -> jax.Array:
    """`o [B, L, N, E]` for q `[B, L, N, E]`, k and v `[B, S, N, E]`: the masks and block
    sizes of `blockwise_attention_with_lse`, without the log-sum-exp."""
    return blockwise_attention_with_lse(q, k, v, **kwargs)[0]
