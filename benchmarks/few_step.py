"""Sampling speed-up of a few-step student and of the step cache against the teacher, in
one run.

    python benchmarks/few_step.py --teacher=runs/demo --student=runs/demo_student \
        [--steps=25 --cfg=3 --student_steps=4,1 --cache=0.1 --repeats=5]

Loads the teacher run and (optionally) the student run with `generate.Generator.from_workdir`
(each run's `config.json`), compiles every variant once, then times them alternating
(teacher, teacher with the step cache at each `--cache` threshold, student at each of
`--student_steps`) `--repeats` times over the same prompts (`sample.prompts` of the
teacher's config) and reports the median of the sampler's wall time (`denoise`: the
compiled sampler from noise to latents) and of the whole `generate` call (text encoding and
decoding included), and each variant's speed-up over the teacher as a ratio of medians.
For the cache it also reports the steps in which the network ran (`sampler.sample`'s
`return_calls`, the same noise). Record results in docs/sampling.md with the machine.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from sora_jax import config as config_lib
from sora_jax.diffusion import sampler
from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the teacher run's workdir")
    p.add_argument("--student", default="", help="a distilled run's workdir ('' = none)")
    p.add_argument("--steps", type=int, default=25, help="the teacher's ODE steps")
    p.add_argument("--cfg", type=float, default=3.0, help="the teacher's guidance scale")
    p.add_argument("--student_steps", default="4,1", help="comma-separated student steps")
    p.add_argument("--cache", default="0.1", help="comma-separated cache thresholds ('' = none)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants")
    return p.parse_args(argv)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def cache_calls(gen, prompts, options) -> int:
    """Steps in which the teacher's network ran for `prompts` under its step cache."""
    shape = gen._latent_shape(options)
    keys = [jax.random.fold_in(jax.random.key(options.seed), i) for i in range(len(prompts))]
    noise = jnp.stack([jax.random.normal(k, shape, jnp.float32) for k in keys])
    text, mask = gen.text_encoder.encode(list(prompts))
    _, calls = jax.jit(
        lambda p, z, s, m: sampler.sample(
            gen.apply_fn, p, z, s, m, num_steps=options.num_steps, cfg_scale=options.cfg_scale,
            alpha=gen._alpha(options, shape), method=options.sampler,
            cache_threshold=generate.cache_threshold(gen.config), return_calls=True,
        )
    )(gen.params, noise, text, mask)  # fmt: skip
    return int(calls)


def main(argv=None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    teacher_dir = pathlib.Path(args.teacher)
    config = config_lib.load_run_config(teacher_dir)
    prompts = list(config.sample.prompts)
    base = requests_lib.SampleOptions.from_config(
        config.sample, num_steps=args.steps, cfg_scale=args.cfg, sampler="euler"
    )
    teacher = generate.Generator.from_workdir(teacher_dir, config)
    variants = {f"teacher {args.steps} steps cfg {args.cfg:g}": (teacher, base)}
    for threshold in _floats(args.cache):
        cached = copy.deepcopy(config)
        with cached.unlocked():  # a run recorded before the field existed lacks it
            cached.sample.cache_threshold = threshold
        gen = generate.Generator.from_workdir(teacher_dir, cached)
        variants[f"teacher + cache {threshold:g}"] = (gen, base)
    if args.student:
        student_dir = pathlib.Path(args.student)
        s_config = config_lib.load_run_config(student_dir)
        student = generate.Generator.from_workdir(student_dir, s_config)
        for n in (int(x) for x in args.student_steps.split(",")):
            options = requests_lib.SampleOptions.from_config(
                s_config.sample, num_steps=n, cfg_scale=1.0
            )
            variants[f"student {n} step{'s' if n > 1 else ''}"] = (student, options)

    for gen, options in variants.values():  # compile each variant outside the timing
        gen.generate(prompts, options)
    denoise = {name: [] for name in variants}
    total = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternating: every variant sees the same machine load
        for name, (gen, options) in variants.items():
            t0 = time.perf_counter()
            _, timings = gen.generate(prompts, options)
            total[name].append(time.perf_counter() - t0)
            denoise[name].append(timings["denoise_s"])

    ref = next(iter(variants))
    result = {}
    device = f"{jax.devices()[0].device_kind} ({jax.device_count()} dev)"
    print(f"{len(prompts)} prompts, median of {args.repeats} alternating rounds, {device}")
    print(f"  {'variant':<28} {'denoise ms':>11} {'speed-up':>9} {'total ms':>10} {'speed-up':>9}")
    for name, (gen, options) in variants.items():
        d, t = statistics.median(denoise[name]), statistics.median(total[name])
        result[name] = {
            "denoise_s": d,
            "total_s": t,
            "denoise_speedup": statistics.median(denoise[ref]) / d,
            "total_speedup": statistics.median(total[ref]) / t,
        }
        line = (
            f"  {name:<28} {d * 1e3:11.1f} {result[name]['denoise_speedup']:8.2f}x "
            f"{t * 1e3:10.1f} {result[name]['total_speedup']:8.2f}x"
        )
        if generate.cache_threshold(gen.config) > 0:
            calls = cache_calls(gen, prompts, options)
            result[name]["network_steps"] = calls
            line += f"  (network ran in {calls} of {options.num_steps} steps)"
        print(line)
    return result


if __name__ == "__main__":
    main()
