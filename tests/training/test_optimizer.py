"""The weight-decay mask (sora_jax/run/optimizer.py): decided by a parameter's name, the same
for scanned and unscanned trees, and applied by the optimizer only where it says."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from sora_jax.models import build_model
from sora_jax.models import vae as vae_lib
from sora_jax.run import optimizer as optimizer_lib

TEXT_DIM, S = 16, 8


def _tiny_params(scan: bool):
    cfg = {"name": "video_dit", "preset": "tiny", "scan_layers": scan}
    model = build_model(cfg, 4, TEXT_DIM)
    args = (
        jnp.ones((1, 2, 8, 8, 4)),
        jnp.full((1,), 0.3),
        jnp.ones((1, S, TEXT_DIM)),
        jnp.ones((1, S), bool),
    )
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def _flat(tree) -> dict[str, object]:
    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in leaves}


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_marks_exactly_the_kernels_of_the_tiny_preset(scan):
    params = _tiny_params(scan)
    shapes = _flat(params)
    mask = _flat(optimizer_lib.decay_mask(nn.meta.unbox(params)))
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {k for k in shapes if k.endswith("/kernel")}
    # What the rank rule got wrong: these have rank >= 2 and must not decay.
    kept = {k for k in shapes if k not in decayed and shapes[k].ndim >= 2}
    names = {k.rsplit("/", 1)[-1] for k in kept}
    assert "modulation" in names and "head_modulation" in names
    assert any("norm_q/scale" in k for k in kept)  # [N, E] (and [layers, N, E])
    if scan:  # a leading layers axis: biases and norm scales are [layers, ...]
        assert any(k.startswith("blocks/") and k.endswith("/bias") for k in kept)
        assert any(k.startswith("blocks/") and k.endswith("norm3/scale") for k in kept)
        assert shapes["blocks/modulation"].ndim == 3


def test_boxed_trees_get_the_same_mask():
    params = _tiny_params(scan=True)
    boxed = _flat(optimizer_lib.decay_mask(params))
    plain = _flat(optimizer_lib.decay_mask(nn.meta.unbox(params)))
    assert boxed == plain


def test_vae_and_lora_leaves():
    cfg = vae_lib.PRESETS["tiny"]
    params = jax.eval_shape(
        vae_lib.CausalVAE(cfg).init, jax.random.key(0), vae_lib.example_input(cfg)
    )
    mask = _flat(optimizer_lib.decay_mask(nn.meta.unbox(params["params"])))
    assert mask and all(v == k.endswith("/kernel") for k, v in mask.items())
    lora = {"blocks": {"self_attn": {"query": {"kernel": {"lora_a": 0, "lora_b": 0}}}}}
    assert jax.tree.leaves(optimizer_lib.decay_mask(lora)) == [True, True]


def test_adamw_decays_only_masked_leaves():
    config = ml_collections.ConfigDict(
        dict(lr=0.1, schedule="constant", warmup_steps=0, b1=0.9, b2=0.99, eps=1e-8,
             weight_decay=0.5, grad_clip=0.0, lr_end=0.0, decay_fraction=0.2)
    )  # fmt: skip
    tx = optimizer_lib.make_optimizer(config, 10)
    params = {"blocks": {"ffn": {"wi": {"kernel": jnp.ones((2, 3, 3)), "bias": jnp.ones((2, 3))}}}}
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):  # zero gradients: only the decay moves a parameter
        updates, state = tx.update(zeros, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    np.testing.assert_array_equal(params["blocks"]["ffn"]["wi"]["bias"], 1.0)
    assert float(params["blocks"]["ffn"]["wi"]["kernel"][0, 0, 0]) < 1.0
