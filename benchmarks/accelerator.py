"""Measures what matters on whatever accelerator is present; writes JSON lines.

    python benchmarks/accelerator.py --out=accelerator.jsonl   # ~8 minutes on one H100
    python benchmarks/accelerator.py --smoke                    # tiny shapes, any CPU

One record per line, each with a "record" field:
- "environment": jax and jaxlib versions, platform, device kind and count, cuDNN version
  (GPUs), the device's memory limit, the bf16 dense peak used for MFU, XLA_FLAGS.
- "attention": per implementation and sequence length (Wan2.1-1.3B heads, 12 x 128; batch
  1; self-attention, no mask), forward and backward time and TFLOP/s. FLOPs: 4 B N L^2 E
  forward (two matmuls), 2.5x that backward (FlashAttention-2's count: five matmuls).
- "train_step": the full train step of the `wan2_1_1_3b` widths (AdamW, an EMA of the
  parameters, the state donated; the rectified-flow loss; text 512 x 4096 tokens) per
  remat policy and token count: compile and step time, model TFLOP/s (3F of
  sora_jax.models.flops), MFU against the chip's peak, memory (XLA's analysis of the
  compiled step and the device's peak so far), and the attention forward kernels in the
  compiled step (`attention.count_forward_kernels`; the layers are scanned, so the
  count is per block body: 2 = self + cross once, 4 = rerun by remat).
- "skipped": a configuration not run because the time budget (--budget_s) was spent.
A configuration that fails (out of memory) writes its error and the run goes on.

Peak TFLOP/s (sora_jax.training.perf.PEAK_TFLOPS, vendor datasheets, dense bf16): H100 SXM
989, H200 989, A100 312. MFU on a CPU uses the measured float32 figure there.

It needs only jax, flax, optax and numpy (the GPU machines this project borrows have no
ml_collections, grain, PyAV or array_record); tests/test_benchmarks.py runs --smoke with
those packages made unimportable. Never run on a GPU yet: docs/perf.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from anywhere

from sora_jax.parallel import compiler_flags  # noqa: E402


def _gpu_present() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return shutil.which("nvidia-smi") is not None and (not platforms or "cuda" in platforms)


# XLA reads its flags when the backend starts: set the GPU ones before jax initializes.
APPLIED = compiler_flags.apply("gpu") if _gpu_present() else {}

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from sora_jax.models import attention, build_model, flops  # noqa: E402
from sora_jax.training import perf  # noqa: E402

# Wan2.1-1.3B: 12 heads of 128 (sora_jax.models.dit.PRESETS['wan2_1_1_3b']).
HEADS, HEAD_DIM = 12, 128
TEXT_TOKENS, TEXT_DIM, CHANNELS = 512, 4096, 16
# Latent (T', H', W') for 8,192 and 32,768 video tokens with patch (1, 2, 2).
LATENTS = {8192: (8, 64, 64), 32768: (32, 64, 64)}
SMOKE = dict(
    heads=2,
    head_dim=16,
    text_tokens=8,
    text_dim=16,
    channels=4,
    latents={64: (1, 16, 16)},
    model=dict(dim=32, num_layers=1, num_heads=2, mlp_dim=64, freq_dim=32),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the test suite, CPU)")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--budget_s", type=float, default=420.0, help="skip what starts later")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument(
        "--remat", default="", help="policies of the step (default full,save_attention; smoke: one)"
    )
    p.add_argument("--impls", default="", help="attention kernels (default: by platform)")
    return p.parse_args(argv)


class Writer:
    def __init__(self, out: str):
        self.file = open(out, "a") if out else None  # noqa: SIM115

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def environment() -> dict:
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    cudnn = None
    if device.platform == "gpu":
        try:
            from jax._src.lib import cuda_versions  # noqa: PLC0415 (GPU builds only)

            cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
        except (ImportError, AttributeError):
            cudnn = None
    import jaxlib  # noqa: PLC0415

    peak = perf.peak_flops(device)
    return {
        "record": "environment",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "cudnn": cudnn,
        "bytes_limit": stats.get("bytes_limit"),
        "peak_tflops": None if peak is None else peak / 1e12,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "applied": APPLIED,
    }


def _time(fn, *args, steps: int) -> tuple[float, float]:
    """(compile seconds, median seconds per call) of a jitted `fn`."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def attention_record(impl, tokens, heads, head_dim, dtype, steps) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, tokens, heads, head_dim), dtype) for key in keys)
    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, None, impl=impl)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    fwd_compile, fwd_s = _time(jax.jit(attend), q, k, v, steps=steps)
    both_compile, both_s = _time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v, steps=steps)
    fwd_flops = 4.0 * heads * tokens * tokens * head_dim
    bwd_s = max(both_s - fwd_s, 1e-9)
    return {
        "record": "attention",
        "impl": impl,
        "tokens": tokens,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": jnp.dtype(dtype).name,
        "compile_s": round(fwd_compile + both_compile, 2),
        "fwd_ms": 1e3 * fwd_s,
        "bwd_ms": 1e3 * bwd_s,
        "fwd_tflops": fwd_flops / fwd_s / 1e12,
        "bwd_tflops": 2.5 * fwd_flops / bwd_s / 1e12,
    }


def train_step_record(model_cfg, latent, remat, dims, steps) -> dict:
    """One configuration of the train step; `dims` = (channels, text tokens, text dim)."""
    channels, s_text, d_text = dims
    model = build_model({**model_cfg, "remat": remat}, channels, d_text)
    x0 = jnp.zeros((1, *latent, channels), jnp.float32)
    text = jnp.zeros((1, s_text, d_text), jnp.bfloat16)  # text embeddings move in bf16
    mask = jnp.arange(s_text)[None] < s_text // 2  # half the caption is padding
    t = jnp.zeros((1,), jnp.float32)
    params = jax.jit(lambda key: nn.meta.unbox(model.init(key, x0, t, text, mask)["params"]))(
        jax.random.key(0)
    )
    opt = optax.adamw(1e-4, weight_decay=0.01)
    ema = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # own buffers: donated
    state = {"params": params, "opt": opt.init(params), "ema": ema, "step": jnp.int32(0)}

    def train_step(state, x0, text, mask):
        key = jax.random.fold_in(jax.random.key(0), state["step"])
        k_eps, k_t = jax.random.split(key)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        t = jax.random.uniform(k_t, (x0.shape[0],))
        tb = t[:, None, None, None, None]
        x_t = (1.0 - tb) * x0 + tb * eps  # rectified flow: v = eps - x_0

        def loss_fn(p):
            v = model.apply({"params": p}, x_t, t, text, mask)
            return jnp.mean(jnp.square(v - (eps - x0)))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: 0.999 * e + 0.001 * p, state["ema"], params)
        return {"params": params, "opt": opt_state, "ema": ema, "step": state["step"] + 1}, loss

    step = jax.jit(train_step, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, x0, text, mask).compile()
    compile_s = time.perf_counter() - t0
    kernels = attention.count_forward_kernels(compiled.as_text())
    analysis = compiled.memory_analysis()
    state, loss = compiled(state, x0, text, mask)  # warm-up
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = compiled(state, x0, text, mask)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = flops.tokens_per_sample(model, latent)
    model_flops = flops.train_flops_per_sample(model, tokens, s_text)
    peak = perf.peak_flops()
    device_stats = jax.devices()[0].memory_stats() or {}
    memory = None
    if analysis is not None:
        memory = {
            name: getattr(analysis, f"{name}_size_in_bytes", None)
            for name in ("argument", "output", "temp", "generated_code")
        }
    del state
    return {
        "record": "train_step",
        "remat": remat,
        "tokens": tokens,
        "latent": list(latent),
        "attention_impl": model.attention_impl,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": round(compile_s, 2),
        "step_s": step_s,
        "loss": float(loss),
        "model_tflop_per_step": model_flops / 1e12,
        "model_tflops": model_flops / step_s / 1e12,
        "mfu": None if peak is None else model_flops / step_s / peak,
        "compiled_memory_bytes": memory,
        "peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
        "attention_forward_kernels": kernels,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    write = Writer(args.out)
    start = time.perf_counter()
    env = environment()
    write(env)
    gpu = env["platform"] == "gpu"
    if args.smoke:
        heads, head_dim, latents = SMOKE["heads"], SMOKE["head_dim"], SMOKE["latents"]
        dims = (SMOKE["channels"], SMOKE["text_tokens"], SMOKE["text_dim"])
        model_cfg = dict(name="video_dit", preset="wan2_1_1_3b", **SMOKE["model"])
    else:
        heads, head_dim, latents = HEADS, HEAD_DIM, LATENTS
        dims = (CHANNELS, TEXT_TOKENS, TEXT_DIM)
        model_cfg = dict(name="video_dit", preset="wan2_1_1_3b")
    dtype = jnp.bfloat16 if env["platform"] != "cpu" else jnp.float32
    model_cfg.update(dtype=jnp.dtype(dtype).name, attention_impl="auto", scan_layers=True)
    impls = args.impls.split(",") if args.impls else (["cudnn"] if gpu else []) + ["blockwise"]

    def budget_left(what: dict) -> bool:
        if time.perf_counter() - start < args.budget_s:
            return True
        write({"record": "skipped", **what, "reason": f"--budget_s={args.budget_s} spent"})
        return False

    def run(what: dict, fn) -> None:
        if not budget_left(what):
            return
        try:
            write(fn())
        except Exception as e:  # an out-of-memory configuration is a result, not the end
            write({"record": "error", **what, "error": f"{type(e).__name__}: {str(e)[:500]}"})

    tokens_list = sorted(latents)
    for tokens in tokens_list:
        # The dense reference only where its [N, L, L] float32 scores fit (3 GiB at 8k).
        extra = ["xla"] if tokens <= 8192 and "xla" not in impls else []
        for impl in [*impls, *extra]:
            what = {"kind": "attention", "impl": impl, "tokens": tokens}
            run(
                what,
                lambda i=impl, n=tokens: attention_record(i, n, heads, head_dim, dtype, args.steps),
            )
    remats = args.remat or ("save_attention" if args.smoke else "full,save_attention")
    for tokens in tokens_list:
        for remat in remats.split(","):
            what = {"kind": "train_step", "remat": remat, "tokens": tokens}
            run(
                what,
                lambda r=remat, n=tokens: train_step_record(
                    model_cfg, latents[n], r, dims, args.steps
                ),
            )
    write({"record": "done", "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
