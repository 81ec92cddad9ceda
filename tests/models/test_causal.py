"""Block-causal self-attention over frame chunks (sora_jax/models/causal.py) and the causal
VideoDiT: every kernel against a numpy softmax with the mask built independently, context
parallelism against one device, refusals naming the field, and the model's causality."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from sora_jax.models import causal as causal_lib
from sora_jax.models import dit
from sora_jax.parallel import mesh as mesh_lib


def _qkv(key, b=2, length=48, n=2, e=8):
    kq, kk, kv = jax.random.split(key, 3)
    shape = (b, length, n, e)
    return (jax.random.normal(k, shape) for k in (kq, kk, kv))


def _reference(q, k, v, chunk_tokens):
    """numpy softmax attention keeping key s for query l when s // c <= l // c."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    pos = np.arange(q.shape[1])
    keep = (pos[None, :] // chunk_tokens) <= (pos[:, None] // chunk_tokens)  # [L, S]
    s = np.einsum("blne,bsne->bnls", q, k) / np.sqrt(q.shape[-1])
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnls,bsne->blne", p, v)


@pytest.mark.parametrize("impl", ["xla", "blockwise", "auto"])
def test_block_causal_attention_matches_reference(impl):
    q, k, v = _qkv(jax.random.key(0))
    ids = causal_lib.token_chunks((3, 4, 4), 1)  # 3 chunks of 16 tokens
    out = causal_lib.block_causal_attention(q, k, v, ids, impl)
    np.testing.assert_allclose(out, _reference(q, k, v, 16), atol=2e-5)


@pytest.mark.parametrize("strategy", ["ulysses", "allgather", "ring"])
def test_block_causal_under_context_parallelism(strategy):
    """The mask follows the whole sequence when its tokens are split over `context`."""
    sizes = dict(ici_data=2, ici_fsdp=1, ici_context=4, ici_tensor=1)
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(sizes))
    q, k, v = _qkv(jax.random.key(1), n=4)
    ids = causal_lib.token_chunks((3, 4, 4), 1)
    with jax.set_mesh(mesh):
        out = causal_lib.block_causal_attention(
            q, k, v, ids, "blockwise", context_parallel=strategy
        )
    np.testing.assert_allclose(out, _reference(q, k, v, 16), atol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_kernels_without_masks_are_refused(impl):
    q, k, v = _qkv(jax.random.key(2))
    with pytest.raises(ValueError, match="causal_chunk_frames.*attention_impl='blockwise'"):
        causal_lib.block_causal_attention(q, k, v, causal_lib.token_chunks((3, 4, 4), 1), impl)


def _model(**kw):
    fields = dict(dim=32, num_layers=2, num_heads=2, mlp_dim=64, text_dim=8, pos_embed="sincos")
    fields.update(kw)
    return dit.VideoDiT(in_channels=4, out_channels=4, **fields)


def _random_params(model, x, t, text, mask):
    """Init, then every leaf perturbed: the zero-initialized gates would hide attention."""
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x, t, text, mask))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("chunk,patch_t", [(1, 1), (2, 2)])
def test_causal_model_prefix_is_the_video_so_far(chunk, patch_t):
    """Chunk c's velocity depends only on chunks <= c: the model on the first c chunks gives
    the first c chunks of the model on all of them, and later frames change nothing before
    them (while a full-attention model's early frames do see later ones)."""
    model = _model(causal_chunk_frames=chunk, patch_size=(patch_t, 2, 2))
    x = jax.random.normal(jax.random.key(3), (2, 3 * chunk, 4, 4, 4))
    t = jax.random.uniform(jax.random.key(4), (2, 3 * chunk))
    text = jax.random.normal(jax.random.key(5), (2, 5, 8))
    mask = jnp.ones((2, 5), bool)
    params = _random_params(model, x, t, text, mask)
    causal = jax.jit(lambda x, t: model.apply({"params": params}, x, t, text, mask))
    v = causal(x, t)
    np.testing.assert_allclose(causal(x[:, :chunk], t[:, :chunk]), v[:, :chunk], atol=2e-5)
    later = x.at[:, chunk:].set(0.0)
    np.testing.assert_allclose(causal(later, t)[:, :chunk], v[:, :chunk], atol=2e-5)
    full = model.clone(causal_chunk_frames=0)
    full_fn = jax.jit(lambda x: full.apply({"params": params}, x, t, text, mask)[:, :chunk])
    assert float(jnp.abs(full_fn(later) - full_fn(x)).max()) > 1e-3


def test_causal_scan_layers_and_blockwise_match():
    model = _model(causal_chunk_frames=1)
    x = jax.random.normal(jax.random.key(6), (2, 3, 4, 4, 4))
    t = jnp.full((2, 3), 0.4)
    text, mask = jnp.ones((2, 5, 8)), jnp.ones((2, 5), bool)
    params = _random_params(model, x, t, text, mask)
    v = model.apply({"params": params}, x, t, text, mask)
    scanned = model.clone(scan_layers=True, attention_impl="blockwise")
    stacked = dit.stack_layers(params, model.num_layers)
    np.testing.assert_allclose(scanned.apply({"params": stacked}, x, t, text, mask), v, atol=2e-5)


def test_causal_config_errors_name_the_field():
    x, t = jnp.zeros((1, 3, 4, 4, 4)), jnp.zeros((1, 3))
    text, mask = jnp.zeros((1, 5, 8)), jnp.ones((1, 5), bool)
    with pytest.raises(ValueError, match="not whole chunks of model.causal_chunk_frames=2"):
        _model(causal_chunk_frames=2).init(jax.random.key(0), x, t, text, mask)
    with pytest.raises(ValueError, match="multiple of the temporal patch"):
        _model(causal_chunk_frames=1, patch_size=(2, 2, 2)).init(
            jax.random.key(0), x, t, text, mask
        )
    with pytest.raises(ValueError, match="causal_chunk_frames > 0"):
        cache = causal_lib.empty_cache(2, 1, 1, 4, 2, 16, jnp.float32)
        _model().init(jax.random.key(0), x[:, :1], t[:, :1], text, mask, cache=cache)
