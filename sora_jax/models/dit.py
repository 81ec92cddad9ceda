"""VideoDiT: a diffusion transformer over spacetime patches of video latents, and its presets.

    tokens  = W_p patchify(x_t)                                    [B, L, D]
    e       = MLP(sinusoid(1000 t))                                 [B, Tm, D]
    per block (adaLN-Zero, Wan2.1 layout):
      (a, s, g, a', s', g') = modulation + W_e silu(e)              6 x [B, Tm, D]
      x += g  · SelfAttn(LN(x) (1 + s) + a, RoPE(t, h, w))
      x +=      CrossAttn(LN_affine(x), W_text text, text_mask)
      x += g' · MLP(LN(x) (1 + s') + a')
    v       = unpatchify(W_o (LN(x) (1 + s_o) + a_o))              [B, T, H, W, C_out]

`t` is `[B]` (Tm = 1) or per latent frame `[B, T]` (Tm = T' = T / pt; the times of the pt
frames inside one temporal patch are averaged). Every residual branch and the output head
start at zero, so the initial model outputs exactly zero (adaLN-Zero, DiT; the cross-attention
output projection is zero-initialized as in PixArt-α).

Packed rows (several clips of any shapes back to back, sora_jax/data/packing.py): with
`segment_ids` the call is

    VideoDiT(tokens [B, L, P·C], t [B, L], text [B, S, D_text], text_mask [B, S],
             segment_ids=[B, L], positions=[B, L, 3], text_segment_ids=[B, S]) -> [B, L, P·C_out]

`tokens` are patchified latents (`patchify` per clip, concatenated; 0 = padding in
`segment_ids`), `t` each token's time (its clip's, or its frame's), `positions` each token's
(t, h, w) patch coordinates inside its own clip, and the text the row's captions
concatenated, `text_segment_ids` naming each text token's clip. Self-attention keeps keys
of the query's clip only, cross-attention its own caption only, RoPE uses the given
positions (restarting per clip) and adaLN is per token (Tm = L); the output is token
velocities, unpatchified per clip by the caller. With `time_ids=[B, L]`, `t` is instead the
row's `M` distinct times `[B, M]` (each clip's, and 0 for given frames) and token `l` takes
time `t[time_ids[l]]`: the timestep MLP and its `6 D` projection run once per time slot
(Tm = M) and their rows are gathered to the tokens, instead of once per token. Each clip's
velocities equal those of the clip alone (tests/models/test_dit_packed.py). Not with `pooled_text`.

Parameters. `model.init(rng, x_t, t, text, text_mask)['params']` holds
`nn.LogicallyPartitioned` boxes (logical axis names for sharding, parallel/mesh.py). Callers
unbox them, `params = nn.meta.unbox(variables['params'])`, and then
`model.apply({'params': params}, x_t, t, text, text_mask) -> v` works on the plain tree (it
also accepts the boxed tree). Parameters are float32; `dtype` is the compute dtype; norm and
softmax statistics are float32 and `v` is float32.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sora_jax.models import causal as causal_lib
from sora_jax.models import rope as rope_lib
from sora_jax.models.attention import IMPLS
from sora_jax.models.layers import (
    ACT,
    ACT_TEXT,
    EMBED_INIT,
    MLP,
    XAVIER,
    ZEROS,
    Attention,
    LayerNorm,
    check_patchable,
    dense,
    gate,
    materialize,
    modulate,
    patchify,
    stream_barrier,
    timestep_embedding,
    unpatchify,
)
from sora_jax.models.remat import CUDNN_FORWARD, REMAT_POLICIES, remat_policy
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.parallel.context import STRATEGIES as CONTEXT_PARALLEL

__all__ = [
    "CUDNN_FORWARD",
    "PRESETS",
    "REMAT_POLICIES",
    "VideoDiT",
    "build_model",
    "patchify",
    "remat_policy",
    "unpatchify",
]

# The block settings every Wan preset shares (Wan 2.1 and 2.2 are one architecture).
_WAN = dict(patch_size=(1, 2, 2), freq_dim=256, mlp="gelu", qk_norm=True, cross_attn_norm=True)

# Size presets: fields of VideoDiT. Param counts are for 16 latent channels, text dim 4096
# and patch (1, 2, 2) (the Wan2.1 setting), computed with `jax.eval_shape` (tests/models).
PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized; every test model derives from it. 1,236,928 params with 16 latent
    # channels and text dim 4096 (most of them the text projection).
    "tiny": dict(dim=128, num_layers=2, num_heads=4, mlp_dim=512),
    # DiT (Peebles & Xie 2023, Table 1) widths/depths/heads, MLP ratio 4, in our Wan-style
    # block (which adds cross-attention): 31,331,776 / 121,645,888 / 416,257,088 /
    # 611,141,824 params for S / B / L / XL.
    "S": dict(dim=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B": dict(dim=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(dim=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "XL": dict(dim=1152, num_layers=28, num_heads=16, mlp_dim=4608),
    # Wan2.1 T2V-1.3B (github.com/Wan-Video/Wan2.1, wan/configs/wan_t2v_1_3B.py): 1,418,996,800
    # params; the published bf16 checkpoint (2.84 GB) holds 1.42e9 (the name rounds down).
    "wan2_1_1_3b": dict(
        **_WAN,
        dim=1536,
        num_layers=30,
        num_heads=12,
        mlp_dim=8960,
    ),
    # Wan2.1 T2V-14B (wan/configs/wan_t2v_14B.py): 14,288,491,584 params; bf16 checkpoint
    # 28.6 GB = 1.43e10.
    "wan2_1_14b": dict(
        **_WAN,
        dim=5120,
        num_layers=40,
        num_heads=40,
        mlp_dim=13824,
    ),
    # Wan2.2 TI2V-5B (Wan2.2-TI2V-5B-Diffusers/transformer/config.json; 48 latent channels of
    # the Wan 2.2 VAE, vae.PRESETS['wan2_2']): 4,999,787,712 params. Wan 2.1's architecture.
    "wan2_2_ti2v_5b": dict(
        **_WAN,
        dim=3072,
        num_layers=30,
        num_heads=24,
        mlp_dim=14336,
    ),
    # One expert of Wan2.2 A14B (transformer and transformer_2 of Wan2.2-T2V-A14B-Diffusers):
    # Wan 2.1 14B's shape, 14,288,491,584 params each (sora_jax.models.wan_experts).
    "wan2_2_a14b": dict(
        **_WAN,
        dim=5120,
        num_layers=40,
        num_heads=40,
        mlp_dim=13824,
    ),
}


class DiTBlock(nn.Module):
    """One transformer block: `(x [B, L, D], e6 [B, Tm, 6, D], ...) -> (x, None)`."""

    num_heads: int
    mlp_dim: int
    mlp: str = "gelu"
    qk_norm: bool = True
    cross_attn_norm: bool = True
    attention_impl: str = "xla"
    context_parallel: str = "none"
    splash_block_size: int = 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, e6, context, context_mask, rope, segments=None, causal=None):
        # The (carry, out) signature lets nn.scan stack blocks without a wrapper. `segments`:
        # None, or packed rows' (self ids [B, L], cross pair ([B, L], [B, S])). `causal`:
        # None, or CausalSelfAttention's keywords (models/causal.py); then `out` is the
        # chunk's (k, v) in a cached call.
        d, dt = x.shape[-1], self.dtype
        table = self.param(
            "modulation", nn.with_logical_partitioning(ZEROS, (None, "embed")), (6, d)
        )
        # e6 [B, Tm, 6, D] float32 plus the table, one [B, Tm, D] part at a time (Tm = L for
        # packed rows: no [B, L, 6, D] sum is kept per block).
        shift1, scale1, gate1, shift2, scale2, gate2 = (e6[:, :, i] + table[i] for i in range(6))
        self_ids, cross_ids = (None, None) if segments is None else segments
        attn = dict(
            num_heads=self.num_heads,
            qk_norm=self.qk_norm,
            attention_impl=self.attention_impl,
            context_parallel=self.context_parallel,
            splash_block_size=self.splash_block_size,
            dtype=dt,
        )

        # The three residual adds in float32 whatever the stream's dtype (VideoDiT.
        # residual_dtype): one rounding per block at most, not one per add.
        stream, f32 = x.dtype, jnp.float32
        # On CPU, each point where the stream feeds a norm and a residual add materializes its
        # cotangent once (layers.stream_barrier; the GPU and TPU fusers weigh duplication).
        barrier = stream_barrier if mesh_lib.target_platform() == "cpu" else lambda y: y
        x = barrier(x.astype(f32))
        h = modulate(LayerNorm(name="norm1")(x), shift1, scale1).astype(dt)
        if causal is None:
            o, kv = Attention(**attn, name="self_attn")(h, rope=rope, segment_ids=self_ids), None
        else:
            self_attn = causal_lib.CausalSelfAttention(**attn, name="self_attn")
            o, kv = self_attn(h, rope, **causal)
        x = barrier(x + gate(o.astype(f32), gate1))
        h = LayerNorm(affine=True, name="norm3")(x).astype(dt) if self.cross_attn_norm else x
        cross = Attention(**attn, zero_out=True, name="cross_attn")
        x = x + cross(h.astype(dt), context, context_mask, segment_ids=cross_ids).astype(f32)
        x = barrier(x)
        h = modulate(LayerNorm(name="norm2")(x), shift2, scale2).astype(dt)
        x = x + gate(MLP(self.mlp_dim, self.mlp, dtype=dt, name="ffn")(h).astype(f32), gate2)
        return nn.with_logical_constraint(x.astype(stream), ACT), kv


def _frame_times(t: jax.Array, batch: int, frames: int, pt: int) -> jax.Array:
    """Timesteps `[B]` -> `[B, 1]`; per-frame `[B, T]` -> `[B, T']` (mean over each patch)."""
    if t.shape == (batch,):
        return t[:, None]
    if t.shape == (batch, frames):
        return t.reshape(batch, frames // pt, pt).mean(-1)  # [B, T', pt] -> [B, T']
    raise ValueError(f"t must be [B]={(batch,)} or [B, T]={batch, frames}, got {t.shape}")


def _check_packed(model, tokens, t, text, segment_ids, positions, text_segment_ids) -> None:
    """Shapes of a packed call (module docstring), or a ValueError naming the argument."""
    b, length, feat = tokens.shape
    p = math.prod(model.patch_size)
    want = {
        "x_t (tokens)": (tokens.shape, (b, length, p * model.in_channels)),
        "t": (jnp.shape(t), (b, length)),
        "segment_ids": (jnp.shape(segment_ids), (b, length)),
        "positions": (None if positions is None else jnp.shape(positions), (b, length, 3)),
        "text_segment_ids": (
            None if text_segment_ids is None else jnp.shape(text_segment_ids),
            text.shape[:2],
        ),
    }
    for name, (got, expected) in want.items():
        if got != expected:
            raise ValueError(
                f"packed VideoDiT call: {name} has shape {got}, expected {expected} (tokens "
                f"[B, L, P·C] with P·C = {p}·{model.in_channels}; per-token t, segment ids and "
                "(t, h, w) positions; a clip id per text token)"
            )
    if feat % p:
        raise ValueError(f"tokens have {feat} features, not a multiple of the patch's {p}")
    if model.pooled_text:
        raise ValueError(
            "model.pooled_text=True is not supported on packed rows (the pooled caption would "
            "need a per-clip mean); set model.pooled_text=False or train bucketed"
        )


def _patch_kernel_init(in_channels: int, cond_channels: int):
    """Xavier init whose rows for the last `cond_channels` input channels start at zero."""

    def init(key, shape, dtype=jnp.float32):
        keep = jnp.arange(shape[0]) % in_channels < in_channels - cond_channels  # [P·C]
        return XAVIER(key, shape, dtype) * keep[:, None].astype(dtype)

    return init


class VideoDiT(nn.Module):
    """`(x_t [B,T,H,W,C], t [B]|[B,T], text [B,S,D_text], text_mask [B,S]) -> v [B,T,H,W,C_out]`."""

    in_channels: int  # latent channels C, plus cond_channels conditioning channels (last)
    out_channels: int  # velocity channels (= latent channels)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    text_dim: int = 64
    freq_dim: int = 256
    mlp: str = "gelu"  # 'gelu' | 'swiglu'
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_split: tuple[int, int, int] | None = None  # head-dim (E_t, E_h, E_w); None = Wan's
    attention_impl: str = "xla"  # 'xla' | 'blockwise' | 'cudnn' | 'splash' | 'auto'
    # Self-attention over the mesh's `context` axis: 'none' | 'ulysses' | 'allgather' | 'ring'
    # (sora_jax/parallel/context.py); without a mesh or context size 1, plain attention.
    context_parallel: str = "none"
    # The splash kernel's tile on TPUs: sequences are padded to whole blocks of this many
    # tokens (a multiple of 128; sora_jax/models/splash.py). 1024-2048 suit long videos.
    splash_block_size: int = 512
    dtype: Any = jnp.float32  # compute dtype; params are always float32
    # The residual stream between blocks: 'compute' (the compute dtype: half the memory of
    # the activations remat keeps in bfloat16) or 'float32' (as Wan keeps it). The adds
    # inside a block are float32 either way.
    residual_dtype: str = "compute"
    cond_channels: int = 0  # trailing input channels whose patch-embed rows start at zero
    scan_layers: bool = False  # stack blocks with nn.scan (params get a leading 'layers' axis)
    remat: str = "none"  # one of REMAT_POLICIES
    pos_embed: str = "none"  # 'none' (RoPE only, as Wan) | 'sincos' (adds absolute positions)
    pooled_text: bool = False  # add the masked mean of the text to the adaLN conditioning
    # Latent frames per chunk of block-causal self-attention (chunk c sees chunks <= c;
    # models/causal.py); 0 = full attention. A `cache` call runs one chunk over a KV cache.
    causal_chunk_frames: int = 0

    @nn.compact
    def __call__(
        self,
        x_t,
        t,
        text,
        text_mask,
        segment_ids=None,
        positions=None,
        text_segment_ids=None,
        cache=None,
        time_ids=None,
    ):
        packed, causal = segment_ids is not None, self.causal_chunk_frames > 0
        patch, dt = tuple(self.patch_size), self.dtype
        if packed:
            b, length, feat = x_t.shape
            c = feat // math.prod(patch)
            per_token_t = t if time_ids is None else time_ids  # [B, L] either way
            _check_packed(self, x_t, per_token_t, text, segment_ids, positions, text_segment_ids)
            if time_ids is not None and (jnp.ndim(t) != 2 or jnp.shape(t)[0] != b):
                raise ValueError(
                    f"packed VideoDiT call: with time_ids, t is the row's time slots [B, M] "
                    f"with B = {b}, got shape {jnp.shape(t)}"
                )
        else:
            b, frames, height, width, c = x_t.shape
        if c != self.in_channels:
            raise ValueError(f"x_t has {c} channels, the model was built for {self.in_channels}")
        if text.shape[-1] != self.text_dim:
            raise ValueError(
                f"text has width {text.shape[-1]}, the model was built for {self.text_dim}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        split = rope_lib.check_split(self.rope_split, self.dim // self.num_heads)
        if causal:
            causal_lib.check_call(self, 0 if packed else frames, packed, cache)
            chunk_t = self.causal_chunk_frames // patch[0]  # F' token frames per chunk
        elif cache is not None:
            raise ValueError("a KV cache needs a causal model: set model.causal_chunk_frames > 0")

        # --- Embeddings: patches, timesteps, text ---------------------------------------
        if packed:
            tokens, grid = x_t.astype(dt), None  # [B, L, P·C], patchified per clip
        else:
            tokens, grid = patchify(x_t.astype(dt), patch)  # [B, L, P·C]
        kernel = _patch_kernel_init(self.in_channels, self.cond_channels)
        patch_embed = nn.Dense(
            self.dim,
            dtype=dt,
            param_dtype=jnp.float32,
            name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(kernel, ("conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(ZEROS, ("embed",)),
        )
        x = patch_embed(tokens)  # [B, L, D]
        if self.residual_dtype == "float32":
            x = x.astype(jnp.float32)
        elif self.residual_dtype != "compute":
            raise ValueError(
                f"model.residual_dtype={self.residual_dtype!r}: use 'compute' or 'float32'"
            )
        if self.pos_embed == "sincos" and packed:
            x = x + rope_lib.sincos_from_positions(positions, self.dim).astype(dt)  # [B, L, D]
        elif self.pos_embed == "sincos" and causal:  # (t mod F', h, w): models/causal.py
            x = x + causal_lib.sincos(grid, chunk_t, self.dim).astype(dt)[None]
        elif self.pos_embed == "sincos":
            x = x + rope_lib.sincos_embedding(grid, self.dim).astype(dt)[None]
        elif self.pos_embed != "none":
            raise ValueError(f"model.pos_embed={self.pos_embed!r}: use 'none' or 'sincos'")
        x = nn.with_logical_constraint(x, ACT)

        if packed:
            # [B, L]: Tm = L, a time per token; or [B, M]: Tm = M time slots (time_ids)
            t_frames = jnp.asarray(t, jnp.float32)
        else:
            t_frames = _frame_times(jnp.asarray(t), b, frames, patch[0])  # [B, Tm]
        f32 = jnp.float32  # the timestep path is tiny: keep it in float32
        e = timestep_embedding(t_frames, self.freq_dim)  # [B, Tm, freq_dim]
        e = dense(
            self.dim, ("conv_in", "embed"), dtype=f32, init=EMBED_INIT, name="time_embedding_0"
        )(e)
        e = dense(self.dim, ("mlp", "embed"), dtype=f32, init=EMBED_INIT, name="time_embedding_1")(
            nn.silu(e)
        )
        if self.pooled_text:
            # Masked mean of the text tokens, added to the timestep embedding (SD3's pooled
            # conditioning): the caption then modulates every block globally through adaLN.
            m = text_mask.astype(f32)[..., None]  # [B, S, 1]
            pooled = (text.astype(f32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)  # [B, D_text]
            pooled = dense(
                self.dim, ("vocab", "embed"), dtype=f32, init=EMBED_INIT, name="pooled_text_0"
            )(pooled)
            pooled = dense(
                self.dim, ("mlp", "embed"), dtype=f32, init=EMBED_INIT, name="pooled_text_1"
            )(nn.silu(pooled))
            e = e + pooled[:, None]  # [B, Tm, D]
        proj = dense(6 * self.dim, ("embed", "mlp"), dtype=f32, zero=True, name="time_projection")
        e6 = proj(nn.silu(e)).reshape(*e.shape[:2], 6, self.dim)  # [B, Tm, 6·D] -> [B, Tm, 6, D]
        if packed and time_ids is not None:  # each token takes its slot's rows: Tm = L
            e = jnp.take_along_axis(e, time_ids[..., None], axis=1)  # [B, M, D] -> [B, L, D]
            e6 = jnp.take_along_axis(e6, time_ids[..., None, None], axis=1)  # [B, L, 6, D]

        ctx = dense(
            self.dim, ("vocab", "embed"), dtype=dt, init=EMBED_INIT, name="text_embedding_0"
        )(text.astype(dt))
        ctx = dense(self.dim, ("mlp", "embed"), dtype=dt, init=EMBED_INIT, name="text_embedding_1")(
            nn.gelu(ctx)
        )
        ctx = nn.with_logical_constraint(ctx, ACT_TEXT)  # [B, S, D]
        ctx_mask = text_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S] over [B, N, L, S]
        if packed:
            rope = rope_lib.position_tables(positions, split)  # (cos, sin), each [B, L, E/2]
            # A text token belongs to its clip (id >= 1); others (-1) are nobody's keys.
            text_ids = jnp.where(
                text_mask.astype(bool) & (text_segment_ids > 0), text_segment_ids, -1
            )
            segments = (segment_ids, (segment_ids, text_ids))
            ctx_mask = None  # folded into text_ids
        else:
            rope = rope_lib.rope_tables(grid, split)  # (cos, sin), each [L, E/2]
            segments = None
        if mesh_lib.target_platform() == "cpu":  # computed once, not in every q/k element
            rope = tuple(materialize(table) for table in rope)
        causal_kw = [None] * self.num_layers
        if causal and cache is None:
            causal_kw = [dict(block_ids=causal_lib.token_chunks(grid, chunk_t))] * self.num_layers
        elif causal:  # one chunk over the window: RoPE at window positions (models/causal.py)
            rope, past_rope = causal_lib.cache_rope(
                grid, cache.k.shape[2] // rope[0].shape[0], split
            )
            causal_kw = [
                dict(past=(cache.k[i], cache.v[i], cache.valid, past_rope))
                for i in range(self.num_layers)
            ]

        # --- Blocks -------------------------------------------------------------------
        block_cls = DiTBlock
        if self.remat != "none":
            policy = remat_policy(self.remat)
            block_cls = nn.remat(DiTBlock, policy=policy, prevent_cse=not self.scan_layers)
        block_kw = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            mlp=self.mlp,
            qk_norm=self.qk_norm,
            cross_attn_norm=self.cross_attn_norm,
            attention_impl=self.attention_impl,
            context_parallel=self.context_parallel,
            splash_block_size=self.splash_block_size,
            dtype=dt,
        )
        if self.scan_layers:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 6,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            blocks = stack(**block_kw, name="blocks")
            x, _ = blocks(x, e6, ctx, ctx_mask, rope, segments, causal_kw[0])
        else:
            kvs = []
            for i in range(self.num_layers):
                block = block_cls(**block_kw, name=f"blocks_{i}")
                x, kv = block(x, e6, ctx, ctx_mask, rope, segments, causal_kw[i])
                kvs.append(kv)

        # --- Output head: adaLN (shift, scale from e), zero-initialized linear ----------
        table = self.param(
            "head_modulation", nn.with_logical_partitioning(ZEROS, (None, "embed")), (2, self.dim)
        )
        mod = e[:, :, None] + table  # [B, Tm, 2, D]
        h = modulate(LayerNorm(name="norm_out")(x), mod[:, :, 0], mod[:, :, 1]).astype(dt)
        out_features = math.prod(patch) * self.out_channels
        head = dense(out_features, ("embed", "conv_out"), dtype=dt, zero=True, name="head")
        if packed:
            return head(h).astype(jnp.float32)  # [B, L, P·C_out]: unpatchified per clip outside
        v = unpatchify(head(h).astype(jnp.float32), grid, patch)  # [B, T, H, W, C_out]
        if cache is not None:  # and the chunk's (k, v), each [layers, B, Lc, N, E]
            return v, tuple(jnp.stack(x) for x in zip(*kvs, strict=True))
        return v


# --- Registry and factory ---------------------------------------------------------------

MODELS = {"video_dit": VideoDiT}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FIELDS = {f.name for f in dataclasses.fields(VideoDiT)} - {"parent", "name"}
_BUILD_ARGS = {"in_channels", "out_channels", "text_dim"}  # from the data, not the config


def model_fields(model_cfg) -> dict[str, Any]:
    """The VideoDiT fields a model config asks for: preset, then non-None explicit fields."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    name = cfg.pop("name", "video_dit")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; choose one of {sorted(MODELS)}")
    preset = cfg.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r} is unknown; choose one of {list(PRESETS)}")
    fields = dict(PRESETS[preset]) if preset else {}
    for key, value in cfg.items():
        if key not in _FIELDS - _BUILD_ARGS:
            near = difflib.get_close_matches(key, sorted(_FIELDS - _BUILD_ARGS), n=1)
            hint = f" (did you mean model.{near[0]}?)" if near else ""
            raise ValueError(f"model.{key} is not a VideoDiT field{hint}")
        if value is not None:
            fields[key] = value
    if isinstance(fields.get("dtype"), str):
        if fields["dtype"] not in _DTYPES:
            raise ValueError(f"model.dtype={fields['dtype']!r}: choose one of {list(_DTYPES)}")
        fields["dtype"] = _DTYPES[fields["dtype"]]
    choices = {
        "mlp": ("gelu", "swiglu"),
        "remat": REMAT_POLICIES,
        "attention_impl": IMPLS,
        "context_parallel": CONTEXT_PARALLEL,
        "pos_embed": ("none", "sincos"),
        "residual_dtype": ("compute", "float32"),
    }
    for key, allowed in choices.items():
        if key in fields and fields[key] not in allowed:
            raise ValueError(f"model.{key}={fields[key]!r} is unknown; choose one of {allowed}")
    for key in ("patch_size", "rope_split"):
        if fields.get(key) is not None:
            fields[key] = tuple(int(v) for v in fields[key])
    return fields


def config_errors(model_cfg) -> list[str]:
    """The `model` section's own constraint checked before building: `dim` divisible by
    `num_heads` (when both are given)."""
    model = model_cfg
    if "dim" in model and model.dim is not None and "num_heads" in model and model.num_heads:
        if model.dim % model.num_heads:
            return [f"model.dim={model.dim} is not divisible by model.num_heads={model.num_heads}"]
    return []


def num_heads(model_cfg) -> int:
    """N, the attention heads of a model config (its preset's or VideoDiT's default)."""
    return int(model_fields(model_cfg).get("num_heads", VideoDiT.num_heads))


def build_model(model_cfg, in_channels: int, text_dim: int) -> VideoDiT:
    """The model of a config (ConfigDict or dict) for `in_channels` latent channels.

    `model_cfg.cond_channels` extra conditioning channels are appended to the input (their
    patch-embedding rows start at zero); the output has `in_channels` velocity channels.
    """
    fields = model_fields(model_cfg)
    cond = int(fields.get("cond_channels", 0))
    return VideoDiT(
        in_channels=in_channels + cond, out_channels=in_channels, text_dim=text_dim, **fields
    )


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-block params `blocks_i` -> one `blocks` tree with a leading layers axis (scan)."""
    blocks = [params[f"blocks_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: `blocks` [layers, ...] -> `blocks_0`, `blocks_1`, ..."""
    num_layers = jax.tree.leaves(params["blocks"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "blocks"}
    per_layer = {
        f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
        for i in range(num_layers)
    }
    return {**rest, **per_layer}


def check_bucket(model: VideoDiT, latent_shape) -> tuple[int, int, int]:
    """The token grid of a latent `(T, H, W[, C])` bucket, or a ValueError naming the patch."""
    return check_patchable(tuple(latent_shape)[:3], model.patch_size)


def make_apply_fn(model: nn.Module) -> Callable:
    """`apply(params, x_t, t, text, text_mask) -> v` over a plain parameter tree (and, for
    packed rows, `apply(params, tokens, t, text, text_mask, segment_ids=..., positions=...,
    text_segment_ids=...)`, the module docstring's packed call)."""

    def apply(params, x_t, t, text, text_mask, **packed):
        return model.apply({"params": params}, x_t, t, text, text_mask, **packed)

    return apply
