"""Where sampling time goes: text encode, denoising (total and per step), decode, writing.

    python benchmarks/sample.py --workdir=runs/demo [--config=experiments/demo.py] [--ema=0]

Loads a trained run with `generate.Generator.from_workdir` (the run's `config.json` unless
--config is given), samples the config's `sample.prompts` with `SampleOptions.from_config`
twice, and reports the second pass: the first includes compiling the sampler. The videos
are written to a temporary directory with `generate.write_samples` (mp4 + sidecar per
prompt, contact sheet), as `sora_jax.sample` does. Record results in docs/perf.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import jax

from sora_jax import config as config_lib
from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/demo", help="a training run's workdir")
    p.add_argument("--config", default="", help="experiment file[:arg]; '' = WORKDIR/config.json")
    p.add_argument("--ema", type=float, default=None, help="EMA decay; default sample.ema_decay")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    config = (
        config_lib.load_config(args.config) if args.config else config_lib.load_run_config(workdir)
    )
    ema = config.sample.ema_decay if args.ema is None else args.ema
    gen = generate.Generator.from_workdir(workdir, config, ema_decay=ema)
    options = requests_lib.SampleOptions.from_config(config.sample)
    prompts = list(config.sample.prompts)
    if not prompts:
        raise SystemExit(f"sample.prompts of {workdir}'s config is empty: nothing to sample")

    t0 = time.perf_counter()
    gen.generate(prompts, options)  # compiles the sampler for this batch shape
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    videos, timings = gen.generate(prompts, options)
    params = {**dataclasses.asdict(options), **gen.checkpoint_info()}
    with tempfile.TemporaryDirectory() as outdir:
        t1 = time.perf_counter()
        generate.write_samples(
            outdir,
            videos,
            prompts,
            params,
            fps=config.sample.fps,
            scale=config.sample.video_scale,
        )
        timings["write_s"] = time.perf_counter() - t1
    total_s = time.perf_counter() - t0

    n = len(prompts)
    result = {
        **timings,
        "denoise_per_step_s": timings["denoise_s"] / options.num_steps,
        "total_s": total_s,
        "first_pass_s": first_s,
        "samples_per_s": n / total_s,
    }
    print(
        f"{workdir} step {gen.step} ({gen.weights}), {n} prompts of shape "
        f"{'x'.join(map(str, videos.shape[1:]))}, {options.num_steps} {options.sampler} steps, "
        f"cfg {options.cfg_scale:g}, {jax.devices()[0].device_kind} ({jax.device_count()} dev)"
    )
    print(f"  first pass (with compile) {first_s:8.3f} s")
    print("  second pass:")
    print(f"    text encode   {timings['text_encode_s'] * 1e3:9.1f} ms")
    print(
        f"    denoise       {timings['denoise_s'] * 1e3:9.1f} ms  "
        f"({result['denoise_per_step_s'] * 1e3:.2f} ms/step, CFG doubles the batch)"
    )
    print(f"    decode        {timings['decode_s'] * 1e3:9.1f} ms")
    print(f"    write         {timings['write_s'] * 1e3:9.1f} ms")
    print(f"    total         {total_s * 1e3:9.1f} ms  ({result['samples_per_s']:.2f} samples/s)")
    return result


if __name__ == "__main__":
    main()
