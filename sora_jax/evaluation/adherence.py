"""Prompt adherence measured from the pixels, with no learned weights.

A video made for a synthetic caption (sora_jax.data.synthetic) shows one coloured shape on
black moving in one direction. `measure` reads back two caption attributes:

- colour: foreground pixels are those whose brightest channel, in [0, 1] units, exceeds
  `FOREGROUND_THRESHOLD`. Their mean RGB over all frames is divided by its own largest
  channel (so a dim or anti-aliased red still reads as red: the hue, not the brightness,
  names the colour) and matched to the nearest `synthetic.COLOURS` entry in RGB.
- direction: the brightness-weighted foreground centroid `c_t = sum_p w_p p / sum_p w_p`
  (w = brightest channel) per frame, averaged over the first and last `ceil(T / 3)`
  frames; the displacement `d = c_last - c_first` in fractions of (W, H) names the
  direction by its dominant axis (image convention: y grows downwards). It is `None` when
  there is no foreground in either third, when `max(|d_x|, |d_y|)` is below
  `MIN_DISPLACEMENT`, or for an image (T = 1).

`None` never matches a caption, so an empty or static video scores zero, not chance.
NaN or infinite values read as background; `score` counts the videos that hold any.
Ground-truth clips measure back exactly (tests/evaluation/test_adherence.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sora_jax.data import synthetic

# Mid-grey: the background is black (0) and every palette colour has a channel at 1, so
# 0.5 separates them with equal headroom for noise on either side.
FOREGROUND_THRESHOLD = 0.5
# Smallest displacement counted as motion, a fraction of the frame side. Ground truth moves
# >= 0.28 * 2/3 ~ 19% between the thirds; 1.5% is ~0.5 px at 32 px, above centroid jitter.
MIN_DISPLACEMENT = 0.015
CHANCE = {"colour": 1 / len(synthetic.COLOURS), "direction": 1 / len(synthetic.DIRECTIONS)}
CHANCE["both"] = CHANCE["colour"] * CHANCE["direction"]

_PALETTE_NAMES = list(synthetic.COLOURS)
_PALETTE = np.array([synthetic.COLOURS[n] for n in _PALETTE_NAMES], np.float32)  # [6, 3]


def _unit_rgb(video) -> np.ndarray:
    """`[T, H, W, 3]` uint8 or float in [-1, 1] -> float32 in [0, 1]."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"adherence.measure expects a video [T, H, W, 3], got shape {video.shape}; "
            "pass one video at a time (an image is [1, H, W, 3])"
        )
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    rgb = (video.astype(np.float32) + 1.0) / 2.0
    # A diverged (NaN / inf) value counts as background; `score` counts and reports them.
    return np.nan_to_num(rgb, nan=0.0, posinf=0.0, neginf=0.0)


def measure(video) -> dict[str, str | None]:
    """Dominant colour and motion direction of `video` `[T, H, W, 3]` (uint8, or float in
    [-1, 1]); each is a word of the synthetic vocabulary or `None` when unreadable."""
    rgb = _unit_rgb(video)  # [T, H, W, 3] in [0, 1]
    num_frames, height, width, _ = rgb.shape
    bright = rgb.max(axis=-1)  # [T, H, W]
    fg = bright > FOREGROUND_THRESHOLD  # [T, H, W]
    if not fg.any():
        return {"colour": None, "direction": None}

    mean = rgb[fg].mean(axis=0)  # [3] over every foreground pixel of every frame
    hue = mean / mean.max()
    colour = _PALETTE_NAMES[int(np.argmin(((_PALETTE - hue) ** 2).sum(axis=-1)))]

    direction = None
    if num_frames > 1:
        w = np.where(fg, bright, 0.0)  # [T, H, W] brightness weights on the foreground
        mass = w.sum(axis=(1, 2))  # [T]
        ys = (np.arange(height) + 0.5) / height  # [H] pixel centres, fraction of H
        xs = (np.arange(width) + 0.5) / width  # [W]
        n = math.ceil(num_frames / 3)
        first, last = slice(0, n), slice(num_frames - n, num_frames)
        if mass[first].sum() > 0 and mass[last].sum() > 0:
            # Centroid of each third's pooled mass (frames weighted by their mass), so a
            # frame where the object vanished does not drag the average to (0, 0).
            def centroid(frames: slice) -> np.ndarray:
                m = w[frames].sum(axis=0)  # [H, W] mass pooled over the third's frames
                x = (m.sum(axis=0) * xs).sum()
                y = (m.sum(axis=1) * ys).sum()
                return np.array([x, y]) / m.sum()

            dx, dy = centroid(last) - centroid(first)
            if max(abs(dx), abs(dy)) >= MIN_DISPLACEMENT:
                if abs(dx) >= abs(dy):
                    direction = "right" if dx > 0 else "left"
                else:
                    direction = "down" if dy > 0 else "up"
    return {"colour": colour, "direction": direction}


def record(video, caption: str) -> dict[str, Any]:
    """One video's measurement against its synthetic caption (an entry of `per_video`)."""
    want = synthetic.parse_caption(caption)
    got = measure(video)
    video = np.asarray(video)
    nonfinite = 0 if video.dtype == np.uint8 else int((~np.isfinite(video)).sum())
    colour_ok = got["colour"] == want["colour"]
    direction_ok = got["direction"] == want["direction"]
    return {
        "caption": caption,
        "colour": got["colour"],
        "direction": got["direction"],
        "colour_match": colour_ok,
        "direction_match": direction_ok,
        "both_match": colour_ok and direction_ok,
        "nonfinite_values": nonfinite,
    }


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Match fractions, chance levels and `per_video` of `record` results."""
    if len(records) == 0:
        raise ValueError("adherence.score got no videos: an accuracy over zero is undefined")
    records = list(records)
    n = len(records)
    result: dict[str, Any] = {
        key: sum(r[f"{key}_match"] for r in records) / n for key in ("colour", "direction", "both")
    }
    result["n"] = n
    # Videos holding NaN/inf (read as background by `measure`), so a diverged sampler is
    # visible in the report rather than only as a low score.
    result["nonfinite_videos"] = sum(r["nonfinite_values"] > 0 for r in records)
    result.update({f"chance_{k}": v for k, v in CHANCE.items()})
    result["per_video"] = records
    return result


def score(videos: Sequence, captions: Sequence[str]) -> dict[str, Any]:
    """Fraction of `videos` (each `[T, H, W, 3]`) whose measured colour, direction, and both
    match their synthetic `captions`, next to the chance levels of uniform guessing, plus a
    per-video record for the JSON report."""
    if len(videos) != len(captions):
        raise ValueError(
            f"adherence.score got {len(videos)} videos for {len(captions)} captions; "
            "pass one caption per video, in the same order"
        )
    if len(captions) == 0:
        raise ValueError("adherence.score got no videos: an accuracy over zero is undefined")
    return summarize([record(v, c) for v, c in zip(videos, captions, strict=True)])
