"""Pallas splash attention (TPU) behind the common `(q, k, v, mask)` call of models.attention.

Tiles. The kernel works on blocks of `block_q` queries by `block_kv` keys. A sequence is
padded up to whole blocks of `min(block_size, L rounded up to 128)` (128: the TPU lane
width), so 7,800 video tokens become 8 blocks of 1,024 (`block_size=1024`) rather than 61
blocks of 128 as a gcd rule would give. Few large blocks matter twice on a TPU: each grid
step has a fixed cost, and the kernel keeps per-block metadata (which blocks to visit) in
the core's scalar memory (SMEM, ~1 MiB), which grows as `(L / block_q) (L / block_kv)`:
at 75,600 tokens, 128-wide blocks need more SMEM than a v5p has and the step does not
compile. `model.splash_block_size` sets the size (default 512, what MaxText uses; 1,024 to
2,048 suit long video sequences on v5p/v6e). The backward is two kernels (dK/dV, dQ):
the fused one keeps dQ partials per key block, memory that grows as L² (`block_sizes`).

Masks. Key padding (the text mask, padded tiles) becomes segment ids: real queries 1,
valid keys 1, masked and padded keys 0. When nothing is padded and no mask is given, no
segment ids are passed and the kernel skips that work. Other masks are refused.

Packed rows. `segment_ids=(q_ids [B, L], kv_ids [B, S])` (clip ids, 0 = padding tokens)
are the kernel's own `SegmentIds`: a query attends to keys of its clip only. Masked keys
take an id no query has (-1), padded tiles -2 for keys and -3 for queries, so neither
reaches a real token; rows left with no key are zeroed by the caller
(models.attention.dot_product_attention).

Remat. The kernel names its output and log-sum-exp `RESIDUALS` (`jax.checkpoint_name`),
so a remat policy that saves that name keeps them and the backward does not rerun the
forward kernel.

Off a TPU the kernel runs in the Pallas interpreter (same numbers, far slower), which is
how CPU tests check it. Whether it is interpreted is decided by the platform of the mesh
being compiled for (`parallel.mesh.target_platform`), never by the host alone: a plan
compiled on a CPU host for a TPU topology gets the Mosaic kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sora_jax.parallel import mesh as mesh_lib

LANE = 128  # the TPU lane width: tiles are multiples of it
DEFAULT_BLOCK = 512
# The name the kernel gives its residuals (output and log-sum-exp) for remat policies.
RESIDUALS = "attention_residuals"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tile(length: int, block_size: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """`(block, padded length)` of a sequence of `length` tokens: blocks of `block_size`
    (a multiple of 128), or one block of the length rounded up to 128 when shorter."""
    if block_size <= 0 or block_size % LANE:
        raise ValueError(
            f"model.splash_block_size={block_size} must be a positive multiple of {LANE} "
            "(the TPU lane width); typical values are 512 to 2048"
        )
    block = min(block_size, _round_up(length, LANE))
    return block, _round_up(length, block)


def block_sizes(block_q: int, block_kv: int):
    """Forward and backward tiles of the splash kernel: the backward as two kernels (dK/dV,
    then dQ), not the fused one, whose dQ partials per key block take memory that grows as
    L² (measured for one v5p chip, 12 heads x 128, docs/perf.md: 6.1 GiB of temporaries at
    32,768 tokens against 0.2 GiB unfused)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    return sk.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )


def key_padding(mask, b: int, s: int):
    """`mask` as a per-sample key mask `[B, S]`, or None. Splash takes masks as segment ids,
    which express key padding (the only mask the model uses); others are refused."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(
            f"attention impl='splash' supports no mask or a key-padding mask [B, 1, 1, S]; "
            f"got mask shape {mask.shape}: use attention_impl='blockwise' for general masks"
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (b, s))


def splash_attention(
    q,
    k,
    v,
    mask=None,
    *,
    block_size: int = DEFAULT_BLOCK,
    interpret: bool | None = None,
    segment_ids=None,
):
    """Splash attention `[B, L, N, E] x [B, S, N, E] -> [B, L, N, E]` on one device.

    `interpret=None` runs the Mosaic kernel when compiling for a TPU and the Pallas
    interpreter otherwise (parallel.mesh.target_platform). `segment_ids`: None or a pair
    `(q_ids [B, L], kv_ids [B, S])` of ints (packed rows, module docstring).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if interpret is None:
        interpret = mesh_lib.target_platform() != "tpu"
    b, lq, n, e = q.shape
    s = k.shape[1]
    keep = key_padding(mask, b, s)  # [B, S] or None
    block_q, lq_pad = tile(lq, block_size)
    block_kv, s_pad = tile(s, block_size)
    full = sm.MultiHeadMask([sm.FullMask((lq_pad, s_pad)) for _ in range(n)])
    kernel = sk.make_splash_mha(
        full,
        block_sizes=block_sizes(block_q, block_kv),
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=RESIDUALS,
        interpret=interpret,
    )

    def to_kernel(x, length):  # [B, L, N, E] -> [B, N, L_pad, E]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.transpose(x, (0, 2, 1, 3))

    scale = jnp.asarray(1.0 / math.sqrt(e), q.dtype)  # the kernel does not scale q itself
    qk, kk, vk = to_kernel(q * scale, lq_pad), to_kernel(k, s_pad), to_kernel(v, s_pad)
    if segment_ids is not None:
        q_seg, kv_seg = (jnp.asarray(x, jnp.int32) for x in segment_ids)  # [B, L], [B, S]
        if keep is not None:
            kv_seg = jnp.where(keep, kv_seg, -1)  # a masked key: an id no query has
        q_ids = jnp.pad(q_seg, ((0, 0), (0, lq_pad - lq)), constant_values=-3)
        kv_ids = jnp.pad(kv_seg, ((0, 0), (0, s_pad - s)), constant_values=-2)

        def one_packed(qb, kb, vb, qi, ki):  # one row: [N, L_pad, E]
            return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=qi, kv=ki))

        out = jax.vmap(one_packed)(qk, kk, vk, q_ids, kv_ids)
    elif keep is None and lq_pad == lq and s_pad == s:  # nothing to mask: no segment ids
        out = jax.vmap(kernel)(qk, kk, vk)  # [B, N, L_pad, E]
    else:
        q_ids = jnp.broadcast_to(jnp.arange(lq_pad) < lq, (b, lq_pad)).astype(jnp.int32)
        kv_valid = jnp.arange(s_pad) < s  # [S_pad]
        if keep is not None:
            kv_valid = kv_valid & jnp.pad(keep, ((0, 0), (0, s_pad - s)))  # [B, S_pad]
        kv_ids = jnp.broadcast_to(kv_valid, (b, s_pad)).astype(jnp.int32)

        def one(qb, kb, vb, qi, ki):  # one sample: [N, L_pad, E]
            return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=qi, kv=ki))

        out = jax.vmap(one)(qk, kk, vk, q_ids, kv_ids)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :lq].astype(v.dtype)
