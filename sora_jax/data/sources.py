"""Sources of raw clips for the tokenization job, chosen by `data.source.name`.

A source yields `Clip`s: pixels `[T, H, W, 3]` in [-1, 1] already fitted to a bucket,
with the caption and provenance. For the built-in synthetic set, clip `i` is rendered
directly at its bucket's shape; bucket assignment is `i mod len(buckets)` in the config's
bucket order, so every bucket gets an equal share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np

from sora_jax.data import synthetic
from sora_jax.data.buckets import Bucket


@dataclasses.dataclass
class Clip:
    index: int  # position in the source, the unit of deterministic work splitting
    bucket: str
    video: np.ndarray  # [T, H, W, 3] float32 in [-1, 1]
    caption: str
    source_id: str
    fps: float


class SyntheticSource:
    """The built-in captioned set of coloured shapes (sora_jax.data.synthetic)."""

    def __init__(self, config: ml_collections.ConfigDict, buckets: Sequence[Bucket]):
        self.num_clips = int(config.num_clips)
        self.seed = int(config.seed)
        self.buckets = list(buckets)
        if self.num_clips <= 0:
            raise ValueError(f"data.source.num_clips={self.num_clips} must be positive")

    def __len__(self) -> int:
        return self.num_clips

    def bucket_of(self, index: int) -> Bucket:
        return self.buckets[index % len(self.buckets)]

    def indices(self, bucket: str) -> list[int]:
        """Source indices assigned to one bucket, in order."""
        k = [b.name for b in self.buckets].index(bucket)
        return list(range(k, self.num_clips, len(self.buckets)))

    def clip(self, index: int) -> Clip:
        b = self.bucket_of(index)
        item = synthetic.synthetic_clip(index, self.seed, b.frames, b.height, b.width)
        return Clip(
            index=index,
            bucket=b.name,
            video=item["video"],
            caption=item["caption"],
            source_id=item["source_id"],
            fps=float(item["fps"]),
        )

    def __iter__(self) -> Iterator[Clip]:
        for i in range(self.num_clips):
            yield self.clip(i)


SOURCES = {"synthetic": SyntheticSource}


def build_source(config: ml_collections.ConfigDict, buckets: Sequence[Bucket]):
    if config.name not in SOURCES:
        raise ValueError(f"data.source.name={config.name!r} is unknown; known: {sorted(SOURCES)}")
    return SOURCES[config.name](config, buckets)
