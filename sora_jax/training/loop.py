"""The training loop, top to bottom: config → mesh → data → state → restore → compile →
steps (metrics, eval hooks, checkpoints).

Re-running the same command in the same workdir resumes from the latest committed
checkpoint that reads back, with the data pipeline at the same position: the continuation
draws exactly the batches and random numbers an uninterrupted run would have. A resume
whose config changes the state's structure is refused, naming the differing fields.
`training.init_from` (or `--init_from`) starts a new run from another run's parameters.
With `lora.rank > 0` (sora_jax/models/lora.py) those parameters are the frozen base and
only LoRA factors train; the base's checkpoint is recorded in the workdir and reloaded on
resume (checkpoints hold the factors, not the base).

Failures (sora_jax/training/resilience.py): a non-finite update is skipped and counted;
`training.max_consecutive_skips` in a row roll the parameters back to the newest checkpoint
before the streak's first step while the data moves on (training/rollback.py; no periodic
checkpoint is saved inside a streak); SIGTERM saves and exits cleanly;
a step that stalls far beyond the median ends the process with a stack dump.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
from flax import linen as nn
from tqdm import tqdm

from sora_jax.data import pipeline as pipeline_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import params as params_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import eval_hook, perf, resilience, resume, rollback
from sora_jax.training import metrics as metrics_lib
from sora_jax.training import plan as plan_lib
from sora_jax.training import step as step_lib

log = logging.getLogger(__name__)

# Timestep bins of the per-bin training loss (`train/loss_t/<lo>-<hi>`).
TIME_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _host_log(workdir: pathlib.Path) -> logging.Handler:
    """Every process logs to WORKDIR/logs/host_<process index>.log (warnings and up; INFO
    too with --verbosity=0)."""
    path = workdir / "logs" / f"host_{jax.process_index()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    return handler


def _train_vae(config, workdir, **unused):
    from sora_jax.training import vae as vae_training  # trains on pixels, not on shards

    return vae_training.train_vae(config, workdir)


# Trainers other than the DiT loop below, by `model.name` (a registry, not an if/elif chain).
TRAINERS = {"causal_vae": _train_vae}


def train(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, init_from: str = ""
) -> dict[str, Any]:
    """Trains (or resumes) a run in `workdir`; returns a summary of the run."""
    if config.model.name in TRAINERS:
        return TRAINERS[config.model.name](config, workdir, init_from=init_from)
    workdir = pathlib.Path(workdir)

    # --- Config -------------------------------------------------------------------------
    validate_lib.validate(config)
    opts = setup.options(config)
    host_log = _host_log(workdir)
    init_from = init_from or opts.init_from

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
    model, tx, init_fn, abstract, shardings = setup.setup_state(config, manifest, mesh, rules)
    mngr = ckpt_lib.manager(
        workdir / "checkpoints",
        max_to_keep=config.checkpoint_max_to_keep,
        keep_period=opts.checkpoint_keep_period or None,
    )
    config_json = config.to_dict()

    # --- Restore (or initialize) --------------------------------------------------------
    restored = None
    if mngr.all_steps():
        with jax.set_mesh(mesh):
            restored = resume.restore_for_resume(mngr, abstract, config_json)
        if restored is None:
            raise RuntimeError(
                f"no checkpoint in {mngr.directory} restores (all failed, see the warnings): "
                "move the directory away to start afresh, or fix the files"
            )
    lora = abstract.base is not None  # LoRA: checkpoints hold the factors, not the base
    if restored is not None:
        state, data_state, start = restored
        if lora:
            base = params_lib.lora_base(workdir, init_fn, abstract, shardings, mesh, rules, config)
            state = state.replace(base=base)
        pipeline.set_state(data_state)
        metrics_lib.truncate_after(workdir, start)
        print(f"resumed from {workdir / 'checkpoints'} at step {start}", flush=True)
    else:
        if lora and not init_from:
            raise ValueError(
                f"lora.rank={config.lora.rank} fine-tunes a trained model, but no base was "
                "given: pass --init_from=BASE_RUN (or training.init_from), or set lora.rank=0"
            )
        state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
        start = 0
        if init_from:
            state = params_lib.init_from(
                state, abstract, init_from, opts, mesh, patch=model.patch_size, workdir=workdir
            )
    state = setup.place_text_encoder(state, config, shardings)
    n_params = state_lib.param_count(state.params)
    if lora:
        n_base = state_lib.param_count(state.base)
        print(f"model: {n_base:,} frozen + {n_params:,} LoRA parameters", flush=True)
    else:
        print(f"model: {n_params:,} parameters", flush=True)

    # --- Compile ------------------------------------------------------------------------
    jitted = step_lib.jit_train_step(model, tx, config, mesh, shardings)
    # One executable per bucket, compiled now (or loaded from the persistent cache): a
    # batch that does not fit its bucket's executable fails loudly instead of recompiling.
    shapes = plan_lib.pipeline_step_shapes(pipeline)
    compiled, plans = plan_lib.compile_steps(
        jitted, abstract, manifest, shapes, config, mesh, rules
    )
    expected = {s.key: plan_lib.abstract_batch(manifest, s, mesh) for s in shapes}
    plan_of = {p.bucket: p for p in plans}
    log.info("compiled %d bucket(s) in %.1f s", len(plans), sum(p.compile_s for p in plans))
    evaluator = eval_hook.Evaluator(config, workdir, pipeline, model, mesh, manifest)

    # --- Loop ---------------------------------------------------------------------------
    writer = metrics_lib.MetricsWriter(workdir)
    skips = resilience.SkipTracker(opts.max_consecutive_skips)
    peak = perf.peak_flops(mesh.devices.flat[0])
    window: list[tuple[str, dict]] = []  # (bucket, on-device metrics) since the last log
    pending: list[tuple[int, Any]] = []  # (step, on-device skip flag) not yet counted
    wait_s = ckpt_block_s = eval_s = 0.0  # of the window, subtracted from its time (perf.py)
    t_log = time.perf_counter()
    last_loss, preempted, rollbacks = float("nan"), False, 0
    progress = tqdm(
        total=config.total_steps, initial=start, desc="train", unit="step",
        disable=jax.process_index() != 0,
    )  # fmt: skip
    watchdog = resilience.Watchdog(
        factor=opts.watchdog_factor,
        min_timeout_s=opts.watchdog_min_timeout_s,
        log_dir=workdir / "logs",
    ).start()
    profile = tuple(opts.profile_steps)
    step = start
    with (
        jax.set_mesh(mesh),
        nn.logical_axis_rules(rules),
        resilience.Preemption(sync_every_steps=check_every or 1) as preemption,
    ):
        for step in range(start, config.total_steps):
            if step == start or (check_every > 0 and step % check_every == 0):
                # Every process derives the same bucket and batch for this step, or all stop
                # here with a named error instead of hanging in a mismatched collective.
                pipeline_lib.check_schedule_agreement(pipeline, step)
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "profile"))

            # Step.
            t0 = time.perf_counter()
            host = next(pipeline)
            batch = pipeline_lib.to_global_batch(host, mesh, fields=pipeline.fields)
            wait_s += time.perf_counter() - t0
            inputs = {k: batch[k] for k in pipeline.fields}
            plan_lib.check_batch(inputs, expected[host["bucket"]], host["bucket"])
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = compiled[host["bucket"]](state, inputs)
            window.append((host["bucket"], metrics))
            done = step + 1
            pending.append((done, metrics["train/skipped"]))
            if profile and done == profile[-1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()

            # Metrics (and the rollback after too many non-finite updates in a row).
            if done % config.log_every_steps == 0 or done == config.total_steps:
                fetched = [(b, jax.device_get(m)) for b, m in window]
                dt = time.perf_counter() - t_log
                scalars = metrics_lib.window_scalars(fetched, TIME_BINS)
                scalars.update(
                    perf.throughput(
                        steps=len(fetched),
                        seconds=dt,
                        samples=sum(plan_of[b].global_batch for b, _ in fetched),
                        tokens=sum(plan_of[b].global_batch * plan_of[b].tokens for b, _ in fetched),
                        flops=sum(plan_of[b].model_tflops_per_step * 1e12 for b, _ in fetched),
                        devices=mesh.devices.size,
                        peak=peak,
                        eval_s=eval_s,
                        checkpoint_block_s=ckpt_block_s,
                    )
                )
                scalars["data/wait_ms"] = 1e3 * wait_s / len(fetched)
                if rollback.account(pending, skips):  # every step counted, streaks exact
                    with jax.set_mesh(mesh):
                        state = rollback.rollback(mngr, abstract, state, done, skips)
                    rollbacks += 1
                if rollbacks:
                    scalars["train/rollbacks"] = rollbacks
                writer.write(done, scalars)
                mngr.check_for_errors()  # a failed background save surfaces here, not never
                last_loss = scalars["train/loss"]
                progress.set_postfix(loss=f"{last_loss:.4f}")
                window, t_log = [], time.perf_counter()
                wait_s = ckpt_block_s = eval_s = 0.0
            progress.update(1)
            watchdog.beat(step)

            # Eval hooks.
            if config.eval_every_steps > 0 and done % config.eval_every_steps == 0:
                jax.block_until_ready(state)  # the step's own compute is training time
                t0 = time.perf_counter()
                writer.write(done, evaluator(state, done))
                eval_s += time.perf_counter() - t0  # reported, and not training time

            # Checkpoint (and stop cleanly when preempted).
            preempted = preemption.should_stop(done)
            last_step = done == config.total_steps
            if done % config.checkpoint_every_steps == 0 or last_step or preempted:
                if rollback.account(pending, skips):
                    with jax.set_mesh(mesh):
                        state = rollback.rollback(mngr, abstract, state, done, skips)
                    rollbacks += 1
                if skips.consecutive and not (last_step or preempted):
                    # Not a good state to come back to, and it would push good ones out.
                    log.warning(
                        "checkpoint %d not saved: inside a run of %d non-finite updates "
                        "(from step %d)", done, skips.consecutive, skips.start,
                    )  # fmt: skip
                else:
                    jax.block_until_ready(state)  # the step's own compute is training time
                    t0 = time.perf_counter()
                    ckpt_lib.save(mngr, done, state, pipeline.get_state(), config_json)
                    ckpt_block_s += time.perf_counter() - t0
            if preempted:
                print(f"preempted: saved step {done} in {mngr.directory}; exiting", flush=True)
                break
    watchdog.close()
    progress.close()
    pipeline.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    logging.getLogger().removeHandler(host_log)
    host_log.close()
    return {
        "workdir": str(workdir),
        "final_step": int(jax.device_get(state.step)),
        "final_loss": last_loss,
        "parameters": n_params,
        "checkpoint": str(workdir / "checkpoints"),
        "preempted": preempted,
        "skipped_updates": skips.total,
        "rollbacks": rollbacks,
    }
