r"""Evaluators chosen by `evaluate.type`; each writes WORKDIR/eval/<step>.json.

`prompt_adherence`: samples `evaluate.num_videos` prompts drawn from the synthetic caption
space (fixed seed), measures each video's dominant colour and motion direction from the
pixels (sora_jax.evaluation.adherence, no learned weights) and reports the fraction that
match the prompt, next to chance (1/6 colour, 1/4 direction, 1/24 both).

`val_loss`: the fixed-noise, fixed-time validation loss (sora_jax.diffusion.validation) of
the checkpoint on one fixed batch per bucket (the first batch the schedule draws from it),
overall and per time; the same numbers the trainer's eval hook logs as `eval/val_*`.

`reconstruction`: the tokenizer's PSNR and SSIM (sora_jax.evaluation.metrics) on
`evaluate.num_videos` held-out synthetic clips at the sample bucket's shape: clips
0 .. n-1 of the synthetic set with seed `data.source.seed + HELD_OUT_SEED_OFFSET +
evaluate.seed`, never the training clips (seed `data.source.seed`). Needs no checkpoint.

`fvd`: the Fréchet distance (sora_jax.evaluation.frechet) between features of the same
held-out clips rendered at the bucket shape (real) and videos sampled for their captions
(generated, noise index = clip index), with the feature network `evaluate.fvd_features`
(sora_jax.evaluation.features: 'i3d' with `evaluate.fvd_weights`, or the weight-free
'random_conv' sanity metric, not comparable to published FVD).

The item evaluators (all but val_loss) are sharded over processes and resumable item by
item (sora_jax.evaluation.items); their `protocol.json` records what each item computes.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import synthetic
from sora_jax.diffusion import validation
from sora_jax.evaluation import adherence, features, frechet, generate, metrics
from sora_jax.evaluation import requests as requests_lib
from sora_jax.evaluation.items import ItemEvaluator, ItemStore, run_items
from sora_jax.evaluation.val_loss import ValidationLoss
from sora_jax.models import tokenizer as tokenizer_lib

HELD_OUT_SEED_OFFSET = 100_000
# prompt_adherence prompts: the synthetic captions of seed `evaluate.seed + this`.
PROMPT_SEED_OFFSET = 10_000
# The SampleOptions fields a text-to-video evaluation sample depends on. The bucket and the
# frame/size overrides enter through the protocol's `clip_shape`; `cond_frames` only applies
# to i2v and continuation, which no evaluator samples.
T2V_SAMPLING_FIELDS = ("num_steps", "cfg_scale", "sampler", "seed", "shift")


def held_out_seed(config) -> int:
    return int(config.data.source.get("seed", 0)) + HELD_OUT_SEED_OFFSET + int(config.evaluate.seed)


def _shape(config, options) -> tuple[int, int, int]:
    return requests_lib.pixel_shape(config, options)


def _generate(gen, options, prompts, indices, batch) -> np.ndarray:
    """Videos for `prompts` with noise indices `indices`, padded to one compiled batch."""
    videos, _ = gen.generate(prompts, options, indices=indices, pad_to=batch)
    return videos


# --- prompt_adherence -------------------------------------------------------------------


def adherence_prompt_seed(config) -> int:
    return int(config.evaluate.seed) + PROMPT_SEED_OFFSET


def _adherence_prompts(config) -> list[str]:
    n = int(config.evaluate.num_videos)
    seed = adherence_prompt_seed(config)
    return [synthetic.clip_spec(i, seed=seed).caption for i in range(n)]


def _adherence_compute(config, gen, options, indices, batch):
    prompts = _adherence_prompts(config)
    videos = _generate(gen, options, [prompts[i] for i in indices], indices, batch)
    out = []
    for i, video in zip(indices, videos, strict=True):
        r = adherence.record(video, prompts[i])
        out.append(
            {
                "colour": r["colour"] or "",
                "direction": r["direction"] or "",
                "nonfinite_values": r["nonfinite_values"],
            }
        )
    return out


def _adherence_aggregate(config, items):
    prompts = _adherence_prompts(config)
    records = []
    for caption, item in zip(prompts, items, strict=True):
        want = synthetic.parse_caption(caption)
        colour, direction = str(item["colour"]) or None, str(item["direction"]) or None
        c_ok, d_ok = colour == want["colour"], direction == want["direction"]
        records.append(
            {
                "caption": caption,
                "colour": colour,
                "direction": direction,
                "colour_match": c_ok,
                "direction_match": d_ok,
                "both_match": c_ok and d_ok,
                "nonfinite_values": int(item["nonfinite_values"]),
            }
        )
    return adherence.summarize(records)


# --- reconstruction ---------------------------------------------------------------------


def _real_clips(config, options, indices) -> np.ndarray:
    t, h, w = _shape(config, options)
    seed = held_out_seed(config)
    return np.stack([synthetic.synthetic_clip(i, seed, t, h, w)["video"] for i in indices])


def _reconstruction_compute(config, gen, options, indices, batch):
    tokenizer = gen.tokenizer if gen else tokenizer_lib.build_tokenizer(config.tokenizer)
    clips = _real_clips(config, options, indices)
    recon = np.clip(np.asarray(tokenizer.decode(tokenizer.encode(clips)), np.float32), -1, 1)
    return [
        {"psnr": metrics.psnr(r, c), "ssim": metrics.ssim(r, c)}
        for r, c in zip(recon, clips, strict=True)
    ]


def _reconstruction_aggregate(config, items):
    psnr = np.array([float(x["psnr"]) for x in items])
    ssim = np.array([float(x["ssim"]) for x in items])
    return {
        "n": len(items),
        "psnr": float(psnr.mean()),
        "psnr_min": float(psnr.min()),
        "ssim": float(ssim.mean()),
        "ssim_min": float(ssim.min()),
    }


# --- fvd --------------------------------------------------------------------------------

_FEATURE_FNS: dict[tuple, Callable] = {}


def _feature_fn(config):
    key = (
        config.evaluate.get("fvd_features", "random_conv"),
        config.evaluate.get("fvd_weights", ""),
        int(config.evaluate.get("fvd_resize", 224)),
    )
    if key not in _FEATURE_FNS:
        _FEATURE_FNS[key] = features.build(config)
    return _FEATURE_FNS[key]


def _padded(fn, x: np.ndarray, rows: int) -> np.ndarray:
    """`fn(x)` on `x` padded with zeros to `rows`: one compiled shape (hence the same
    floating-point results) for every chunk of items."""
    pad = np.zeros((max(rows - len(x), 0), *x.shape[1:]), x.dtype)
    return fn(np.concatenate([x, pad]))[: len(x)]


def _fvd_compute(config, gen, options, indices, batch):
    feats = _feature_fn(config)
    real = _real_clips(config, options, indices)
    seed = held_out_seed(config)
    prompts = [synthetic.clip_spec(i, seed).caption for i in indices]
    fake = _generate(gen, options, prompts, indices, batch)
    fr, ff = _padded(feats, real, batch), _padded(feats, fake, batch)
    return [{"real": a, "generated": b} for a, b in zip(fr, ff, strict=True)]


def _fvd_aggregate(config, items):
    real = np.stack([x["real"] for x in items])
    fake = np.stack([x["generated"] for x in items])
    fvd = frechet.frechet_distance(*frechet.gaussian_stats(real), *frechet.gaussian_stats(fake))
    return {
        "fvd": float(fvd),
        "n": len(items),
        "feature_dim": int(real.shape[1]),
        "features": config.evaluate.get("fvd_features", "random_conv"),
    }


def _protocol(kind: str):
    def protocol(config, options):
        t, h, w = _shape(config, options)
        p = {
            "type": kind,
            "num_items": int(config.evaluate.num_videos),
            "clip_shape": [t, h, w],
            "tokenizer": config.tokenizer.to_dict(),
        }
        if kind in ("reconstruction", "fvd"):
            p["held_out_seed"] = held_out_seed(config)
            p["clips"] = "synthetic.synthetic_clip(i, held_out_seed, T, H, W), i < num_items"
        if kind in ("prompt_adherence", "fvd"):
            p["sampling"] = {k: getattr(options, k) for k in T2V_SAMPLING_FIELDS}
            p["noise"] = "normal(fold_in(key(sampling.seed), item index))"
        if kind == "prompt_adherence":
            p["prompt_seed"] = adherence_prompt_seed(config)
            p["prompts"] = "synthetic.clip_spec(i, prompt_seed).caption, i < num_items"
        if kind == "fvd":
            p["prompts"] = "synthetic.clip_spec(i, held_out_seed).caption: the clips' captions"
        if kind == "fvd":
            name = config.evaluate.get("fvd_features", "random_conv")
            p["features"] = name
            if name == "i3d":
                p["fvd_weights"] = str(config.evaluate.get("fvd_weights", ""))
                p["fvd_resize"] = int(config.evaluate.get("fvd_resize", 224))
                p["i3d_output"] = "logits (400-d)"
            else:
                p["note"] = "random_conv: a sanity metric, not comparable to published FVD"
        return p

    return protocol


def _count(config) -> int:
    return int(config.evaluate.num_videos)


ITEM_EVALUATORS = {
    "prompt_adherence": ItemEvaluator(
        _count, _protocol("prompt_adherence"), _adherence_compute, _adherence_aggregate
    ),
    "reconstruction": ItemEvaluator(
        _count,
        _protocol("reconstruction"),
        _reconstruction_compute,
        _reconstruction_aggregate,
        needs_generator=False,
    ),
    "fvd": ItemEvaluator(_count, _protocol("fvd"), _fvd_compute, _fvd_aggregate),
}


# --- val_loss (one fixed batch per bucket; not sharded) ----------------------------------


def _val_loss_protocol(config, pipe) -> dict[str, Any]:
    """What `val_loss` computes: per bucket of positive weight, the validation loss
    (sora_jax.diffusion.validation) of its first batch in the data schedule, at the grid
    `times`, with the noise of `noise_seed` (the seed the eval hook uses, `seed + 1`)."""
    first = pipe.first_step_of_each_bucket()
    return {
        "type": "val_loss",
        "batches": {
            b.key: {"step": first[b.key], "rows": b.global_batch}
            for b in pipe.buckets
            if b.weight > 0
        },
        "data": "training records: the batch the data schedule draws at `step`",
        "noise_seed": int(config.seed) + 1,
        "noise": "normal(fold_in(key(noise_seed), flow.PURPOSE_NOISE)), shared by all times",
        "times": list(validation.DEFAULT_TIMES),
        "task": "t2v",
    }


def val_loss(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: requests_lib.SampleOptions,
) -> dict[str, Any]:
    del options  # no sampling: the loss of the checkpoint's weights at fixed times
    mesh = generator.mesh
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    pipe = pipeline_lib.from_config(config, workdir, data_parallel=data_parallel)
    try:
        protocol = _val_loss_protocol(config, pipe)
        loss = ValidationLoss(config, pipe, generator.model, mesh)
        with jax.set_mesh(mesh):
            scores = loss(generator.params)
    finally:
        pipe.close()
    scores = {k.removeprefix("eval/"): v for k, v in scores.items()}
    return {"scores": scores, "protocol": protocol}


EVALUATORS: dict[str, Any] = {"val_loss": val_loss, **ITEM_EVALUATORS}


def _latest_step(workdir: pathlib.Path) -> int:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    options: requests_lib.SampleOptions,
    *,
    step: int | None = None,
    ema_decay: float | None = None,
    generator: generate.Generator | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    stop_after: int | None = None,
    eval_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs the configured evaluator and writes `<eval_dir>/<step>.json` (default eval_dir
    WORKDIR/eval) from process 0 once every item is done.

    `process_index`/`process_count` default to JAX's; passing them splits the items the
    same way without a multi-process runtime (tests, or independent jobs on one
    filesystem). The returned report has `missing` item indices instead of scores while
    items of other processes are not done.
    """
    name = config.evaluate.type
    if name not in EVALUATORS:
        raise ValueError(f"evaluate.type={name!r} is unknown; known: {sorted(EVALUATORS)}")
    workdir = pathlib.Path(workdir)
    evaluator = EVALUATORS[name]
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    needs_gen = not isinstance(evaluator, ItemEvaluator) or evaluator.needs_generator
    gen = generator
    if gen is None and needs_gen:
        gen = generate.Generator.from_workdir(workdir, config, step=step, ema_decay=ema_decay)
    ckpt_step = gen.step if gen else (step if step is not None else _latest_step(workdir))
    root = pathlib.Path(eval_dir or workdir / "eval")
    report: dict[str, Any] = {
        "type": name,
        "checkpoint_step": ckpt_step,
        "weights": gen.weights if gen else "",
    }
    if isinstance(evaluator, ItemEvaluator):
        protocol = evaluator.protocol(config, options)
        if gen:
            protocol["params_sha256"] = gen.params_hash
        store = ItemStore(root / str(ckpt_step) / name, protocol)
        result = run_items(
            evaluator,
            config,
            store,
            gen,
            options,
            process_index=pi,
            process_count=pc,
            stop_after=stop_after,
        )
        report["protocol"] = protocol  # what protocol.json records: the items' settings
        report["items_dir"] = str(store.root)
        report.update(result)
        if "scores" not in result:
            report["path"] = ""
            return report
    else:
        report.update(evaluator(config, workdir, gen, options))  # scores and protocol
    out = root / f"{ckpt_step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    report["path"] = str(out)
    return report
