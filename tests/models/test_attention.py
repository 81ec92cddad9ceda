"""`dot_product_attention` against `jax.nn.dot_product_attention` (the independent reference).

The blockwise kernel's own tests (gradients, JVPs, structured masks, memory) are in
test_blockwise_attention.py."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax.models import attention
from sora_jax.parallel import mesh as mesh_lib

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
ours_xla = jit(functools.partial(attention.dot_product_attention, impl="xla"))
ours = {  # the dense reference path and the memory-efficient one (what 'auto' picks on CPU)
    impl: jit(functools.partial(attention.dot_product_attention, impl=impl))
    for impl in ("xla", "blockwise")
}
reference = jit(functools.partial(jax.nn.dot_product_attention, implementation="xla"))


def _qkv(key, b=2, lq=12, lk=7, n=4, e=16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, lq, n, e), dtype)
    k = jax.random.normal(kk, (b, lk, n, e), dtype)
    v = jax.random.normal(kv, (b, lk, n, e), dtype)
    return q, k, v


def _mask(key, shape):
    mask = jax.random.bernoulli(key, 0.6, shape)
    return mask.at[..., 0].set(True)  # every query row keeps at least one key


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 7), (2, 4, 12, 7), (1, 1, 12, 7)])
@pytest.mark.parametrize("self_attention", [False, True])
def test_matches_jax_reference(impl, mask_shape, self_attention):
    q, k, v = _qkv(jax.random.key(0), lk=12 if self_attention else 7)
    if mask_shape is not None and self_attention:
        mask_shape = (*mask_shape[:-1], 12)
    mask = None if mask_shape is None else _mask(jax.random.key(1), mask_shape)
    out = ours[impl](q, k, v, mask)
    ref = reference(q, k, v, mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_fully_masked_rows_are_zero_and_masked_keys_get_no_weight(impl):
    q, k, v = _qkv(jax.random.key(2))
    mask = jnp.ones((2, 1, 1, 7), bool).at[0].set(False).at[1, ..., 3:].set(False)
    out = ours[impl](q, k, v, mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], 0.0)  # sample 0 has no valid key at all
    # Replacing masked keys/values with garbage changes nothing.
    k2, v2 = k.at[:, 3:].set(1e3), v.at[:, 3:].set(-1e3)
    np.testing.assert_array_equal(ours[impl](q, k2, v2, mask), out)


def test_bfloat16_close_to_float32():
    q, k, v = _qkv(jax.random.key(3))
    ref = ours_xla(q, k, v)
    out = ours_xla(*[x.astype(jnp.bfloat16) for x in (q, k, v)])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


def test_impl_selection_and_errors():
    # Fused kernels where they apply; the memory-efficient blockwise kernel everywhere else.
    assert attention.resolve_impl("auto", jnp.bfloat16, backend="gpu") == "cudnn"
    assert attention.resolve_impl("auto", jnp.float32, backend="gpu") == "blockwise"
    assert attention.resolve_impl("auto", jnp.bfloat16, backend="cpu") == "blockwise"
    assert attention.resolve_impl("auto", jnp.float32, backend="tpu") == "splash"
    q, k, v = _qkv(jax.random.key(4))
    np.testing.assert_allclose(
        attention.dot_product_attention(q, k, v, impl="auto"),
        attention.dot_product_attention(q, k, v, impl="xla"),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="choose one of"):
        attention.dot_product_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match=r"splash.*\[B, 1, 1, S\]"):
        attention.dot_product_attention(q, k, v, jnp.ones((2, 4, 12, 7), bool), impl="splash")
    with pytest.raises(ValueError, match="bfloat16"):
        attention.dot_product_attention(q, k, v, impl="cudnn")


# Splash attention runs in the Pallas interpreter off TPU: the kernel's own numerics, slowly,
# so these cases stay small (one 128-token tile per sequence, two samples).
ours_splash = jit(functools.partial(attention.dot_product_attention, impl="splash"))


@pytest.mark.parametrize("self_attention", [True, False])
def test_splash_matches_xla_values_and_gradients(self_attention):
    # 80 video tokens (the demo bucket) and 7 text tokens: neither fills a tile.
    q, k, v = _qkv(jax.random.key(5), lq=80, lk=80 if self_attention else 7, n=2, e=16)
    mask = None
    if not self_attention:  # key padding; sample 1 has no valid key (a dropped caption)
        mask = jnp.ones((2, 1, 1, 7), bool).at[0, ..., 4:].set(False).at[1].set(False)
    np.testing.assert_allclose(ours_splash(q, k, v, mask), ours_xla(q, k, v, mask), atol=2e-5)

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(
            jnp.sin(attention.dot_product_attention(q, k, v, mask, impl=impl))
        )
        return jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for ours, ref in zip(grads("splash"), grads("xla"), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_splash_under_a_sharded_mesh_matches_xla():
    sizes = dict(ici_data=2, ici_fsdp=2, ici_context=1, ici_tensor=2)
    mesh = mesh_lib.create_mesh(ml_collections.ConfigDict(sizes))
    q, k, v = _qkv(jax.random.key(6), b=4, lq=80, lk=7, n=2, e=16)
    mask = jnp.ones((4, 1, 1, 7), bool).at[2, ..., 3:].set(False)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, sharding) for x in (q, k, v)]
        out = ours_splash(*args, mask)
    np.testing.assert_allclose(out, ours_xla(q, k, v, mask), atol=2e-5)
