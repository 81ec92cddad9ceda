"""The data-only benchmark (`--mode=data_benchmark`): how fast the input pipeline feeds one
process, alone.

    python -m sora_jax.train --config=experiments/demo.py --workdir=runs/demo \
        --mode=data_benchmark

builds the trainer's pipeline from the config (same datasets, weights, batches, workers,
prefetch), reads host batches as fast as it can, and prints samples/s and MB/s next to what
the configured training step consumes. The step's speed comes from `perf/steps_per_s` in
WORKDIR/metrics.jsonl of an earlier run; without one it is reported as unknown. A pipeline
that delivers fewer steps/s than the trainer runs starves the accelerators, and
`data/wait_ms` in metrics.jsonl grows (docs/data_pipeline.md).
"""

from __future__ import annotations

import os
import statistics

import jax

from sora_jax.data import benchmark
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.training import metrics as metrics_lib


def training_steps_per_s(workdir: str | os.PathLike) -> float | None:
    """Median `perf/steps_per_s` over the logged intervals of WORKDIR/metrics.jsonl."""
    rates = [
        m["perf/steps_per_s"]
        for m in metrics_lib.read_metrics(workdir)
        if m.get("perf/steps_per_s") is not None
    ]
    # The median: the first interval includes compilation.
    return statistics.median(rates) if rates else None


def data_benchmark(config, workdir: str | os.PathLike, *, seconds: float = 10.0) -> dict:
    """`--mode=data_benchmark`: the pipeline alone, against the step's consumption."""
    shape = mesh_lib.mesh_shape(config.mesh)
    pipe = pipeline_lib.from_config(config, workdir, data_parallel=shape["data"] * shape["fsdp"])
    print(pipe.report(), flush=True)
    result = benchmark.measure(pipe, seconds=seconds)
    lines = [
        f"data benchmark ({jax.process_count()} process(es), this one reads "
        f"{result['samples_per_step']:.1f} samples per step, worker_count "
        f"{config.data.worker_count}, prefetch {config.data.prefetch}):",
        f"  pipeline  {result['steps_per_s']:9.1f} steps/s  {result['samples_per_s']:9.1f} "
        f"samples/s  {result['mb_per_s']:8.1f} MB/s  ({result['steps']} steps in "
        f"{result['seconds']:.1f} s)",
    ]
    train = training_steps_per_s(workdir)
    result["train_steps_per_s"] = train
    if train is None:
        lines.append(
            f"  training  unknown: no perf/steps_per_s in {os.fspath(workdir)}/metrics.jsonl "
            "(train first, or compare with docs/perf.md)"
        )
    else:
        result["headroom"] = result["steps_per_s"] / train
        lines.append(
            f"  training  {train:9.2f} steps/s  {train * result['samples_per_step']:9.1f} "
            f"samples/s  {train * result['mb_per_step']:8.1f} MB/s  (median perf/steps_per_s "
            "of metrics.jsonl)"
        )
        verdict = "enough" if result["headroom"] >= 1 else "TOO SLOW: the step will wait on data"
        lines.append(f"  headroom  {result['headroom']:.1f}x  ({verdict})")
    print("\n".join(lines), flush=True)
    return result
