"""`flops.model_flops_per_sample` against XLA's own count of the compiled forward."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from sora_jax.models import PRESETS, build_model, flops
from sora_jax.models import lora as lora_lib

TEXT_DIM, S = 64, 16


def xla_forward_flops(model, shape) -> float:
    """FLOPs XLA's cost analysis counts for one sample's forward pass (xla attention)."""
    args = (
        jnp.ones((1, *shape, 4)),
        jnp.full((1,), 0.3),
        jnp.ones((1, S, TEXT_DIM)),
        jnp.ones((1, S), bool),
    )
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    # Backend optimization level 0 compiles ~2x faster; the HLO and its cost are the same.
    jitted = jax.jit(model.apply, compiler_options={"xla_backend_optimization_level": 0})
    cost = jitted.lower({"params": abstract}, *args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


# Latent shapes with 128 and 1024 tokens under patch (1, 2, 2).
SHAPES = [(2, 16, 16), (4, 32, 32)]


@functools.cache
def ratio(dim: int, mlp: str, shape) -> float:
    """XLA's forward FLOPs over the formula's, for the tiny structure at width `dim`."""
    cfg = {"name": "video_dit", "preset": "tiny", "dim": dim, "mlp_dim": 4 * dim, "mlp": mlp}
    model = build_model(cfg, 4, TEXT_DIM)
    tokens = flops.tokens_per_sample(model, shape)
    return xla_forward_flops(model, shape) / flops.model_flops_per_sample(model, tokens, S)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_formula_within_5_percent_of_xla(mlp, shape):
    """The tiny preset (width 128, 2 blocks, 4 heads): XLA counts 2.6-4.4% more (measured).

    The formula leaves out elementwise work (norms, GELU, softmax, biases, RoPE: O(d) per
    token) and the embeddings; against O(d²) matmuls that is a 1/d effect.
    """
    assert PRESETS["tiny"]["dim"] == 128
    assert 1.0 <= ratio(PRESETS["tiny"]["dim"], mlp, shape) < 1.05


@pytest.mark.parametrize("shape", SHAPES)
def test_excess_is_elementwise_and_shrinks_with_width(shape):
    """At width 64 XLA counts 5.6-7.8% more than the formula (measured); at 128, half that."""
    tiny_ratio = ratio(64, "gelu", shape)
    assert 1.0 <= tiny_ratio < 1.09
    assert ratio(128, "gelu", shape) - 1 < 0.7 * (tiny_ratio - 1)


def test_formula_terms_and_config_forms():
    cfg = {"name": "video_dit", "preset": "tiny"}
    d, f, n, s, s_t = 128, 512, 2, 100, 7  # the tiny preset
    expected = n * (
        2 * s * 4 * d * d
        + 2 * s * 2 * d * f
        + 2 * s * 2 * d * d
        + 2 * s_t * 2 * d * d
        + 4 * s * s * d
        + 4 * s * s_t * d
    )
    assert flops.model_flops_per_sample(cfg, s, s_t) == expected
    assert flops.model_flops_per_sample(build_model(cfg, 4, 8), s, s_t) == expected
    swiglu = flops.model_flops_per_sample({**cfg, "mlp": "swiglu"}, s, s_t)
    assert swiglu - expected == n * 2 * s * d * f  # a third MLP matrix
    assert flops.train_flops_per_sample(cfg, s, s_t) == 3 * expected
    assert flops.tokens_per_sample(cfg, (5, 8, 12, 16)) == 5 * 4 * 6


def xla_grad_flops(model, shape, lora=None) -> float:
    """FLOPs XLA counts for one sample's loss and gradient: of every parameter, or (with
    `lora`) of the LoRA factors only, merged into the frozen base inside jit as the train
    step does (training/step.py)."""
    args = (
        jnp.ones((1, *shape, 4)),
        jnp.full((1,), 0.3),
        jnp.ones((1, S, TEXT_DIM)),
        jnp.ones((1, S), bool),
    )
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    base = nn.meta.unbox(boxed)

    def loss(params):
        return jnp.mean(jnp.square(model.apply({"params": params}, *args)))

    if lora is None:
        fn, arg = jax.grad(loss), (base,)
    else:
        init = functools.partial(lora_lib.init, config=lora)
        factors = nn.meta.unbox(jax.eval_shape(init, jax.random.key(1), boxed))
        fn = jax.grad(lambda f, b: loss(lora_lib.merge(b, f, lora.scale)))
        arg = (factors, base)
    jitted = jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})
    cost = jitted.lower(*arg).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_training_flops_of_full_and_lora_runs_match_xla():
    """Full training is 3F; a LoRA run 2F + the weight gradients of the targeted kernels +
    the merge (models/flops.py). XLA counts 4.7% and 5.4% more (measured: elementwise work,
    as in the forward test)."""
    # Unscanned: XLA's cost analysis counts a scanned loop's body once, not per layer.
    model = build_model({"name": "video_dit", "preset": "tiny"}, 4, TEXT_DIM)
    shape = SHAPES[0]
    tokens = flops.tokens_per_sample(model, shape)
    lora = lora_lib.LoraConfig(rank=4)
    xla_full, xla_lora = xla_grad_flops(model, shape), xla_grad_flops(model, shape, lora)
    full = xla_full / flops.train_flops_per_sample(model, tokens, S)
    low = xla_lora / flops.train_flops_per_sample(model, tokens, S, lora=lora)
    assert 1.0 <= full < 1.08 and 1.0 <= low < 1.08  # measured 1.047 and 1.054
    # 3F (what LoRA runs were counted with) overstates XLA's count by a quarter.
    assert xla_lora / (3 * flops.model_flops_per_sample(model, tokens, S)) < 0.9


def test_lora_terms():
    cfg = {"name": "video_dit", "preset": "tiny"}
    d, f, n, s, s_t, r = 128, 512, 2, 100, 7, 4
    forward = flops.model_flops_per_sample(cfg, s, s_t)
    only_q = lora_lib.LoraConfig(rank=r, targets=r"blocks_1/self_attn/query/kernel")
    expected = 2 * forward + 2 * s * d * d + 6 * r * d * d / 8  # one kernel in one block
    got = flops.train_flops_per_sample(cfg, s, s_t, lora=only_q, global_batch=8)
    assert got == pytest.approx(expected)
    mlp = lora_lib.LoraConfig(rank=r, targets=r"blocks.*/ffn/w.*/kernel")
    assert flops.lora_targets(cfg, mlp) == {"ffn/wi/kernel": n, "ffn/wo/kernel": n}
    got = flops.train_flops_per_sample(cfg, s, s_t, lora=mlp)
    assert got == pytest.approx(2 * forward + n * 2 * (2 * s * d * f) + n * 2 * 6 * r * d * f)
    scanned = {**cfg, "scan_layers": True}  # paths 'blocks/...': every layer at once
    assert flops.lora_targets(scanned, mlp) == flops.lora_targets(cfg, mlp)
    assert flops.lora_targets(scanned, only_q) == {}  # 'blocks_1/...' names no scanned path
