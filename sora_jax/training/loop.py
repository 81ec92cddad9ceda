"""The training loop, top to bottom: config → mesh → data → state → restore → compile → steps.

Re-running the same command in the same workdir resumes from the latest committed
checkpoint, with the data pipeline at the same position: the continuation draws exactly
the batches and random numbers an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from sora_jax import config as config_lib
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.models import build_model
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.training import checkpoint as ckpt_lib
from sora_jax.training import metrics as metrics_lib
from sora_jax.training import optimizer as optimizer_lib
from sora_jax.training import plan as plan_lib
from sora_jax.training import state as state_lib
from sora_jax.training import step as step_lib

log = logging.getLogger(__name__)


def model_for(config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> nn.Module:
    """The VideoDiT for a config, sized to the dataset's latent channels and text width."""
    return build_model(
        config.model,
        in_channels=manifest["tokenizer"]["latent_channels"],
        text_dim=manifest["text_encoder"]["dim"],
    )


def example_inputs(config, manifest, batch: int = 1) -> tuple:
    """Zero inputs of the first bucket's shape, for initialization and abstract shapes."""
    first = buckets_lib.buckets_from_config(config.data)[0].name
    shape = manifest["buckets"][first]["shape"]
    max_len = manifest["text_encoder"]["max_length"]
    # Conditioning channels (given latents + mask) are concatenated to x_t by the loss.
    channels = shape[-1] + int(config.model.get("cond_channels", 0) or 0)
    return (
        jnp.zeros((batch, *shape[:-1], channels), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, max_len, manifest["text_encoder"]["dim"]), jnp.float32),
        jnp.ones((batch, max_len), bool),
    )


def setup_state(config, manifest, mesh, rules):
    """The model, the optimizer, the init function and the abstract sharded state."""
    model = model_for(config, manifest)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    init_fn = state_lib.make_init_fn(
        model, tx, example_inputs(config, manifest), tuple(config.optimizer.ema_decays)
    )
    abstract, shardings = state_lib.abstract_state(init_fn, mesh, rules)
    return model, tx, init_fn, abstract, shardings


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) a run in `workdir`; returns a summary of the run."""
    workdir = pathlib.Path(workdir)

    # --- Config -------------------------------------------------------------------------
    config_lib.validate(config)

    # --- Mesh ---------------------------------------------------------------------------
    mesh = mesh_lib.create_mesh(config.mesh)
    rules = mesh_lib.logical_rules(config.mesh)
    log.info("mesh %s", dict(mesh.shape))

    # --- Data ---------------------------------------------------------------------------
    # Datasets, weights and per-bucket global batches from config.data; every manifest is
    # checked against the model's tokenizer and text encoder (docs/data_pipeline.md).
    pipeline = pipeline_lib.from_config(
        config, workdir, data_parallel=mesh.shape["data"] * mesh.shape["fsdp"]
    )
    manifest = pipeline.manifest  # the shared tokenizer / text encoder, buckets by name
    print(pipeline.report(), flush=True)
    check_every = config.data.get("schedule_check_every_steps", 100)

    # --- State --------------------------------------------------------------------------
    model, tx, init_fn, abstract, shardings = setup_state(config, manifest, mesh, rules)
    mngr = ckpt_lib.manager(workdir / "checkpoints", max_to_keep=config.checkpoint_max_to_keep)

    # --- Restore ------------------------------------------------------------------------
    if mngr.latest_step() is not None:
        with jax.set_mesh(mesh):
            state, data_state, start = ckpt_lib.restore(mngr, abstract)
        pipeline.set_state(data_state)
        metrics_lib.truncate_after(workdir, start)
        print(f"resumed from {workdir / 'checkpoints'} at step {start}", flush=True)
    else:
        state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
        start = 0
    n_params = state_lib.param_count(state.params)
    print(f"model: {n_params:,} parameters", flush=True)

    # --- Compile ------------------------------------------------------------------------
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    train_step = step_lib.make_train_step(model, tx, config, schedule)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    # One executable per bucket, compiled now (or loaded from the persistent cache): a
    # batch that does not fit its bucket's executable fails loudly instead of recompiling.
    steps = plan_lib.pipeline_step_shapes(pipeline)
    compiled, plans = plan_lib.compile_steps(jitted, abstract, manifest, steps, config, mesh, rules)
    expected = {s.key: plan_lib.abstract_batch(manifest, s, mesh) for s in steps}
    log.info("compiled %d bucket(s) in %.1f s", len(plans), sum(p.compile_s for p in plans))

    # --- Loop ---------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir)
    fields = ("latents", "text", "text_mask")
    last_loss = float("nan")
    window: list[dict] = []
    wait_ms = 0.0
    t_log = time.perf_counter()
    steps_since_log = 0
    progress = tqdm(
        total=config.total_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
    )
    step = start
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start, config.total_steps):
            if step == start or (check_every > 0 and step % check_every == 0):
                # Every process derives the same bucket and batch for this step, or all stop
                # here with a named error instead of hanging in a mismatched collective.
                pipeline_lib.check_schedule_agreement(pipeline, step)
            t0 = time.perf_counter()
            host = next(pipeline)
            batch = pipeline_lib.to_global_batch(host, mesh, fields=fields)
            wait_ms += 1e3 * (time.perf_counter() - t0)
            inputs = {k: batch[k] for k in fields}
            plan_lib.check_batch(inputs, expected[host["bucket"]], host["bucket"])
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = compiled[host["bucket"]](state, inputs)
            window.append(metrics)
            steps_since_log += 1
            done = step + 1
            if done % config.log_every_steps == 0 or done == config.total_steps:
                fetched = jax.device_get(window)
                dt = time.perf_counter() - t_log
                scalars = {
                    k: float(np.mean([m[k] for m in fetched]))
                    for k in fetched[-1]
                    if np.ndim(fetched[-1][k]) == 0
                }
                scalars["train/skipped"] = float(sum(m["train/skipped"] for m in fetched))
                scalars["perf/steps_per_s"] = steps_since_log / dt
                scalars["perf/samples_per_s"] = steps_since_log * config.data.global_batch_size / dt
                scalars["data/wait_ms"] = wait_ms / steps_since_log
                writer.write(done, scalars)
                last_loss = scalars["train/loss"]
                progress.set_postfix(loss=f"{last_loss:.4f}")
                window, wait_ms, steps_since_log, t_log = [], 0.0, 0, time.perf_counter()
            progress.update(1)
            if done % config.checkpoint_every_steps == 0 or done == config.total_steps:
                ckpt_lib.save(mngr, done, state, pipeline.get_state())
    progress.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    return {
        "workdir": str(workdir),
        "final_step": int(jax.device_get(state.step)),
        "final_loss": last_loss,
        "parameters": n_params,
        "checkpoint": str(workdir / "checkpoints"),
    }
