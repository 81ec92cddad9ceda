"""Buckets: the bounded set of clip shapes a run trains on, and how a clip is put in one.

A bucket is a named pixel shape `(frames, height, width)` with a sampling weight. Every
global step draws one bucket (one shape per step: docs/design.md, Decisions), so each bucket's step
is compiled once. The config lists buckets under `data.buckets`:

    data.buckets = {'9x32x32': dict(frames=9, height=32, width=32, weight=1.0)}

or builds the table with `grid` from named resolutions, aspect ratios and frame counts.

Assignment (`assign`, used by the tokenization job). A clip of `n` frames (at the target
frame rate) and `h x w` pixels can fill a bucket when `n >= frames` and the fit needs at
most `max_upscale` enlargement. Among the buckets it can fill, those of the nearest aspect
ratio (|log(ar_b / ar_clip)| smallest) are kept, and the largest of them (T·H·W pixels,
then name) is chosen. A bucket's optional `keep_prob` < 1 demotes a clip, with that
probability, to the next smaller candidate (a deterministic draw from the clip's id), so
big buckets can be thinned without dropping data; the smallest candidate always keeps.
A `closed` bucket (one the tokenization job found below `data.tokenize.min_bucket_clips`)
is passed over for the next open candidate, with the same aspect ratio; a clip whose
candidates are all closed goes where it would have gone without closing.

Fit (`fit_geometry`): how a `h x w` frame becomes the bucket's `H x W`.
  'crop'    resize to cover (scale max(H/h, W/w)), then centre crop (default);
  'pad'     resize to fit inside (scale min(H/h, W/w)), then centre pad with black;
  'stretch' resize to exactly H x W (the aspect ratio changes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import ml_collections

FIT_POLICIES = ("crop", "pad", "stretch")


@dataclasses.dataclass(frozen=True)
class Bucket:
    name: str
    frames: int  # pixel frames T
    height: int  # pixels H
    width: int  # pixels W
    weight: float = 1.0  # relative sampling weight of the bucket's steps
    keep_prob: float = 1.0  # chance a clip assigned here stays (else: next smaller bucket)
    closed: bool = False  # too few clips: demote its clips to an open candidate (module doc)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def volume(self) -> int:
        return self.frames * self.height * self.width


def buckets_from_config(data_config: ml_collections.ConfigDict) -> list[Bucket]:
    """Reads `data.buckets` into Bucket objects, checking every field."""
    table = data_config.buckets
    if not table:
        raise ValueError("data.buckets is empty: define at least one bucket")
    result = []
    for name, spec in table.items():
        missing = [k for k in ("frames", "height", "width") if k not in spec]
        if missing:
            raise ValueError(f"data.buckets.{name} lacks {missing}")
        bucket = Bucket(
            name=name,
            frames=int(spec["frames"]),
            height=int(spec["height"]),
            width=int(spec["width"]),
            weight=float(spec.get("weight", 1.0)),
            keep_prob=float(spec.get("keep_prob", 1.0)),
        )
        if min(bucket.shape) <= 0 or bucket.weight < 0:
            raise ValueError(f"data.buckets.{name}: sizes must be positive and weight >= 0")
        if not 0.0 < bucket.keep_prob <= 1.0:
            raise ValueError(f"data.buckets.{name}: keep_prob={bucket.keep_prob} must be in (0, 1]")
        result.append(bucket)
    return result


def bucket_by_name(data_config: ml_collections.ConfigDict, name: str) -> Bucket:
    buckets = {b.name: b for b in buckets_from_config(data_config)}
    if name not in buckets:
        raise ValueError(f"no bucket {name!r} in data.buckets; known: {sorted(buckets)}")
    return buckets[name]


def grid(
    resolutions: dict[str, int],
    aspect_ratios: dict[str, float],
    frames: Sequence[int],
    *,
    multiple: int,
    weight: float = 1.0,
) -> dict[str, dict]:
    """A `data.buckets` table: every resolution x aspect ratio x frame count.

    Args:
      resolutions: name -> side of the square of the same area, e.g. `{'256px': 256}`.
      aspect_ratios: name -> width / height, e.g. `{'1:1': 1.0, '16:9': 16 / 9, '9:16': 9 / 16}`.
      frames: pixel frame counts, each obeying the tokenizer's frame rule (1 + 4k for the
        causal VAE; `sora_jax.run.validate` checks).
      multiple: sides are rounded to multiples of this: the tokenizer's spatial stride times
        the patch size (16 for a VAE of stride 8 with patch 2).

    Names are `<frames>x<height>x<width>`; two entries that round to the same shape are one
    bucket. Returns plain dicts, ready for `ml_collections.ConfigDict`.
    """
    if multiple < 1:
        raise ValueError(f"grid(multiple={multiple}) must be >= 1")
    table: dict[str, dict] = {}
    for res_name, side in resolutions.items():
        for ar_name, ar in aspect_ratios.items():
            if side <= 0 or ar <= 0:
                raise ValueError(f"grid: resolution {res_name}={side} and aspect {ar_name}={ar}")
            h = max(multiple, round(side / math.sqrt(ar) / multiple) * multiple)
            w = max(multiple, round(side * math.sqrt(ar) / multiple) * multiple)
            for t in frames:
                table[f"{t}x{h}x{w}"] = dict(frames=int(t), height=h, width=w, weight=weight)
    return table


def fit_scale(height: int, width: int, bucket: Bucket, policy: str) -> tuple[float, float]:
    """`(scale_y, scale_x)` the fit applies to a `height x width` frame."""
    if policy == "crop":
        s = max(bucket.height / height, bucket.width / width)
        return s, s
    if policy == "pad":
        s = min(bucket.height / height, bucket.width / width)
        return s, s
    if policy == "stretch":
        return bucket.height / height, bucket.width / width
    raise ValueError(f"data.tokenize.fit={policy!r} is unknown; choose one of {FIT_POLICIES}")


@dataclasses.dataclass(frozen=True)
class FitGeometry:
    """Resize to `resize` (h, w), then take the window `crop` (top, left) of the bucket's
    size ('crop'), or place it at `pad` (top, left) inside a black frame ('pad')."""

    resize: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    pad: tuple[int, int] = (0, 0)


def fit_geometry(height: int, width: int, bucket: Bucket, policy: str) -> FitGeometry:
    """How a `height x width` frame is resized and cropped or padded to the bucket."""
    sy, sx = fit_scale(height, width, bucket, policy)
    if policy == "stretch":
        return FitGeometry(resize=(bucket.height, bucket.width))
    if policy == "crop":  # cover: round up so the resized frame is never short of the bucket
        rh = max(bucket.height, round(height * sy))
        rw = max(bucket.width, round(width * sx))
        return FitGeometry(
            resize=(rh, rw), crop=((rh - bucket.height) // 2, (rw - bucket.width) // 2)
        )
    rh = min(bucket.height, max(1, round(height * sy)))
    rw = min(bucket.width, max(1, round(width * sx)))
    return FitGeometry(resize=(rh, rw), pad=((bucket.height - rh) // 2, (bucket.width - rw) // 2))


def _uniform(key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def candidates(
    frames: int,
    height: int,
    width: int,
    buckets: Sequence[Bucket],
    *,
    policy: str = "crop",
    max_upscale: float = 1.0,
) -> list[Bucket]:
    """The buckets a clip can fill, nearest aspect ratio first, then largest first."""
    fits = []
    for b in buckets:
        if b.frames > frames:
            continue
        if max(fit_scale(height, width, b, policy)) > max_upscale + 1e-9:
            continue
        fits.append(b)
    if not fits:
        return []
    log_ar = math.log(width / height)

    def ar_distance(b: Bucket) -> float:
        return round(abs(math.log(b.width / b.height) - log_ar), 9)

    best = min(ar_distance(b) for b in fits)
    same_ar = [b for b in fits if ar_distance(b) == best]
    return sorted(same_ar, key=lambda b: (-b.volume, b.name))


def assign(
    frames: int,
    height: int,
    width: int,
    buckets: Sequence[Bucket],
    *,
    key: str,
    policy: str = "crop",
    max_upscale: float = 1.0,
    seed: int = 0,
) -> Bucket | None:
    """The bucket a clip goes to (module docstring), or None when it can fill none.

    `key` identifies the clip (its source id) for the `keep_prob` draws, so a re-run or
    another process assigns it identically."""
    ranked = candidates(frames, height, width, buckets, policy=policy, max_upscale=max_upscale)
    ranked = [b for b in ranked if not b.closed] or ranked
    for i, b in enumerate(ranked):
        last = i == len(ranked) - 1
        if last or b.keep_prob >= 1.0 or _uniform(key, f"{seed}/{b.name}") < b.keep_prob:
            return b
    return None
