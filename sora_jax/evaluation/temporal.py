r"""Temporal consistency of long videos, from the pixels, with no learned weights.

`measure(video, segment)` works on any video `[T, H, W, 3]` (uint8 or [-1, 1] floats),
cut into consecutive segments of `segment` frames (the last partial one dropped):

- `colour_drift`: the L2 distance in RGB ([0, 1] units) between the mean colour of the
  first segment's foreground and of each later segment's; reported for the last segment
  and as the maximum. Foreground pixels are those whose brightest channel exceeds
  `adherence.FOREGROUND_THRESHOLD` (a segment without any counts as black), so a small
  object that changes hue or fades away moves it as much as a whole scene would; a
  steady video keeps it near 0.
- `histogram_drift`: the total-variation distance (in [0, 1]) between the first segment's
  joint colour histogram (`BINS`³ bins of RGB) and each later segment's; last and max.
  It catches changes of the colour distribution that leave the mean in place.
- `flicker`: the mean absolute change between consecutive frames, per segment
  (`mean_t mean_p |x_{t+1} - x_t|`, [0, 1] units), first and last segment and their
  ratio `flicker_ratio = last / first` (1 = as steady at the end as at the start;
  an exploding or freezing video moves it away from 1; NaN when the first is 0).

`segment_adherence(video, caption, segment)` adds, for the synthetic captions of
sora_jax.data.synthetic, the prompt adherence (sora_jax.evaluation.adherence: colour,
direction, ...) of every segment on its own: does the long video still show what the
prompt asks at its end? With `motion='wrap'` (videos of a run trained on wrapping clips,
`data.source.motion`) direction, speed and shape are read on the torus (adherence's
circular measure), so an object that leaves one side and re-enters from the other still
reads as moving on. `summarize` averages both over videos, with per-segment match
fractions `segments[k]['colour']`, `['direction']`, ... and their largest drop below the
first segment's (`max_drop_colour`, `max_drop_direction`).

The evaluator `temporal_consistency` (sora_jax/evaluation/evaluators.py) samples
`evaluate.num_videos` synthetic prompts as videos of `evaluate.long_frames` frames
(sora_jax/evaluation/long_video.py: the rollout of a causal run, sliding-window
continuation otherwise) and reports both with segments of the bucket's frames, measuring
adherence with the run's own motion (`adherence.motion_of(config)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sora_jax.evaluation import adherence

BINS = 4  # per RGB channel: 64 joint bins, coarse enough for tens of pixels per bin
# Per-segment attributes compared with the first segment's.
SEGMENT_ATTRIBUTES = ("colour", "direction", "both")


def _unit(video) -> np.ndarray:
    """`[T, H, W, 3]` uint8 or float in [-1, 1] -> float32 in [0, 1]; NaN/inf -> 0."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"temporal.measure expects a video [T, H, W, 3], got {video.shape}")
    if video.dtype == np.uint8:
        x = video.astype(np.float32) / 255.0
    else:
        x = (np.clip(video.astype(np.float32), -1.0, 1.0) + 1.0) / 2.0
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def segments(video, segment: int) -> list[np.ndarray]:
    """Consecutive `segment`-frame pieces of `video` (a partial last piece is dropped)."""
    if segment < 1:
        raise ValueError(f"segment={segment} frames must be >= 1")
    n = np.asarray(video).shape[0] // segment
    if n < 1:
        raise ValueError(
            f"a video of {np.asarray(video).shape[0]} frames has no {segment}-frame segment"
        )
    return [np.asarray(video)[i * segment : (i + 1) * segment] for i in range(n)]


def _histogram(x: np.ndarray) -> np.ndarray:
    """Normalized joint RGB histogram `[BINS³]` of `[..., 3]` values in [0, 1]."""
    idx = np.minimum((x * BINS).astype(np.int64), BINS - 1)  # [..., 3]
    flat = (idx[..., 0] * BINS + idx[..., 1]) * BINS + idx[..., 2]
    h = np.bincount(flat.ravel(), minlength=BINS**3).astype(np.float64)
    return h / max(h.sum(), 1.0)


def _foreground_mean(x: np.ndarray) -> np.ndarray:
    """Mean RGB `[3]` of the pixels of `x [..., 3]` whose brightest channel is above the
    foreground threshold (zeros when there are none)."""
    px = x.reshape(-1, 3)
    fg = px[px.max(-1) > adherence.FOREGROUND_THRESHOLD]
    return fg.mean(0) if len(fg) else np.zeros(3, np.float32)


def measure(video, segment: int) -> dict[str, Any]:
    """Drift and flicker of one video (module docstring); `segment` frames per segment."""
    x = _unit(video)
    parts = segments(x, segment)
    means = np.stack([_foreground_mean(p) for p in parts])  # [K, 3]
    colour = np.linalg.norm(means - means[0], axis=-1)  # [K]
    hists = np.stack([_histogram(p) for p in parts])  # [K, BINS³]
    tv = 0.5 * np.abs(hists - hists[0]).sum(-1)  # [K]

    def flick(p):
        return float(np.abs(np.diff(p, axis=0)).mean()) if p.shape[0] > 1 else 0.0

    first, last = flick(parts[0]), flick(parts[-1])
    return {
        "segments": len(parts),
        "colour_drift": float(colour[-1]),
        "colour_drift_max": float(colour.max()),
        "histogram_drift": float(tv[-1]),
        "histogram_drift_max": float(tv.max()),
        "flicker_first": first,
        "flicker_last": last,
        "flicker_ratio": last / first if first > 0 else float("nan"),
    }


def segment_adherence(
    video, caption: str, segment: int, motion: str = "straight"
) -> list[dict[str, Any]]:
    """`adherence.record` (with the `motion` measure) of each segment against the
    synthetic `caption`."""
    return [adherence.record(p, caption, motion) for p in segments(video, segment)]


def record(video, caption: str | None, segment: int, motion: str = "straight") -> dict[str, Any]:
    """One video's `measure` and, with a synthetic caption, its per-segment adherence
    (direction, speed and shape read with the `motion` measure)."""
    out = {"caption": caption, **measure(video, segment)}
    if caption is not None:
        per = segment_adherence(video, caption, segment, motion)
        out["segment_matches"] = [
            {k: bool(r[f"{k}_match"]) for k in (*adherence.ATTRIBUTES, "both")} for r in per
        ]
    return out


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over videos of `record` results, per-segment match fractions and the largest
    drop of colour / direction / both below the first segment's."""
    records = list(records)
    if not records:
        raise ValueError("temporal.summarize got no videos")
    keys = [k for k, v in records[0].items() if isinstance(v, float | int) and k != "segments"]
    result: dict[str, Any] = {"n": len(records), "segments": int(records[0]["segments"])}
    for key in keys:
        values = np.array([r[key] for r in records], np.float64)
        result[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    if "segment_matches" in records[0]:
        k = min(len(r["segment_matches"]) for r in records)
        attrs = (*adherence.ATTRIBUTES, "both")
        per = [
            {a: float(np.mean([r["segment_matches"][i][a] for r in records])) for a in attrs}
            for i in range(k)
        ]
        result["per_segment"] = per
        for a in SEGMENT_ATTRIBUTES:
            result[f"max_drop_{a}"] = max(per[0][a] - p[a] for p in per)
    result["per_video"] = records
    return result
