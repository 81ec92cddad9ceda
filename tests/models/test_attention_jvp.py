"""`jax.jvp` through the fused attention kernels (models/attention_jvp.py) against `jax.jvp`
of the dense reference ('xla' attention), in float32: splash through the Pallas interpreter,
cuDNN through a CPU stand-in for the one call into cuDNN (`attention._fused_attention`)
that, like cuDNN, defines only a VJP. Outside `forward_mode()` nothing changes: the fused
kernels still refuse `jax.jvp`, and gradients are lowered exactly as before."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import attention, attention_jvp

B, N, E = 2, 2, 16


def _inputs(lq, lk, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(B, lq, N, E), (B, lk, N, E), (B, lk, N, E)] * 2
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def _reference_jvp(primals, tangents, mask=None, segment_ids=None):
    f32 = lambda xs: [x.astype(jnp.float32) for x in xs]  # noqa: E731
    fn = functools.partial(
        attention.dot_product_attention, mask=mask, impl="xla", segment_ids=segment_ids
    )
    return jax.jvp(fn, tuple(f32(primals)), tuple(f32(tangents)))


def _jvp(impl, primals, tangents, mask=None, segment_ids=None):
    fn = functools.partial(
        attention.dot_product_attention, mask=mask, impl=impl, segment_ids=segment_ids
    )

    @jax.jit
    def run(primals, tangents):
        with attention_jvp.forward_mode():
            return jax.jvp(fn, tuple(primals), tuple(tangents))

    return run(primals, tangents)


def _no_jvp_stand_in():
    """`jax.nn.dot_product_attention(implementation='xla')` behind a custom_vjp: cuDNN's
    numbers on a CPU, and like cuDNN no forward-mode rule."""

    @jax.custom_vjp
    def fused(q, k, v, lengths):
        return jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, implementation="xla"
        )

    def fwd(q, k, v, lengths):
        out, vjp = jax.vjp(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=lengths, implementation="xla"
            ),
            q,
            k,
            v,
        )
        return out, (vjp, lengths)

    def bwd(res, g):
        vjp, lengths = res
        return (*vjp(g), np.zeros(lengths.shape, jax.dtypes.float0))

    fused.defvjp(fwd, bwd)

    def call(query, key, value, query_seq_lengths=None, key_value_seq_lengths=None):
        del query_seq_lengths  # always L here
        lengths = key_value_seq_lengths
        if lengths is None:
            lengths = jnp.full((query.shape[0],), key.shape[1], jnp.int32)
        return fused(query, key, value, lengths)

    return call


@pytest.fixture
def cudnn_stand_in(monkeypatch):
    monkeypatch.setattr(attention, "_fused_attention", _no_jvp_stand_in())


# Key padding with a row that keeps 3 of 7 keys and one that keeps none (a dropped caption).
PADDING = jnp.array([[True] * 3 + [False] * 4, [False] * 7])[:, None, None, :]


@pytest.mark.parametrize(
    "case", ["self", "cross_padded", "segments"], ids=["self", "cross_padded", "segments"]
)
def test_splash_jvp_matches_the_dense_reference(case):
    lk = 7 if case == "cross_padded" else 12
    *primals, dq, dk, dv = _inputs(12, lk)
    mask = PADDING if case == "cross_padded" else None
    # Two clips packed in each row (segment 0: padding tokens, attending to nothing).
    ids = jnp.array([[1] * 5 + [2] * 6 + [0], [1] * 12]) if case == "segments" else None
    out, d_out = _jvp("splash", primals, (dq, dk, dv), mask, ids)
    ref, d_ref = _reference_jvp(primals, (dq, dk, dv), mask, ids)
    assert float(jnp.max(jnp.abs(d_ref))) > 0.1  # a tangent worth comparing
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(d_out, d_ref, atol=2e-5)
    # The primal is the splash kernel's own output (the rule does not replace it).
    plain = jax.jit(functools.partial(attention.dot_product_attention, impl="splash"))
    np.testing.assert_array_equal(out, plain(*primals, mask, segment_ids=ids))


@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_rule_with_a_float32_stand_in_matches_the_dense_reference(cudnn_stand_in, padded):
    """The rule of the 'cudnn' path (`attention._forward_mode` around the call into cuDNN, as
    `_cudnn` makes it), with the stand-in taking float32 so the tangent is checked to float32
    tolerance (`_cudnn` itself only takes half precision, below)."""
    lk = 7
    *primals, dq, dk, dv = _inputs(12, lk)
    mask = PADDING if padded else None

    def kernel(q, k, v, mask=None):  # _cudnn without its half-precision check
        return attention._fused_attention(**attention.cudnn_arguments(q, k, v, mask))

    fused = attention._forward_mode(kernel)
    out, d_out = jax.jit(lambda p, t: jax.jvp(lambda *a: fused(*a, mask), p, t))(
        tuple(primals), (dq, dk, dv)
    )
    ref, d_ref = _reference_jvp(primals, (dq, dk, dv), mask)
    if padded:  # dot_product_attention zeroes rows without keys after the kernel
        out, d_out = out.at[1].set(0.0), d_out.at[1].set(0.0)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(d_out, d_ref, atol=2e-5)


def test_cudnn_path_jvp_in_bfloat16(cudnn_stand_in):
    *primals, dq, dk, dv = _inputs(12, 7, jnp.bfloat16)
    out, d_out = _jvp("cudnn", primals, (dq, dk, dv), PADDING)
    ref, d_ref = _reference_jvp(primals, (dq, dk, dv), PADDING)
    assert d_out.dtype == jnp.bfloat16
    # bfloat16 inputs and outputs: rounding of O(1) values (tests/models/test_cudnn_path.py).
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)
    np.testing.assert_allclose(d_out.astype(jnp.float32), d_ref, atol=5e-2)


def test_outside_forward_mode_the_fused_kernels_are_unchanged(cudnn_stand_in):
    """No JVP without the context, and the gradient's program is the fused kernel's own:
    inside the context grad would transpose the blockwise tangent (another program)."""
    q, k, v, *_ = _inputs(12, 7, jnp.bfloat16)
    attend = functools.partial(attention.dot_product_attention, mask=PADDING, impl="cudnn")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(attend, (q, k, v), (q, k, v))
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
    grad_text = lambda: jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).as_text()  # noqa: E731
    before = grad_text()
    with attention_jvp.forward_mode():
        inside = grad_text()
        jax.jvp(attend, (q, k, v), (q, k, v))
    assert not attention_jvp.active()
    assert grad_text() == before
    assert inside != before
