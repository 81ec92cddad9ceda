"""Diffusion forcing (sora_jax/diffusion/forcing.py): a time per chunk, the 'prefix'
schedule's clean-ish context, per-row draws independent of micro-batching, and the
config checks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax.config import ConfigError
from sora_jax.diffusion import flow, forcing


def _config(**kw):
    c = ml_collections.ConfigDict(
        dict(
            time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0,
            caption_dropout=0.0, loss_weighting="none", tasks={"t2v": 1.0},
            forcing_schedule="independent", forcing_context_t=0.05,
        )
    )  # fmt: skip
    c.update(kw)
    return c


def _batch(b=6, frames=6):
    key = jax.random.key(0)
    return {
        "latents": jax.random.normal(key, (b, frames, 2, 2, 3)),
        "text": jnp.ones((b, 4, 8)),
        "text_mask": jnp.ones((b, 4), bool),
    }


def _recording_apply():
    seen = {}

    def apply(params, x_t, t, text, mask):
        seen["t"], seen["x_t"] = t, x_t
        return jnp.zeros_like(x_t) + params

    return apply, seen


@pytest.mark.parametrize("schedule", ["independent", "prefix"])
def test_each_chunk_has_its_own_time(schedule):
    apply, seen = _recording_apply()
    config = _config(forcing_schedule=schedule)
    batch = _batch(b=64)

    def run(b):  # the recorded model inputs come out of the trace with the loss
        loss, aux = forcing.loss_fn(apply, 0.0, b, jax.random.key(1), config, 3.0, chunk=2)
        return loss, aux, dict(seen)

    loss, aux, seen = jax.jit(run)(batch)
    t = np.asarray(seen["t"]).reshape(64, 3, 2)  # [B, chunks, frames per chunk]
    assert np.all(t[..., 0] == t[..., 1])  # one time per chunk
    assert np.all((t >= 0) & (t <= 1))
    np.testing.assert_allclose(aux["t"], t[..., 0].mean(-1), rtol=1e-6)
    # x_t interpolates each frame at its chunk's time: x_t - (1 - t) x_0 is t · eps, N(0, t²).
    x0 = np.asarray(batch["latents"])
    eps = (np.asarray(seen["x_t"]) - (1 - t.reshape(64, 6, 1, 1, 1)) * x0) / t.reshape(
        64, 6, 1, 1, 1
    )
    assert abs(eps.std() - 1.0) < 0.05
    # With zero velocity predicted, the loss is E (eps - x_0)² over everything: about 2.
    assert abs(float(loss) - np.mean(np.square(eps - x0))) < 1e-3
    ctx = np.isclose(t[..., 0], 0.05)
    if schedule == "prefix":
        # A prefix of k ~ U{0, 1, 2} chunks at t_ctx, then free times: every k is drawn.
        k = ctx.sum(-1)
        assert all(np.all(ctx[i, : k[i]]) and not np.any(ctx[i, k[i] :]) for i in range(64))
        assert set(k.tolist()) == {0, 1, 2}
    else:
        assert not ctx.any()
        assert np.std(t[:, 0, 0] - t[:, 1, 0]) > 0.1  # chunks drawn independently


def test_micro_batches_draw_what_their_rows_draw():
    apply, _ = _recording_apply()
    config, batch = _config(forcing_schedule="prefix"), _batch()
    key = jax.random.key(2)
    loss = jax.jit(
        lambda b, offset: forcing.loss_fn(
            apply, 0.1, b, key, config, 3.0, chunk=3, row_offset=offset
        )[1],
        static_argnums=1,
    )
    full, part = loss(batch, 0), loss({k: v[3:] for k, v in batch.items()}, 3)
    np.testing.assert_allclose(part["per_sample_loss"], full["per_sample_loss"][3:], rtol=1e-6)
    np.testing.assert_allclose(part["t"], full["t"][3:], rtol=1e-6)


def test_loss_for_selects_by_model_and_checks_the_config():
    config = ml_collections.ConfigDict(
        dict(model=dict(causal_chunk_frames=0), diffusion=_config().to_dict())
    )
    assert forcing.loss_for(config) is flow.loss_fn
    config.model.causal_chunk_frames = 1
    assert forcing.loss_for(config).keywords == {"chunk": 1}
    config.diffusion.tasks = {"t2v": 1.0, "i2v": 0.5}
    config.diffusion.forcing_schedule = "pyramid"
    with pytest.raises(ConfigError, match="forcing_schedule='pyramid'.*\n.*diffusion.tasks"):
        forcing.loss_for(config)
