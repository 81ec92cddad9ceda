"""Context (sequence) parallel attention over the mesh axis `context` (docs/parallelism.md).

The video tokens of one sample are split over the C devices of a context group: device
c holds the block of Lc = L_pad / C consecutive tokens `[c Lc, (c + 1) Lc)` of q, k and v
(`[B, Lc, N, E]`, with the batch over ('data', 'fsdp') and the heads over `tensor` as the
logical rules put them). Self-attention needs every key for every query; three strategies
bring them together, all exact (the same numbers as full attention, up to float rounding):

**Ulysses** (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509) trades the sequence
split for a head split with an all-to-all, attends locally, and trades back:

    q, k, v  [B, Lc, N, E] --all_to_all--> [B, L_pad, N / C, E]
    o = attend(q, k, v, mask)              [B, L_pad, N / C, E]   (any kernel: blockwise, cudnn, …)
    o        [B, L_pad, N / C, E] --all_to_all--> [B, Lc, N, E]

Four all-to-alls per attention, each moving 1/C of a tensor; N (heads per tensor shard)
must be divisible by C.

**Ring** (Liu et al. 2023, arXiv:2310.01889) keeps the queries in place and passes the
key/value blocks round the ring with `ppermute`: at step i = 0 … C-1 device c holds the
block j = (c - i) mod C. The softmax over all keys is accumulated block by block with the
online softmax (Milakov & Gimelshein 2018; FlashAttention), statistics in float32:

    s_i   = q k_jᵀ / sqrt(E), masked keys -> f32 min           [B, N, Lc, Lc]
    m_i   = max(m_{i-1}, rowmax(s_i))                           [B, N, Lc, 1]
    corr  = exp(m_{i-1} - m_i),   p_i = exp(s_i - m_i)
    z_i   = corr · z_{i-1} + rowsum(p_i)                        [B, N, Lc, 1]
    acc_i = corr · acc_{i-1} + p_i v_j                          [B, N, Lc, E]
    o     = acc_{C-1} / z_{C-1}

from m_{-1} = f32 min, z_{-1} = 0, acc_{-1} = 0. By induction acc_i = Σ exp(s - m_i) v and
z_i = Σ exp(s - m_i) over the blocks seen so far, so o = softmax(s) v over all keys. A
masked key's exp(min - m_i) underflows to exactly 0 once any real key has been seen
(and a block seen before it is wiped by corr = exp(min - m_i) = 0), as in `xla_attention`.
m is a constant to autodiff (`stop_gradient`): o does not depend on it. This einsum step
holds O(Lc²) scores per head; it is what the ring runs with the dense reference kernel
(`attention_impl='xla'`).

With any other kernel the caller passes `attend_lse(q, k_j, v_j, keep) -> (o_j, lse_j)`, a
memory-efficient kernel that also returns each row's log-sum-exp over the block's keys
(models/blockwise_attention.py: scores in small tiles, never `[Lc, Lc]`), and the ring
merges the blocks by their log-sum-exps, the same online softmax one level up:

    lse_i = logaddexp(lse_{i-1}, lse_j)                        [B, N, Lc]
    o_i   = exp(lse_{i-1} - lse_i) o_{i-1} + exp(lse_j - lse_i) o_j

(a row that keeps no key in a block has o_j = 0 and lse_j = f32 min, so it gets weight 0
there). The forward pass holds one K/V block per device (two while the next arrives); the
C - 1 block passes can overlap the previous block's matmuls. Gradients are plain autodiff
through the unrolled steps (ppermute transposes to the reverse permute): the einsum step
is rematerialized and the kernel keeps only its inputs and (o_j, lse_j), so the backward
keeps no scores, but it does keep the C K/V blocks it saw (this device's heads of the whole
K/V). A custom VJP that passes K/V round the ring again in the backward (as the Ring
Attention paper does) would remove that; not done here.

**All-gather** ('allgather'; what MaxText runs on GPUs) keeps the queries in place and
gathers the whole K/V of this device's heads, then attends with the per-device kernel:

    k, v  [B, Lc, N, E] --all_gather--> [B, L_pad, N, E]
    o = attend(q, k, v, mask)           [B, Lc, N, E]     (any kernel: cudnn, blockwise, …)

One all-gather each for k and v forward (their transpose, a reduce-scatter, backward), each
moving (C - 1)/C of K/V; no head constraint. It holds the whole K/V of its heads (2 L N E
values per sample, small next to the activations of a block) and runs one fused kernel
call instead of C small ones, which is why it suits cuDNN: the ring's per-block merge needs
a kernel that returns its log-sum-exp. The gathers can overlap the projections of the
queries only as far as XLA's scheduler moves them.

**Queries only** ('queries', for cross-attention): q keeps its sequence split, k and v
(the short text) are whole on every device; no communication.

**Padding.** When L is not divisible by C, q, k, v are zero-padded to L_pad = ⌈L / C⌉ C;
the padded keys are masked out and the padded query rows are dropped from the output, so
every bucket's token count works on every context degree.

Without a mesh, or with a `context` axis of size 1, `context_degree()` is 1 and the caller
(`models.attention.dot_product_attention`) runs the plain kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "context"
# Values of `model.context_parallel` (video self-attention); 'queries' is what the model's
# cross-attention uses when one of the other two is on.
STRATEGIES = ("none", "ulysses", "allgather", "ring")
MODES = (*STRATEGIES, "queries")
# The strategies that split self-attention (q and k the same tokens).
SELF_ATTENTION = ("ulysses", "allgather", "ring")
_MIN = float(jnp.finfo(jnp.float32).min)

Attend = Callable[..., jax.Array]  # (q, k, v, mask) -> o, all per device
# (q, k, v, mask) -> (o [B, L, N, E], lse [B, N, L] float32), per device
AttendLSE = Callable[..., tuple[jax.Array, jax.Array]]


def config_errors(
    strategy: str,
    shape: dict[str, int] | None,
    bucket_tokens: dict[str, int],
    num_heads: Callable[[], int],
) -> list[str]:
    """`model.context_parallel` against the mesh `shape` and each bucket's video tokens L
    (docs/parallelism.md).

    Token counts need no divisibility: every strategy pads L to a multiple of the context
    size C and mask the padding. Ulysses splits each tensor shard's heads over C, so those
    must divide; a bucket with fewer tokens than C would leave devices holding only padding.
    `num_heads()` gives the model's N; it is asked only when the context axis is split,
    and a ValueError it raises (a bad model section) is reported as the error.
    """
    if strategy not in STRATEGIES:
        return [f"model.context_parallel={strategy!r} is unknown; choose one of {STRATEGIES}"]
    if strategy == "none" or shape is None or shape["context"] == 1:
        return []
    c, t = shape["context"], shape["tensor"]
    errors = []
    try:
        heads = num_heads()
    except ValueError as e:
        return [str(e)]
    # Heads a tensor shard holds: split over `tensor` only when it divides them.
    per_shard = heads // t if heads % t == 0 else heads
    if strategy == "ulysses" and per_shard % c:
        errors.append(
            f"model.context_parallel='ulysses' splits the {per_shard} heads of each tensor shard "
            f"(model.num_heads={heads}, mesh tensor={t}) over mesh context={c}, which does not "
            f"divide; make num_heads / tensor a multiple of {c}, change mesh.ici_context / "
            f"dcn_context, or use model.context_parallel='allgather' or 'ring'"
        )
    for name, tokens in bucket_tokens.items():
        if tokens < c:
            errors.append(
                f"data.buckets.{name}: {tokens} video tokens over mesh context={c} leave "
                f"{c - tokens} devices holding only padding; use a context size of at most "
                f"{tokens} (mesh.ici_context / dcn_context) or drop the bucket"
            )
    return errors


def _axis_sizes() -> dict[str, int]:
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def context_degree() -> int:
    """C, the size of the current mesh's `context` axis (1 without a mesh)."""
    return _axis_sizes().get(AXIS, 1)


def _layout(b: int, n: int):
    """(batch spec entry, heads spec entry, heads per device before any all-to-all).

    Batch over ('data', 'fsdp') and heads over `tensor`, as DEFAULT_RULES put activations;
    a dimension those axes do not divide stays whole (each device computes it, correctly).
    """
    sizes = _axis_sizes()
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    batch_ok = batch_axes and b % math.prod(sizes[a] for a in batch_axes) == 0
    tensor = sizes.get("tensor", 1)
    heads_ok = tensor > 1 and n % tensor == 0
    return (
        (batch_axes if batch_ok else None),
        ("tensor" if heads_ok else None),
        n // (tensor if heads_ok else 1),
    )


def _as_4d_mask(mask, q, k):
    """`mask` broadcastable to `[B, N, L, S]` as `[B|1, N|1, L|1, S]` bool (S explicit)."""
    b, lq, n, _ = q.shape
    s = k.shape[1]
    mask = jnp.asarray(mask, bool)
    if mask.ndim > 4:
        raise ValueError(f"attention mask has {mask.ndim} dims; at most 4 ([B, N, L, S])")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    for size, full in zip(mask.shape, (b, n, lq, s), strict=True):
        if size not in (1, full):
            raise ValueError(f"attention mask {mask.shape} does not broadcast to [B, N, L, S]")
    return jnp.broadcast_to(mask, (*mask.shape[:3], s))


def _pad(x, axis: int, length: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _shard_map(fn, in_specs, out_spec):
    # check_vma=False: the per-device kernels include Pallas calls (splash), which carry no
    # replication rules; gradients are still right (shard_map psums the cotangents of
    # inputs over the axes their spec leaves out).
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)


def _mask_spec(mask, full_shape, entries) -> P:
    """A mask dimension is split like the tensor it indexes only where it has full size."""
    return P(*(e if m == f and m > 1 else None for m, f, e in zip(mask.shape, full_shape, entries)))


def _pad_self_attention(q, k, v, mask, c: int):
    """Pads the token axis of q, k, v `[B, L, N, E]` to L_pad = ⌈L / C⌉ C; masks padded keys.

    Returns q, k, v `[B, L_pad, N, E]` and a `[B|1, N|1, L_pad|1, L_pad]` mask (or None
    when nothing is masked). Padded query rows see only real keys; callers drop them.
    """
    b, length = q.shape[:2]
    if mask is not None:
        mask = _as_4d_mask(mask, q, k)
    lp = -(-length // c) * c
    if lp == length:
        return q, k, v, mask
    q, k, v = (_pad(x, 1, lp) for x in (q, k, v))
    if mask is None:
        mask = (jnp.arange(lp) < length)[None, None, None, :]  # [1, 1, 1, L_pad]
    else:
        mask = _pad(mask, 3, lp, False)  # padded keys: masked
        if mask.shape[2] > 1:
            mask = _pad(mask, 2, lp, True)  # padded queries: any value, they are dropped
    return q, k, v, mask


def ulysses_attention(q, k, v, mask=None, *, attend: Attend) -> jax.Array:
    """Self-attention `[B, L, N, E]` with all-to-alls between sequence and head splits.

    `attend(q, k, v, mask)` is the per-device kernel; it sees `[B, L_pad, N / C, E]` and a
    mask `[B|1, N/C|1, L_pad|1, L_pad]` (key padding stays `[B|1, 1, 1, L_pad]`, which
    splash needs).
    """
    c, (b, length, n, _) = context_degree(), q.shape
    batch, heads, n_local = _layout(b, n)
    if n_local % c:
        raise ValueError(
            f"context_parallel='ulysses' splits each device's {n_local} heads (num_heads={n} "
            f"over tensor) across context={c} devices, which does not divide; choose "
            f"model.num_heads / mesh tensor size divisible by the context size, a smaller "
            f"context size, or context_parallel='allgather' or 'ring'"
        )
    q, k, v, mask = _pad_self_attention(q, k, v, mask, c)
    lp = q.shape[1]
    qkv_spec = P(batch, AXIS, heads, None)

    def body(q, k, v, mask):  # q, k, v [B, Lc, N, E] per device
        # tiled all_to_all: split the heads into C chunks, chunk c goes to device c, which
        # concatenates the sequence blocks it receives in device order (= token order).
        to_heads = lambda x: jax.lax.all_to_all(x, AXIS, 2, 1, tiled=True)
        q, k, v = to_heads(q), to_heads(k), to_heads(v)  # [B, L_pad, N / C, E]
        if mask is not None and mask.shape[1] > 1:  # a per-head mask: this device's heads
            h = q.shape[2]
            mask = jax.lax.dynamic_slice_in_dim(mask, jax.lax.axis_index(AXIS) * h, h, axis=1)
        o = attend(q, k, v, mask)  # [B, L_pad, N / C, E]
        return jax.lax.all_to_all(o, AXIS, 1, 2, tiled=True)  # -> [B, Lc, N, E]

    if mask is None:
        fn = lambda q, k, v: body(q, k, v, None)
        args, specs = (q, k, v), (qkv_spec,) * 3
    else:  # the whole mask on every context device: it indexes the full sequence
        full = (b, n, lp, lp)
        fn, args = body, (q, k, v, mask)
        specs = (qkv_spec,) * 3 + (_mask_spec(mask, full, (batch, heads, None, None)),)
    out = _shard_map(fn, specs, qkv_spec)(*args)
    return out[:, :length]  # drop padded query rows


@jax.checkpoint
def _ring_step(q, k, v, keep, m, z, acc):
    """One online-softmax update with the block (k, v) `[B, Lc, N, E]`; `keep` masks its keys.

    Rematerialized (`jax.checkpoint`): the backward pass recomputes this step's scores
    `[B, N, Lc, Lc]` instead of keeping all C of them, i.e. a full `[Lc, L]` score matrix.
    """
    s = jnp.einsum("BLNE,BSNE->BNLS", q, k, preferred_element_type=jnp.float32)
    if keep is not None:
        s = jnp.where(keep, s, _MIN)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True)))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)  # [B, N, Lc, Lc] in [0, 1]
    z = corr * z + jnp.sum(p, axis=-1, keepdims=True)
    pv = jnp.einsum("BNLS,BSNE->BNLE", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, z, corr * acc + pv


def _ring_body(q, k, v, mask, *, c: int, attend_lse: AttendLSE | None = None):
    """One device's ring attention. q, k, v `[B, Lc, N, E]`; mask `[B|1, N|1, Lc|1, L_pad]`
    (keys over the whole padded sequence, sliced per step) or None. -> `[B, Lc, N, E]`."""
    if attend_lse is not None:
        return _ring_body_lse(q, k, v, mask, c=c, attend_lse=attend_lse)
    b, lq, n, e = q.shape
    lc = k.shape[1]
    index = jax.lax.axis_index(AXIS)
    q = q * jnp.asarray(1.0 / math.sqrt(e), q.dtype)
    m = jnp.full((b, n, lq, 1), _MIN, jnp.float32)  # running max
    z = jnp.zeros((b, n, lq, 1), jnp.float32)  # running sum of exp(s - m)
    acc = jnp.zeros((b, n, lq, e), jnp.float32)  # running sum of exp(s - m) v
    perm = [(j, (j + 1) % c) for j in range(c)]  # block j moves to device j + 1
    for i in range(c):  # c is static and small: unrolled, so XLA overlaps permute and matmul
        keep = None
        if mask is not None:
            src = (index - i) % c  # the block this device holds at step i
            keep = jax.lax.dynamic_slice_in_dim(mask, src * lc, lc, axis=3)
        m, z, acc = _ring_step(q, k, v, keep, m, z, acc)
        if i < c - 1:
            k, v = jax.lax.ppermute((k, v), AXIS, perm)
    # z >= 1: the row maximum contributes exp(0) (a fully masked row averages its values;
    # dot_product_attention zeroes such rows).
    return jnp.transpose(acc / z, (0, 2, 1, 3)).astype(v.dtype)  # [B, N, Lc, E] -> [B, Lc, N, E]


def _ring_body_lse(q, k, v, mask, *, c: int, attend_lse: AttendLSE):
    """`_ring_body` with a kernel that returns the log-sum-exp: blocks merged by their lse."""
    lc = k.shape[1]
    index = jax.lax.axis_index(AXIS)
    perm = [(j, (j + 1) % c) for j in range(c)]  # block j moves to device j + 1
    o = lse = None
    for i in range(c):  # unrolled, as in _ring_body
        keep = None
        if mask is not None:
            src = (index - i) % c  # the block this device holds at step i
            keep = jax.lax.dynamic_slice_in_dim(mask, src * lc, lc, axis=3)
        o_j, lse_j = attend_lse(q, k, v, keep)  # [B, Lc, N, E], [B, N, Lc]
        o_j = o_j.astype(jnp.float32)
        if o is None:
            o, lse = o_j, lse_j
        else:
            lse_new = jnp.logaddexp(lse, lse_j)
            weight = lambda x, lse_new=lse_new: jnp.transpose(jnp.exp(x - lse_new), (0, 2, 1))
            o = weight(lse)[..., None] * o + weight(lse_j)[..., None] * o_j  # [B, Lc, N, E]
            lse = lse_new
        if i < c - 1:
            k, v = jax.lax.ppermute((k, v), AXIS, perm)
    return o.astype(v.dtype)


def ring_attention(
    q, k, v, mask=None, *, attend: Attend | None = None, attend_lse: AttendLSE | None = None
) -> jax.Array:
    """Self-attention `[B, L, N, E]` with K/V blocks passed round the `context` ring.

    Per block: `attend_lse` (a kernel returning `(o_j, lse_j)`) merged by log-sum-exp, or
    without one the einsum online softmax of the module docstring (float32 statistics,
    `[Lc, Lc]` scores per step). `attend` is accepted for a uniform signature and not used:
    a fused kernel would have to return its softmax statistics to be combined.
    """
    del attend
    c, (b, length, n, _) = context_degree(), q.shape
    batch, heads, _ = _layout(b, n)
    q, k, v, mask = _pad_self_attention(q, k, v, mask, c)
    lp = q.shape[1]
    qkv_spec = P(batch, AXIS, heads, None)
    body = functools.partial(_ring_body, c=c, attend_lse=attend_lse)
    if mask is None:
        fn = lambda q, k, v: body(q, k, v, None)
        args, specs = (q, k, v), (qkv_spec,) * 3
    else:  # the query dimension split like q, the key dimension whole (sliced per step)
        fn = body
        args = (q, k, v, mask)
        specs = (qkv_spec,) * 3 + (_mask_spec(mask, (b, n, lp, lp), (batch, heads, AXIS, None)),)
    out = _shard_map(fn, specs, qkv_spec)(*args)
    return out[:, :length]  # drop padded query rows


def allgather_attention(q, k, v, mask=None, *, attend: Attend) -> jax.Array:
    """Self-attention `[B, L, N, E]`: local queries against K/V all-gathered over `context`.

    `attend(q, k, v, mask)` is the per-device kernel; it sees q `[B, Lc, N, E]`, k and v
    `[B, L_pad, N, E]` and a mask `[B|1, N|1, Lc|1, L_pad]` (key padding stays
    `[B|1, 1, 1, L_pad]`, the form cuDNN takes as sequence lengths).
    """
    c, (b, length, n, _) = context_degree(), q.shape
    batch, heads, _ = _layout(b, n)
    q, k, v, mask = _pad_self_attention(q, k, v, mask, c)
    lp = q.shape[1]
    qkv_spec = P(batch, AXIS, heads, None)

    def body(q, k, v, mask):  # q, k, v [B, Lc, N, E] per device
        # tiled: the C blocks concatenated in device order (= token order) -> [B, L_pad, N, E]
        gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
        return attend(q, gather(k), gather(v), mask)  # [B, Lc, N, E]

    if mask is None:
        fn = lambda q, k, v: body(q, k, v, None)
        args, specs = (q, k, v), (qkv_spec,) * 3
    else:  # the query dimension split like q, the key dimension whole
        fn, args = body, (q, k, v, mask)
        specs = (qkv_spec,) * 3 + (_mask_spec(mask, (b, n, lp, lp), (batch, heads, AXIS, None)),)
    out = _shard_map(fn, specs, qkv_spec)(*args)
    return out[:, :length]  # drop padded query rows


def query_sharded_attention(q, k, v, mask=None, *, attend: Attend) -> jax.Array:
    """Cross-attention: q `[B, L, N, E]` split over `context`, k/v `[B, S, N, E]` whole.

    The text is short (S tokens), so every device keeps all of it and attends its own
    query block with `attend`; no communication. L is padded to a multiple of C.
    """
    c, (b, length, n, _) = context_degree(), q.shape
    s = k.shape[1]
    batch, heads, _ = _layout(b, n)
    lp = -(-length // c) * c
    mask = None if mask is None else _as_4d_mask(mask, q, k)
    q = _pad(q, 1, lp)
    qkv_spec, kv_spec = P(batch, AXIS, heads, None), P(batch, None, heads, None)
    if mask is None:
        fn = lambda q, k, v: attend(q, k, v, None)
        args, specs = (q, k, v), (qkv_spec, kv_spec, kv_spec)
    else:
        if mask.shape[2] > 1:
            mask = _pad(mask, 2, lp, True)
        fn, args = attend, (q, k, v, mask)
        mask_spec = _mask_spec(mask, (b, n, lp, s), (batch, heads, AXIS, None))
        specs = (qkv_spec, kv_spec, kv_spec, mask_spec)
    out = _shard_map(fn, specs, qkv_spec)(*args)
    return out[:, :length]


_FNS = {
    "ulysses": ulysses_attention,
    "allgather": allgather_attention,
    "ring": ring_attention,
    "queries": query_sharded_attention,
}


def context_parallel_attention(
    q, k, v, mask, *, mode: str, attend: Attend, attend_lse: AttendLSE | None = None
) -> jax.Array:
    """`o [B, L, N, E]` by strategy `mode` (one of MODES except 'none') over `context`.

    `attend` is the per-device kernel; `attend_lse`, one that also returns the log-sum-exp,
    is what the ring merges its blocks with (None: the ring's own einsum step).
    """
    if mode not in _FNS:
        raise ValueError(f"context_parallel={mode!r} is unknown; choose one of {MODES}")
    if mode == "ring":
        return ring_attention(q, k, v, mask, attend=attend, attend_lse=attend_lse)
    return _FNS[mode](q, k, v, mask, attend=attend)
