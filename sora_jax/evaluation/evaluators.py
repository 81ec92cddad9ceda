"""Evaluators chosen by `evaluate.type`; each writes WORKDIR/eval/<step>.json.

`prompt_adherence`: samples `evaluate.num_videos` prompts drawn from the synthetic caption
space (fixed seed), measures each video's dominant colour and motion direction from the
pixels (sora_jax.evaluation.adherence, no learned weights) and reports the fraction that
match the prompt, next to chance (1/6 colour, 1/4 direction, 1/24 both).

`val_loss`: the fixed-noise, fixed-time validation loss (sora_jax.diffusion.validation) of
the checkpoint on one fixed batch per bucket (the first batch the schedule draws from it),
overall and per time; the same numbers the trainer's eval hook logs as `eval/val_*`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

from sora_jax.data import synthetic
from sora_jax.evaluation import adherence, generate


def prompt_adherence(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: generate.SampleOptions,
) -> dict[str, Any]:
    n = int(config.evaluate.num_videos)
    prompts = [
        synthetic.clip_spec(i, seed=int(config.evaluate.seed) + 10_000).caption for i in range(n)
    ]
    videos = []
    timings: dict[str, float] = {}
    per_batch = int(config.sample.batch_size)
    for lo in range(0, n, per_batch):
        v, t = generator.generate(prompts[lo : lo + per_batch], options)
        videos.extend(v)
        for k, x in t.items():
            timings[k] = timings.get(k, 0.0) + x
    result = adherence.score(videos, prompts)
    return {"scores": result, "timings": timings}


def val_loss(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: generate.SampleOptions,
) -> dict[str, Any]:
    del options  # no sampling: the loss of the checkpoint's weights at fixed times
    import jax

    from sora_jax.data import pipeline as pipeline_lib
    from sora_jax.diffusion import validation
    from sora_jax.training import hooks

    mesh = generator.mesh
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    pipe = pipeline_lib.from_config(config, workdir, data_parallel=data_parallel)
    try:
        hook = hooks.Evaluator(config, workdir, pipe, generator.model, mesh, generator.manifest)
        with jax.set_mesh(mesh):
            scores = hook.validation_of(generator.params)
    finally:
        pipe.close()
    scores = {k.removeprefix("eval/"): v for k, v in scores.items()}
    return {"scores": scores, "times": list(validation.DEFAULT_TIMES)}


EVALUATORS = {"prompt_adherence": prompt_adherence, "val_loss": val_loss}


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    options: generate.SampleOptions,
    *,
    step: int | None = None,
    ema_decay: float | None = None,
    generator: generate.Generator | None = None,
) -> dict[str, Any]:
    """Runs the configured evaluator and writes WORKDIR/eval/<step>.json."""
    name = config.evaluate.type
    if name not in EVALUATORS:
        raise ValueError(f"evaluate.type={name!r} is unknown; known: {sorted(EVALUATORS)}")
    gen = generator or generate.Generator.from_workdir(
        workdir, config, step=step, ema_decay=ema_decay
    )
    result = EVALUATORS[name](config, workdir, gen, options)
    report = {
        "type": name,
        "checkpoint_step": gen.step,
        "weights": gen.weights,
        "protocol": {
            "num_videos": int(config.evaluate.num_videos),
            "prompt_seed": int(config.evaluate.seed),
            **{k: v for k, v in vars(options).items()},
        },
        **result,
    }
    out = pathlib.Path(workdir) / "eval" / f"{gen.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    report["path"] = str(out)
    return report
