"""The training loop, top to bottom: config → mesh → data → state → restore → compile →
steps (metrics, eval hooks, checkpoints), the same for every model: a model family
(training/families.py: the DiT; training/vae.py: the causal VAE) supplies its data, state,
compiled step, evaluation and end-of-run export, and every guarantee below holds for all.

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
checkpoint is saved inside a streak); SIGTERM saves and exits cleanly; a step that stalls
far beyond the median ends the process with a stack dump.
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
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import distill, eval_hook, families, perf, resilience, resume, rollback, vae
from sora_jax.training import experts as experts_lib
from sora_jax.training import metrics as metrics_lib
from sora_jax.training import plan as plan_lib

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


# Model families by `model.name` (a registry, not an if/elif chain); any other name is a
# VideoDiT (models/dit.py checks it).
FAMILIES = {"causal_vae": vae.VAE}
# Training modes by config section, before the model's name: a config with `distill`
# trains a few-step student of a frozen teacher (training/distill.py); one with `experts`
# trains Wan 2.2 A14B's two experts together (training/experts.py).
MODES = {"distill": distill.Distill, "experts": experts_lib.TwoExperts}


def train(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, init_from: str = ""
) -> dict[str, Any]:
    """Trains (or resumes) a run in `workdir`; returns a summary of the run."""
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
    mode = next((m for m in MODES if config.get(m) is not None), None)
    family_cls = MODES[mode] if mode else FAMILIES.get(config.model.name)
    family_cls = family_cls or families.dit_family(config)  # packed rows or buckets
    family = family_cls(config, workdir, mesh, rules)

    # --- Data ---------------------------------------------------------------------------
    data = family.data()  # next(data): a host batch; get_state/set_state in checkpoints
    print(data.report(), flush=True)
    check_every = config.data.get("schedule_check_every_steps", 100)

    # --- State --------------------------------------------------------------------------
    init_fn, abstract, shardings = family.state()
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
    if restored is not None:
        state, data_state, start = restored
        state = family.resumed(state, init_fn, abstract, shardings)  # e.g. a LoRA base
        data.set_state(data_state)
        metrics_lib.truncate_after(workdir, start)
        print(f"resumed from {workdir / 'checkpoints'} at step {start}", flush=True)
    else:
        state, start = family.fresh(init_fn, abstract, init_from), 0
    state = family.place(state, shardings)  # frozen parts read onto the mesh
    print(family.describe(state), flush=True)

    # --- Compile ------------------------------------------------------------------------
    steps = family.compile(abstract, shardings)  # bucket -> CompiledStep, before step one
    fingerprints = {b: s.fingerprint for b, s in steps.items()}
    changed = resume.record_compiled_steps(workdir, start, fingerprints)
    if changed:  # the continuation is not the uninterrupted run's (training/resume.py)
        log.warning("\n".join(changed))

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
                family.check_schedule(step)  # all processes agree on the next batch
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(workdir / "profile"))

            # Step.
            t0 = time.perf_counter()
            host = next(data)
            batch = pipeline_lib.to_global_batch(host, mesh, fields=data.fields)
            wait_s += time.perf_counter() - t0
            inputs = {k: batch[k] for k in data.fields}
            bucket = steps[host["bucket"]]
            plan_lib.check_batch(inputs, bucket.batch, host["bucket"])
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = bucket.executable(state, inputs)
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
                scalars.update(_throughput(fetched, steps, dt, eval_s, ckpt_block_s, mesh, peak))
                scalars["data/wait_ms"] = 1e3 * wait_s / len(fetched)
                state, rolled = rollback.settle(pending, skips, mngr, abstract, state, done)
                rollbacks += rolled
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

            # Evaluation: the `config.evals` entries due at this step (or `eval_every_steps`).
            if eval_hook.due(config, done):
                jax.block_until_ready(state)  # the step's own compute is training time
                t0 = time.perf_counter()
                writer.write(done, family.evaluate(state, done))
                eval_s += time.perf_counter() - t0  # reported, and not training time

            # Checkpoint (and stop cleanly when preempted).
            preempted = preemption.should_stop(done)
            last_step = done == config.total_steps
            if done % config.checkpoint_every_steps == 0 or last_step or preempted:
                state, rolled = rollback.settle(pending, skips, mngr, abstract, state, done)
                rollbacks += rolled
                if skips.consecutive and not (last_step or preempted):
                    # Not a good state to come back to, and it would push good ones out.
                    log.warning(
                        "checkpoint %d not saved: inside a run of %d non-finite updates "
                        "(from step %d)", done, skips.consecutive, skips.start,
                    )  # fmt: skip
                else:
                    jax.block_until_ready(state)  # the step's own compute is training time
                    t0 = time.perf_counter()
                    ckpt_lib.save(mngr, done, state, data.get_state(), config_json)
                    ckpt_block_s += time.perf_counter() - t0
            if preempted:
                print(f"preempted: saved step {done} in {mngr.directory}; exiting", flush=True)
                break
    watchdog.close()
    progress.close()
    data.close()
    mngr.wait_until_finished()
    mngr.close()
    extra = {} if preempted else family.finish(state, writer, start)  # e.g. the VAE export
    writer.close()
    logging.getLogger().removeHandler(host_log)
    host_log.close()
    return {
        "workdir": str(workdir),
        "final_step": int(jax.device_get(state.step)),
        "final_loss": last_loss,
        "parameters": state_lib.param_count(state.params),
        "checkpoint": str(workdir / "checkpoints"),
        "preempted": preempted,
        "skipped_updates": skips.total,
        "rollbacks": rollbacks,
        **extra,
    }


def _throughput(fetched, steps, seconds, eval_s, ckpt_block_s, mesh, peak) -> dict[str, float]:
    """`perf/*` of a window's steps (training/perf.py), from each bucket's compiled step."""
    run = [steps[b] for b, _ in fetched]
    counted = lambda f: None if any(f(s) is None for s in run) else sum(f(s) for s in run)  # noqa: E731
    return perf.throughput(
        steps=len(run),
        seconds=seconds,
        samples=sum(s.global_batch for s in run),
        tokens=counted(lambda s: None if s.tokens is None else s.global_batch * s.tokens),
        flops=counted(lambda s: s.flops),
        devices=mesh.devices.size,
        peak=peak,
        eval_s=eval_s,
        checkpoint_block_s=ckpt_block_s,
    )
