"""T5 / umT5 encoder stack in Flax Linen, loading Hugging Face safetensors (`t5`).

Pre-norm blocks (Raffel et al. 2020, "Exploring the Limits of Transfer Learning"):

    h = x + W_o softmax(q k^T + b + m) v          no 1/sqrt(E) scaling (T5 folds it into W_q)
    y = h + W_o' f(RMS(h))                        f = act(W_i h)  or  act(W_i0 h) * (W_i1 h)
    RMS(x) = w * x / sqrt(mean(x²) + eps)         T5 LayerNorm: no mean, no bias
    output = RMS_final(y_L)

with q, k, v = W_q RMS(x), ...: [B, N, S, E] (N E may differ from D). `b[n, i, j]` is a
learned scalar per head and bucket of the relative position `j - i`: half the buckets for
each direction, exact distances below `max_exact = buckets / 4`, logarithmically spaced up
to `max_distance`, the rest clipped to the last bucket (HF `_relative_position_bucket`).
T5 and mT5 learn one bias table in block 0 and reuse it in every block; umT5 (Chung et al.
2023) learns one per block (`per_layer_position_bias`). T5 v1.0 uses a ReLU FFN, T5 v1.1,
mT5 and umT5 a gated-GELU FFN with HF's tanh-approximate "gelu_new".

Tensor names are Hugging Face's (`encoder.block.{i}.layer.0.SelfAttention.q.weight`,
`encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`,
`shared.weight`, ...); see `hf_name_map` and `ignored_by_design`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.safetensors_io import NameMap

# Activations named by HF's `feed_forward_proj` ("relu", "gated-gelu", "gated-silu", ...).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder fields of a Hugging Face T5 / mT5 / umT5 config.json."""

    vocab_size: int
    d_model: int  # D
    d_kv: int  # E
    d_ff: int  # F
    num_layers: int
    num_heads: int  # N
    num_buckets: int = 32
    max_distance: int = 128
    activation: str = "gelu_new"
    gated: bool = True
    layer_norm_eps: float = 1e-6
    # umT5: every block has its own relative position bias; T5/mT5: block 0's is shared.
    per_layer_position_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> T5Config:
        model_type = hf.get("model_type")
        if model_type not in ("t5", "mt5", "umt5"):
            raise ValueError(
                f"{source}: model_type={model_type!r}; the t5 encoder reads 't5', 'mt5' or 'umt5'"
            )
        proj = hf.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        activation = proj.removeprefix("gated-")
        if gated and activation == "gelu":
            activation = "gelu_new"  # HF maps the legacy name "gated-gelu" to the tanh form
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{source}: feed_forward_proj={proj!r}; known activations: {sorted(ACTIVATIONS)}"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_kv=hf["d_kv"],
            d_ff=hf["d_ff"],
            num_layers=hf["num_layers"],
            num_heads=hf["num_heads"],
            num_buckets=hf.get("relative_attention_num_buckets", 32),
            max_distance=hf.get("relative_attention_max_distance", 128),
            activation=activation,
            gated=gated,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            per_layer_position_bias=model_type == "umt5",
        )

    @classmethod
    def from_file(cls, path: pathlib.Path) -> T5Config:
        return cls.from_hf(json.loads(path.read_text()), str(path))


def relative_position_buckets(seq: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional buckets `[S, S]` of `j - i` (key minus query), as HF computes them.

    Computed on the host in float32 with HF's operation order, so that distances which
    fall exactly on a bucket boundary round the same way as the reference.
    """
    rel = np.arange(seq)[None, :] - np.arange(seq)[:, None]  # [S, S]: j - i
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    # max(dist, 1) only avoids log(0): distances below max_exact take the exact branch.
    far = np.maximum(dist, 1).astype(np.float32)
    scale = np.log(far / max_exact) / np.log(max_distance / max_exact)
    large = max_exact + (scale * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(dist < max_exact, dist, large)


class T5LayerNorm(nn.Module):
    """`w * x / sqrt(mean(x²) + eps)` over D, in float32."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w * x32).astype(self.dtype)


class T5Block(nn.Module):
    """Self-attention + FFN, both pre-norm residual: `[B, S, D] -> [B, S, D]`."""

    config: T5Config
    has_position_bias: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None, key_bias: jax.Array):
        """bias: [1, N, S, S] from an earlier block or None; key_bias: [B, 1, 1, S].

        Returns the block output and the position bias for the next block to reuse.
        """
        c = self.config
        dense = lambda width, name: nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)
        norm = lambda name: T5LayerNorm(c.layer_norm_eps, self.dtype, name=name)
        seq = x.shape[1]
        if self.has_position_bias:
            table = nn.Embed(c.num_buckets, c.num_heads, name="relative_attention_bias")
            buckets = relative_position_buckets(seq, c.num_buckets, c.max_distance)
            bias = table(jnp.asarray(buckets)).transpose(2, 0, 1)[None]  # [S,S,N] -> [1,N,S,S]

        h = norm("attention_norm")(x)
        split = lambda t: t.reshape(*t.shape[:2], c.num_heads, c.d_kv)  # [B,S,NE] -> [B,S,N,E]
        q = split(dense(c.num_heads * c.d_kv, "q")(h))
        k = split(dense(c.num_heads * c.d_kv, "k")(h))
        v = split(dense(c.num_heads * c.d_kv, "v")(h))
        logits = jnp.einsum("BQNE,BKNE->BNQK", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits + bias + key_bias, axis=-1).astype(self.dtype)
        a = jnp.einsum("BNQK,BKNE->BQNE", probs, v)
        a = a.reshape(*a.shape[:2], -1)  # [B,S,N,E] -> [B,S,NE]
        x = x + dense(c.d_model, "o")(a)

        h = norm("ffn_norm")(x)
        act = ACTIVATIONS[c.activation]
        if c.gated:
            f = act(dense(c.d_ff, "wi_0")(h)) * dense(c.d_ff, "wi_1")(h)
        else:
            f = act(dense(c.d_ff, "wi")(h))
        return x + dense(c.d_model, "wo")(f), bias


class T5Encoder(nn.Module):
    """Token ids `[B, S]` and mask `[B, S]` -> final-norm hidden states `[B, S, D]`."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, name="shared")(ids)
        # HF adds finfo(float32).min to padded keys' logits; any large negative gives 0 weight.
        key_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        bias = None
        for i in range(c.num_layers):
            own_bias = i == 0 or c.per_layer_position_bias
            x, bias = T5Block(c, own_bias, self.dtype, name=f"block_{i}")(x, bias, key_bias)
        return T5LayerNorm(c.layer_norm_eps, self.dtype, name="final_layer_norm")(x)


def hf_name_map(config: T5Config) -> NameMap:
    """`{HF tensor name: (Flax parameter path, transpose)}` for every encoder parameter."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {
        "shared.weight": (("shared", "embedding"), False),
        "encoder.final_layer_norm.weight": (("final_layer_norm", "scale"), False),
    }
    ffn = ["wi_0", "wi_1", "wo"] if config.gated else ["wi", "wo"]
    for i in range(config.num_layers):
        block, attn = f"block_{i}", f"encoder.block.{i}.layer.0"
        for proj in ["q", "k", "v", "o"]:
            names[f"{attn}.SelfAttention.{proj}.weight"] = ((block, proj, "kernel"), True)
        if i == 0 or config.per_layer_position_bias:
            names[f"{attn}.SelfAttention.relative_attention_bias.weight"] = (
                (block, "relative_attention_bias", "embedding"),
                False,
            )
        names[f"{attn}.layer_norm.weight"] = ((block, "attention_norm", "scale"), False)
        for proj in ffn:
            names[f"encoder.block.{i}.layer.1.DenseReluDense.{proj}.weight"] = (
                (block, proj, "kernel"),
                True,
            )
        names[f"encoder.block.{i}.layer.1.layer_norm.weight"] = (
            (block, "ffn_norm", "scale"),
            False,
        )
    return names


# `T5EncoderModel` checkpoints store the token embedding as `shared.weight` and sometimes also
# its tied copy `encoder.embed_tokens.weight`; either serves, the copy is otherwise ignored.
ALIASES = {"shared.weight": "encoder.embed_tokens.weight"}


def ignored_by_design(name: str) -> bool:
    """Tensors of full encoder-decoder checkpoints that an encoder does not use: the decoder
    stack and the LM head (T5ForConditionalGeneration / UMT5ForConditionalGeneration)."""
    return name.startswith("decoder.") or name == "lm_head.weight"
