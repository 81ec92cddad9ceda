r"""The DMD2 distillation step and its state (`distill.method='dmd2'`; the maths:
sora_jax/diffusion/dmd.py; the sCM step and the shared state: training/distill_step.py).

The state is the DiT's TrainState with the frozen teacher (the real score) as its `base`,
like sCM's; what DMD2 adds, the fake-score network φ and its optimizer state, lives in the
state's `opt_state`, which is then the optimizer state of the two players:

    opt_state = {"generator": the student's optimizer state,
                 "fake_score": φ (the teacher's parameter tree),
                 "fake_score_opt": φ's optimizer state}

so φ is sharded on the mesh like the student (same logical names), checkpointed and
restored with the rest of the state (bit-identical resume), and reported by `--mode=plan`
among the step's arguments; `params` and `ema` stay the generator's, so a checkpoint
samples and evaluates as any student. One step (`distill.fake_updates_per_generator` = K):

    x_0, text from the batch;  t from the n-step grid, x_t = (1 - t) x_0 + t eps
    if step % K == 0:  θ ← AdamW(∇_θ L_G)   (real and fake scores at τ, no gradient to them)
    φ ← AdamW(∇_φ L_fake) on x̂_0 = stop_gradient(G_θ(x_t, t)) of the step's θ (before
        its update), every step

Both optimizers are `config.optimizer` (DMD2 uses one learning rate for both); the EMA is
the generator's, updated on its own steps. A non-finite loss or gradient skips that
player's update (state kept), and counts in `train/skipped`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sora_jax.diffusion import dmd, flow, sampler
from sora_jax.models import dit
from sora_jax.models import text as text_lib
from sora_jax.training import step as step_lib
from sora_jax.training.step import apply_update, step_key


def with_fake_score(tree):
    """A TrainState-shaped tree (abstract state, shardings, boxed init) with DMD2's
    `opt_state`: the fake score takes the layout of `params`, its optimizer state that of
    the student's."""
    return tree.replace(
        opt_state={
            "generator": tree.opt_state,
            "fake_score": tree.params,
            "fake_score_opt": tree.opt_state,
        }
    )


def make_dmd2_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    d: ml_collections.ConfigDict,
):
    """`train_step(state, batch) -> (state, metrics)` of DMD2 (module doc); `d` the
    `distill` options (distill_step.options)."""
    apply_fn = dit.make_apply_fn(model)
    text_encoder = text_lib.step_encoder(config.text_encoder)
    decays = tuple(config.optimizer.ema_decays)
    every = int(d.fake_updates_per_generator)
    steps = int(d.dmd_steps)

    net = step_lib.t2v_net(apply_fn, config)

    def train_step(state, batch):
        x_data, text, mask, alpha = step_lib.batch_inputs(config, text_encoder, state, batch)
        b = x_data.shape[0]
        keys = flow.row_keys(step_key(config.seed, state.step), b)  # per row: split-free
        fold = lambda p: jax.vmap(lambda k: jax.random.fold_in(k, p))(keys)  # noqa: E731
        normal = lambda ks: jax.vmap(lambda k: jax.random.normal(k, x_data.shape[1:]))(ks)  # noqa: E731
        t = jax.vmap(lambda k: dmd.generator_time(k, steps, alpha))(fold(dmd.PURPOSE_GEN_TIME))
        x_t = flow.interpolate(x_data, normal(fold(dmd.PURPOSE_GEN_NOISE)), t)
        tau = jax.vmap(lambda k: dmd.score_time(k, d.dmd_t_min, d.dmd_t_max, alpha))(
            fold(dmd.PURPOSE_SCORE_TIME)
        )
        eps_tau = normal(fold(dmd.PURPOSE_SCORE_NOISE))
        teacher = jax.lax.stop_gradient(state.base)
        opt = state.opt_state
        fake = opt["fake_score"]

        def generate(params):
            return dmd.denoised(net(params, x_t, t, text, mask), x_t, t)  # x̂_0

        def generator_loss(params):
            x0 = generate(params)
            x_tau = flow.interpolate(jax.lax.stop_gradient(x0), eps_tau, tau)
            v_real = sampler.guided_velocity(net, teacher, x_tau, tau, text, mask, d.cfg_scale)
            real = dmd.denoised(v_real, x_tau, tau)
            fake_x0 = dmd.denoised(
                net(jax.lax.stop_gradient(fake), x_tau, tau, text, mask), x_tau, tau
            )
            grad = dmd.dmd_gradient(jax.lax.stop_gradient(x0), real, fake_x0)
            per_sample = dmd.generator_loss(x0, grad)
            return jnp.mean(per_sample), x0

        def generator_update(_):
            (loss, x0), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.params)
            inner = state.replace(opt_state=opt["generator"])
            new, finite, grad_norm = apply_update(inner, grads, loss, tx, decays)
            return new.params, new.opt_state, new.ema, x0, loss, grad_norm, finite

        def fake_only(_):
            x0 = generate(state.params)
            zero = jnp.zeros((), jnp.float32)
            return state.params, opt["generator"], state.ema, x0, zero, zero, jnp.bool_(True)

        gen_step = state.step % every == 0
        params, gen_opt, ema, x0, g_loss, g_norm, g_finite = jax.lax.cond(
            gen_step, generator_update, fake_only, None
        )

        # The fake score on the generator's samples (θ of this step, before its update).
        x0 = jax.lax.stop_gradient(x0)
        x_tau = flow.interpolate(x0, eps_tau, tau)

        def fake_loss(phi):
            per_sample = dmd.fake_score_loss(net(phi, x_tau, tau, text, mask), x0, eps_tau)
            return jnp.mean(per_sample), per_sample

        (f_loss, per_sample), f_grads = jax.value_and_grad(fake_loss, has_aux=True)(fake)
        f_norm = optax.tree.norm(f_grads)
        f_finite = jnp.isfinite(f_loss) & jnp.isfinite(f_norm)
        updates, f_opt = tx.update(f_grads, opt["fake_score_opt"], fake)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(f_finite, n, o), new, old)  # noqa: E731
        new_fake = keep(optax.apply_updates(fake, updates), fake)
        f_opt = keep(f_opt, opt["fake_score_opt"])

        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema=ema,
            opt_state={"generator": gen_opt, "fake_score": new_fake, "fake_score_opt": f_opt},
        )
        metrics = {
            # The fake score's denoising loss (every step; what tracks the generator).
            "train/loss": f_loss,
            "train/generator_loss": g_loss,  # L_G on generator steps, 0 otherwise
            "train/generator_step": gen_step.astype(jnp.int32),
            "train/grad_norm": g_norm,
            "train/fake_grad_norm": f_norm,
            "train/param_norm": optax.tree.norm(params),
            "train/lr": schedule(state.step),
            "train/skipped": ((~g_finite) | (~f_finite)).astype(jnp.int32),
            "train/per_sample_loss": per_sample,
            "train/t": tau,
        }
        return new_state, metrics

    return train_step
