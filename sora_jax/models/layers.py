"""Building blocks of VideoDiT: patches, embeddings, norms, adaLN modulation, attention, MLP.

Conventions shared by every layer here:
- Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`);
  computation runs in the module's `dtype`; norm statistics and softmax run in float32.
- Linear kernels use Xavier-uniform init and zero biases (DiT and Wan2.1 both do).
- Layers never read the mesh: `nn.with_logical_constraint` is a no-op without rules.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from sora_jax.models import attention as attention_lib
from sora_jax.models import rope as rope_lib
from sora_jax.parallel import mesh as mesh_lib

Dtype = Any
ACT = ("act_batch", "act_length", "act_embed")  # video activations [B, L, D]
ACT_TEXT = ("act_batch", "act_text_length", "act_embed")  # text activations [B, S, D]
XAVIER = nn.initializers.xavier_uniform()
EMBED_INIT = nn.initializers.normal(0.02)  # Wan2.1's init of the text and time embeddings
ZEROS = nn.initializers.zeros_init()


# --- Spacetime patches ------------------------------------------------------------------


def check_patchable(shape, patch) -> tuple[int, int, int]:
    """The token grid `(T', H', W')` of a `(T, H, W)` shape, or a ValueError naming both."""
    shape, patch = tuple(int(s) for s in shape), tuple(int(p) for p in patch)
    if len(shape) != 3 or len(patch) != 3 or any(s % p for s, p in zip(shape, patch, strict=True)):
        raise ValueError(
            f"latent (T, H, W)={shape} is not divisible by patch_size={patch}; choose buckets "
            "whose latent frames/height/width are multiples of the patch"
        )
    return tuple(s // p for s, p in zip(shape, patch, strict=True))


def patchify(x: jax.Array, patch) -> tuple[jax.Array, tuple[int, int, int]]:
    """Latents `[B, T, H, W, C]` -> tokens `[B, L, pt·ph·pw·C]` and the grid `(T', H', W')`.

    Tokens are in (t, h, w) row-major order; each token's features are in (pt, ph, pw, C)
    order, the layout of Wan2.1's output head.
    """
    b, t, h, w, c = x.shape
    gt, gh, gw = check_patchable((t, h, w), patch)
    pt, ph, pw = patch
    x = x.reshape(b, gt, pt, gh, ph, gw, pw, c)  # split each axis into (grid, patch)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, T', H', W', pt, ph, pw, C]
    return x.reshape(b, gt * gh * gw, pt * ph * pw * c), (gt, gh, gw)  # [B, L, P·C]


def unpatchify(tokens: jax.Array, grid, patch) -> jax.Array:
    """The exact inverse of `patchify`: tokens `[B, L, pt·ph·pw·C]` -> `[B, T, H, W, C]`."""
    b, length, feat = tokens.shape
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    if length != gt * gh * gw or feat % (pt * ph * pw):
        raise ValueError(f"tokens {tokens.shape} do not fit grid {grid} and patch {patch}")
    c = feat // (pt * ph * pw)
    x = tokens.reshape(b, gt, gh, gw, pt, ph, pw, c)  # [B, T', H', W', pt, ph, pw, C]
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, T', pt, H', ph, W', pw, C]
    return x.reshape(b, gt * pt, gh * ph, gw * pw, c)  # [B, T, H, W, C]


# --- Linear layers, norms, embeddings ---------------------------------------------------


def _flatten_dense() -> bool:
    """Whether dense layers flatten their leading axes into one: on one CPU device only.
    Under a mesh of several devices the batch and length axes may be sharded differently,
    and merging them would make the compiler reshard (and change which collectives the
    sharded step runs, tests/parallel/test_collectives.py)."""
    return mesh_lib.target_platform() == "cpu" and jax.sharding.get_abstract_mesh().size <= 1


class NamedDense(nn.Module):
    """`y = x · kernel + bias` contracting the trailing `axis` dims of x, with named params.

    Like `nn.DenseGeneral` (same parameter names and layout: kernel `in_shape + features`),
    but the kernel is created at its final rank. DenseGeneral initializes a flat 2-D kernel
    and reshapes it, which breaks logical sharding constraints of rank > 2 as soon as
    logical axis rules are active (flax re-runs the initializer to check shapes in apply).
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    axis: tuple[int, ...] = (-1,)
    use_bias: bool = True
    zero: bool = False
    init: Any = None  # kernel initializer; None = Xavier-uniform over (in axes, out axes)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = tuple(sorted(a % x.ndim for a in self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        n_in, n_out = len(in_shape), len(self.features)
        base = (
            ZEROS
            if self.zero
            else self.init
            if self.init is not None
            else nn.initializers.variance_scaling(
                1.0,
                "fan_avg",
                "uniform",
                in_axis=tuple(range(n_in)),
                out_axis=tuple(range(n_in, n_in + n_out)),
            )
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(base, self.names),
            in_shape + self.features,
            jnp.float32,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        lead = x.shape[: x.ndim - n_in]
        if len(lead) > 1 and axis == tuple(range(len(lead), x.ndim)) and _flatten_dense():
            # [B, L, in] as one [B·L, in] @ [in, out] matmul: the weight gradient is then a
            # plain 2-D product; contracting B and L together, XLA's CPU backend copied x
            # transposed and ran a slower matmul (docs/perf.md, "CPU step against PyTorch").
            y = x.reshape(-1, math.prod(in_shape)) @ kernel.reshape(math.prod(in_shape), -1)
            y = y.reshape(*lead, *self.features)
        else:
            y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(ZEROS, self.names[n_in:]),
                self.features,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


def dense(features, names, *, dtype, name, axis=-1, zero=False, init=None) -> nn.Module:
    """A dense layer whose kernel is named `names` and bias named by its output axes."""
    features = (features,) if isinstance(features, int) else tuple(features)
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return NamedDense(
        features,
        tuple(names),
        axis=axis,
        zero=zero,
        init=init,
        dtype=dtype,
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics; returns float32.

    `y = (x - mean) / sqrt(var + eps)` (times `scale`, plus `bias`, when `affine`).
    """

    affine: bool = False
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
            y = y * self.param("scale", ones, x.shape[-1:])
            y = y + self.param(
                "bias", nn.with_logical_partitioning(ZEROS, ("embed",)), x.shape[-1:]
            )
        return y


class HeadsRMSNorm(nn.Module):
    """RMSNorm of q or k `[B, L, N, E]` over all heads together (N·E features, as Wan2.1).

    `y = x / sqrt(mean(x²) + eps) · scale`, statistics in float32, returned in x's dtype.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.eps)
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads", "kv"))
        return (y * self.param("scale", init, x.shape[-2:])).astype(x.dtype)


def timestep_embedding(t: jax.Array, freq_dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding `[..., freq_dim]` (float32) of timesteps `t * 1000`, t in [0, 1].

    `[cos(1000 t omega_j), sin(1000 t omega_j)]`, `omega_j = max_period^(-j / (freq_dim/2))`
    (DiT and Wan2.1 order: cosines first).
    """
    half = freq_dim // 2
    omega = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[..., None] * omega
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@jax.custom_jvp
def stream_barrier(x: jax.Array) -> jax.Array:
    """The identity, whose tangent (and so, transposed, whose cotangent) the compiler
    computes once here instead of recomputing it in every consumer.

    The residual stream's cotangent at block k is the sum of every later block's
    contributions (each norm's and each branch's). XLA's CPU fuser treats that chain of adds
    as cheap and duplicates it into each consumer (weight-gradient dots through
    transposing copies, the norms' backward reductions): work quadratic in depth, about a
    quarter of the 320-token step of benchmarks/peer_step.py (docs/perf.md, "CPU step
    against PyTorch"). `optimization_barrier` does not stop it (the CPU compiler removes
    barriers before fusing); an in-place update of one element with its own value does, as
    a dynamic-update-slice needs its operand in a buffer. Values, tangents and gradients
    are bit-identical (the same adds in the same order; the transposed update adds zeros).
    """
    return x


@stream_barrier.defjvp
def _stream_barrier_jvp(primals, tangents):
    (t,) = tangents
    return primals[0], materialize(t)


def materialize(x: jax.Array) -> jax.Array:
    """The identity, computed once into a buffer of its own: XLA's CPU fuser would otherwise
    recompute a cheap-looking producer inside every consumer (the RoPE tables' cos and sin,
    once per element of q and k and again in the backward: ~4% of the 320-token step of
    benchmarks/peer_step.py). An in-place update of one element with its own value needs
    its operand in a buffer (`stream_barrier`'s tangent is this); values are bit-identical."""
    corner = (0,) * x.ndim
    return jax.lax.dynamic_update_slice(x, jax.lax.slice(x, corner, (1,) * x.ndim), corner)


# --- adaLN modulation: per sample (Tm = 1), per latent frame (Tm = T') or per token -----
# (Tm = L: packed rows, each token modulated by its own clip's, or frame's, timestep).


def _frames(x: jax.Array, m: jax.Array) -> jax.Array:
    b, length, d = x.shape
    return x.reshape(b, m.shape[1], length // m.shape[1], d)  # [B, Tm, L/Tm, D]: by frame


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x (1 + scale) + shift` with x `[B, L, D]`, shift/scale `[B, Tm, D]` broadcast per frame."""
    y = _frames(x, shift) * (1.0 + scale[:, :, None]) + shift[:, :, None]
    return y.reshape(x.shape)  # [B, Tm, L/Tm, D] -> [B, L, D]


def gate(x: jax.Array, g: jax.Array) -> jax.Array:
    """`g x` with x `[B, L, D]`, g `[B, Tm, D]` broadcast over each frame's tokens."""
    return (_frames(x, g) * g[:, :, None].astype(x.dtype)).reshape(x.shape)  # -> [B, L, D]


# --- Attention and MLP ------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with optional q/k RMSNorm and 3D RoPE.

    Self-attention when `context` is None, else cross-attention from x `[B, L, D]` to
    context `[B, S, D]` with `mask` broadcastable to `[B, N, L, S]`. `segment_ids` (packed
    rows: `[B, L]`, or a `([B, L], [B, S])` pair for cross-attention) keeps only keys of the
    query's own clip (models.attention). `rope` tables are `[L, E/2]` or per row `[B, L, E/2]`.
    """

    num_heads: int
    qk_norm: bool = True
    zero_out: bool = False  # zero-init the output projection (identity residual at init)
    # A kernel of models.attention.IMPLS: 'blockwise' (memory-efficient, pure JAX), 'xla'
    # (dense reference), 'cudnn', 'splash', or 'auto' (fused where it applies, else blockwise).
    attention_impl: str = "xla"
    # Video self-attention over the `context` mesh axis: 'none' | 'ulysses' | 'allgather' |
    # 'ring'. Cross-attention then splits only its queries ('queries'): the text stays whole.
    context_parallel: str = "none"
    splash_block_size: int = 512  # the splash kernel's tile (sora_jax/models/splash.py)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None, rope=None, segment_ids=None) -> jax.Array:
        d = x.shape[-1]
        n, e = self.num_heads, d // self.num_heads
        qkv_names = ("embed", "heads", "kv")
        kv_len = "act_length" if context is None else "act_text_length"
        src = x if context is None else context
        q = dense((n, e), qkv_names, dtype=self.dtype, name="query")(x)  # [B, L, N, E]
        k = dense((n, e), qkv_names, dtype=self.dtype, name="key")(src)  # [B, S, N, E]
        v = dense((n, e), qkv_names, dtype=self.dtype, name="value")(src)  # [B, S, N, E]
        if self.qk_norm:
            q, k = HeadsRMSNorm(name="norm_q")(q), HeadsRMSNorm(name="norm_k")(k)
        if rope is not None:
            q, k = rope_lib.apply_rope(q, *rope), rope_lib.apply_rope(k, *rope)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
        k = nn.with_logical_constraint(k, ("act_batch", kv_len, "act_heads", "act_kv"))
        v = nn.with_logical_constraint(v, ("act_batch", kv_len, "act_heads", "act_kv"))
        cp = self.context_parallel
        if context is not None and cp != "none":
            cp = "queries"
        o = attention_lib.dot_product_attention(
            q,
            k,
            v,
            mask,
            impl=self.attention_impl,
            context_parallel=cp,
            splash_block_size=self.splash_block_size,
            segment_ids=segment_ids,
        )
        # Named so the 'save_attention_out' / 'offload' remat policies can keep it.
        o = checkpoint_name(o, "attention_out")
        out_names = ("heads", "kv", "embed")
        out = dense(d, out_names, dtype=self.dtype, name="out", axis=(-2, -1), zero=self.zero_out)
        return out(o)  # [B, L, N, E] -> [B, L, D]


class MLP(nn.Module):
    """`W_o gelu(W_i x)` (tanh approximation, as Wan2.1) or SwiGLU `W_o (silu(W_0 x) ⊙ W_1 x)`."""

    hidden: int
    kind: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        names = ("embed", "mlp")
        if self.kind == "gelu":
            h = jax.nn.gelu(dense(self.hidden, names, dtype=self.dtype, name="wi")(x))
        elif self.kind == "swiglu":
            h0 = dense(self.hidden, names, dtype=self.dtype, name="wi_0")(x)
            h = jax.nn.silu(h0) * dense(self.hidden, names, dtype=self.dtype, name="wi_1")(x)
        else:
            raise ValueError(f"model.mlp={self.kind!r} is unknown; choose 'gelu' or 'swiglu'")
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(h)  # [B, L, D]
