"""How fast the input pipeline feeds one process, alone: `measure(pipeline)` reads host
batches as fast as it can and returns steps/s, samples/s and MB/s.

`python -m sora_jax.train --mode=data_benchmark` (sora_jax/training/data_benchmark.py)
runs it on the trainer's pipeline and compares it with the training step's speed;
benchmarks/data_pipeline.py runs it per worker/prefetch setting.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from sora_jax.data import pipeline as pipeline_lib


def batch_bytes(batch: dict[str, Any]) -> int:
    """Bytes of the numeric arrays of a host batch (what moves to the devices)."""
    return sum(v.nbytes for v in batch.values() if isinstance(v, np.ndarray))


def measure(
    pipeline: pipeline_lib.Pipeline,
    *,
    seconds: float = 10.0,
    max_steps: int | None = None,
    warmup_steps: int = 5,
) -> dict[str, float]:
    """Reads host batches for `seconds` (or `max_steps`) after a warm-up; closes the pipeline.

    Returns this process's `steps_per_s`, `samples_per_s`, `mb_per_s` (10^6 bytes of
    numeric arrays), `ms_per_step`, and the mean `samples_per_step` / `mb_per_step`.
    """
    with pipeline:
        for _ in range(warmup_steps):  # thread start-up, file opening, first shuffles
            next(pipeline)
        steps = samples = nbytes = 0
        t0 = time.perf_counter()
        while (max_steps is None or steps < max_steps) and (
            time.perf_counter() - t0 < seconds or steps == 0
        ):
            batch = next(pipeline)
            samples += next(v.shape[0] for v in batch.values() if isinstance(v, np.ndarray))
            nbytes += batch_bytes(batch)
            steps += 1
        dt = time.perf_counter() - t0
    return {
        "steps": steps,
        "seconds": dt,
        "steps_per_s": steps / dt,
        "samples_per_s": samples / dt,
        "mb_per_s": nbytes / dt / 1e6,
        "ms_per_step": 1e3 * dt / steps,
        "samples_per_step": samples / steps,
        "mb_per_step": nbytes / steps / 1e6,
    }
