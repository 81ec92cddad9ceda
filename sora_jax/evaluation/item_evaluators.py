"""The evaluators that score items (videos or clips) one by one, shardable and resumable
(evaluation/items.py): prompt_adherence, temporal_consistency, reconstruction and fvd,
with the reference clips they compare against; their protocols and scores are described
in sora_jax/evaluation/evaluators.py, which registers them with the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import holdout, shards, sources, synthetic, tokenization
from sora_jax.evaluation import adherence, features, frechet, long_video, metrics
from sora_jax.evaluation import requests as requests_lib
from sora_jax.evaluation import temporal as temporal_lib
from sora_jax.evaluation.items import ItemEvaluator
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


def clip_shape(config, options) -> tuple[int, int, int]:
    return requests_lib.pixel_shape(config, options)


def _generate(gen, options, prompts, indices, batch) -> np.ndarray:
    """Videos for `prompts` with noise indices `indices`, padded to one compiled batch."""
    videos, _ = gen.generate(prompts, options, indices=indices, pad_to=batch)
    return videos


# --- the reference clips: held-out inputs of the dataset, or synthetic -----------------

REFERENCES = ("auto", "holdout", "synthetic")


def dataset_manifest(config) -> dict[str, Any] | None:
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
    manifest = dataset_manifest(config)
    has = bool(manifest and holdout.split(manifest)["buckets"])
    if ref == "holdout" and not has:
        raise ValueError(
            f"evaluate.reference='holdout' but the dataset {tokenization.dataset_dir(config, '')} "
            "has no held-out clips: tokenize with data.tokenize.holdout_fraction > 0 "
            "(docs/tokenize.md), or set evaluate.reference='synthetic'"
        )
    return "holdout" if has else "synthetic"


def _holdout_items(config) -> list[tuple[str, int, int]]:
    return holdout.clip_list(dataset_manifest(config))[: int(config.evaluate.num_videos)]


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
        got = adherence.measure(video, adherence.motion_of(config))
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
    clip = clip_shape(config, options)[0]
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
        r = temporal_lib.record(video, prompts[i], clip, adherence.motion_of(config))
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
    t, h, w = clip_shape(config, options)
    seed = held_out_seed(config)
    motion = synthetic.motion_of(config)
    return np.stack([synthetic.synthetic_clip(i, seed, t, h, w, motion)["video"] for i in indices])


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
        t, h, w = clip_shape(config, options)  # every real clip resampled to the sampled shape
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
        t, h, w = clip_shape(config, options)
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
            p["holdout_rule"] = holdout.split(dataset_manifest(config))["rule"]
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
        if kind in ("prompt_adherence", "temporal_consistency", "reconstruction", "fvd"):
            if synthetic.motion_of(config) != "straight":  # absent: straight (older reports)
                p["motion"] = synthetic.motion_of(config)
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
