"""The training loop's helpers, kept out of loop.py so the loop reads top to bottom:
resume checks, `init_from`, rollback, metric aggregation, and the eval hook."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sora_jax.diffusion import flow, validation
from sora_jax.models import lora as lora_lib
from sora_jax.models import text as text_lib
from sora_jax.training import checkpoint as ckpt_lib
from sora_jax.training import state as state_lib
from sora_jax.training import step as step_lib

log = logging.getLogger(__name__)


# --- Resume and initialization ---------------------------------------------------------


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, name + ".")
        elif a != b and not (isinstance(a, list | tuple) and list(a) == list(b or [])):
            out.append(f"{name}: checkpoint {a!r} -> now {b!r}")
    return out


def check_resume_structure(directory, step: int, abstract_state, config_json: dict) -> None:
    """Refuses to resume into a state of another structure (leaf names or shapes), naming
    the differing leaves and the config fields that changed since the checkpoint."""
    saved = ckpt_lib.saved_shapes(pathlib.Path(directory), step, "")
    if not saved:
        raise OSError(f"{directory}/{step}/state has no readable array metadata")
    wanted = ckpt_lib._flat_shapes(ckpt_lib.stored(abstract_state))  # a LoRA base is not saved
    report = ckpt_lib.load_report(saved, wanted)
    if not any(report.values()):
        return
    leaves = [f"{k} {n}" for k in ("missing", "unexpected", "reshaped") for n in report[k]]
    old = ckpt_lib.saved_config(directory, step)
    fields = _config_diff(old, config_json) if old is not None else ["(no config saved)"]
    raise StructureError(
        f"cannot resume from {directory}/{step}: the config changes the train state's "
        f"structure.\n  config fields that differ:\n    " + "\n    ".join(fields or ["none"])
        + "\n  state leaves that differ (first 10):\n    " + "\n    ".join(leaves[:10])
        + "\nuse a new --workdir, or start it from this run with --init_from="
        f"{pathlib.Path(directory).parent}"
    )  # fmt: skip


class StructureError(ValueError):
    """The checkpoint holds a train state of another structure than the config builds."""


def restore_for_resume(mngr, abstract_state, config_json: dict):
    """`(state, data_state, step)` of the newest committed checkpoint that reads back.

    Newest first: a step whose files cannot be read is skipped with a warning; a step that
    reads but holds another state structure stops the run (StructureError), since an
    older step would not fit either. None when no checkpoint restores.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            check_resume_structure(mngr.directory, step, abstract_state, config_json)
            return ckpt_lib.restore(mngr, abstract_state, step)
        except StructureError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is skipped, loudly
            # Moved aside, not deleted (nothing is lost), so the run can save this step anew.
            aside = pathlib.Path(mngr.directory) / f"{step}.unreadable"
            if jax.process_index() == 0:
                (pathlib.Path(mngr.directory) / str(step)).rename(aside)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
            mngr.reload()
            log.warning(
                "checkpoint %s/%d could not be restored (%s: %s); moved it to %s and trying "
                "the previous one",
                mngr.directory,
                step,
                type(e).__name__,
                (str(e).splitlines() or [""])[0][:200],
                aside.name,
            )
    return None


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
    ema = {k: params for k in state.ema}  # EMA starts at the loaded weights, as at init
    return state.replace(params=params, ema=ema)


def load_params(fresh, abstract, path, *, source="params", allow=(), patch=None):
    """`checkpoint.load_for_init` plus model surgery: when the saved patch kernel has fewer
    input channels than the model's (a t2v checkpoint for a model with
    `model.cond_channels`), it loads with zero rows for the added channels."""
    from sora_jax.models import surgery

    directory, step = ckpt_lib.resolve_checkpoint(path)
    key = surgery.PATCH_KERNEL
    saved = ckpt_lib.saved_shapes(directory, step, source).get(key)
    wanted = ckpt_lib._flat_shapes(abstract).get(key)
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
    from sora_jax.models import dit

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


def rollback(mngr, abstract_state, state, done: int, skips) -> Any:
    """Parameters and optimizer state of the last checkpoint before the run of skipped
    updates; the step counter (and the data, which moved on) stay at `done`."""
    first_bad = done - skips.consecutive + 1
    restored = ckpt_lib.restore_latest_valid(mngr, abstract_state, before=first_bad)
    if restored is None:
        raise RuntimeError(
            f"{skips.consecutive} consecutive non-finite updates up to step {done} and no "
            f"checkpoint before step {first_bad} to roll back to: lower optimizer.lr, check "
            "the data of these steps, or raise training.max_consecutive_skips"
        )
    good, _, good_step = restored
    good = state_lib.with_frozen(good, state)  # frozen parts are not in checkpoints
    log.warning(
        "%d consecutive non-finite updates up to step %d: rolled the parameters back to "
        "checkpoint %d; the data continues after step %d",
        skips.consecutive,
        done,
        good_step,
        done,
    )
    print(f"rollback: steps {first_bad}-{done} skipped; parameters of step {good_step}")
    skips.consecutive = 0
    step = jax.device_put(jnp.asarray(done, state.step.dtype), state.step.sharding)
    return good.replace(step=step)


# --- Metrics ---------------------------------------------------------------------------


def window_scalars(fetched: list[tuple[str, dict]], bins) -> dict[str, float]:
    """Means over the steps since the last log: every scalar metric, the loss per bucket
    (`train/loss/<bucket>`) and per timestep bin (`train/loss_t/<lo>-<hi>`), skips summed."""
    metrics = [m for _, m in fetched]
    out = {
        k: float(np.mean([m[k] for m in metrics]))
        for k in metrics[-1]
        if np.ndim(metrics[-1][k]) == 0
    }
    out["train/skipped"] = float(sum(m["train/skipped"] for m in metrics))
    for bucket in sorted({b for b, _ in fetched}):
        out[f"train/loss/{bucket}"] = float(
            np.mean([m["train/loss"] for b, m in fetched if b == bucket])
        )
    if "train/per_sample_loss" in metrics[-1] and "train/t" in metrics[-1]:
        losses = np.concatenate([np.ravel(m["train/per_sample_loss"]) for m in metrics])
        # t is [B], or [B, T'] with per-frame times: a sample's mean time names its bin.
        times = np.concatenate(
            [np.asarray(m["train/t"]).reshape(len(m["train/t"]), -1).mean(-1) for m in metrics]
        )
        for lo, hi in zip(bins[:-1], bins[1:], strict=True):
            sel = (times >= lo) & (times < hi) if hi < bins[-1] else (times >= lo)
            if sel.any():
                out[f"train/loss_t/{lo:.2f}-{hi:.2f}"] = float(losses[sel].mean())
    return out


# --- Eval hook -------------------------------------------------------------------------


class Evaluator:
    """Every `eval_every_steps`: the fixed-noise validation loss per bucket and timestep
    (sora_jax.diffusion.validation) on one fixed batch per bucket, and a fixed-seed sample
    grid with the EMA weights through the code of `sora_jax.sample`, written to
    `samples/<step>/`. The batches are the first batch the schedule draws from each bucket
    (training data: the number tracks fit, not generalization)."""

    def __init__(self, config, workdir, pipeline, model, mesh, manifest):
        self.config, self.workdir, self.mesh, self.manifest = config, workdir, mesh, manifest
        self.pipeline = pipeline
        self.apply_fn = step_lib.make_apply_fn(model)
        self.text_encoder = text_lib.step_encoder(config.text_encoder)  # embed='train_step'
        self._fns: dict[str, Any] = {}

    def _batch(self, key: str):
        from sora_jax.data import pipeline as pipeline_lib

        step = self.pipeline.first_step_of_each_bucket()[key]
        host = self.pipeline.batch_at(step)
        fields = self.pipeline.fields
        batch = pipeline_lib.to_global_batch(host, self.mesh, fields=fields)
        return {k: batch[k] for k in fields}

    def _params(self, state):
        decay = self.config.sample.get("ema_decay", 0.0)
        params, weights = state.params, "raw"
        if decay:
            params, weights = state.ema[state_lib.ema_key(decay)], f"ema {decay:g}"
        if state.base is not None:  # LoRA: the model is the base with the factors merged
            lora = lora_lib.LoraConfig.from_config(self.config.get("lora"))
            params = jax.jit(lora_lib.merge, static_argnums=2)(state.base, params, lora.scale)
        return params, weights

    def validation(self, state) -> dict[str, float]:
        return self.validation_of(self._params(state)[0], state.text_encoder)

    def validation_of(self, params, text_params=None) -> dict[str, float]:
        """`eval/val_<loss name>/<bucket>` of `params` on each bucket's fixed batch; with
        the text encoder in the step, the batch's ids are embedded with `text_params` (by
        default the encoder's weights, read once)."""
        if self.text_encoder is not None and text_params is None:
            self.text_encoder.load()
            text_params = self.text_encoder.params
        out = {}
        cond = int(self.config.model.get("cond_channels", 0) or 0)
        for b in self.pipeline.buckets:
            if b.weight <= 0:
                continue
            batch = self._batch(b.key)
            if b.key not in self._fns:
                alpha = flow.shift_alpha(
                    self.config.diffusion, b.shape, tuple(self.config.model.patch_size)
                )

                def fn(params, text_params, batch, alpha=alpha):
                    key = jax.random.key(self.config.seed + 1)
                    if self.text_encoder is not None:
                        batch = step_lib.embed_text(self.text_encoder, text_params, batch)
                    return validation.validation_loss(
                        self.apply_fn, params, batch, key, self.config.diffusion, alpha,
                        cond_channels=cond,
                    )  # fmt: skip

                self._fns[b.key] = jax.jit(fn)
            values = self._fns[b.key](params, text_params, batch)
            for name, value in jax.device_get(values).items():
                out[f"eval/val_{name}/{b.key}"] = float(value)
        return out

    def samples(self, state, step: int) -> None:
        from sora_jax.evaluation import generate
        from sora_jax.evaluation import requests as requests_lib

        params, weights = self._params(state)
        gen = generate.Generator(self.config, self.manifest, params, step, weights)
        if state.text_encoder is not None:  # the copy on the mesh, not a second one
            gen.text_encoder.use_params(state.text_encoder)
        options = requests_lib.SampleOptions.from_config(self.config.sample)
        generate.sample_to_dir(
            self.config, self.workdir, list(self.config.sample.prompts), options, generator=gen
        )

    def __call__(self, state, step: int) -> dict[str, float]:
        out = self.validation(state)
        if self.config.sample.get("prompts"):
            self.samples(state, step)
        return out
