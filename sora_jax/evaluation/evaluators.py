r"""Evaluators chosen by `evaluate.type`; each writes WORKDIR/eval/<step>.json.

`prompt_adherence`: samples `evaluate.num_videos` prompts drawn from the synthetic caption
space (fixed seed), measures each video's dominant colour, motion direction, shape and
speed from the pixels (sora_jax.evaluation.adherence, no learned weights) and reports the
fraction that match the prompt, next to chance (1/6 colour, 1/4 direction, 1/3 shape,
1/2 speed, 1/24 colour and direction, 1/144 all four).

The reference (`evaluate.reference`, `reference`): 'holdout', the dataset's held-out split
(sora_jax.data.holdout; made by `data.tokenize.holdout_fraction`), 'synthetic', or 'auto'
(default): the held-out split when the tokenized dataset has one, else synthetic.

`val_loss`: the fixed-noise, fixed-time validation loss (sora_jax.diffusion.validation) of
the checkpoint, overall and per time, per bucket: on the held-out split, the first
`min(count, evaluate.num_videos)` held-out records of each bucket (rounded down to a
multiple of data x fsdp); otherwise on one fixed training batch per bucket (the first
batch the schedule draws from it), the numbers the trainer's eval hook logs as `eval/val_*`.
The protocol's `split` says which (`holdout` or `train`).

`reconstruction`: the tokenizer's PSNR and SSIM (sora_jax.evaluation.metrics) on
`evaluate.num_videos` reference clips: held-out clips cut again from `data.source` (the
pixels that were tokenized, each at its bucket's shape), or clips 0 .. n-1 of the
synthetic set with seed `data.source.seed + HELD_OUT_SEED_OFFSET + evaluate.seed` at the
sample bucket's shape, never the training clips (seed `data.source.seed`). Needs no
checkpoint.

`fvd`: the Fréchet distance (sora_jax.evaluation.frechet) between features of the
reference clips (real; held-out clips resampled to the sample bucket's shape) and videos
sampled for their captions (generated, noise index = clip index), with the feature network
`evaluate.fvd_features` (sora_jax.evaluation.features). The score's key names it:
`fvd_i3d` (I3D, clips resampled to 16 x 224 x 224) or `fd_random_conv` (the weight-free
sanity metric, not comparable to published FVD).

The item evaluators (all but val_loss) are sharded over processes and resumable item by
item (sora_jax.evaluation.items); their `protocol.json` records what each item computes.

`temporal_consistency`: `evaluate.num_videos` synthetic prompts (as prompt_adherence's)
sampled as long videos of `evaluate.long_frames` pixel frames (default 4x the bucket's;
sora_jax.evaluation.long_video: the KV-cache rollout of a causal run, sliding-window
continuation otherwise), measured by sora_jax.evaluation.temporal with segments of the
bucket's frames: colour and histogram drift from the first segment, flicker, and the
colour / direction / shape / speed adherence of every segment on its own.

`samples`: the fixed-seed sample grid of `sample.prompts` into WORKDIR/samples/<step>/,
the grid the trainer writes without `config.evals`; in training its contact sheet (one row
of frames per prompt) also goes to TensorBoard as an image.

`config.evals` names several evaluators, each `name -> {type, every_steps, options}`: the
options are fields of `evaluate` that this entry overrides (`num_videos`, `reference`,
`fvd_features`, ...). The trainer runs each entry every `every_steps` on the live weights
(sora_jax/training/eval_hook.py) and `sora_jax.evaluate` runs them on a checkpoint, both
through `evaluate(..., name=name)`, which writes WORKDIR/eval/<step>/<name>.json: the
same numbers for the same weights. Without `config.evals`, `evaluate` runs the one
evaluator of `evaluate.type` into WORKDIR/eval/<step>.json.
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

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import global_batch as rows_lib
from sora_jax.data import holdout, shards, sources, synthetic, tokenization
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.diffusion import validation
from sora_jax.evaluation import adherence, features, frechet, generate, long_video, metrics
from sora_jax.evaluation import requests as requests_lib
from sora_jax.evaluation import temporal as temporal_lib
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


# --- the reference clips: held-out inputs of the dataset, or synthetic -----------------

REFERENCES = ("auto", "holdout", "synthetic")


def _manifest(config) -> dict[str, Any] | None:
    """The dataset's manifest (`data.dataset_dir`, resolved by `evaluate`), if tokenized."""
    out = tokenization.dataset_dir(config, "")
    return shards.read_manifest(out) if (out / shards.MANIFEST).is_file() else None


def reference(config) -> str:
    """`evaluate.reference`: 'holdout' (the dataset's held-out split), 'synthetic' (clips of
    the synthetic set with the held-out seed) or 'auto' (the split when it holds clips)."""
    ref = config.evaluate.get("reference", "auto")
    if ref not in REFERENCES:
        raise ValueError(f"evaluate.reference={ref!r} is unknown; known: {list(REFERENCES)}")
    if ref == "synthetic":
        return ref
    manifest = _manifest(config)
    has = bool(manifest and holdout.split(manifest)["buckets"])
    if ref == "holdout" and not has:
        raise ValueError(
            f"evaluate.reference='holdout' but the dataset {tokenization.dataset_dir(config, '')} "
            "has no held-out clips: tokenize with data.tokenize.holdout_fraction > 0 "
            "(docs/tokenize.md), or set evaluate.reference='synthetic'"
        )
    return "holdout" if has else "synthetic"


def _holdout_items(config) -> list[tuple[str, int, int]]:
    return holdout.clip_list(_manifest(config))[: int(config.evaluate.num_videos)]


def _source(config):
    table = buckets_lib.buckets_from_config(config.data)
    return sources.build_source(
        config.data.source, table, sources.ClipOptions.from_config(config.data)
    )


def _holdout_clips(config, indices) -> list[sources.Clip]:
    """The held-out clips `indices` cut again from `data.source`: the pixels (in [-1, 1])
    that were tokenized, not a decoding of their latents."""
    items, source, out = _holdout_items(config), _source(config), []
    for i in indices:
        bucket, index, k = items[i]
        clips = [c for c in source.clips(index) if c.bucket == bucket]
        if k >= len(clips):
            raise ValueError(
                f"held-out input {source.input_id(index)!r} now gives {len(clips)} clip(s) in "
                f"bucket {bucket!r}, the dataset holds more: data.source or data.tokenize "
                "differ from the tokenization's; evaluate with the config that made the data"
            )
        out.append(clips[k])
    return out


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
    for video in videos:
        got = adherence.measure(video)
        item = {k: got[k] or "" for k in adherence.ATTRIBUTES}  # words; "" = unreadable
        # The numbers behind shape and speed; NaN = unread.
        item.update({k: np.nan if got[k] is None else got[k] for k in ("fill", "skew", "travel")})
        item["nonfinite_values"] = adherence.nonfinite_values(video)
        out.append(item)
    return out


def _adherence_aggregate(config, items):
    prompts = _adherence_prompts(config)
    records = []
    for caption, item in zip(prompts, items, strict=True):
        got = {k: str(item[k]) or None for k in adherence.ATTRIBUTES}
        for k in ("fill", "skew", "travel"):
            v = float(item[k])
            got[k] = None if np.isnan(v) else v
        records.append(adherence.compare(got, caption, int(item["nonfinite_values"])))
    return adherence.summarize(records)


# --- temporal_consistency ---------------------------------------------------------------


def _long_frames(config, options) -> tuple[int, int]:
    """(long video frames, segment frames): `evaluate.long_frames` (<= 0: 4 clips) and the
    sample bucket's frames."""
    clip = _shape(config, options)[0]
    frames = int(config.evaluate.get("long_frames", 0) or 0)
    return (frames if frames > 0 else 4 * clip), clip


def _temporal_compute(config, gen, options, indices, batch):
    del batch  # one compiled rollout per call: no padding needed
    prompts = _adherence_prompts(config)
    frames, clip = _long_frames(config, options)
    videos, _ = long_video.long_videos(
        gen, [prompts[i] for i in indices], options, frames, indices=indices
    )
    out = []
    for i, video in zip(indices, videos, strict=True):
        r = temporal_lib.record(video, prompts[i], clip)
        item = {k: float(v) for k, v in r.items() if isinstance(v, float | int)}
        for k, matches in enumerate(r["segment_matches"]):
            item.update({f"seg{k}_{a}": float(v) for a, v in matches.items()})
        out.append(item)
    return out


def _temporal_aggregate(config, items):
    prompts = _adherence_prompts(config)
    records = []
    for caption, item in zip(prompts, items, strict=True):
        item = {k: float(v) for k, v in item.items()}
        k = int(item["segments"])
        attrs = (*adherence.ATTRIBUTES, "both")
        matches = [{a: bool(item.pop(f"seg{i}_{a}")) for a in attrs} for i in range(k)]
        records.append({"caption": caption, **item, "segments": k, "segment_matches": matches})
    return temporal_lib.summarize(records)


# --- reconstruction ---------------------------------------------------------------------


def _real_clips(config, options, indices) -> np.ndarray:
    t, h, w = _shape(config, options)
    seed = held_out_seed(config)
    return np.stack([synthetic.synthetic_clip(i, seed, t, h, w)["video"] for i in indices])


def _reconstruction_compute(config, gen, options, indices, batch):
    tokenizer = gen.tokenizer if gen else tokenizer_lib.build_tokenizer(config.tokenizer)
    if reference(config) == "holdout":  # one clip at a time: buckets differ in shape
        out = []
        for clip in _holdout_clips(config, indices):
            c = np.asarray(clip.video, np.float32)
            r = np.clip(np.asarray(tokenizer.decode(tokenizer.encode(c[None])), np.float32), -1, 1)
            out.append({"psnr": metrics.psnr(r[0], c), "ssim": metrics.ssim(r[0], c)})
        return out
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
        int(config.evaluate.get("fvd_resize", features.FVD_SIZE)),
        int(config.evaluate.get("fvd_frames", features.FVD_FRAMES)),
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
    if reference(config) == "holdout":
        t, h, w = _shape(config, options)  # every real clip resampled to the sampled shape
        clips = _holdout_clips(config, indices)
        real = np.stack([features.resample(c.video[None], t, h, w)[0] for c in clips])
        prompts = [c.caption for c in clips]
    else:
        real = _real_clips(config, options, indices)
        seed = held_out_seed(config)
        prompts = [synthetic.clip_spec(i, seed).caption for i in indices]
    fake = _generate(gen, options, prompts, indices, batch)
    fr, ff = _padded(feats, real, batch), _padded(feats, fake, batch)
    return [{"real": a, "generated": b} for a, b in zip(fr, ff, strict=True)]


def _fvd_aggregate(config, items):
    real = np.stack([x["real"] for x in items])
    fake = np.stack([x["generated"] for x in items])
    fd = frechet.frechet_distance(*frechet.gaussian_stats(real), *frechet.gaussian_stats(fake))
    return {
        features.score_key(config): float(fd),  # fvd_i3d or fd_random_conv
        "n": len(items),
        "feature_dim": int(real.shape[1]),
        "features": config.evaluate.get("fvd_features", "random_conv"),
    }


def _protocol(kind: str):
    def protocol(config, options):
        t, h, w = _shape(config, options)
        p = {
            "type": kind,
            "num_items": _count(config),  # evaluate.num_videos, or fewer held-out clips
            "clip_shape": [t, h, w],
            "tokenizer": config.tokenizer.to_dict(),
        }
        ref = reference(config) if kind in ("reconstruction", "fvd") else ""
        if ref == "holdout":
            p["reference"] = "holdout"
            p["dataset"] = str(tokenization.dataset_dir(config, ""))
            p["holdout_rule"] = holdout.split(_manifest(config))["rule"]
            source = _source(config)
            p["clips"] = (
                "held-out clip i (bucket, input, k-th clip of the input in the bucket), cut "
                "again from data.source: the pixels that were tokenized"
            )
            p["holdout_clips"] = [[b, source.input_id(i), k] for b, i, k in _holdout_items(config)]
            if kind == "fvd":
                p["resample"] = (
                    "real clips to clip_shape: evenly spaced frames (nearest), bilinear space"
                )
        elif ref == "synthetic":
            p["reference"] = "synthetic"
            p["held_out_seed"] = held_out_seed(config)
            p["clips"] = "synthetic.synthetic_clip(i, held_out_seed, T, H, W), i < num_items"
        if kind in ("prompt_adherence", "fvd"):
            p["sampling"] = {k: getattr(options, k) for k in T2V_SAMPLING_FIELDS}
            p["noise"] = "normal(fold_in(key(sampling.seed), item index))"
        if kind == "temporal_consistency":
            frames, clip = _long_frames(config, options)
            p["sampling"] = {k: getattr(options, k) for k in T2V_SAMPLING_FIELDS}
            p["long_frames"], p["segment_frames"] = frames, clip
            p["prompt_seed"] = adherence_prompt_seed(config)
            if long_video.is_causal(config):
                p["generation"] = "KV-cache rollout (sora_jax/diffusion/rollout.py)"
                p["rollout_window"] = long_video.window(config)
                p["context_t"] = long_video.context_t(config)
            else:
                p["generation"] = "sliding-window continuation (long_video.continuation_videos)"
        if kind == "prompt_adherence":
            p["prompt_seed"] = adherence_prompt_seed(config)
            p["prompts"] = "synthetic.clip_spec(i, prompt_seed).caption, i < num_items"
        if kind == "fvd":
            p["prompts"] = (
                "the held-out clips' captions"
                if ref == "holdout"
                else "synthetic.clip_spec(i, held_out_seed).caption: the clips' captions"
            )
            name = config.evaluate.get("fvd_features", "random_conv")
            p["features"] = name
            p["score_key"] = features.score_key(config)
            if name == "i3d":
                p["fvd_weights"] = str(config.evaluate.get("fvd_weights", ""))
                p["fvd_resize"] = int(config.evaluate.get("fvd_resize", features.FVD_SIZE))
                p["fvd_frames"] = int(config.evaluate.get("fvd_frames", features.FVD_FRAMES))
                p["i3d_input"] = (
                    "clips resampled to fvd_frames (evenly spaced, nearest) x fvd_resize^2 "
                    "(bilinear, half-pixel centres, no antialiasing), RGB in [-1, 1]"
                )
                p["i3d_output"] = "logits (400-d): 2x7x7 average pool, logits, mean over time"
            else:
                p["note"] = "random_conv: a sanity metric, not comparable to published FVD"
        return p

    return protocol


def _count(config) -> int:
    n = int(config.evaluate.num_videos)
    if config.evaluate.type in ("reconstruction", "fvd") and reference(config) == "holdout":
        return len(_holdout_items(config))  # at most num_videos
    return n


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
    "temporal_consistency": ItemEvaluator(
        _count, _protocol("temporal_consistency"), _temporal_compute, _temporal_aggregate
    ),
}


# --- val_loss (one fixed batch per bucket; not sharded) ----------------------------------


def _noise_protocol(config) -> dict[str, Any]:
    return {
        "noise_seed": int(config.seed) + 1,
        "noise": "normal(fold_in(key(noise_seed), flow.PURPOSE_NOISE)), shared by all times",
        "times": list(validation.DEFAULT_TIMES),
        "task": "t2v",
    }


def _val_loss_protocol(config, pipe) -> dict[str, Any]:
    """What `val_loss` computes on training data: per bucket of positive weight, the
    validation loss (sora_jax.diffusion.validation) of its first batch in the data schedule,
    at the grid `times`, with the noise of `noise_seed` (the seed the eval hook uses,
    `seed + 1`)."""
    first = pipe.first_step_of_each_bucket()
    return {
        "type": "val_loss",
        "split": "train",
        "batches": {
            b.key: {"step": first[b.key], "rows": b.global_batch}
            for b in pipe.buckets
            if b.weight > 0
        },
        "data": "training records: the batch the data schedule draws at `step`",
        **_noise_protocol(config),
    }


def _holdout_batches(config, mesh) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per bucket of the held-out split (and of `data.buckets`), its first
    `min(count, evaluate.num_videos)` records rounded down to a multiple of the mesh's data
    parallelism, as this process's host batch; and the protocol."""
    out = tokenization.dataset_dir(config, "")
    manifest = _manifest(config)
    shards.check_manifest_matches(
        manifest, tokenization.expected_manifest_fields(config), dataset_dir=out
    )
    split = holdout.split(manifest)
    fields = pipeline_lib.step_fields(manifest)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    layout = rows_lib.row_layout(mesh)
    cap = int(config.evaluate.num_videos)
    batches, used, skipped = {}, {}, {}
    for name, entry in split["buckets"].items():
        rows = min(entry["count"], cap) // dp * dp
        if name not in config.data.buckets:
            skipped[name] = "not in data.buckets"
        elif rows == 0:
            skipped[name] = f"{entry['count']} held-out clip(s), fewer than data x fsdp = {dp}"
        else:
            full = holdout.read_bucket(out, manifest, name, fields, rows)
            sel = layout.rows(rows)  # this process's rows of the batch
            batches[name] = {**{f: full[f][sel] for f in fields}, "layout": layout}
            used[name] = {"rows": rows, "of": entry["count"], "files": entry["files"]}
    if not batches:
        raise ValueError(
            f"no bucket of the held-out split of {out} fills a batch ({skipped}): raise "
            "data.tokenize.holdout_fraction, or set evaluate.reference='synthetic' to score "
            "the first training batch of each bucket instead"
        )
    protocol = {
        "type": "val_loss",
        "split": "holdout",
        "dataset": str(out),
        "holdout_rule": split["rule"],
        "batches": used,
        "skipped": skipped,
        "data": "held-out records (DATASET/holdout): the first `rows` of each bucket, in "
        "file order",
        **_noise_protocol(config),
    }
    return batches, protocol


_HOLDOUT_LOSSES: dict[str, tuple[ValidationLoss, dict[str, Any]]] = {}


def val_loss(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: requests_lib.SampleOptions,
) -> dict[str, Any]:
    """On the held-out split when the dataset has one (`evaluate.reference`), else on the
    first training batch of each bucket; the protocol's `split` says which."""
    del options  # no sampling: the loss of the checkpoint's weights at fixed times
    mesh = generator.mesh
    if reference(config) == "holdout":
        # One compiled loss per config and held-out split: the trainer evaluates often.
        key = json.dumps([config.to_dict(), holdout.split(_manifest(config))], default=str)
        if key not in _HOLDOUT_LOSSES:
            batches, protocol = _holdout_batches(config, mesh)
            loss = ValidationLoss(config, None, generator.model, mesh, batches=batches)
            _HOLDOUT_LOSSES[key] = (loss, protocol)
        loss, protocol = _HOLDOUT_LOSSES[key]
        with jax.set_mesh(mesh):
            scores = loss(generator.params)
    else:
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


def samples(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    generator: generate.Generator,
    options: requests_lib.SampleOptions,
) -> dict[str, Any]:
    """The fixed-seed sample grid: `sample.prompts` (noise index = position) through the
    code of `sora_jax.sample`, into WORKDIR/samples/<step>/ (videos, sidecars, contact
    sheet). The trainer also logs the contact sheet to TensorBoard as an image."""
    prompts = list(config.sample.get("prompts") or [])
    if not prompts:
        raise ValueError(
            "evaluator type 'samples' needs prompts: set config.sample.prompts (a list of captions)"
        )
    summary = generate.sample_to_dir(config, workdir, prompts, options, generator=generator)
    fields = {k: getattr(options, k) for k in T2V_SAMPLING_FIELDS}
    return {
        "scores": {"num_videos": len(summary["videos"])},
        "protocol": {
            "type": "samples",
            "prompts": prompts,
            "noise": "normal(fold_in(key(seed), index), latent_shape), index = prompt position",
            "clip_shape": list(_shape(config, options)),
            **fields,
        },
        "videos": summary["videos"],
        "contact_sheet": summary["contact_sheet"],
    }


EVALUATORS: dict[str, Any] = {"val_loss": val_loss, "samples": samples, **ITEM_EVALUATORS}


# --- config.evals: named evaluators, each with its schedule ------------------------------

# The fields of a `config.evals` entry that are not options of `evaluate`.
SCHEDULE_FIELDS = ("every_steps",)


def needs_generator(kind: str) -> bool:
    """Whether the evaluator `kind` reads a checkpoint's weights (all but reconstruction)."""
    evaluator = EVALUATORS[kind]
    return not isinstance(evaluator, ItemEvaluator) or evaluator.needs_generator


def named_evals(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """`config.evals` (name -> entry), checked; {} for a config without it."""
    evals = dict(config.get("evals") or {})
    for name, entry in evals.items():
        if entry.get("type") not in EVALUATORS:
            raise ValueError(
                f"config.evals.{name}.type={entry.get('type')!r} is unknown; known: "
                f"{sorted(EVALUATORS)}"
            )
        if int(entry.get("every_steps", 0)) < 0:
            raise ValueError(f"config.evals.{name}.every_steps must be >= 0 (0 = offline only)")
    return evals


def entry_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose `evaluate` is `config.evaluate` with the options of
    `config.evals[name]` set: what every evaluator reads."""
    evals = named_evals(config)
    if name not in evals:
        raise ValueError(f"evaluator {name!r} is not in config.evals; known: {sorted(evals)}")
    out = config.copy_and_resolve_references()
    with out.unlocked():
        for k, v in evals[name].items():
            if k not in SCHEDULE_FIELDS:
                out.evaluate[k] = v
    return out


def scalars(name: str, report: dict[str, Any]) -> dict[str, float]:
    """The numeric scores of a report as `eval/<name>/<score>` (metrics.jsonl, TensorBoard)."""
    out = {}
    for k, v in report.get("scores", {}).items():
        if isinstance(v, int | float | np.number) and not isinstance(v, bool):
            out[f"eval/{name}/{k}"] = float(v)
    return out


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
    name: str | None = None,
) -> dict[str, Any]:
    """Runs the configured evaluator and writes `<eval_dir>/<step>.json` (default eval_dir
    WORKDIR/eval) from process 0 once every item is done; with `name`, the entry
    `config.evals[name]` into `<eval_dir>/<step>/<name>.json` (module docstring).

    `process_index`/`process_count` default to JAX's; passing them splits the items the
    same way without a multi-process runtime (tests, or independent jobs on one
    filesystem). The returned report has `missing` item indices instead of scores while
    items of other processes are not done.
    """
    entry: dict[str, Any] = {}
    if name is not None:
        config = entry_config(config, name)  # an error for a name not in config.evals
        entry = config.evals[name].to_dict()
    kind = config.evaluate.type
    if kind not in EVALUATORS:
        raise ValueError(f"evaluate.type={kind!r} is unknown; known: {sorted(EVALUATORS)}")
    workdir = pathlib.Path(workdir)
    evaluator = EVALUATORS[kind]
    config = config.copy_and_resolve_references()  # the dataset directory made explicit
    with config.unlocked():
        config.data.dataset_dir = str(tokenization.dataset_dir(config, workdir))
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    needs_gen = needs_generator(kind)
    gen = generator
    if gen is None and needs_gen:
        gen = generate.Generator.from_workdir(workdir, config, step=step, ema_decay=ema_decay)
    ckpt_step = gen.step if gen else (step if step is not None else _latest_step(workdir))
    root = pathlib.Path(eval_dir or workdir / "eval")
    report: dict[str, Any] = {
        "type": kind,
        "checkpoint_step": ckpt_step,
        "weights": gen.weights if gen and needs_gen else "",
    }
    if name is not None:
        report["name"], report["entry"] = name, entry
    if isinstance(evaluator, ItemEvaluator):
        protocol = evaluator.protocol(config, options)
        if gen and needs_gen:  # reconstruction depends on the tokenizer alone
            protocol["params_sha256"] = gen.params_hash
        store = ItemStore(root / str(ckpt_step) / (name or kind), protocol)
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
    out = root / str(ckpt_step) / f"{name}.json" if name else root / f"{ckpt_step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    report["path"] = str(out)
    return report
