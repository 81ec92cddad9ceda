"""Conditioning tasks: pixel -> latent frames of a causal VAE, task frequencies, the model
input channels, a loss blind to given frames, and config errors that name the fields."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax.config import ConfigError
from sora_jax.diffusion import conditioning, flow

WEIGHTS = {"t2v": 1.0, "i2v": 0.5, "last_frame": 0.1, "continuation": 0.2, "image": 0.0}


def config(**overrides):
    fields = dict(
        time_sampling="uniform",
        logit_mean=0.0,
        logit_std=1.0,
        caption_dropout=0.0,
        tasks=ml_collections.ConfigDict(WEIGHTS),
        cond_dropout=0.0,
        continuation_frames=-1,
    )
    return ml_collections.ConfigDict({**fields, **overrides})


@pytest.mark.parametrize("c", [4, 2])
def test_pixel_to_latent_frames_of_a_causal_vae(c):
    if c == 4:  # the layout of Wan2.1's causal VAE: 1 + 4 + 4 + ...
        assert [conditioning.latent_frame_of_pixel(p) for p in range(10)] == [
            0, 1, 1, 1, 1, 2, 2, 2, 2, 3,
        ]  # fmt: skip
        assert list(conditioning.pixel_frames_of_latent(2)) == [5, 6, 7, 8]
        assert conditioning.num_latent_frames(17) == 5 and conditioning.num_latent_frames(1) == 1
    with pytest.raises(ValueError, match="1 \\+ "):
        conditioning.num_latent_frames(1 + 2 * c + 1, c)
    # The two maps are inverse: every pixel frame of latent frame j maps back to j, and the
    # latent frames partition the pixel frames in order.
    covered = []
    for j in range(6):
        frames = list(conditioning.pixel_frames_of_latent(j, c))
        assert all(conditioning.latent_frame_of_pixel(p, c) == j for p in frames)
        covered += frames
    assert covered == list(range(1 + 5 * c))
    # A latent frame is given only when all its pixel frames are: the first 1 + c pixel
    # frames give latent frames 0 and 1, one pixel frame fewer only latent frame 0.
    pixel = np.arange(1 + 4 * c)
    np.testing.assert_array_equal(
        conditioning.latent_given(pixel < 1 + c, c), [True, True, False, False, False]
    )
    np.testing.assert_array_equal(
        conditioning.latent_given(pixel < c, c), [True, False, False, False, False]
    )


def test_task_frequencies_match_weights():
    n, frames = 40_000, 4
    cfg = config(cond_dropout=0.25, continuation_frames=2)
    keys = [jax.random.key(i) for i in range(3)]
    tasks, given = conditioning.draw(*keys, n, frames, cfg)
    tasks, given = np.asarray(tasks), np.asarray(given)
    w = np.array([WEIGHTS[name] for name in conditioning.TASKS])
    p = w / w.sum()
    # Conditioning dropout moves a quarter of the conditioning samples to t2v.
    p_kept = p.copy()
    p_kept[1:] *= 0.75
    p_kept[0] += 0.25 * p[1:].sum()
    freq = np.bincount(tasks, minlength=len(p)) / n
    sigma = np.sqrt(p_kept * (1 - p_kept) / n)  # binomial standard error
    assert np.all(np.abs(freq - p_kept) <= 5 * sigma), (freq, p_kept)
    assert freq[conditioning.IMAGE] == 0.0
    # Given frames per task: none, frame 0, frame T'-1, a prefix of k in {1, 2} frames.
    assert not given[tasks == conditioning.T2V].any()
    np.testing.assert_array_equal(
        given[tasks == conditioning.I2V], [[1, 0, 0, 0]] * int((tasks == 1).sum())
    )
    assert given[tasks == conditioning.LAST_FRAME].sum(0).tolist()[:3] == [0, 0, 0]
    assert given[tasks == conditioning.LAST_FRAME][:, 3].all()
    cont = given[tasks == conditioning.CONTINUATION]
    k = cont.sum(1)
    np.testing.assert_array_equal(cont, np.arange(frames)[None] < k[:, None])  # prefixes
    assert set(k.tolist()) == {1, 2} and abs((k == 1).mean() - 0.5) < 0.03
    # A T' = 1 bucket is all images, whatever the weights.
    tasks1, given1 = conditioning.draw(*keys, 8, 1, cfg)
    assert (np.asarray(tasks1) == conditioning.IMAGE).all() and not np.asarray(given1).any()


def test_model_input_channels():
    b, frames, c = 2, 3, 4
    x_t = jax.random.normal(jax.random.key(0), (b, frames, 2, 2, c))
    x_0 = jax.random.normal(jax.random.key(1), x_t.shape)
    given = conditioning.task_mask("continuation", b, frames, num_given=2)
    assert conditioning.model_input(x_t, x_0, given, 0) is x_t
    x_in = np.asarray(conditioning.model_input(x_t, x_0, given, c + 1))
    assert x_in.shape == (b, frames, 2, 2, 2 * c + 1)
    np.testing.assert_array_equal(x_in[..., :c], x_t)
    np.testing.assert_array_equal(x_in[:, :2, ..., c:-1], x_0[:, :2])  # given latents
    np.testing.assert_array_equal(x_in[:, 2, ..., c:], 0.0)  # zeros elsewhere
    np.testing.assert_array_equal(
        x_in[..., -1], np.broadcast_to(np.asarray(given)[:, :, None, None], (b, frames, 2, 2))
    )
    t2v = np.asarray(conditioning.model_input(x_t, None, None, c + 1))
    np.testing.assert_array_equal(t2v[..., c:], 0.0)
    with pytest.raises(ValueError, match="model.cond_channels=3"):
        conditioning.model_input(x_t, x_0, given, 3)


@pytest.mark.parametrize("cond_channels", [0, 4])
def test_loss_ignores_given_frames(cond_channels):
    c = 3
    batch = {
        "latents": jax.random.normal(jax.random.key(0), (64, 3, 2, 2, c)),
        "text": jnp.ones((64, 2, 5)),
        "text_mask": jnp.ones((64, 2), bool),
    }
    cfg = config(tasks=ml_collections.ConfigDict({"i2v": 1.0, "continuation": 1.0}))

    def apply(params, x, t, text, mask, perturb=0.0):
        v = params * x[..., :c]
        if cond_channels:  # perturb where the mask channel says "given"
            return v + perturb * x[..., -1:]
        return v + perturb * (t == 0.0)[:, :, None, None, None]  # given frames have t = 0

    key = jax.random.key(5)
    loss, aux = flow.loss_fn(apply, 0.5, batch, key, cfg, cond_channels=cond_channels)
    bumped = lambda *a: apply(*a, perturb=100.0)
    loss2, aux2 = flow.loss_fn(bumped, 0.5, batch, key, cfg, cond_channels=cond_channels)
    np.testing.assert_array_equal(aux["per_sample_loss"], aux2["per_sample_loss"])
    assert float(loss) == float(loss2)
    # The same loss by hand: mean over the non-given frames of each sample, then over samples.
    tasks = np.asarray(aux["task"])
    assert set(tasks.tolist()) == {conditioning.I2V, conditioning.CONTINUATION}
    t = aux["t"]
    rows = flow.row_keys(key, 64)  # sample b draws from fold_in(key, b)
    eps = jax.vmap(
        lambda r: jax.random.normal(jax.random.fold_in(r, flow.PURPOSE_NOISE), (3, 2, 2, c))
    )(rows)
    x_0 = batch["latents"]
    err = np.asarray(jnp.mean((0.5 * flow.interpolate(x_0, eps, t) - (eps - x_0)) ** 2, (2, 3, 4)))
    k = np.asarray(jax.vmap(
        lambda r: jax.random.randint(jax.random.fold_in(r, flow.PURPOSE_CONTINUATION), (1,), 1, 3)
    )(rows))[:, 0]  # fmt: skip
    n_given = np.where(tasks == conditioning.I2V, 1, k)
    manual = [err[b, n_given[b] :].mean() for b in range(64)]
    np.testing.assert_allclose(aux["per_sample_loss"], manual, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(manual), rtol=1e-5)


def test_config_errors_name_the_fields():
    model = ml_collections.ConfigDict(dict(patch_size=(1, 2, 2), cond_channels=0))

    def error(cfg, model=model, channels=12):
        with pytest.raises(ConfigError) as e:
            flow.check_config(cfg, model, channels)
        return str(e.value)

    assert "diffusion.tasks" in error(config(tasks=ml_collections.ConfigDict({"v2v": 1.0})))
    assert "data.buckets" in error(config(tasks=ml_collections.ConfigDict({"image": 1.0})))
    bad_channels = ml_collections.ConfigDict(dict(patch_size=(1, 2, 2), cond_channels=12))
    assert "model.cond_channels=12" in error(config(), bad_channels)
    patch2 = ml_collections.ConfigDict(dict(patch_size=(2, 2, 2), cond_channels=0))
    msg = error(config(), patch2)
    assert "diffusion.tasks" in msg and "model.cond_channels" in msg
    assert "diffusion.cond_dropout" in error(config(cond_dropout=1.5))
    # Fine: t = 0 alone with temporal patch 1, channels C + 1 with temporal patch 2.
    flow.check_config(config(), model, 12)
    flow.check_config(
        config(), ml_collections.ConfigDict(dict(patch_size=(2, 2, 2), cond_channels=13)), 12
    )
