"""The cuDNN attention path without a GPU: every attention call the model makes, checked
through the exact arguments it hands `jax.nn.dot_product_attention`.

`attention._fused_attention` (the one call into cuDNN) is replaced by a recorder that runs
JAX's own cuDNN layout checks on the arguments (`check_layout`, `check_is_flash_attention`
from jax/_src/cudnn/fused_attention_stablehlo.py: what `implementation='cudnn'` runs before
lowering) and then the XLA implementation of the same call, which takes the same
`key_value_seq_lengths`. The result must match the dense reference (`xla_attention` on the
same bfloat16 inputs, in float32): self-attention, cross-attention with padding and with an
all-dropped caption, Ulysses, all-gather context parallelism and the 'queries' mode.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks
from jax.sharding import AxisType

from sora_jax.models import attention
from sora_jax.parallel.mesh import AXES

# bfloat16 inputs, the reference in float32 from the same values: the fused path's rounding
# (probabilities and output in bfloat16) stays below 2e-2; a key too many or too few moves
# outputs by O(1e-1).
ATOL = 2e-2
B, N, E = 2, 4, 16


@pytest.fixture
def recorded(monkeypatch):
    """Replaces the cuDNN call; returns the list of keyword arguments it received."""
    calls = []

    def fused(**kwargs):
        q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
        cudnn_checks.check_layout(
            query=q,
            key=k,
            value=v,
            bias=None,
            q_seqlen=kwargs.get("query_seq_lengths"),
            kv_seqlen=kwargs.get("key_value_seq_lengths"),
            q_offsets=None,
            kv_offsets=None,
            page_table_k=None,
            page_table_v=None,
            layout=cudnn_checks.AttentionLayout.BTNH,
        )
        # Pre-Hopper limits (head dim <= 128): the stricter of the two.
        cudnn_checks.check_is_flash_attention(
            q, k, v, cudnn_checks.AttentionLayout.BTNH.value, 90800, False, True
        )
        assert set(kwargs) <= {
            "query",
            "key",
            "value",
            "query_seq_lengths",
            "key_value_seq_lengths",
        }
        calls.append(kwargs)
        return jax.nn.dot_product_attention(**kwargs, implementation="xla")

    monkeypatch.setattr(attention, "_fused_attention", fused)
    return calls


def _qkv(lq, lk, seed=0, n=N):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    return normal(B, lq, n, E), normal(B, lk, n, E), normal(B, lk, n, E)


def _reference(q, k, v, mask):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return attention.dot_product_attention(*f32, mask, impl="xla")


def _lengths_mask(s, lengths):
    return jnp.asarray(np.arange(s)[None] < np.asarray(lengths)[:, None])[:, None, None, :]


def _check(out, q, k, v, mask):
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, mask), atol=ATOL)


@pytest.mark.parametrize(
    "case, lq, lk, lengths",
    [
        ("self", 80, 80, None),  # video self-attention: no mask
        ("cross, padded", 80, 7, (7, 3)),  # text cross-attention, sample 1 padded
        ("cross, dropped caption", 80, 7, (5, 0)),  # sample 1: no valid key at all
    ],
)
def test_single_device_calls(recorded, case, lq, lk, lengths):
    q, k, v = _qkv(lq, lk)
    mask = None if lengths is None else _lengths_mask(lk, lengths)
    out = jax.jit(functools.partial(attention.dot_product_attention, impl="cudnn"))(q, k, v, mask)
    _check(out, q, k, v, mask)
    (args,) = recorded
    if lengths is None:
        assert "key_value_seq_lengths" not in args
    else:  # a dropped caption runs with one key and is zeroed afterwards
        np.testing.assert_array_equal(args["key_value_seq_lengths"].shape, (B,))
        if 0 in lengths:
            np.testing.assert_array_equal(out[1], 0.0)


def test_arguments_are_sequence_lengths():
    q, k, v = _qkv(8, 7)
    args = attention.cudnn_arguments(q, k, v, _lengths_mask(7, (7, 0)))
    np.testing.assert_array_equal(args["key_value_seq_lengths"], [7, 1])
    np.testing.assert_array_equal(args["query_seq_lengths"], [8, 8])
    assert "mask" not in args and "bias" not in args
    assert set(attention.cudnn_arguments(q, k, v)) == {"query", "key", "value"}


def test_refuses_masks_it_cannot_express(recorded):
    q, k, v = _qkv(8, 7)
    with pytest.raises(ValueError, match=r"attention_impl='cudnn'.*\[B\|1, 1, 1, S\].*blockwise"):
        attention.dot_product_attention(q, k, v, jnp.ones((B, N, 8, 7), bool), impl="cudnn")
    gaps = jnp.ones((B, 1, 1, 7), bool).at[1, ..., 2].set(False)
    with pytest.raises(ValueError, match=r"attention_impl='cudnn'.*rows \[1\].*blockwise"):
        attention.dot_product_attention(q, k, v, gaps, impl="cudnn")
    # Under jit the values are unknown: the row with gaps comes back NaN, never wrong.
    out = jax.jit(functools.partial(attention.dot_product_attention, impl="cudnn"))(q, k, v, gaps)
    assert np.all(np.isnan(np.asarray(out[1], np.float32)))
    np.testing.assert_allclose(out[0].astype(jnp.float32), _reference(q, k, v, gaps)[0], atol=ATOL)


def _mesh(sizes):
    devices = jax.devices()[: math.prod(sizes)]
    return jax.make_mesh(sizes, AXES, (AxisType.Auto,) * 4, devices=devices)


@pytest.mark.parametrize(
    "strategy, sizes, lq, lk, lengths",
    [
        ("ulysses", (1, 1, 4, 1), 75, 75, None),  # 75 tokens padded to 76: padding as lengths
        ("ulysses", (2, 1, 2, 2), 80, 80, None),
        ("allgather", (1, 1, 4, 1), 75, 75, None),
        ("allgather", (2, 1, 2, 2), 80, 80, None),
        ("queries", (2, 1, 2, 2), 75, 7, (4, 0)),  # cross-attention, a dropped caption
    ],
)
def test_context_parallel_calls(devices, recorded, strategy, sizes, lq, lk, lengths):
    q, k, v = _qkv(lq, lk, seed=1)
    mask = None if lengths is None else _lengths_mask(lk, lengths)
    fn = functools.partial(attention.dot_product_attention, impl="cudnn", context_parallel=strategy)
    with jax.set_mesh(_mesh(sizes)):
        out = jax.jit(fn)(q, k, v, mask)
    _check(out, q, k, v, mask)
    assert recorded, "the cuDNN call did not run"
    c = sizes[2]
    for args in recorded:  # per device: its shard of the queries or heads
        if strategy != "ulysses":
            assert args["query"].shape[1] == -(-lq // c)
        if lq % c and strategy != "queries":  # padded keys travel as lengths, not a mask
            assert args["key_value_seq_lengths"].shape == (args["query"].shape[0],)
