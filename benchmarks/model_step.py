"""Forward+backward time and achieved FLOP/s of VideoDiT for one preset and bucket.

    python benchmarks/model_step.py --preset=tiny --latent=4x16x16 --batch=2
    python benchmarks/model_step.py --preset=B --latent=8x32x32 --dtype=bfloat16 \\
        --attention=auto --remat=save_dots --scan --peak_tflops=989

Model FLOPs are the `3F` per sample of sora_jax.models.flops (docs/design.md, Performance
accounting); XLA's own count of the compiled step is printed beside them. Record results
in docs/perf.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from sora_jax.models import build_model, flops
from sora_jax.training import perf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="a key of sora_jax.models.PRESETS")
    p.add_argument("--latent", default="4x16x16", help="latent frames x height x width")
    p.add_argument("--channels", type=int, default=16, help="latent channels C")
    p.add_argument("--text_len", type=int, default=64, help="text tokens S")
    p.add_argument("--text_dim", type=int, default=64, help="text embedding width")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="xla", help="xla | cudnn | splash | auto")
    p.add_argument("--remat", default="none", help="none | full | save_dots | ...")
    p.add_argument("--scan", action="store_true", help="stack blocks with nn.scan")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak, for MFU")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = dict(
        name="video_dit",
        preset=args.preset,
        dtype=args.dtype,
        attention_impl=args.attention,
        remat=args.remat,
        scan_layers=args.scan,
    )
    model = build_model(cfg, args.channels, args.text_dim)
    shape = tuple(int(n) for n in args.latent.split("x"))
    b, s_t = args.batch, args.text_len
    keys = jax.random.split(jax.random.key(0), 4)
    x_t = jax.random.normal(keys[0], (b, *shape, args.channels))
    t = jax.random.uniform(keys[1], (b,))
    text = jax.random.normal(keys[2], (b, s_t, args.text_dim))
    mask = jnp.ones((b, s_t), bool)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, x_t, t, text, mask)["params"]))(keys[3])

    @jax.jit
    def step(params, x_t, t, text, mask):
        def loss(p):
            return jnp.mean(jnp.square(model.apply({"params": p}, x_t, t, text, mask) - x_t))

        return jax.value_and_grad(loss)(params)

    t0 = time.perf_counter()
    compiled = step.lower(params, x_t, t, text, mask).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
    jax.block_until_ready(compiled(params, x_t, t, text, mask))  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = compiled(params, x_t, t, text, mask)
    jax.block_until_ready(out)
    step_s = (time.perf_counter() - t0) / args.steps

    tokens = flops.tokens_per_sample(model, shape)
    model_flops = b * flops.train_flops_per_sample(model, tokens, s_t)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    result = {
        "preset": args.preset,
        "latent": shape,
        "tokens": tokens,
        "batch": b,
        "params": n_params,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2),
        "step_ms": round(1e3 * step_s, 3),
        "model_tflop_per_step": model_flops / 1e12,
        "xla_tflop_per_step": xla_flops / 1e12,
        "achieved_tflops": model_flops / step_s / 1e12,
    }
    if args.scan:
        # XLA's cost analysis counts a while-loop body once, not once per layer.
        result["xla_tflop_per_step"] = "n/a with --scan (counts one layer)"
    if args.peak_tflops:
        result["mfu"] = perf.mfu(model_flops, step_s, 1, args.peak_tflops * 1e12)
    for key, value in result.items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return result


if __name__ == "__main__":
    main()
