"""Remat policies that keep the attention kernels' residuals: the compiled backward runs one
attention forward per attention call where `remat='full'` runs two, with the same numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib

from sora_jax.models import attention, build_model, dit

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
C, D_TEXT = 4, 8
SMALL = dict(
    name="video_dit",
    preset="tiny",
    num_layers=1,
    dim=32,
    num_heads=2,
    mlp_dim=64,
    freq_dim=32,
    attention_impl="blockwise",
)


def _args(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    text = jnp.asarray(rng.standard_normal((shape[0], 3, D_TEXT)), jnp.float32)
    mask = jnp.array([[True, True, False], [True, False, False]])[: shape[0]]
    return x, jnp.full((shape[0],), 0.3), text, mask


def _loss_and_grad(remat, args, params=None):
    model = build_model({**SMALL, "remat": remat}, C, D_TEXT)
    if params is None:
        abstract = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
        rng = np.random.default_rng(1)
        params = jax.tree.map(
            lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32),
            nn.meta.unbox(abstract),
        )
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, *args)))
    return jit(jax.value_and_grad(loss)), params


def test_save_attention_runs_one_attention_forward_per_call():
    """Self- and cross-attention: 2 attention calls per layer. 544 video tokens: three query blocks
    of the blockwise kernel, so its forward is a loop XLA cannot fold away."""
    args = _args((1, 2, 32, 34, C))  # 2 x 16 x 17 = 544 tokens
    forwards = {}
    for remat in ("full", "save_attention"):
        step, params = _loss_and_grad(remat, args)
        hlo = step.lower(params).compile().as_text()
        forwards[remat] = attention.count_forward_kernels(hlo)["blockwise"]
    calls = 2 * SMALL["num_layers"]
    assert forwards == {"full": 2 * calls, "save_attention": calls}


@pytest.mark.parametrize("remat", ["save_attention", "offload_attention"])
def test_policies_give_the_same_loss_and_grads(remat):
    args = _args((2, 2, 4, 4, C))
    step, params = _loss_and_grad("none", args)
    loss_ref, grads_ref = step(params)
    step, _ = _loss_and_grad(remat, args, params)
    loss, grads = step(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref
    )


def test_policies_keep_the_kernels_residuals_by_name():
    # The splash and blockwise kernels share one name; cuDNN's forward is matched by the
    # primitive JAX binds (fails here if a JAX release renames it).
    from sora_jax.models import blockwise_attention, splash

    assert blockwise_attention.RESIDUALS == splash.RESIDUALS
    assert cudnn_lib._dot_product_attention_fwd_p_wrapper.name in dit.CUDNN_FORWARD
    policy = dit.remat_policy("save_attention")
    assert policy(cudnn_lib._dot_product_attention_fwd_p_wrapper)
    assert not policy(jax.lax.exp_p)
    assert not dit.remat_policy("full")(cudnn_lib._dot_product_attention_fwd_p_wrapper)


def test_count_forward_kernels_reads_cudnn_custom_calls():
    hlo = "\n".join(
        [
            'a = custom-call(q, k, v), custom_call_target="__cudnn$fmhaSoftmax"',
            'b = custom-call(q, k, v), custom_call_target="__cudnn$fmhaSoftmaxBackward"',
            'c = custom-call(q, k, v), custom_call_target="__cudnn$fmhaSoftmax"',
        ]
    )
    assert attention.count_forward_kernels(hlo) == {"cudnn": 2, "blockwise": 0}
