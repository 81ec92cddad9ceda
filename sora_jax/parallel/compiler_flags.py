"""The compiler settings production runs use, in one place.

XLA's TPU compiler reads `LIBTPU_INIT_ARGS` once, when libtpu loads. The flags below let
collectives run asynchronously and overlap with compute (the FSDP all-gathers and gradient
reduce-scatters of every layer), as large-scale JAX trainers set them. The launchers export
them for real runs (sora_jax/launchers.py) and the planner applies them before it describes
a topology (sora_jax/parallel/topology.py), so `--mode=plan --topology=...` compiles what
the run will run. A value the user already exported is kept, never overwritten.

Each flag is checked against the installed libtpu by the tests (an unknown flag aborts
libtpu at start-up).
"""

from __future__ import annotations

import os

# Async collective fusion (all-gathers and all-reduces issued early, fused, and overlapped
# with the TensorCore's compute), the latency-hiding scheduler, and the data-parallel
# all-reduce optimisation.
TPU_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_all_reduce=true",
    "--xla_tpu_enable_latency_hiding_scheduler=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)

ENV_VARS = {"tpu": "LIBTPU_INIT_ARGS"}
FLAGS = {"tpu": TPU_FLAGS}


def env(platform: str) -> dict[str, str]:
    """The environment variables a run on `platform` ('tpu', 'gpu', 'cpu') exports."""
    if platform not in FLAGS:
        return {}
    return {ENV_VARS[platform]: " ".join(FLAGS[platform])}


def apply(platform: str) -> dict[str, str]:
    """Sets `env(platform)` in this process where the user has not set it; returns what is
    in force. Call before the platform's backend (or libtpu) is first loaded."""
    out = {}
    for name, value in env(platform).items():
        os.environ.setdefault(name, value)
        out[name] = os.environ[name]
    return out
