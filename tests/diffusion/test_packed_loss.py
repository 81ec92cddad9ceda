"""The packed objective: each sample's loss equals the bucketed loss of its clip alone with
the same draws, and the batch loss is the mean over samples (or token-weighted)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax.diffusion import conditioning, flow, packed
from sora_jax.models import dit

C, S, D_TEXT, PATCH, K, L = 4, 3, 8, (1, 2, 2), 3, 40
SHAPES = [[(3, 4, 6), (2, 6, 4), (1, 4, 4)], [(2, 4, 4)]]  # latent (T', H', W') per row


def _config(**kw):
    return ml_collections.ConfigDict(
        dict(
            time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=-1.0,
            shift_base_tokens=4, caption_dropout=0.3, loss_weighting="none",
            tasks={"t2v": 1.0, "i2v": 1.0}, cond_dropout=0.0, **kw,
        )
    )  # fmt: skip


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    feat = int(np.prod(PATCH)) * C
    out = dict(
        tokens=np.zeros((2, L, feat), np.float32),
        segment_ids=np.zeros((2, L), np.int32),
        positions=np.zeros((2, L, 3), np.int32),
        segment_shapes=np.zeros((2, K, 3), np.int32),
        text=np.zeros((2, K, S, D_TEXT), np.float32),
        text_mask=np.zeros((2, K, S), bool),
    )
    clips = []
    for r, row in enumerate(SHAPES):
        cursor = 0
        for j, shape in enumerate(row):
            x0 = rng.normal(size=(1, *shape, C)).astype(np.float32)
            tok, grid = dit.patchify(jnp.asarray(x0), PATCH)
            n = tok.shape[1]
            out["tokens"][r, cursor : cursor + n] = tok[0]
            out["segment_ids"][r, cursor : cursor + n] = j + 1
            p = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1)
            out["positions"][r, cursor : cursor + n] = p.reshape(-1, 3)
            out["segment_shapes"][r, j] = grid
            out["text"][r, j] = rng.normal(size=(S, D_TEXT))
            out["text_mask"][r, j] = np.arange(S) < 2
            clips.append((r, j, slice(cursor, cursor + n), x0, grid))
            cursor += n
    return out, clips


def _model():
    return dit.VideoDiT(
        in_channels=2 * C + 1, out_channels=C, patch_size=PATCH, dim=32, num_layers=1,
        num_heads=2, mlp_dim=64, text_dim=D_TEXT, cond_channels=C + 1,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)  # one compile, not one per operation
def _params(model):
    x = jnp.zeros((1, 1, 4, 4, 2 * C + 1))
    init = model.init(
        jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, S, D_TEXT)), jnp.ones((1, S), bool)
    )
    leaves, tree = jax.tree.flatten(init["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


def test_each_sample_loss_is_its_clip_alone_with_the_same_draws():
    config = _config()
    model = _model()
    apply_fn = dit.make_apply_fn(model)
    batch, clips = _batch()
    params = _params(model)
    key = jax.random.key(7)
    loss, aux = jax.jit(
        lambda p, b: packed.packed_loss_fn(
            apply_fn, p, b, key, config, patch=PATCH, cond_channels=C + 1
        )
    )(params, batch)
    losses, t, tasks = (np.asarray(aux[n]).reshape(2, K) for n in ("per_sample_loss", "t", "task"))
    assert set(tasks[tasks >= 0].tolist()) == {
        conditioning.T2V,
        conditioning.I2V,
        conditioning.IMAGE,
    }
    # Compiled, as in training (op by op, each clip's model call dispatches every op alone).
    per_sample_loss = jax.jit(flow.per_sample_loss, static_argnums=(0, 8))
    keys = packed.sample_keys(key, 2, K)
    eps_tok = jax.jit(packed.token_noise, static_argnums=4)(
        keys, jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]),
        jnp.asarray(batch["segment_shapes"]), batch["tokens"].shape[-1],
    )  # fmt: skip
    unpatchify = jax.jit(dit.unpatchify, static_argnums=(1, 2))
    for r, j, sl, x0, grid in clips:
        eps = unpatchify(eps_tok[r : r + 1, sl], grid, PATCH)
        keep = jax.random.uniform(jax.random.fold_in(keys[r, j], flow.PURPOSE_DROPOUT)) >= 0.3
        text = batch["text"][r, j][None] * keep
        mask = batch["text_mask"][r, j][None] & bool(keep)
        given = None
        if tasks[r, j] != conditioning.IMAGE:
            given = conditioning.task_mask(conditioning.TASKS[tasks[r, j]], 1, x0.shape[1])
            given = jnp.zeros((1, x0.shape[1]), bool) if given is None else given
        alone = per_sample_loss(
            apply_fn, params, jnp.asarray(x0), eps, jnp.asarray([t[r, j]]), text, mask, given, C + 1
        )
        np.testing.assert_allclose(losses[r, j], alone[0], rtol=2e-5)
    real = tasks >= 0
    assert real.sum() == 4 and np.all(t[~real] == -1)
    np.testing.assert_allclose(loss, losses[real].mean(), rtol=1e-6)
    # token-weighted: generated elements count, i2v's given frame does not
    loss_tok, _ = jax.jit(
        lambda p, b: packed.packed_loss_fn(
            apply_fn, p, b, key, _config(packed_loss="token"), patch=PATCH, cond_channels=C + 1
        )
    )(params, batch)
    n = np.zeros((2, K))
    for r, j, _, x0, _ in clips:
        frames = x0.shape[1] - (tasks[r, j] == conditioning.I2V)
        n[r, j] = frames * x0.shape[2] * x0.shape[3] * C
    np.testing.assert_allclose(loss_tok, (losses * n).sum() / n.sum(), rtol=1e-5)


def test_shape_classes_and_bad_mode():
    grids = jnp.array([[1, 2, 2], [3, 2, 3], [2, 3, 2], [2, 2, 2], [0, 0, 0]])
    names = [packed.SHAPE_CLASSES[i] if i >= 0 else None for i in packed.shape_classes(grids, 1)]
    assert names == ["image", "landscape", "portrait", "square", None]
    config = _config()
    for grid in ([3, 2, 3], [1, 4, 4], [5, 3, 2]):  # each sample's shift from its own shape
        want = flow.shift_alpha(config, (grid[0], 2 * grid[1], 2 * grid[2]), PATCH)
        np.testing.assert_allclose(packed.sample_alpha(config, jnp.array(grid), PATCH), want, 1e-6)
    with pytest.raises(ValueError, match="diffusion.packed_loss"):
        packed.packed_loss_mode(_config(packed_loss="tokens"))
