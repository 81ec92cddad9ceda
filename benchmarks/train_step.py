"""Step time, tokens/s and MFU of the full sharded train step (optimizer, EMA, donation)
for an experiment config, on random batches of its first bucket.

    python benchmarks/train_step.py --config=experiments/demo.py --steps=20
    python benchmarks/train_step.py --config=experiments/demo.py \\
        --config.model.preset=B --config.model.dtype=bfloat16 --config.data.global_batch_size=8
    python benchmarks/train_step.py --measure_cpu_peak   # the CPU entry of PEAK_TFLOPS
    python benchmarks/train_step.py --config=experiments/demo.py \
        --config.text_encoder.name=minilm --config.text_encoder.dim=0 --compare_text_embed

`--compare_text_embed` times the step twice in one process: with stored embeddings
(`text_encoder.embed='tokenize'`) and with the frozen encoder run inside it ('train_step').

MFU uses sora_jax.training.perf.PEAK_TFLOPS for the device kind (or --peak_tflops).
Record results in docs/perf.md with the machine.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn

from sora_jax import config as config_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import perf, plan
from sora_jax.training import step as step_lib

CONFIG = config_lib.define_config_flag()
STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up step.")
PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s (default: table).")
MEASURE_PEAK = flags.DEFINE_bool("measure_cpu_peak", False, "Only measure CPU matmul peak.")
COMPARE_EMBED = flags.DEFINE_bool(
    "compare_text_embed", False, "Time text_encoder.embed='tokenize' and 'train_step'."
)


def measure_cpu_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 n x n matmul TFLOP/s on the default device."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def random_batch(spec: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Host arrays for `plan.abstract_batch`: Gaussian floats, token ids, all-True masks."""
    out = {}
    for k, s in spec.items():
        if np.dtype(s.dtype) == np.bool_:
            out[k] = np.ones(s.shape, bool)
        elif np.issubdtype(s.dtype, np.integer):
            out[k] = rng.integers(100, 1000, s.shape).astype(s.dtype)  # ordinary word ids
        else:
            out[k] = rng.standard_normal(s.shape).astype(s.dtype)
    return out


def main(argv):
    del argv
    if MEASURE_PEAK.value:
        print(f"cpu float32 matmul peak: {measure_cpu_peak():.4f} TFLOP/s")
        return
    config = CONFIG.value or config_lib.load_config("experiments/demo.py")
    if config.text_encoder.get("dim") == 0:
        config.text_encoder.dim = None  # a flag cannot unset the width check
    if not COMPARE_EMBED.value:
        benchmark(config)
        return
    seconds = {}
    for mode in ("tokenize", "train_step"):
        config.text_encoder.embed = mode
        print(f"--- text_encoder.embed={mode!r}")
        seconds[mode] = benchmark(config)
    ratio = seconds["train_step"] / seconds["tokenize"]
    print(f"step time, encoder in the step / stored embeddings: {ratio:.3f}")


def benchmark(config) -> float:
    """Times the step of `config`'s first bucket; prints the throughput; seconds per step."""
    validate_lib.validate(config)
    mesh = mesh_lib.create_mesh(config.mesh)
    rules = mesh_lib.logical_rules(config.mesh)
    geometry = plan.dataset_geometry(config)
    model, tx, init_fn, abstract, shardings = setup.setup_state(config, geometry, mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    state = setup.place_text_encoder(state, config, shardings)
    jitted = step_lib.jit_train_step(model, tx, config, mesh, shardings)
    first = plan.config_step_shapes(config, geometry, mesh.shape["data"] * mesh.shape["fsdp"])[0]
    compiled, (bucket_plan,) = plan.compile_steps(
        jitted, abstract, geometry, [first], config, mesh, rules
    )
    bucket = bucket_plan.bucket
    spec = plan.abstract_batch(geometry, first, mesh)
    host = random_batch(spec, np.random.default_rng(0))
    batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in host.items()}
    step = compiled[bucket]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = step(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(STEPS.value):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - t0
    peak = PEAK.value * 1e12 if PEAK.value else perf.peak_flops(mesh.devices.flat[0])
    result = perf.throughput(
        steps=STEPS.value,
        seconds=seconds,
        samples=STEPS.value * first.global_batch,
        tokens=STEPS.value * first.global_batch * bucket_plan.tokens,
        flops=STEPS.value * bucket_plan.model_tflops_per_step * 1e12,  # LoRA counted
        devices=mesh.devices.size,
        peak=peak,
    )
    print(f"bucket {bucket} latent {list(bucket_plan.latent_shape)} tokens {bucket_plan.tokens}")
    print(
        f"devices {mesh.devices.size} x {mesh.devices.flat[0].device_kind}, mesh {dict(mesh.shape)}"
    )
    print(
        f"parameters {state_lib.param_count(state.params):,}, global batch "
        f"{first.global_batch}, compile {bucket_plan.compile_s:.1f} s"
    )
    for key, value in result.items():
        print(f"{key:>36}: {value:.4g}")
    return seconds / STEPS.value


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags, argv=sys.argv)
