"""Throughput accounting: tokens/s, samples/s and MFU (docs/design.md, Performance accounting).

    MFU = 3F · global_batch / (step_time · devices · peak)

with F from sora_jax.models.flops and `peak` the dense bfloat16 (TPU, GPU) or float32 (CPU)
FLOP/s of one device from `PEAK_TFLOPS`, matched by `device_kind` substring.
"""

from __future__ import annotations

import jax

# Dense peak TFLOP/s per device (vendor datasheets: bf16 without sparsity). The CPU entry
# is measured, not listed: the best float32 2048x2048 matmul on the 2-core AMD EPYC this
# project is developed on (benchmarks/train_step.py --measure_cpu_peak).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; PCIe parts are ~756
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6", 918.0),
    ("cpu", 0.42),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device, or None for a device kind not in the table."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower() if device.platform != "cpu" else "cpu"
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in kind:
            return tflops * 1e12
    return None


def throughput(
    *,
    steps: int,
    seconds: float,
    global_batch: int,
    tokens_per_sample: int,
    train_flops_per_sample: float,
    devices: int,
    peak: float | None,
) -> dict[str, float]:
    """`perf/*` metrics of `steps` steps that took `seconds` of wall time."""
    step_time = seconds / steps
    out = {
        "perf/step_time_s": step_time,
        "perf/steps_per_s": 1.0 / step_time,
        "perf/samples_per_s": global_batch / step_time,
        "perf/tokens_per_s": global_batch * tokens_per_sample / step_time,
        "perf/model_tflops_per_s_per_device": (
            train_flops_per_sample * global_batch / step_time / devices / 1e12
        ),
    }
    if peak:
        out["perf/mfu"] = train_flops_per_sample * global_batch / (step_time * devices * peak)
    return out
