"""`flops.model_flops_per_sample` against XLA's own count of the compiled forward."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from sora_jax.models import PRESETS, build_model, flops

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
    assert flops.mfu(3e12, 8, 2.0, 4, 1e12) == pytest.approx(3.0)
