"""Multi-process start-up: `jax.distributed.initialize` with explicit flags or auto-detection.

One process per host (or per GPU group) runs the same command. Three ways to say how many
there are:

- explicit: `--coordinator_address=HOST:PORT --num_processes=P --process_id=I` on every
  process (what `launch/multiprocess.sh` passes);
- auto-detected by JAX on Cloud TPU pods and under SLURM (`srun`): pass
  `--distributed=auto`, or nothing at all when the environment shows several SLURM tasks;
- single process (the default): nothing is initialized.

On CPU the collectives between processes go through gloo (`jax_cpu_collectives_
implementation`), which is how multi-process runs are tested on one machine. Timeouts bound
every wait: a process that never joins fails start-up after `--distributed_timeout_s`, and
once running, a process that dies is noticed by the others within the heartbeat timeout,
after which they exit non-zero instead of hanging in a collective.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1)


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "",
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Joins the processes of a multi-process run; returns whether it did.

    `mode`: '' (explicit flags if given, auto under a multi-task SLURM job, else single
    process), 'auto' (let JAX detect the cluster), 'off' (never initialize).
    """
    if mode not in ("", "auto", "off"):
        raise ValueError(f"--distributed={mode!r} is unknown; use '', 'auto' or 'off'")
    explicit = [coordinator_address, num_processes, process_id]
    if mode == "off" or (not any(x is not None for x in explicit) and mode != "auto"):
        if _slurm_tasks() <= 1 or mode == "off":
            return False
        mode = "auto"
    if mode != "auto" and None in explicit:
        raise ValueError(
            "multi-process runs need all of --coordinator_address, --num_processes and "
            f"--process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r}); "
            "or pass --distributed=auto on Cloud TPU / SLURM"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes)")
    # CPU devices of several processes talk through gloo (GPU and TPU devices ignore it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s)
    )
    if mode == "auto":
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=int(num_processes),
            process_id=int(process_id),
            **kwargs,
        )
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
