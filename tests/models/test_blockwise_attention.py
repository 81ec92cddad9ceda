"""The blockwise attention against the dense reference `jax.nn.dot_product_attention`.

Values, gradients (q, k, v) and JVPs in float32 for every mask the kernel builds per block
(key padding, an all-masked row, segment ids, block-causal ids, a dense mask), at lengths
that are not multiples of the blocks (small blocks, so every case has several blocks and
padding); then its compiled memory against the dense path at 8k tokens, and the tiny
VideoDiT with 'blockwise' against 'xla'.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sora_jax.models import attention, attention_jvp, build_model
from sora_jax.models import blockwise_attention as bw

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
ATOL = RTOL = 1e-5
B, N, E = 2, 3, 8
BLOCKS = dict(block_q=16, block_kv=8)  # L = 40 -> 3 query blocks, S = 40 -> 5, S = 7 -> 1


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _case(name: str):
    """(q, k, v, kernel kwargs, keep [B, N|1, L, S]) for one mask case."""
    rng = np.random.default_rng(0)
    lq, s = 40, (7 if name in ("cross", "cross_padding", "all_masked_row") else 40)
    q, k, v = _normal(rng, B, lq, N, E), _normal(rng, B, s, N, E), _normal(rng, B, s, N, E)
    ones = np.ones((B, 1, lq, s), bool)
    kwargs, keep = {}, ones
    if name in ("cross_padding", "self_padding", "all_masked_row"):
        lengths = {"cross_padding": [7, 3], "self_padding": [33, 9], "all_masked_row": [5, 0]}
        kv_mask = np.arange(s)[None] < np.array(lengths[name])[:, None]  # [B, S]
        kwargs, keep = dict(kv_mask=kv_mask), ones & kv_mask[:, None, None, :]
    elif name == "segments":  # packed: sample 0 has segments of 13, 20, 7 tokens; sample 1 one
        ids = np.stack([np.repeat([0, 1, 2], [13, 20, 7]), np.zeros(lq, int)])  # [B, L]
        kwargs, keep = dict(segment_ids=ids), ones & (ids[:, :, None] == ids[:, None, :])[:, None]
    elif name == "block_causal":  # 5 frames of 8 tokens, each sees its own and earlier ones
        ids = np.asarray(bw.frame_causal_ids(5, 8))
        kwargs, keep = dict(block_causal=ids), ones & (ids[None, :] <= ids[:, None])[None, None]
    elif name == "causal_segments_padding":  # all three at once
        seg = np.stack([np.repeat([0, 1], [24, 16]), np.zeros(lq, int)])
        frames = np.asarray(bw.frame_causal_ids(5, 8))
        kv_mask = np.arange(s)[None] < np.array([[40], [30]])
        kwargs = dict(kv_mask=kv_mask, segment_ids=seg, block_causal=frames)
        keep = (
            ones
            & kv_mask[:, None, None, :]
            & (seg[:, :, None] == seg[:, None, :])[:, None]
            & (frames[None, :] <= frames[:, None])[None, None]
        )
    elif name == "dense":  # a per-head mask [B, N, L, S]
        keep = rng.random((B, N, lq, s)) < 0.5
        keep[:, :, :, 0] = True
        kwargs = dict(mask=keep)
    elif name not in ("none", "cross"):
        raise ValueError(name)
    return q, k, v, kwargs, jnp.asarray(keep)


CASES = [
    "none",
    "cross",
    "cross_padding",
    "self_padding",
    "all_masked_row",
    "segments",
    "block_causal",
    "causal_segments_padding",
    "dense",
]


def _reference(q, k, v, keep):
    """Dense attention; rows that keep no key give 0 (dot_product_attention's convention)."""
    o = jax.nn.dot_product_attention(q, k, v, mask=keep, implementation="xla")
    any_key = jnp.any(jnp.broadcast_to(keep, (q.shape[0], q.shape[2], *keep.shape[2:])), -1)
    return o * jnp.transpose(any_key, (0, 2, 1))[..., None]  # [B, N, L] -> [B, L, N, 1]


@functools.partial(jit, static_argnames=("fn",))
def _value_grads_jvp(q, k, v, w, tangents, fn):
    """o, the gradients of sum(o · w) for (q, k, v), and the JVP of o along `tangents`."""
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    with attention_jvp.forward_mode():  # the kernel's custom JVP (grad uses its custom VJP)
        o, do = jax.jvp(fn, (q, k, v), tangents)
    return o, grads, do


@pytest.mark.parametrize("name", CASES)
def test_matches_dense_reference_values_gradients_jvp(name):
    q, k, v, kwargs, keep = _case(name)
    rng = np.random.default_rng(1)
    w = _normal(rng, *q.shape)
    tangents = tuple(_normal(rng, *x.shape) for x in (q, k, v))
    ours = _value_grads_jvp(
        q, k, v, w, tangents, fn=functools.partial(bw.blockwise_attention, **kwargs, **BLOCKS)
    )
    ref = _value_grads_jvp(q, k, v, w, tangents, fn=functools.partial(_reference, keep=keep))
    for what, a, b in zip(("o", "grads", "jvp"), ours, ref, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert np.all(np.isfinite(x)), what
            np.testing.assert_allclose(x, y, atol=ATOL, rtol=RTOL, err_msg=what)


def test_all_masked_rows_are_zero_with_finite_gradients():
    q, k, v, kwargs, _ = _case("all_masked_row")  # sample 1 has no valid key
    fn = functools.partial(bw.blockwise_attention_with_lse, **kwargs, **BLOCKS)
    o, lse = fn(q, k, v)
    np.testing.assert_array_equal(o[1], 0.0)
    assert np.all(lse[1] == np.finfo(np.float32).min) and np.all(np.isfinite(lse))
    grads = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)[0])), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[1], 0.0)
    # Masked keys and values are never read: garbage there changes nothing.
    k2, v2 = k.at[0, 5:].set(1e4), v.at[0, 5:].set(-1e4)
    np.testing.assert_array_equal(fn(q, k2, v2)[0], o)


def test_lse_and_its_derivatives():
    """lse = logsumexp of the kept scores, with gradients and a JVP (it is what ring attention
    merges over key blocks)."""
    q, k, v, kwargs, keep = _case("causal_segments_padding")

    def lse_ref(q, k):
        s = jnp.einsum("BLNE,BSNE->BNLS", q, k) / np.sqrt(E)
        return jax.nn.logsumexp(jnp.where(keep, s, -jnp.inf), axis=-1)

    lse_ours = lambda q, k: bw.blockwise_attention_with_lse(q, k, v, **kwargs, **BLOCKS)[1]
    np.testing.assert_allclose(lse_ours(q, k), lse_ref(q, k), atol=ATOL, rtol=RTOL)
    w = _normal(np.random.default_rng(2), B, N, 40)
    for ours, ref in zip(
        jax.grad(lambda q, k: jnp.sum(lse_ours(q, k) * w), argnums=(0, 1))(q, k),
        jax.grad(lambda q, k: jnp.sum(lse_ref(q, k) * w), argnums=(0, 1))(q, k),
        strict=True,
    ):
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL)
    # Cotangents on both outputs at once (ring attention differentiates o and lse).
    o_ref = lambda q, k: _reference(q, k, v, keep=keep)
    both = lambda q, k: bw.blockwise_attention_with_lse(q, k, v, **kwargs, **BLOCKS)
    w_o = _normal(np.random.default_rng(3), *q.shape)
    for ours, ref in zip(
        jax.grad(lambda q, k: jnp.sum(both(q, k)[0] * w_o) + jnp.sum(both(q, k)[1] * w))(q, k),
        jax.grad(lambda q, k: jnp.sum(o_ref(q, k) * w_o) + jnp.sum(lse_ref(q, k) * w))(q, k),
        strict=True,
    ):
        np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL)
    tangents = (q[:, ::-1], k * 0.5)
    with attention_jvp.forward_mode():
        jvp_ours = jax.jvp(lse_ours, (q, k), tangents)[1]
    np.testing.assert_allclose(
        jvp_ours, jax.jvp(lse_ref, (q, k), tangents)[1], atol=ATOL, rtol=RTOL
    )


def test_dot_product_attention_front_end():
    """impl='blockwise' in models.attention: key padding, general masks, bfloat16."""
    rng = np.random.default_rng(3)
    q, k, v = _normal(rng, B, 40, N, E), _normal(rng, B, 40, N, E), _normal(rng, B, 40, N, E)
    padding = jnp.asarray(np.arange(40)[None] < np.array([[40], [0]]))[:, None, None, :]
    general = jnp.asarray(rng.random((1, N, 40, 40)) < 0.5)
    for mask in (None, padding, general):
        np.testing.assert_allclose(
            attention.dot_product_attention(q, k, v, mask, impl="blockwise"),
            attention.dot_product_attention(q, k, v, mask, impl="xla"),
            atol=ATOL,
            rtol=RTOL,
        )
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention.dot_product_attention(*half, padding, impl="blockwise")
    assert out.dtype == jnp.bfloat16
    ref = attention.dot_product_attention(*half, padding, impl="xla")
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=3e-2)
    grad = jax.grad(
        lambda q: jnp.sum(attention.dot_product_attention(q, *half[1:], impl="blockwise"))
    )(half[0])
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(grad.astype(jnp.float32)))


def test_errors_name_the_shapes():
    q = jnp.zeros((2, 40, N, E))
    with pytest.raises(ValueError, match=r"kv_mask has shape \(2, 5\)"):
        bw.blockwise_attention(q, q, q, kv_mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 39\)"):
        bw.blockwise_attention(q, q, q, segment_ids=jnp.zeros((2, 39), int))
    with pytest.raises(ValueError, match="does not broadcast"):
        bw.blockwise_attention(q, q, q, mask=jnp.ones((2, 4, 40, 40), bool))


def test_skipped_block_pairs_are_exactly_those_without_a_kept_key():
    """Packed rows (contiguous segments) and block-causal frames: the kernel computes a
    (query block, key block) pair exactly when some query of the one keeps some key of the
    other (models/blockwise_attention.py `_live`)."""
    lq = 64
    seg = np.stack([np.repeat([1, 2, 3], [20, 30, 14]), np.repeat([1, 2], [40, 24])])  # [B, L]
    frames = np.asarray(bw.frame_causal_ids(8, 8))
    blocks = lambda ids: bw._split(jnp.asarray(ids, jnp.int32).reshape(-1, lq), 1, 8)
    for qm, km, keep in (
        (
            bw._QMasks(blocks(seg), None, None),
            bw._KVMasks(None, blocks(seg), None, None),
            seg[:, :, None] == seg[:, None, :],
        ),
        (
            bw._QMasks(None, blocks(frames), None),
            bw._KVMasks(None, None, blocks(frames), None),
            (frames[None, :] <= frames[:, None])[None],
        ),
    ):
        live = np.asarray(bw._live(qm, km, lq // 8, lq // 8))
        exact = np.asarray(keep).reshape(-1, lq // 8, 8, lq // 8, 8).any(axis=(0, 2, 4))
        np.testing.assert_array_equal(live, exact)
        assert 0 < live.sum() < live.size  # some pairs are skipped, some computed


def test_compiled_temporaries_are_a_small_fraction_of_the_dense_path_at_8k_tokens():
    """The dense path stores the float32 scores [B, N, L, L] (512 MiB here, twice for its
    gradient); the blockwise one a few blocks. Compiled only, never run."""
    x = jax.ShapeDtypeStruct((1, 8192, 2, 16), jnp.float32)  # [B, L, N, E]

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    dense, blockwise = temp_bytes(attention.xla_attention), temp_bytes(bw.blockwise_attention)
    assert dense > 2 * 8192**2 * 4  # the reference really stores the scores
    assert blockwise < 0.1 * dense, (blockwise, dense)


def _loss_grads_jvp(model, params, x, t, text, text_mask, w):
    apply = lambda p, x, t: model.apply({"params": p}, x, t, text, text_mask)
    loss_grads = jax.value_and_grad(lambda p: jnp.sum(apply(p, x, t) * w))(params)
    with attention_jvp.forward_mode():
        jvp = jax.jvp(functools.partial(apply, params), (x, t), (w, jnp.ones_like(t)))[1]
    return loss_grads, jvp


def test_video_dit_blockwise_matches_xla():
    """The tiny VideoDiT's loss, every parameter gradient and its JVP along (x_t, t) (what
    consistency distillation differentiates): 'blockwise' equals 'xla'."""
    small = dict(name="video_dit", preset="tiny", num_layers=2, dim=32, num_heads=4, mlp_dim=64)
    rng = np.random.default_rng(4)
    x = _normal(rng, 2, 3, 6, 6, 4)  # 27 tokens
    t = jnp.asarray(rng.uniform(size=(2,)), jnp.float32)
    text = _normal(rng, 2, 5, 8)
    text_mask = jnp.asarray(np.arange(5)[None] < np.array([[5], [0]]))  # sample 1: no caption
    w = _normal(rng, *x.shape)
    results = {}
    for impl in ("xla", "blockwise"):
        model = build_model({**small, "attention_impl": impl}, 4, 8)
        if impl == "xla":
            params = nn.meta.unbox(model.init(jax.random.key(0), x, t, text, text_mask)["params"])
            # Random (not zero-initialized) output projections, so attention reaches the loss.
            params = jax.tree.map(lambda a: a + 0.1 * _normal(rng, *a.shape), params)
        results[impl] = jit(functools.partial(_loss_grads_jvp, model))(
            params, x, t, text, text_mask, w
        )
    ((loss_x, grads_x), jvp_x), ((loss_b, grads_b), jvp_b) = results["xla"], results["blockwise"]
    np.testing.assert_allclose(loss_b, loss_x, rtol=1e-5)
    np.testing.assert_allclose(jvp_b, jvp_x, atol=1e-4, rtol=1e-4)
    for (path, g), g_ref in zip(
        jax.tree.leaves_with_path(grads_b), jax.tree.leaves(grads_x), strict=True
    ):
        np.testing.assert_allclose(
            g, g_ref, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path)
        )
