"""The compiler settings production runs use, in one place.

XLA's TPU compiler reads `LIBTPU_INIT_ARGS` once, when libtpu loads. The flags below let
collectives run asynchronously and overlap with compute (the FSDP all-gathers and gradient
reduce-scatters of every layer), as large-scale JAX trainers set them. The launchers export
them for real runs (sora_jax/launchers.py) and the planner applies them before it describes
a topology (sora_jax/parallel/topology.py), so `--mode=plan --topology=...` compiles what
the run will run. A value the user already exported is kept, never overwritten.

On GPUs, XLA reads `XLA_FLAGS` when the backend starts: the latency-hiding scheduler,
pipelined (and double-buffered) collectives of scanned layers, and combine thresholds that
merge the per-layer all-gathers and reduce-scatters into few large ones, as large JAX GPU
trainers set them; `XLA_PYTHON_CLIENT_MEM_FRACTION` is the share of GPU memory JAX's
allocator takes at start-up (JAX's default 0.75 leaves a quarter of the card unused). Our
flags go after any the user exported, and a flag the user set keeps the user's value. None
of the GPU settings has run on a GPU yet (docs/perf.md).

Each flag is checked against the installed jaxlib by the tests: an unknown flag aborts
libtpu at start-up, and XLA aborts on an unknown `XLA_FLAGS` entry (a CPU jaxlib parses the
GPU flags too).
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

# XLA GPU overlap flags. Thresholds: 1 GiB all-gather / 512 MiB reduce-scatter and
# all-reduce combine buffers (large enough to merge one layer's FSDP collectives; smaller
# ones issue per-parameter NCCL calls), the magnitudes MaxText's GPU recipes use.
GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=1073741824",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=536870912",
    "--xla_gpu_all_reduce_combine_threshold_bytes=536870912",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
)
# The share of GPU memory JAX preallocates: most of it, leaving room for cuDNN/NCCL
# workspaces outside JAX's allocator. Plans should budget against this fraction.
GPU_MEM_FRACTION = "0.9"

ENV_VARS = {"tpu": "LIBTPU_INIT_ARGS", "gpu": "XLA_FLAGS"}
FLAGS = {"tpu": TPU_FLAGS, "gpu": GPU_FLAGS}
# Variables set as they are (kept where the user set them).
VALUES = {"gpu": {"XLA_PYTHON_CLIENT_MEM_FRACTION": GPU_MEM_FRACTION}}


def _merge(existing: str, flags: tuple[str, ...]) -> str:
    """`existing` flags followed by those of `flags` whose name the user did not set."""
    given = {f.split("=", 1)[0] for f in existing.split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in given]
    return " ".join([*existing.split(), *extra])


def env(platform: str, environ=None) -> dict[str, str]:
    """The environment variables a run on `platform` ('tpu', 'gpu', 'cpu') exports, merged
    with `environ` (default: this process's environment): flag variables keep the user's
    flags and append ours (a flag the user set keeps the user's value), other variables
    keep the user's value. Empty for a platform without settings."""
    environ = os.environ if environ is None else environ
    out = {}
    if platform in FLAGS:
        name = ENV_VARS[platform]
        out[name] = _merge(environ.get(name, ""), FLAGS[platform])
    for name, value in VALUES.get(platform, {}).items():
        out[name] = environ.get(name, value)
    return out


def apply(platform: str) -> dict[str, str]:
    """Sets `env(platform)` in this process; returns what is in force. Call before the
    platform's backend (or libtpu) is first loaded."""
    out = env(platform)
    os.environ.update(out)
    return out


def host_platform(root: str = "/") -> str:
    """The accelerator this host has, judged from its device files without starting any
    backend: 'tpu' (a TPU VM: /dev/accel* or /dev/vfio/N), 'gpu' (/dev/nvidia0), else
    'cpu'."""
    dev = os.path.join(root, "dev")
    names = os.listdir(dev) if os.path.isdir(dev) else []
    vfio = os.path.join(dev, "vfio")
    if any(n.startswith("accel") for n in names) or (
        os.path.isdir(vfio) and any(n.isdigit() for n in os.listdir(vfio))
    ):
        return "tpu"
    if "nvidia0" in names:
        return "gpu"
    return "cpu"


def apply_for_host() -> dict[str, str]:
    """`apply` for this host's accelerator: what `python -m sora_jax.train` calls before
    JAX starts, so every launcher's runs (an ssh command on TPU VM workers included, which
    carries no exported variables) compile with the production flags."""
    return apply(host_platform())
