"""Buckets: the bounded set of clip shapes a run trains on.

A bucket is a named pixel shape `(frames, height, width)` with a sampling weight. Every
global step draws one bucket (one shape per step, DESIGN.md §3), so each bucket's step
is compiled once. The config lists buckets under `data.buckets`:

    data.buckets = {'9x32x32': dict(frames=9, height=32, width=32, weight=1.0)}
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Bucket:
    name: str
    frames: int  # pixel frames T
    height: int  # pixels H
    width: int  # pixels W
    weight: float = 1.0  # relative sampling weight of the bucket's steps

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)


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
        )
        if min(bucket.shape) <= 0 or bucket.weight < 0:
            raise ValueError(f"data.buckets.{name}: sizes must be positive and weight >= 0")
        result.append(bucket)
    return result


def bucket_by_name(data_config: ml_collections.ConfigDict, name: str) -> Bucket:
    buckets = {b.name: b for b in buckets_from_config(data_config)}
    if name not in buckets:
        raise ValueError(f"no bucket {name!r} in data.buckets; known: {sorted(buckets)}")
    return buckets[name]
