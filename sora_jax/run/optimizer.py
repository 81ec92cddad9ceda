"""Optimizer: AdamW with warmup + cosine / constant / warmup-stable-decay, clipping, masks.

Weight decay applies by a parameter's role, read from its name (the last key of its path),
never from its rank: with `model.scan_layers=True` every block parameter gains a leading
layers axis, so a bias `[layers, D]` or a norm scale `[layers, D]` has rank 2, and a q/k
norm scale is `[N, E]` even unscanned. Decayed: the matrices a layer multiplies its input
by (`DECAYED_NAMES`: dense and conv kernels, embedding tables, LoRA factors). Not decayed:
everything that adds to or scales activations (biases, norm scales, the adaLN modulation
tables `modulation` / `head_modulation`, q/k norm scales).
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


# Leaf names that weight decay applies to (models/layers.py, models/dit.py, models/vae.py,
# models/lora.py): linear maps of the input. Every other leaf (bias, scale, modulation,
# head_modulation, ...) is a shift or a gain and is never decayed.
DECAYED_NAMES = frozenset({"kernel", "embedding", "lora_a", "lora_b"})


def _leaf_name(path) -> str:
    """The last dict key of a leaf's path (a boxed leaf's path ends in `.value`)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def decay_mask(params):
    """True where weight decay applies: leaves named in `DECAYED_NAMES`, whatever their
    rank (scanned or not)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) in DECAYED_NAMES, params
    )


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
