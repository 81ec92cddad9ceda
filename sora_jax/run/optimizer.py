"""Optimizer: AdamW with warmup + cosine / constant / warmup-stable-decay, clipping, masks.

Weight decay applies to matrices only (kernels of rank >= 2); norms, biases and scales are
never decayed.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """`optimizer.schedule`: 'cosine' | 'constant' | 'wsd', each after a linear warmup."""
    lr, warmup = config.lr, config.warmup_steps
    name = config.schedule
    if name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
            [warmup],
        )
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup, 1), max(total_steps, warmup + 1), end_value=lr * config.lr_end
        )
    if name == "wsd":
        # Warmup-stable-decay: constant after warmup, linear decay over the last fraction.
        decay = max(int(total_steps * config.decay_fraction), 1)
        stable = max(total_steps - warmup - decay, 0)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, max(warmup, 1)),
                optax.constant_schedule(lr),
                optax.linear_schedule(lr, lr * config.lr_end, decay),
            ],
            [warmup, warmup + stable],
        )
    raise ValueError(f"optimizer.schedule={name!r} is unknown; use cosine, constant or wsd")


def decay_mask(params):
    """True where weight decay applies: matrices (rank >= 2), not vectors."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )
