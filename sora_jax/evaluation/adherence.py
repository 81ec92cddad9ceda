"""Prompt adherence measured from the pixels, with no learned weights.

A video made for a synthetic caption (sora_jax.data.synthetic) shows one coloured shape on
black moving in one direction at one speed: "a red square moving left slowly". `measure`
reads back all four caption attributes:

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
- shape: per frame, the soft mask `m` (brightest channel where above
  `SHAPE_THRESHOLD`, else 0), its area `A = sum m`, its soft extents
  `w = sum_x max_y m` and `h = sum_y max_x m` (exact for anti-aliased edges), its `fill =
  A / (w h)` and its vertical `skew = (y_mass - y_box) / h` (the mass centroid's offset
  from the extent's centre). Medians over the frames with foreground: a triangle (apex up:
  its mass sits h / 6 below the centre) has `|skew| >= TRIANGLE_SKEW`; otherwise a square
  fills its box (`fill >= SQUARE_FILL`; ideal 1) and a circle does not (ideal pi / 4).
- speed: the distance travelled from the first frame to the last, as a fraction of the
  frame along the dominant axis of motion (the caption's unit, `synthetic.SPEEDS`): the
  slope of a least-squares line through the per-frame centroids (frames with
  foreground), times the clip's length. The nearest `SPEEDS` value names it; `None` as
  for direction (static, empty, an image, fewer than two frames with foreground).

Wrapping videos (`motion='wrap'`, the toroidal clips of `synthetic.MOTIONS`): an object
leaving one side re-enters from the other, so the linear centroid jumps across the frame
and a straddling object's centroid sits mid-frame. There direction and speed read the
circular centroid per frame, `x_t = arg(sum_p w_p exp(2 pi i x_p)) / (2 pi)` in [0, 1)
(likewise y; positions in fractions of the frame), unwrap the track by wrapping each
step between frames with foreground to (-1/2, 1/2] of the frame and summing, and then
decide exactly as above on the unwrapped track: direction from the mass-weighted mean
position of the first and last thirds, speed from the least-squares slope. The frame
step of any caption (at most 1/8 of the frame from 5 frames up) is far below 1/2, so the
unwrapping is unambiguous. On an object that does not straddle an edge the circular and
linear centroids differ only by the object's asymmetry, and the words read back are the
same as the straight measure's (tests/evaluation/test_adherence.py). Colour does not
depend on position; shape is read on each frame rolled (by whole pixels) so that its
circular centroid sits at the frame's centre, which puts a straddling object back in one
piece (on a background brighter than `SHAPE_THRESHOLD` the words may differ from the
straight measure's: the roll moves that background too). `motion_of(config)` (the
run's `data.source.motion`) picks the measure for the evaluators.

`None` never matches a caption, so an empty or static video scores zero, not chance.
NaN or infinite values read as background; `score` counts the videos that hold any.
Ground-truth clips measure back exactly at every size the demo uses, and clips of another
shape or speed do not (tests/evaluation/test_adherence.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sora_jax.data import synthetic

# Measures of direction and speed: 'straight' (linear centroids) or 'wrap' (circular).
MOTIONS = synthetic.MOTIONS
motion_of = synthetic.motion_of
# Mid-grey: the background is black (0) and every palette colour has a channel at 1, so
# 0.5 separates them with equal headroom for noise on either side.
FOREGROUND_THRESHOLD = 0.5
# Smallest displacement counted as motion, a fraction of the frame side. Ground truth moves
# >= 0.28 * 2/3 ~ 19% between the thirds; 1.5% is ~0.5 px at 32 px, above centroid jitter.
MIN_DISPLACEMENT = 0.015
# Shape: the soft mask keeps anti-aliased edges (coverage >= 1/4) and drops faint noise.
SHAPE_THRESHOLD = 0.25
# Ground truth (16..64 px frames): |skew| of triangles 0.065..0.155 (ideal 1/6), of squares
# and circles <= 0.035; fill of squares >= 0.966, of circles 0.755..0.862 (ideal 0.785).
TRIANGLE_SKEW = 0.05
SQUARE_FILL = 0.9
CHANCE = {
    "colour": 1 / len(synthetic.COLOURS),
    "direction": 1 / len(synthetic.DIRECTIONS),
    "shape": 1 / len(synthetic.SHAPES),
    "speed": 1 / len(synthetic.SPEEDS),
}
CHANCE["both"] = CHANCE["colour"] * CHANCE["direction"]
CHANCE["all"] = CHANCE["both"] * CHANCE["shape"] * CHANCE["speed"]
# The attributes `measure` reads, and the raw numbers behind shape and speed.
ATTRIBUTES = ("colour", "direction", "shape", "speed")

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


def measure(video, motion: str = "straight") -> dict[str, str | float | None]:
    """Colour, motion direction, shape and speed of `video` `[T, H, W, 3]` (uint8, or float
    in [-1, 1]); each is a word of the synthetic vocabulary or `None` when unreadable, with
    the numbers behind shape and speed (`fill`, `skew`, `travel`; `None` when unread).
    `motion='wrap'` reads direction and speed on the torus (module docstring)."""
    synthetic.check_motion(motion, "adherence.measure(motion)")
    rgb = _unit_rgb(video)  # [T, H, W, 3] in [0, 1]
    bright = rgb.max(axis=-1)  # [T, H, W]
    fg = bright > FOREGROUND_THRESHOLD  # [T, H, W]
    out: dict[str, str | float | None] = dict.fromkeys((*ATTRIBUTES, "fill", "skew", "travel"))
    if not fg.any():
        return out
    mean = rgb[fg].mean(axis=0)  # [3] over every foreground pixel of every frame
    hue = mean / mean.max()
    out["colour"] = _PALETTE_NAMES[int(np.argmin(((_PALETTE - hue) ** 2).sum(axis=-1)))]
    w = np.where(fg, bright, 0.0)  # [T, H, W] brightness weights on the foreground
    wrap = motion == "wrap"
    out["direction"] = _direction_wrap(w) if wrap else _direction(w)
    mask = np.where(bright >= SHAPE_THRESHOLD, bright, 0.0)  # [T, H, W]
    out.update(_shape(recentre_on_torus(mask) if wrap else mask))
    out.update(_speed_wrap(w) if wrap else _speed(w))
    return out


def _centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as fractions of (H, W): `[H]`, `[W]`."""
    return (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width


def _direction_word(dx: float, dy: float) -> str | None:
    """The direction word of a displacement (dx, dy) in fractions of (W, H)."""
    if max(abs(dx), abs(dy)) < MIN_DISPLACEMENT:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _direction(w: np.ndarray) -> str | None:
    """The direction word of the foreground weights `w` `[T, H, W]` (module docstring)."""
    num_frames, height, width = w.shape
    if num_frames < 2:
        return None
    mass = w.sum(axis=(1, 2))  # [T]
    ys, xs = _centres(height, width)
    n = math.ceil(num_frames / 3)
    first, last = slice(0, n), slice(num_frames - n, num_frames)
    if mass[first].sum() <= 0 or mass[last].sum() <= 0:
        return None

    # Centroid of each third's pooled mass (frames weighted by their mass), so a frame
    # where the object vanished does not drag the average to (0, 0).
    def centroid(frames: slice) -> np.ndarray:
        m = w[frames].sum(axis=0)  # [H, W] mass pooled over the third's frames
        x = (m.sum(axis=0) * xs).sum()
        y = (m.sum(axis=1) * ys).sum()
        return np.array([x, y]) / m.sum()

    dx, dy = centroid(last) - centroid(first)
    return _direction_word(dx, dy)


def wrap_half(d: np.ndarray) -> np.ndarray:
    """Displacements in fractions of the frame wrapped to (-1/2, 1/2]."""
    return d - np.ceil(d - 0.5)


def circular_track(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unwrapped track of the circular centroid of `w` `[T, H, W]` (module docstring):
    `seen` `[T]` (frames with foreground) and positions `[T', 2]` as (x, y) fractions of
    (W, H) over the seen frames, starting in [0, 1) and continuous across the edges."""
    num_frames, height, width = w.shape
    mass = w.sum(axis=(1, 2))  # [T]
    seen = mass > 0
    ys, xs = _centres(height, width)

    def angle(profile: np.ndarray, pos: np.ndarray) -> np.ndarray:
        z = (profile * np.exp(2j * np.pi * pos)).sum(axis=-1)  # [T'] resultant
        return np.mod(np.angle(z) / (2 * np.pi), 1.0)  # [T'] in [0, 1)

    x = angle(w.sum(axis=1)[seen], xs)  # [T'] column profiles
    y = angle(w.sum(axis=2)[seen], ys)  # [T'] row profiles
    pos = np.stack([x, y], axis=-1)  # [T', 2]
    if len(pos) > 1:
        steps = wrap_half(np.diff(pos, axis=0))  # [T'-1, 2]
        pos = np.concatenate([pos[:1], pos[:1] + np.cumsum(steps, axis=0)])
    return seen, pos


def recentre_on_torus(m: np.ndarray) -> np.ndarray:
    """`m` `[T, H, W]` with each frame rolled (whole pixels) so that its circular centroid
    sits at the frame's centre: an object straddling an edge becomes one piece again."""
    seen, pos = circular_track(m)
    num_frames, height, width = m.shape
    out = m.copy()
    for t, (x, y) in zip(np.flatnonzero(seen), np.mod(pos, 1.0), strict=True):
        shift = (round(height / 2 - y * height), round(width / 2 - x * width))
        out[t] = np.roll(m[t], shift, axis=(0, 1))
    return out


def _direction_wrap(w: np.ndarray) -> str | None:
    """`_direction` on the torus: thirds' mass-weighted mean of the unwrapped circular track."""
    num_frames = w.shape[0]
    if num_frames < 2:
        return None
    mass = w.sum(axis=(1, 2))  # [T]
    n = math.ceil(num_frames / 3)
    if mass[:n].sum() <= 0 or mass[num_frames - n :].sum() <= 0:
        return None
    seen, pos = circular_track(w)
    frame = np.arange(num_frames)[seen]  # [T'] frame of each tracked position
    m = mass[seen]  # [T']

    def mean(keep: np.ndarray) -> np.ndarray:
        return (m[keep, None] * pos[keep]).sum(axis=0) / m[keep].sum()

    dx, dy = mean(frame >= num_frames - n) - mean(frame < n)
    return _direction_word(dx, dy)


def _shape(m: np.ndarray) -> dict[str, str | float | None]:
    """Shape word, fill and skew of the soft mask `m` `[T, H, W]` (module docstring)."""
    area = m.sum(axis=(1, 2))  # [T]
    keep = area > 0
    if not keep.any():
        return {"shape": None, "fill": None, "skew": None}
    m, area = m[keep], area[keep]  # [T', H, W], [T']
    ys = np.arange(m.shape[1]) + 0.5  # [H] pixel centres
    rows = m.max(axis=2)  # [T', H]: how much of each row the object spans, at most 1
    box_w = m.max(axis=1).sum(axis=1)  # [T'] soft extent along x
    box_h = rows.sum(axis=1)  # [T'] soft extent along y
    fill = float(np.median(area / (box_w * box_h)))
    y_box = (rows * ys).sum(axis=1) / box_h  # [T'] centre of the extent
    y_mass = (m.sum(axis=2) * ys).sum(axis=1) / area  # [T'] centroid of the mass
    skew = float(np.median((y_mass - y_box) / box_h))
    if abs(skew) >= TRIANGLE_SKEW:
        shape = "triangle"
    else:
        shape = "square" if fill >= SQUARE_FILL else "circle"
    return {"shape": shape, "fill": fill, "skew": skew}


def _speed(w: np.ndarray) -> dict[str, str | float | None]:
    """Speed word and travel of the foreground weights `w` `[T, H, W]` (module docstring)."""
    num_frames, height, width = w.shape
    mass = w.sum(axis=(1, 2))  # [T]
    seen = mass > 0
    if num_frames < 2 or seen.sum() < 2:
        return {"speed": None, "travel": None}
    ys, xs = _centres(height, width)
    cx = (w.sum(axis=1) * xs).sum(axis=1)[seen] / mass[seen]  # [T'] centroid x per frame
    cy = (w.sum(axis=2) * ys).sum(axis=1)[seen] / mass[seen]  # [T']
    t = np.arange(num_frames)[seen] / (num_frames - 1)  # [T'] in [0, 1]: first .. last frame
    # Least-squares slopes per unit clip length = travel from the first frame to the last.
    travel = max(abs(np.polyfit(t, cx, 1)[0]), abs(np.polyfit(t, cy, 1)[0]))
    return _speed_word(travel)


def _speed_wrap(w: np.ndarray) -> dict[str, str | float | None]:
    """`_speed` on the torus: the slope of the unwrapped circular track."""
    num_frames = w.shape[0]
    seen, pos = circular_track(w)
    if num_frames < 2 or seen.sum() < 2:
        return {"speed": None, "travel": None}
    t = np.arange(num_frames)[seen] / (num_frames - 1)  # [T'] in [0, 1]
    travel = max(abs(np.polyfit(t, pos[:, 0], 1)[0]), abs(np.polyfit(t, pos[:, 1], 1)[0]))
    return _speed_word(travel)


def _speed_word(travel: float) -> dict[str, str | float | None]:
    if travel < MIN_DISPLACEMENT:
        return {"speed": None, "travel": float(travel)}
    speed = min(synthetic.SPEEDS, key=lambda k: abs(synthetic.SPEEDS[k] - travel))
    return {"speed": speed, "travel": float(travel)}


def nonfinite_values(video) -> int:
    video = np.asarray(video)
    return 0 if video.dtype == np.uint8 else int((~np.isfinite(video)).sum())


def compare(got: dict[str, Any], caption: str, nonfinite: int = 0) -> dict[str, Any]:
    """A `measure` result against its synthetic caption (an entry of `per_video`):
    `<attribute>_match` per attribute, `both_match` (colour and direction) and `all_match`
    (all four)."""
    want = synthetic.parse_caption(caption)
    out: dict[str, Any] = {"caption": caption}
    for key in ATTRIBUTES:
        out[key] = got.get(key)
        out[f"{key}_match"] = got.get(key) == want[key]
    for key in ("fill", "skew", "travel"):
        out[key] = got.get(key)
    out["both_match"] = out["colour_match"] and out["direction_match"]
    out["all_match"] = all(out[f"{k}_match"] for k in ATTRIBUTES)
    out["nonfinite_values"] = int(nonfinite)
    return out


def record(video, caption: str, motion: str = "straight") -> dict[str, Any]:
    """One video's measurement (with the `motion` measure) against its synthetic caption
    (an entry of `per_video`)."""
    return compare(measure(video, motion), caption, nonfinite_values(video))


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Match fractions, chance levels and `per_video` of `record` results."""
    if len(records) == 0:
        raise ValueError("adherence.score got no videos: an accuracy over zero is undefined")
    records = list(records)
    n = len(records)
    result: dict[str, Any] = {
        key: sum(r[f"{key}_match"] for r in records) / n for key in (*ATTRIBUTES, "both", "all")
    }
    result["n"] = n
    # Videos holding NaN/inf (read as background by `measure`), so a diverged sampler is
    # visible in the report rather than only as a low score.
    result["nonfinite_videos"] = sum(r["nonfinite_values"] > 0 for r in records)
    result.update({f"chance_{k}": v for k, v in CHANCE.items()})
    result["per_video"] = records
    return result


def score(videos: Sequence, captions: Sequence[str], motion: str = "straight") -> dict[str, Any]:
    """Fraction of `videos` (each `[T, H, W, 3]`) whose measured colour, direction, shape,
    speed, colour and direction (`both`) and all four (`all`) match their synthetic
    `captions`, next to the chance levels of uniform guessing, plus a per-video record for
    the JSON report. `motion`: the measure of direction and speed ('wrap' for videos of
    wrapping data, `motion_of(config)`)."""
    if len(videos) != len(captions):
        raise ValueError(
            f"adherence.score got {len(videos)} videos for {len(captions)} captions; "
            "pass one caption per video, in the same order"
        )
    if len(captions) == 0:
        raise ValueError("adherence.score got no videos: an accuracy over zero is undefined")
    return summarize([record(v, c, motion) for v, c in zip(videos, captions, strict=True)])
