"""The KV-cache rollout of a causal VideoDiT (sora_jax/diffusion/rollout.py): the same
frames as recomputing the full block-causal attention at every step, a rolling window,
and compiled memory flat in the number of chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sora_jax.diffusion import rollout
from sora_jax.models import causal as causal_lib
from sora_jax.models import dit

CHUNK = (1, 4, 4, 4)  # (F, H', W', C): one latent frame of 4x4x4 per chunk


def _model(**kw):
    fields = dict(dim=32, num_layers=2, num_heads=2, mlp_dim=64, text_dim=8)
    fields.update(kw)
    return dit.VideoDiT(in_channels=4, out_channels=4, causal_chunk_frames=1, **fields)


@pytest.fixture(scope="module")
def setup():
    """A causal model with random (not zero-initialized) weights, text and sample keys."""
    model = _model(pos_embed="sincos")
    x = jnp.zeros((2, 3, 4, 4, 4))
    text = jax.random.normal(jax.random.key(1), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((2, 3)), text, mask))
    leaves, tree = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    sample_keys = jax.vmap(jax.random.key)(jnp.arange(2))
    return model, params, text, mask, sample_keys


def _rollout(model, params, text, mask, keys, chunks, window, cfg, impl="xla"):
    model = model.clone(attention_impl=impl)
    batch = keys.shape[0] * (1 if cfg == 1.0 else 2)
    cache = rollout.new_cache(model, batch, window, (1, 2, 2))
    return rollout.rollout(
        rollout.cached_apply_fn(model), params, keys, text, mask, cache,
        num_chunks=chunks, chunk_shape=CHUNK, num_steps=3, cfg_scale=cfg, alpha=2.0,
        context_t=0.1,
    )  # fmt: skip


@pytest.mark.parametrize("cfg,impl", [(1.0, "xla"), (3.0, "blockwise")])
def test_cache_matches_full_recompute(setup, cfg, impl):
    model, params, text, mask, keys = setup
    chunks = 4
    got = _rollout(model, params, text, mask, keys, chunks, chunks - 1, cfg, impl)
    apply = jax.jit(dit.make_apply_fn(model.clone(attention_impl="xla")))
    want = rollout.reference_rollout(
        apply, params, keys, text, mask,
        num_chunks=chunks, chunk_shape=CHUNK, num_steps=3, cfg_scale=cfg, alpha=2.0,
        context_t=0.1,
    )  # fmt: skip
    assert got.shape == (2, 4, 4, 4, 4)
    assert float(jnp.std(got[:, 1:] - got[:, :1])) > 0.1  # chunks differ: a real video
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_rolling_window(setup):
    """A window of W chunks: the first W + 1 chunks are those of an unbounded cache (nothing
    has been dropped yet) and later ones differ (the oldest chunk is forgotten)."""
    model, params, text, mask, keys = setup
    full = _rollout(model, params, text, mask, keys, 5, 4, 1.0)
    rolled = _rollout(model, params, text, mask, keys, 5, 2, 1.0)
    np.testing.assert_allclose(np.asarray(rolled[:, :3]), np.asarray(full[:, :3]), atol=1e-5)
    assert float(jnp.abs(rolled[:, 3:] - full[:, 3:]).max()) > 1e-3


def test_memory_flat_in_chunks(setup):
    """The compiled rollout's temporaries do not grow with the number of chunks (only the
    output does): `compiled.memory_analysis()` for 4 and 32 chunks."""
    model, params, text, mask, keys = setup
    cache = rollout.new_cache(model, 2, 2, (1, 2, 2))

    def temp_bytes(chunks):
        fn = jax.jit(
            lambda p, k, t, m, c: rollout.rollout(
                rollout.cached_apply_fn(model),
                p,
                k,
                t,
                m,
                c,
                num_chunks=chunks,
                chunk_shape=CHUNK,
                num_steps=2,
            )  # fmt: skip
        )
        mem = fn.lower(params, keys, text, mask, cache).compile().memory_analysis()
        return mem.temp_size_in_bytes, mem.output_size_in_bytes

    (temp4, out4), (temp32, out32) = temp_bytes(4), temp_bytes(32)
    assert out32 == 8 * out4  # the video itself grows
    assert temp32 == temp4, (temp4, temp32)


def test_cache_rejects_bad_calls(setup):
    model, params, text, mask, keys = setup
    cache = rollout.new_cache(model, 2, 2, (1, 2, 2))
    x = jnp.zeros((2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="one chunk"):
        model.apply({"params": params}, x, jnp.zeros((2, 2)), text, mask, cache=cache)
    with pytest.raises(ValueError, match="rollout_window"):
        causal_lib.empty_cache(2, 2, 0, 4, 2, 16, jnp.float32)
