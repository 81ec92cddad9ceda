"""Training one Wan 2.2 A14B expert: `diffusion.time_range` restricts the loss's times to the
expert's range (sora_jax.models.wan_experts, experiments/wan22.py)."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.diffusion import flow
from sora_jax.models import wan_experts

EXPERIMENT = str(pathlib.Path(__file__).parents[2] / "experiments" / "wan22.py")
BINS = 16  # the toy model has one weight per time bin of width 1/16


def _config(time_range=None):
    c = ml_collections.ConfigDict(
        dict(
            time_sampling="logit_normal",
            logit_mean=0.0,
            logit_std=1.0,
            caption_dropout=0.0,
            tasks={"t2v": 1.0},
        )
    )
    if time_range is not None:
        c.time_range = time_range
    return c


def _apply(params, x_t, t, text, text_mask):
    """v = w[bin(t)] · x_t: the gradient reaches only the bins of the times drawn."""
    bins = jnp.clip((t * BINS).astype(jnp.int32), 0, BINS - 1)  # [B]
    return params["w"][bins][:, None, None, None, None] * x_t


def _grads(time_range, shift=3.0):
    batch = {
        "latents": jnp.ones((64, 2, 2, 2, 4)),
        "text": jnp.zeros((64, 3, 8)),
        "text_mask": jnp.ones((64, 3), bool),
    }
    params = {"w": jnp.zeros((BINS,))}
    loss = lambda p: flow.loss_fn(_apply, p, batch, jax.random.key(0), _config(time_range), shift)  # noqa: E731
    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return np.asarray(aux["t"]), np.asarray(grads["w"])


@pytest.mark.parametrize("expert", [wan_experts.HIGH, wan_experts.LOW])
def test_an_expert_run_draws_and_learns_only_its_times(expert):
    ratio = wan_experts.BOUNDARY_RATIO_T2V
    lo, hi = wan_experts.time_range(expert, ratio)
    t, g = _grads((lo, hi))
    assert (t >= lo).all() and (t <= hi).all()
    assert (np.asarray(wan_experts.expert_index(t, ratio)) == expert).all()
    # Gradients only on the bins of the expert's range: [14, 16) high, [0, 14] low.
    touched = np.nonzero(g)[0]
    edge = int(ratio * BINS)  # 14: the bin holding the boundary
    if expert == wan_experts.HIGH:
        assert touched.min() >= edge and len(touched) >= 2
    else:
        assert touched.max() <= edge and len(touched) >= 8
    # Without the restriction the same draws cover both experts' ranges.
    t_all, _ = _grads(None)
    assert len(set(np.asarray(wan_experts.expert_index(t_all, ratio)).tolist())) == 2


def test_time_range_is_validated():
    model = ml_collections.ConfigDict(dict(cond_channels=0, patch_size=(1, 2, 2)))
    with pytest.raises(config_lib.ConfigError, match="time_range"):
        flow.check_config(_config((0.9, 0.5)), model)
    flow.check_config(_config((0.875, 1.0)), model)


def test_experiment_sets_the_expert_range():
    c = config_lib.load_config(EXPERIMENT + ":size=a14b,expert=high")
    assert tuple(c.diffusion.time_range) == (0.875, 1.0) and c.model.preset == "wan2_2_a14b"
    c = config_lib.load_config(EXPERIMENT + ":size=ti2v_5b")
    assert c.model.preset == "wan2_2_ti2v_5b" and c.tokenizer.preset == "wan2_2"
    assert c.diffusion.tasks.i2v > 0 and c.model.get("cond_channels", 0) == 0
    # Both experts in one run: the experts section, times over [0, 1]; TI2V-5B has one model.
    c = config_lib.load_config(EXPERIMENT + ":size=a14b,expert=both,boundary=0.9")
    assert c.experts.boundary_ratio == 0.9 and c.diffusion.get("time_range", None) is None
    with pytest.raises(config_lib.ConfigError, match="expert=both needs size=a14b"):
        config_lib.load_config(EXPERIMENT + ":size=ti2v_5b,expert=both")
