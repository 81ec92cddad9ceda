"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

Randomness is `fold_in(fold_in(key(seed), step), purpose)` (docs/design.md, Decisions):
the step's key depends only on the seed and the step, so a resumed run draws the same
noise, times and caption dropout as an uninterrupted one. A step whose loss or gradients
are not finite leaves the state unchanged except for the step counter, and reports
`train/skipped = 1`.

Conditioning tasks (`diffusion.tasks`, sora_jax/diffusion/conditioning.py) are drawn inside
the loss from the batch's own latents; `model.cond_channels` (0 = given frames enter through
per-frame t = 0 only, C + 1 = also as input channels) is checked against the tasks and the
latent channels when the step is built, before anything is compiled.

LoRA (`config.lora.rank > 0`, sora_jax/models/lora.py): `state.params` holds the factors
A, B and `state.base` the frozen model. The step merges `W + (alpha / r) A B` inside jit and
differentiates the loss with respect to A and B only; the optimizer, the EMA and the
gradient norm see only the factors, and `state.base` passes through unchanged.

Text in the step (`text_encoder.embed='train_step'`, sora_jax/models/text.py): the batch
holds token ids `text_ids [B, S]` instead of `text [B, S, D]`; the step runs the frozen
encoder on them with `state.text_encoder` (sharded over the mesh like any parameter) before
the loss, outside the differentiated function, so no gradient or optimizer state exists
for it. Everything after that is the step of a dataset of stored embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sora_jax.diffusion import conditioning, flow, forcing
from sora_jax.diffusion import packed as packed_lib
from sora_jax.models import dit
from sora_jax.models import lora as lora_lib
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run.train_state import TrainState, ema_key


def step_key(seed: int, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def apply_update(
    state: TrainState, grads, loss_value: jax.Array, tx: optax.GradientTransformation, decays
) -> tuple[TrainState, jax.Array, jax.Array]:
    """The optimizer and EMA update of one step, skipped (state kept, step counted) when the
    loss or the gradient norm is not finite. Returns `(state, finite, grad_norm)`."""
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
    return new_state, finite, grad_norm


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    apply_fn = dit.make_apply_fn(model)
    lora = lora_lib.LoraConfig.from_config(config.get("lora"))
    text_encoder = text_lib.step_encoder(config.text_encoder)  # None: embeddings in the batch
    patch = tuple(config.model.patch_size)
    cond_channels = int(config.model.get("cond_channels", 0) or 0)
    # VideoDiT's velocity has the latent channels C; check tasks and channels before jit.
    flow.check_config(config.diffusion, config.model, getattr(model, "out_channels", None))
    loss_fn = forcing.loss_for(config)  # flow.loss_fn; a time per chunk for causal models
    decays = tuple(config.optimizer.ema_decays)
    # Micro-batches per step: gradients are summed over them, so a step of batch B costs
    # the activation memory of B / accum samples and computes the same update.
    accum = int(config.optimizer.get("grad_accum_steps", 1) or 1)
    if accum < 1:
        raise ValueError(f"optimizer.grad_accum_steps={accum} must be >= 1")

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if text_encoder is not None:
            batch = text_lib.embed_batch(text_encoder, state.text_encoder, batch)
        # The shift depends on the bucket's shape, which is static within one compilation.
        alpha = flow.shift_alpha(config.diffusion, batch["latents"].shape[1:], patch)
        key = step_key(config.seed, state.step)

        def fn(params, *inputs):
            if lora.enabled:  # params are the factors; the base is a constant of the loss
                params = lora_lib.merge(state.base, params, lora.scale)
            return apply_fn(params, *inputs)

        def loss(params, micro, row_offset):
            return loss_fn(
                fn, params, micro, key, config.diffusion, alpha,
                cond_channels=cond_channels, row_offset=row_offset,
            )  # fmt: skip

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        if accum == 1:
            (loss_value, aux), grads = grad_fn(state.params, batch, 0)
        else:
            (loss_value, aux), grads = _accumulate(grad_fn, state.params, batch, accum)
        new_state, finite, grad_norm = apply_update(state, grads, loss_value, tx, decays)
        params = new_state.params
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


def _accumulate(grad_fn, params, batch: dict, accum: int):
    """`grad_fn` over `accum` equal micro-batches of `batch`, in a scan: the mean loss, the
    mean gradient, and the per-sample aux concatenated back in batch order.

    The loss is a mean over samples with per-row random draws (flow.loss_fn's
    `row_offset`), so the result equals the whole-batch gradient up to float summation order.
    """
    b = batch["latents"].shape[0]
    if b % accum:
        raise ValueError(
            f"global batch {b} is not divisible by optimizer.grad_accum_steps={accum}; "
            "make the batch (data.global_batch_size or the bucket's) a multiple of it"
        )
    m = b // accum
    # [B, ...] -> [accum, B / accum, ...]: micro-batch j holds rows j m ... (j + 1) m - 1.
    micro = jax.tree.map(lambda x: x.reshape(accum, m, *x.shape[1:]), batch)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        part, j = xs
        (loss_j, aux_j), grads_j = grad_fn(params, part, j * m)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads_j)
        return (loss_sum + loss_j, grad_sum), aux_j

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), aux = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (micro, jnp.arange(accum))
    )
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    aux = jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), aux)  # [accum, m, ...] -> [B, ...]
    return (loss_sum / accum, aux), grads


def jit_train_step(model: nn.Module, tx, config: ml_collections.ConfigDict, mesh, shardings):
    """`make_train_step` jitted as the trainer runs it: state in and out in `shardings`
    (donated), the batch over ('data', 'fsdp'), metrics replicated."""

    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    return jax.jit(
        make_train_step(model, tx, config, schedule),
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


# --- Packed rows (data/packing.py, diffusion/packed.py) ----------------------------------


def make_packed_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch)` on packed rows: `tokens [B, L, P·C]`, `segment_ids`,
    `positions`, `segment_shapes [B, K, 3]`, `text [B, K, S, D]` (or `text_ids [B, K, S]`)
    and `text_mask [B, K, S]`. One shape for the whole run; the loss is
    `diffusion.packed.packed_loss_fn` (each clip its own draws and loss, the batch loss the
    mean over clips, or token-weighted). The update, EMA, skipping and metrics are the
    bucketed step's; `train/per_sample_loss`, `train/t`, `train/task` and
    `train/shape_class` are per sample slot `[B K]` (empty slots: t = -1, class -1)."""
    apply_fn = dit.make_apply_fn(model)
    lora = lora_lib.LoraConfig.from_config(config.get("lora"))
    text_encoder = text_lib.step_encoder(config.text_encoder)
    patch = tuple(config.model.patch_size)
    cond_channels = int(config.model.get("cond_channels", 0) or 0)
    flow.check_config(config.diffusion, config.model, getattr(model, "out_channels", None))
    packed_lib.packed_loss_mode(config.diffusion)  # a bad name fails before compiling
    decays = tuple(config.optimizer.ema_decays)
    accum = int(config.optimizer.get("grad_accum_steps", 1) or 1)
    if accum != 1:
        raise ValueError(
            f"optimizer.grad_accum_steps={accum}: packed rows train without accumulation "
            "(micro-batches hold different numbers of clips); set it to 1 and size "
            "data.packing.rows_per_batch / tokens_per_row instead"
        )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if text_encoder is not None:  # ids [B, K, S] -> embeddings [B, K, S, D]
            ids, mask = batch["text_ids"], batch["text_mask"]
            b, k, s = ids.shape
            flat = {"text_ids": ids.reshape(b * k, s), "text_mask": mask.reshape(b * k, s)}
            text = text_lib.embed_batch(text_encoder, state.text_encoder, flat)["text"]
            batch = {**batch, "text": text.reshape(b, k, s, -1)}
        key = step_key(config.seed, state.step)

        def fn(params, *inputs, **kw):
            if lora.enabled:
                params = lora_lib.merge(state.base, params, lora.scale)
            return apply_fn(params, *inputs, **kw)

        def loss(params):
            return packed_lib.packed_loss_fn(
                fn, params, batch, key, config.diffusion, patch=patch, cond_channels=cond_channels
            )

        (loss_value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        new_state, finite, grad_norm = apply_update(state, grads, loss_value, tx, decays)
        metrics = {
            "train/loss": loss_value,
            "train/grad_norm": grad_norm,
            "train/param_norm": optax.tree.norm(new_state.params),
            "train/lr": schedule(state.step),
            "train/skipped": (~finite).astype(jnp.int32),
            "train/samples": jnp.sum(aux["shape_class"] >= 0),
            "train/useful_tokens": jnp.sum(batch["segment_ids"] > 0),
            **{f"train/{k}": v for k, v in aux.items()},
        }
        return new_state, metrics

    return train_step


def jit_packed_train_step(model: nn.Module, tx, config, mesh, shardings):
    """`make_packed_train_step` jitted as `jit_train_step` jits the bucketed one."""
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    return jax.jit(
        make_packed_train_step(model, tx, config, schedule),
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def t2v_net(apply_fn: Callable, config: ml_collections.ConfigDict) -> Callable:
    """`net(params, x, t, text, mask) -> v`: the model on x with no given frames
    (text-to-video; zero conditioning channels when `model.cond_channels` > 0)."""
    cond_channels = int(config.model.get("cond_channels", 0) or 0)

    def net(params, x, t, text, text_mask):
        x_in = conditioning.model_input(x, None, None, cond_channels)
        return apply_fn(params, x_in, t, text, text_mask)

    return net


def batch_inputs(config: ml_collections.ConfigDict, text_encoder, state, batch) -> tuple:
    """`(latents float32, text, text_mask, alpha)` of a batch: its captions embedded by the
    step's frozen text encoder when the run has one (`text_lib.step_encoder`), `alpha` the
    time shift of its latent shape (`flow.shift_alpha`)."""
    if text_encoder is not None:
        batch = text_lib.embed_batch(text_encoder, state.text_encoder, batch)
    x = batch["latents"].astype(jnp.float32)
    alpha = flow.shift_alpha(config.diffusion, x.shape[1:], tuple(config.model.patch_size))
    return x, batch["text"], batch["text_mask"], alpha
