r"""The distillation step and state: a few-step student trained against a frozen teacher.

The maths (sCM in the rectified-flow parameterization, guidance distilled as in rCM) is in
sora_jax/diffusion/consistency.py; this module turns it into the loop's pure
`train_step(state, batch) -> (state, metrics)` and its sharded state. A config with a
`distill` section (experiments/distill.py documents every field) selects it
(training/distill.py is the family the loop runs).

The state is the DiT's TrainState (run/train_state.py): `params`, `opt_state` and `ema` are
the student's, and the frozen teacher is the state's frozen `base`, sharded on the mesh
like the student (same logical names, same shardings). Frozen parts are never
checkpointed: the teacher is read again from `distill.teacher` at every start, so a
checkpoint of a student has exactly the layout of a DiT checkpoint and samples, evaluates,
resumes and `--init_from`s as one. A step:

    t ~ logit-normal(distill.logit_mean, distill.logit_std), shifted   x_t = (1-t) x_0 + t eps
    v_T  = teacher velocity with guidance distill.cfg_scale (one batched pass, both branches)
    (u⁻, du⁻/dt) = jax.jvp(student at θ⁻, (x_t, t), (v_T, 1))
    u_tgt = u⁻ + ĝ,  ĝ the normalized tangent with warmup r = min(1, step / warmup)
    loss = mean ‖u_θ(x_t, t) - u_tgt‖² / D      (gradient w.r.t. the student only)

The JVP runs through the model's attention: 'blockwise' (a custom_jvp,
models/blockwise_attention.py) and 'xla' differentiate forward; the fused kernels ('cudnn',
'splash') define only a VJP, so the step traces its one `jax.jvp` inside
`attention_jvp.forward_mode()`, which gives them a JVP rule whose tangent is the blockwise
kernel's (models/attention_jvp.py); the teacher and the student's gradient run the fused
kernels unchanged. Under context parallelism the fused kernels are refused.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sora_jax.config import ConfigError
from sora_jax.diffusion import consistency, flow, sampler
from sora_jax.models import attention, attention_jvp, dit
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import setup
from sora_jax.training import dmd_step
from sora_jax.training import step as step_lib
from sora_jax.training.step import apply_update, step_key

# Attention implementations whose forward-mode rule is a fused kernel's JVP wrapper
# (models/attention_jvp.py), which is not applied inside the context-parallel strategies.
FUSED_IMPLS = ("cudnn", "splash")
# Model fields that change how the network runs, not what it computes: the student may set
# them differently from the teacher's run.
RUNTIME_FIELDS = ("attention_impl", "remat", "dtype", "context_parallel", "splash_block_size")
# The model config a `python -m sora_jax.wan import` writes next to its checkpoints/
# (sora_jax.wan.MODEL_CONFIG_FILE).
IMPORT_MODEL_CONFIG = "model_config.json"

METHODS = ("scm", "dmd2")
DEFAULTS = dict(
    method="scm",
    teacher="",
    teacher_source="ema/decay_0p99",
    cfg_scale=3.0,
    logit_mean=-0.8,
    logit_std=1.6,
    tangent_warmup_steps=0,
    tangent_norm_c=0.1,
    dmd_steps=4,
    fake_updates_per_generator=5,
    dmd_t_min=0.02,
    dmd_t_max=0.98,
)


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether a config trains (or a run is) a few-step student: it has a `distill` section."""
    return config.get("distill") is not None


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.distill` over its defaults."""
    out = ml_collections.ConfigDict(dict(DEFAULTS))
    out.update(dict(config.distill))
    return out


def config_errors(config: ml_collections.ConfigDict, platform: str | None = None) -> list[str]:
    """What is wrong with a distillation config, each naming the field and the fix."""
    d, errors = options(config), []
    if not d.teacher:
        errors.append(
            "distill.teacher is empty: give the teacher run's workdir (or its checkpoints/ "
            "or one checkpoints/<step> directory)"
        )
    impl = config.model.get("attention_impl", "xla")
    resolved = attention.resolve_impl(
        impl, jnp.dtype(config.model.get("dtype", "float32")), platform
    )
    context_parallel = config.model.get("context_parallel", "none")
    if resolved in FUSED_IMPLS and context_parallel != "none":
        errors.append(
            f"model.attention_impl={impl!r} resolves to the fused kernel {resolved!r}, whose "
            f"JVP rule does not run under model.context_parallel={context_parallel!r}, and "
            "distillation differentiates the network forward: set "
            "model.attention_impl='blockwise' (memory-efficient) or 'xla'"
        )
    if int(config.get("lora", {}).get("rank", 0) or 0) > 0:
        errors.append("lora.rank > 0: distillation trains the whole student; set lora.rank=0")
    if int(config.optimizer.get("grad_accum_steps", 1) or 1) != 1:
        errors.append(
            "optimizer.grad_accum_steps > 1 is not implemented for distillation; set it to 1"
        )
    if d.method not in METHODS:
        errors.append(f"distill.method={d.method!r} is unknown; choose one of {METHODS}")
    if d.method == "dmd2":
        if d.dmd_steps < 1:
            errors.append(f"distill.dmd_steps={d.dmd_steps} must be >= 1 (the generator's steps)")
        if d.fake_updates_per_generator < 1:
            errors.append(
                f"distill.fake_updates_per_generator={d.fake_updates_per_generator} must be >= 1"
            )
        if not 0.0 <= d.dmd_t_min < d.dmd_t_max <= 1.0:
            errors.append(
                f"distill.dmd_t_min={d.dmd_t_min}, distill.dmd_t_max={d.dmd_t_max}: need "
                "0 <= dmd_t_min < dmd_t_max <= 1"
            )
    if d.cfg_scale < 1.0:
        errors.append(f"distill.cfg_scale={d.cfg_scale} must be >= 1 (1 = no guidance)")
    if d.logit_std <= 0:
        errors.append(f"distill.logit_std={d.logit_std} must be > 0")
    if d.tangent_warmup_steps < 0:
        errors.append(f"distill.tangent_warmup_steps={d.tangent_warmup_steps} must be >= 0")
    return errors


def check_config(config: ml_collections.ConfigDict, platform: str | None = None) -> None:
    errors = config_errors(config, platform)
    if errors:
        raise ConfigError("invalid distillation config:\n  - " + "\n  - ".join(errors))


# --- State ------------------------------------------------------------------------------


def setup_state(config, manifest, mesh, rules):
    """`(model, tx, init_fn, abstract, shardings)` of the DiT's state with the teacher as
    its frozen `base` (same shapes and shardings as the student's parameters); for DMD2 the
    fake-score network and its optimizer state in `opt_state` (training/dmd_step.py)."""
    check_config(config, mesh.devices.flat[0].platform)
    model, tx, init_fn, abstract, shardings = setup.setup_state(config, manifest, mesh, rules)
    if options(config).method == "dmd2":
        base_init = init_fn

        def init_fn(rng):
            return dmd_step.with_fake_score(base_init(rng))

        abstract, shardings = (
            dmd_step.with_fake_score(abstract),
            dmd_step.with_fake_score(shardings),
        )
    abstract = abstract.replace(base=abstract.params)
    shardings = shardings.replace(base=shardings.params)
    return model, tx, init_fn, abstract, shardings


def check_teacher_model(config, teacher_dir, step: int) -> None:
    """Refuses a teacher whose run built another model (fields other than RUNTIME_FIELDS).

    The teacher's model is the config saved with its checkpoint or, for a `python -m
    sora_jax.wan import` output (no saved config), the import's `model_config.json`.
    """
    saved = ckpt_lib.saved_config(teacher_dir, step)
    imported = pathlib.Path(teacher_dir).parent / IMPORT_MODEL_CONFIG
    if saved is None and imported.is_file():
        try:
            theirs = dit.model_fields(json.loads(imported.read_text())["model"])
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"distill.teacher={teacher_dir}/{step}: {imported} does not give the "
                f"imported model's fields ({e}); import it again with python -m sora_jax.wan"
            ) from e
    elif saved is None:
        return  # an older checkpoint without its config: the leaf shapes are still checked
    else:
        theirs = saved.get("model", {})
    ours = dit.model_fields(config.model)
    diff = [
        f"model.{k}: teacher {theirs.get(k)!r} vs student {v!r}"
        for k, v in sorted(ours.items())
        if k not in RUNTIME_FIELDS and k in theirs and _norm(theirs[k]) != _norm(v)
    ]
    if diff:
        raise ConfigError(
            f"distill.teacher={teacher_dir}/{step} was trained with another model:\n  "
            + "\n  ".join(diff)
            + "\nthe student is the teacher's architecture: set these fields as the teacher's"
        )


def _norm(v):
    return list(v) if isinstance(v, list | tuple) else v


def load_teacher(config, abstract_params, fresh_params):
    """The teacher's parameters (`distill.teacher`, tree `distill.teacher_source`) read
    onto the mesh in the student's shardings, and the checkpoint they came from."""
    d = options(config)
    directory, step = ckpt_lib.resolve_checkpoint(d.teacher)
    check_teacher_model(config, directory, step)
    try:
        params, report = ckpt_lib.load_for_init(
            f"{directory}/{step}", abstract_params, fresh_params, source=d.teacher_source
        )
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"distill.teacher={d.teacher} (distill.teacher_source={d.teacher_source!r}) does "
            f"not load into the student: {e}"
        ) from e
    return params, report["checkpoint"]


# --- Step -------------------------------------------------------------------------------


def make_distill_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
):
    """`train_step(state, batch) -> (state, metrics)` of consistency distillation."""
    apply_fn = dit.make_apply_fn(model)
    d = options(config)
    text_encoder = text_lib.step_encoder(config.text_encoder)
    decays = tuple(config.optimizer.ema_decays)
    warmup = int(d.tangent_warmup_steps)

    net = step_lib.t2v_net(apply_fn, config)

    def train_step(state, batch):
        x_0, text, mask, alpha = step_lib.batch_inputs(config, text_encoder, state, batch)
        b = x_0.shape[0]
        key = step_key(config.seed, state.step)
        # Per-row draws (flow.row_keys): a row's time and noise do not depend on the split.
        keys = flow.row_keys(key, b)
        t = jax.vmap(
            lambda k: consistency.sample_times(
                jax.random.fold_in(k, consistency.PURPOSE_DISTILL_TIME),
                1, d.logit_mean, d.logit_std, alpha,
            )[0]
        )(keys)  # fmt: skip
        eps = jax.vmap(
            lambda k: jax.random.normal(
                jax.random.fold_in(k, consistency.PURPOSE_DISTILL_NOISE), x_0.shape[1:]
            )
        )(keys)
        x_t = flow.interpolate(x_0, eps, t)

        # Teacher (frozen, no gradient) and the student's tangent at θ⁻ (no gradient).
        teacher = jax.lax.stop_gradient(state.base)
        v_t = sampler.guided_velocity(
            lambda p, x, tt, s, m: net(p, x, tt, s, m), teacher, x_t, t, text, mask, d.cfg_scale
        )
        frozen = jax.lax.stop_gradient(state.params)
        with attention_jvp.forward_mode():  # a JVP rule for fused attention kernels
            u_minus, du_dt = consistency.tangent(
                lambda x, tt: net(frozen, x, tt, text, mask), x_t, t, v_t
            )
        r = 1.0 if warmup == 0 else jnp.minimum(1.0, state.step.astype(jnp.float32) / warmup)
        u_tgt, g_norm = consistency.target(
            u_minus, du_dt, v_t, t, tangent_scale=r, norm_c=float(d.tangent_norm_c)
        )
        u_tgt = jax.lax.stop_gradient(u_tgt)

        def loss_fn(params):
            u = net(params, x_t, t, text, mask)
            per_sample = jnp.mean(jnp.square(u - u_tgt), axis=tuple(range(1, u.ndim)))  # [B]
            return jnp.mean(per_sample), per_sample

        (loss, per_sample), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, finite, grad_norm = apply_update(state, grads, loss, tx, decays)
        dims = float(x_0[0].size)
        metrics = {
            "train/loss": loss,
            # ‖g‖² / D: the consistency residual before normalization (0 when consistent).
            "train/residual": jnp.mean(jnp.square(g_norm)) / dims,
            "train/tangent_scale": jnp.asarray(r, jnp.float32),
            "train/grad_norm": grad_norm,
            "train/param_norm": optax.tree.norm(new_state.params),
            "train/lr": schedule(state.step),
            "train/skipped": (~finite).astype(jnp.int32),
            "train/per_sample_loss": per_sample,
            "train/t": t,
        }
        return new_state, metrics

    return train_step


def jit_distill_step(model, tx, config, mesh, shardings):
    """`make_distill_step` jitted as the trainer runs it (state donated, batch over
    ('data', 'fsdp'), metrics replicated), like step.jit_train_step."""
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    d = options(config)
    if d.method == "dmd2":
        step = dmd_step.make_dmd2_step(model, tx, config, schedule, d)
    else:
        step = make_distill_step(model, tx, config, schedule)
    return jax.jit(
        step,
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
