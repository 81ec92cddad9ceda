"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

Randomness is `fold_in(fold_in(key(seed), step), purpose)` (DESIGN.md §3): the step's key
depends only on the seed and the step, so a resumed run draws the same noise, times and
caption dropout as an uninterrupted one. A step whose loss or gradients are not finite
leaves the state unchanged except for the step counter, and reports `train/skipped = 1`.

Conditioning tasks (`diffusion.tasks`, sora_jax/diffusion/conditioning.py) are drawn inside
the loss from the batch's own latents; `model.cond_channels` (0 = given frames enter through
per-frame t = 0 only, C + 1 = also as input channels) is checked against the tasks and the
latent channels when the step is built, before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sora_jax.diffusion import flow
from sora_jax.training.state import TrainState, ema_key


def step_key(seed: int, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def make_apply_fn(model: nn.Module) -> Callable:
    """`apply(params, x_t, t, text, text_mask) -> v` over a plain parameter tree."""

    def apply(params, x_t, t, text, text_mask):
        return model.apply({"params": params}, x_t, t, text, text_mask)

    return apply


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    apply_fn = make_apply_fn(model)
    patch = tuple(config.model.patch_size)
    cond_channels = int(config.model.get("cond_channels", 0) or 0)
    # VideoDiT's velocity has the latent channels C; check tasks and channels before jit.
    flow.check_config(config.diffusion, config.model, getattr(model, "out_channels", None))
    decays = tuple(config.optimizer.ema_decays)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # The shift depends on the bucket's shape, which is static within one compilation.
        alpha = flow.shift_alpha(config.diffusion, batch["latents"].shape[1:], patch)
        key = step_key(config.seed, state.step)

        def loss(params):
            return flow.loss_fn(
                apply_fn, params, batch, key, config.diffusion, alpha, cond_channels=cond_channels
            )

        (loss_value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        params = keep(params, state.params)
        opt_state = keep(opt_state, state.opt_state)
        ema = {}
        for d in decays:
            old = state.ema[ema_key(d)]
            new = jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, old, params)
            ema[ema_key(d)] = keep(new, old)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        metrics = {
            "train/loss": loss_value,
            "train/grad_norm": grad_norm,
            "train/param_norm": optax.tree.norm(params),
            "train/lr": schedule(state.step),
            "train/skipped": (~finite).astype(jnp.int32),
            "train/per_sample_loss": aux["per_sample_loss"],
            "train/t": aux["t"],
            "train/task": aux["task"],
        }
        return new_state, metrics

    return train_step
