"""Model parameters read from checkpoints: `--init_from` (another run's parameters, with
patch-kernel surgery for added conditioning channels), a LoRA run's frozen base, and the
parameters a sampler or evaluator uses (`restore_params_for_sampling`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from sora_jax.models import dit, surgery
from sora_jax.models import lora as lora_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib


def init_from(state, abstract_state, path: str, opts, mesh, *, patch=None, workdir=None):
    """The fresh `state` with parameters (and EMA copies) loaded from another run.

    A LoRA state (`state.base` set) loads the frozen base instead, keeps its fresh factors,
    and records the checkpoint in `workdir` for resumes and sampling. With the model's
    `patch` given, a saved patch kernel with fewer input channels is extended with zero rows
    (sora_jax/models/surgery.py: a t2v checkpoint into an i2v model, same output at step 0).
    """
    lora = state.base is not None
    params, report = load_params(
        state.base if lora else state.params,
        abstract_state.base if lora else abstract_state.params,
        path,
        source=opts.init_from_source,
        allow=tuple(opts.init_from_allow),
        patch=patch,
    )
    print(
        f"init_from {report['checkpoint']} ({report['source']}): {report['loaded']} leaves "
        f"loaded{' as the frozen LoRA base' if lora else ''}; kept fresh: missing "
        f"{report['missing']}, reshaped {report['reshaped']}; ignored: {report['unexpected']}",
        flush=True,
    )
    if lora:
        if workdir is not None:
            ckpt_lib.record_lora_base(
                workdir, report["checkpoint"], opts.init_from_source, tuple(opts.init_from_allow)
            )
        return state.replace(base=params)
    # The EMA starts at the loaded weights, as at init, in buffers of its own: the train
    # step donates the state, and one buffer donated twice is an error.
    ema = {k: jax.tree.map(jnp.copy, params) for k in state.ema}
    return state.replace(params=params, ema=ema)


def load_params(fresh, abstract, path, *, source="params", allow=(), patch=None):
    """`checkpoint.load_for_init` plus model surgery: when the saved patch kernel has fewer
    input channels than the model's (a t2v checkpoint for a model with
    `model.cond_channels`), it loads with zero rows for the added channels."""
    directory, step = ckpt_lib.resolve_checkpoint(path)
    key = surgery.PATCH_KERNEL
    saved = ckpt_lib.saved_shapes(directory, step, source).get(key)
    wanted = ckpt_lib.flat_shapes(abstract).get(key)
    added = 0
    if patch is not None and saved is not None and wanted is not None:
        if tuple(saved[1:]) == tuple(wanted[1:]):
            added = surgery.added_channels(saved[0], wanted[0], patch)
    allow = tuple(allow) + ((key,) if added else ())
    params, report = ckpt_lib.load_for_init(
        f"{directory}/{step}", abstract, fresh, source=source, allow=allow
    )
    if not added:
        return params, report
    # Read the saved kernel at its own shape, then append the zero rows.
    leaf = abstract["patch_embedding"]["kernel"]
    target = {
        "patch_embedding": {
            "kernel": jax.ShapeDtypeStruct(saved, leaf.dtype, sharding=leaf.sharding)
        }
    }
    wrapped = node = {}
    parts = source.split("/")
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = target
    restored, _ = ckpt_lib.restore_params(directory, wrapped, step)
    for k in parts:
        restored = restored[k]
    kernel = surgery.expand_patch_kernel(restored["patch_embedding"]["kernel"], patch, added)
    embed = dict(params["patch_embedding"], kernel=jax.device_put(kernel, leaf.sharding))
    params = {**params, "patch_embedding": embed}
    report["reshaped"] = [r for r in report["reshaped"] if not r.startswith(key + ":")]
    report["loaded"] += 1
    report["surgery"] = f"{key} {tuple(saved)} -> {tuple(wanted)}: +{added} input channels"
    print(
        f"init_from: {key} saved {tuple(saved)} -> model {tuple(wanted)}: added {added} "
        "conditioning input channels with zero rows (sora_jax.models.surgery), so the model "
        "outputs what the checkpoint's model did until training uses them",
        flush=True,
    )
    return params, report


def lora_base(workdir, init_fn, abstract_state, shardings, mesh, rules, config):
    """The frozen base of a LoRA run, reloaded from the checkpoint its first start recorded
    (`lora_base.json`): leaves it kept fresh then are re-created from the same seed."""
    record = ckpt_lib.recorded_lora_base(workdir)

    def init_base(rng):
        return nn.meta.unbox(init_fn(rng)).base

    with jax.set_mesh(mesh):
        fresh = jax.jit(init_base, out_shardings=shardings.base)(jax.random.key(config.seed))
        base, report = load_params(
            fresh,
            abstract_state.base,
            record["checkpoint"],
            source=record["source"],
            allow=tuple(record["allow"]),
            patch=tuple(dit.model_fields(config.model).get("patch_size", dit.VideoDiT.patch_size)),
        )
    print(f"LoRA base reloaded from {report['checkpoint']} ({report['source']})", flush=True)
    return base


def restore_params_for_sampling(
    workdir: str | os.PathLike,
    config,
    manifest: dict[str, Any],
    mesh,
    rules,
    *,
    step: int | None = None,
    ema_decay: float | None = None,
    build=None,
):
    """`(params, step, weights)`: the model parameters of a run's checkpoint, ready for
    `VideoDiT.apply`: the EMA with `ema_decay` (> 0) or the raw parameters (0/None); for a
    LoRA run (`config.lora.rank > 0`) the factors merged into the recorded frozen base.
    `weights` names what was loaded ('raw', 'ema 0.999', '+ lora r=…'). `build`: the
    state's constructor (default `setup.setup_state`; run/experts.py passes its own)."""
    workdir = pathlib.Path(workdir)
    build = build or setup.setup_state
    _, _, init_fn, abstract, shardings = build(config, manifest, mesh, rules)
    if ema_decay:
        key = state_lib.ema_key(ema_decay)
        if key not in abstract.ema:
            raise ValueError(
                f"the run keeps no EMA with decay {ema_decay}; it has "
                f"{list(config.optimizer.ema_decays)} (use 0 for the raw parameters)"
            )
        target, weights = {"ema": {key: abstract.ema[key]}}, f"ema {ema_decay:g}"
    else:
        target, weights = {"params": abstract.params}, "raw"
    with jax.set_mesh(mesh):
        restored, step = ckpt_lib.restore_params(workdir / "checkpoints", target, step)
    params = restored["ema"][key] if ema_decay else restored["params"]
    lora = lora_lib.LoraConfig.from_config(config.get("lora"))
    if lora.enabled:
        base = lora_base(workdir, init_fn, abstract, shardings, mesh, rules, config)
        with jax.set_mesh(mesh):
            params = jax.jit(lora_lib.merge, static_argnums=2)(base, params, lora.scale)
        weights += f" + lora r={lora.rank}"
    return params, step, weights
