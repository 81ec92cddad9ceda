"""Throughput and MFU: the one place they are computed (docs/design.md, Performance
accounting; the FLOP formula of a model is sora_jax/models/flops.py).

Per metrics window of `n` steps (the steps since the previous metrics line):

    wall     = time from the previous metrics line to this one
    eval_s   = perf/eval_s: the in-loop evaluation (the clock starts once the step is done)
    ckpt_s   = perf/checkpoint_block_s: time the loop blocked in checkpoint saves (the
               state ready first; the asynchronous write after that is not counted)
    train_s  = wall - eval_s - ckpt_s        (steps, data waiting and host overhead)

    perf/step_time_s    = train_s / n
    perf/steps_per_s    = n / train_s
    perf/samples_per_s  = Σ_steps global_batch / train_s
    perf/tokens_per_s   = Σ_steps global_batch · tokens / train_s
    perf/model_tflops_per_s_per_device = Σ_steps FLOPs / (train_s · devices) / 1e12
    perf/mfu            = Σ_steps FLOPs / (train_s · devices · peak)

with a step's FLOPs `global_batch · train FLOPs per sample` (models/flops.py: 3F, or 2F plus
the LoRA terms for a LoRA run) and `peak` the dense bfloat16 (TPU, GPU) or float32 (CPU)
FLOP/s of one device from `PEAK_TFLOPS`, matched by `device_kind` substring. So `perf/mfu`
is the utilization of the training steps alone: evaluation and checkpoint blocking are
reported beside it, never inside it.
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


def mfu(flops: float, seconds: float, devices: int, peak: float) -> float:
    """Model FLOPs utilization of `flops` model FLOPs done in `seconds` on `devices`."""
    return flops / (seconds * devices * peak)


def throughput(
    *,
    steps: int,
    seconds: float,
    samples: int,
    tokens: int | None,
    flops: float | None,
    devices: int,
    peak: float | None,
    eval_s: float = 0.0,
    checkpoint_block_s: float = 0.0,
) -> dict[str, float]:
    """`perf/*` metrics of `steps` steps (of `samples` samples, `tokens` tokens and `flops`
    model FLOPs together) in a window of `seconds` wall time that includes `eval_s` of
    evaluation and `checkpoint_block_s` of checkpoint blocking (module docstring)."""
    train_s = max(seconds - eval_s - checkpoint_block_s, 1e-9)
    out = {
        "perf/step_time_s": train_s / steps,
        "perf/steps_per_s": steps / train_s,
        "perf/samples_per_s": samples / train_s,
        "perf/eval_s": eval_s,
        "perf/checkpoint_block_s": checkpoint_block_s,
    }
    if tokens is not None:
        out["perf/tokens_per_s"] = tokens / train_s
    if flops is not None:
        out["perf/model_tflops_per_s_per_device"] = flops / train_s / devices / 1e12
        if peak:
            out["perf/mfu"] = mfu(flops, train_s, devices, peak)
    return out
