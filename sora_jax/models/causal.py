"""Causal video DiT: block-causal self-attention over frame chunks and its rolling KV cache.

With `model.causal_chunk_frames = F > 0` the latent frames are cut into chunks of F frames
(`c = frame // F`) and the video self-attention becomes block-causal over chunks:

    keep(l, s) = chunk(s) <= chunk(l)          tokens of chunk c see chunks 0 .. c

(all tokens of a chunk see each other; text cross-attention is unchanged). Trained with
diffusion forcing (sora_jax/diffusion/forcing.py: every chunk its own time), the model
denoises chunk c given its past at any noise level, which is what an autoregressive
rollout needs (sora_jax/diffusion/rollout.py).

**Kernels** (`block_causal_attention`): 'blockwise' takes the chunk ids as its own
block-causal ids (`blockwise_attention.block_causal`; no `[L, L]` mask is stored); 'xla'
and the context-parallel strategies ('ulysses', 'allgather', 'ring', which see a dense
mask `[1, 1, L, L]` of the whole sequence, sliced per block by the ring) a dense mask;
'splash' and 'cudnn' are refused naming the field (neither kernel as wrapped here takes a
mask other than key padding).

**The KV cache** (`KVCache`): per layer, the self-attention keys (after q/k norm, before
RoPE) and values of the last W chunks, newest first, `[layers, B, W·Lc, N, E]`, with a
validity mask `[B, W·Lc]` (slots not yet filled). A cached call of `VideoDiT` (argument
`cache`) runs only the Lc tokens of the current chunk: their queries attend to their own
keys and to the cache's valid keys, and the call returns the chunk's own (k, v) per layer,
which `push` puts in front of the cache, dropping the oldest chunk. Every array has a
fixed shape, so one compiled call serves every chunk and memory does not grow with the
length of the video.

**Positions under the rolling window.** RoPE scores depend only on position differences
(sora_jax/models/rope.py), so the cached call re-rotates the cached keys at their place in
the window: the current chunk is at latent frames `[W F', (W + 1) F')` (F' = F / p_t
token frames) and cache slot j (j = 0 the newest) at `[(W - 1 - j) F', (W - j) F')`. Any
rollout thus uses positions 0 .. (W + 1) F' - 1 only: within the trained range when
(W + 1) chunks fit a training clip. Keys are cached before RoPE for this reason. The
optional absolute `pos_embed='sincos'` uses, for causal models, each token's frame inside
its chunk (t mod F') with its absolute (h, w): it is the same for a chunk wherever it
falls in a video, so it never leaves the trained range either.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from sora_jax.models import attention as attention_lib
from sora_jax.models import blockwise_attention as blockwise_lib
from sora_jax.models import rope as rope_lib
from sora_jax.models.layers import HeadsRMSNorm, dense
from sora_jax.parallel import context as context_lib

CAUSAL_FIELD = "model.causal_chunk_frames"


class KVCache(NamedTuple):
    """Self-attention keys (pre-RoPE) and values of the window's chunks, newest first."""

    k: jax.Array  # [layers, B, W·Lc, N, E]
    v: jax.Array  # [layers, B, W·Lc, N, E]
    valid: jax.Array  # [B, W·Lc] bool: slots that hold a chunk


def empty_cache(
    num_layers: int, batch: int, window: int, chunk_tokens: int, heads: int, head_dim: int, dtype
) -> KVCache:
    """A cache of `window` chunks of `chunk_tokens` tokens, none filled yet."""
    if window < 1:
        raise ValueError(f"sample.rollout_window={window} must be >= 1 (past chunks kept)")
    shape = (num_layers, batch, window * chunk_tokens, heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape[1:3], bool))


def push(cache: KVCache, kv: tuple[jax.Array, jax.Array]) -> KVCache:
    """The cache with a chunk's `(k, v)` `[layers, B, Lc, N, E]` in front and the oldest
    chunk dropped (same shapes: the window rolls)."""
    k_new, v_new = kv
    lc = k_new.shape[2]
    keep = cache.k.shape[2] - lc  # [layers, B, W·Lc] -> newest chunk + the W - 1 next
    valid = jnp.concatenate(
        [jnp.ones(cache.valid.shape[:1] + (lc,), bool), cache.valid[:, :keep]], axis=1
    )
    return KVCache(
        jnp.concatenate([k_new.astype(cache.k.dtype), cache.k[:, :, :keep]], axis=2),
        jnp.concatenate([v_new.astype(cache.v.dtype), cache.v[:, :, :keep]], axis=2),
        valid,
    )


def chunk_token_frames(chunk_frames: int, patch_t: int) -> int:
    """F' = F / p_t, token frames per chunk, or a ValueError naming the field."""
    if chunk_frames <= 0 or chunk_frames % patch_t:
        raise ValueError(
            f"{CAUSAL_FIELD}={chunk_frames} must be a positive multiple of the temporal patch "
            f"model.patch_size[0]={patch_t}"
        )
    return chunk_frames // patch_t


def check_call(model, frames: int, packed: bool, cache) -> None:
    """What a causal VideoDiT call needs, or a ValueError naming the field and the fix."""
    f = model.causal_chunk_frames
    chunk_token_frames(f, model.patch_size[0])
    if packed:
        raise ValueError(
            f"{CAUSAL_FIELD}={f} does not take packed rows yet (data.packing.tokens_per_row "
            f"> 0): train bucketed, or set {CAUSAL_FIELD}=0"
        )
    if frames % f:
        raise ValueError(
            f"{frames} latent frames are not whole chunks of {CAUSAL_FIELD}={f}: choose buckets "
            "whose latent frames are a multiple of it"
        )
    if cache is not None and frames != f:
        raise ValueError(
            f"a cached call denoises one chunk ({f} latent frames), got {frames} frames"
        )
    if cache is not None and model.scan_layers:
        raise ValueError(
            "a cached (rollout) call needs per-layer blocks: build the model with "
            "model.scan_layers=False and dit.unstack_layers(params) (diffusion/rollout.py does)"
        )


def token_chunks(grid: tuple[int, int, int], chunk_t: int) -> jax.Array:
    """Chunk ids `[L]` int32 of tokens in (t, h, w) order: token frame t is in chunk t // F'."""
    frames, h, w = grid
    return jnp.repeat(jnp.arange(frames, dtype=jnp.int32) // chunk_t, h * w)


def sincos(grid: tuple[int, int, int], chunk_t: int, dim: int) -> jax.Array:
    """`[L, D]` sin-cos embedding of (t mod F', h, w): a chunk's own frame index (module doc)."""
    pos = rope_lib.grid_positions(grid)  # [L, 3]
    pos = pos.at[:, 0].set(jnp.mod(pos[:, 0], chunk_t))
    return rope_lib.sincos_from_positions(pos, dim)


def cache_rope(grid: tuple[int, int, int], window: int, split) -> tuple[tuple, tuple]:
    """RoPE tables `(cos, sin)` of the current chunk (grid `(F', H', W')`) at window position
    W and of the cache's W·Lc keys (slot j, newest first, at position W - 1 - j)."""
    chunk_t, h, w = grid
    current = rope_lib.rope_tables(grid, split, offset=(window * chunk_t, 0, 0))  # [Lc, E/2]
    past = rope_lib.rope_tables((window * chunk_t, h, w), split)  # [W·Lc, E/2] oldest first
    lc = chunk_t * h * w

    def newest_first(x):  # [W·Lc, E/2] slot order W-1 .. 0 -> 0 .. W-1
        return x.reshape(window, lc, -1)[::-1].reshape(window * lc, -1)

    return current, tuple(newest_first(x) for x in past)


def block_causal_mask(ids: jax.Array) -> jax.Array:
    """The dense mask `[1, 1, L, L]` of chunk ids `[L]`: key s kept when its chunk <= l's."""
    return (ids[None, :] <= ids[:, None])[None, None]


def block_causal_attention(
    q, k, v, ids, impl: str, *, context_parallel: str = "none", splash_block_size: int = 512
):
    """Self-attention `[B, L, N, E]` keeping, for query l, the keys of chunks <= chunk(l).

    `ids` `[L]` int32 chunk ids (`token_chunks`). Kernels as in the module docstring.
    """
    impl = attention_lib.resolve_impl(impl, q.dtype)
    if impl in ("splash", "cudnn"):
        raise ValueError(
            f"{CAUSAL_FIELD} > 0 needs a block-causal mask, which model.attention_impl="
            f"{impl!r} does not take here (only key padding): set model.attention_impl="
            "'blockwise' (any platform; keeps chunk ids, no [L, L] mask) or 'xla'"
        )
    distributed = context_parallel != "none" and context_lib.context_degree() > 1
    if impl == "blockwise" and not distributed:
        return blockwise_lib.blockwise_attention(q, k, v, block_causal=ids)
    return attention_lib.dot_product_attention(
        q,
        k,
        v,
        block_causal_mask(ids),
        impl=impl,
        context_parallel=context_parallel,
        splash_block_size=splash_block_size,
    )


class CausalSelfAttention(nn.Module):
    """`layers.Attention`'s self-attention (same parameters: query, key, value, norm_q,
    norm_k, out) with a block-causal mask, or over a KV cache.

    `(x [B, L, D], rope, block_ids=[L])` -> `(o [B, L, D], None)`: training, block-causal.
    `(x [B, Lc, D], rope, past=(k, v, valid, past_rope))` -> `(o, (k, v))`: one chunk's
    queries over its own keys and the cache's valid keys; (k, v) `[B, Lc, N, E]` are the
    chunk's keys before RoPE and values, what the cache stores.
    """

    num_heads: int
    qk_norm: bool = True
    attention_impl: str = "xla"
    context_parallel: str = "none"
    splash_block_size: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope, block_ids=None, past=None):
        d = x.shape[-1]
        n, e = self.num_heads, d // self.num_heads
        names = ("embed", "heads", "kv")
        q = dense((n, e), names, dtype=self.dtype, name="query")(x)  # [B, L, N, E]
        k = dense((n, e), names, dtype=self.dtype, name="key")(x)
        v = dense((n, e), names, dtype=self.dtype, name="value")(x)
        if self.qk_norm:
            q, k = HeadsRMSNorm(name="norm_q")(q), HeadsRMSNorm(name="norm_k")(k)
        kv = None
        if past is None:
            q, k_rot = rope_lib.apply_rope(q, *rope), rope_lib.apply_rope(k, *rope)
            act = ("act_batch", "act_length", "act_heads", "act_kv")
            q, k_rot, v_all = (nn.with_logical_constraint(y, act) for y in (q, k_rot, v))
            o = block_causal_attention(
                q,
                k_rot,
                v_all,
                block_ids,
                self.attention_impl,
                context_parallel=self.context_parallel,
                splash_block_size=self.splash_block_size,
            )
        else:
            k_past, v_past, valid, past_rope = past
            kv = (k, v)
            q = rope_lib.apply_rope(q, *rope)
            k_all = jnp.concatenate(
                [
                    rope_lib.apply_rope(k, *rope),
                    rope_lib.apply_rope(k_past.astype(k.dtype), *past_rope),
                ],
                axis=1,
            )  # [B, Lc + W·Lc, N, E]: own chunk first, then the cache newest first
            v_all = jnp.concatenate([v, v_past.astype(v.dtype)], axis=1)
            keys = jnp.concatenate([jnp.ones(x.shape[:2], bool), valid], axis=1)  # [B, S]
            # Valid keys form a prefix of every row (cuDNN's key lengths work too).
            o = attention_lib.dot_product_attention(
                q,
                k_all,
                v_all,
                keys[:, None, None, :],
                impl=self.attention_impl,
                splash_block_size=self.splash_block_size,
            )
        o = checkpoint_name(o, "attention_out")  # as layers.Attention: the remat policies
        out = dense(d, ("heads", "kv", "embed"), dtype=self.dtype, name="out", axis=(-2, -1))
        return out(o), kv  # [B, L, N, E] -> [B, L, D]
