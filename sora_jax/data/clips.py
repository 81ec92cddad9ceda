"""What a source yields: `Clip`s cut to a bucket, the options that cut them
(`ClipOptions`, the `data.tokenize` section) and the caption check every source applies.
Shared by sora_jax.data.sources and the sources in modules of their own (tfds_source).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from sora_jax.data import buckets as buckets_lib
from sora_jax.data.video_files import Reject


@dataclasses.dataclass
class Clip:
    index: int  # the input it came from, the unit of deterministic work splitting
    bucket: str
    video: np.ndarray  # [T, H, W, 3] float32 in [-1, 1]
    caption: str
    source_id: str
    fps: float
    extra: dict[str, Any] | None = None  # further manifest fields, stored as JSON


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    """`data.tokenize`: how files become clips (sora_jax.data.buckets for the rules)."""

    fps: float = 0.0  # target frame rate; 0 = keep every source frame
    fit: str = "crop"  # 'crop' | 'pad' | 'stretch'
    clip_stride: int = 0  # output frames between clip starts in one video; 0 = one clip
    max_clips_per_video: int = 0  # 0 = as many as fit
    max_upscale: float = 1.0  # largest enlargement a fit may apply
    min_side: int = 8  # frames with a side outside [min_side, max_side] are rejected
    max_side: int = 8192
    seed: int = 0  # keep_prob draws
    # data.tokenize.mode='native': each clip's own shape (sora_jax.data.native); None =
    # buckets. Not a config field: resolved by the job from the tokenizer and the model.
    native: Any = None

    def job_fields(self) -> dict[str, Any]:
        """The fields `_units/job.json` and the manifest record (`native` separately)."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.name != "native"}

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict) -> ClipOptions:
        section = data_config.get("tokenize", None) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: section[k] for k in section if k in fields and k != "native"}
        opts = cls(**known)
        if opts.fit not in buckets_lib.FIT_POLICIES:
            raise ValueError(
                f"data.tokenize.fit={opts.fit!r} is unknown; choose one of "
                f"{buckets_lib.FIT_POLICIES}"
            )
        if opts.max_upscale < 1.0 or opts.min_side < 1 or opts.max_side < opts.min_side:
            raise ValueError(
                "data.tokenize: need max_upscale >= 1 and 1 <= min_side <= max_side, got "
                f"{opts.max_upscale}, {opts.min_side}, {opts.max_side}"
            )
        return opts


def check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str):
        raise Reject("bad_caption", f"{where}: caption is {type(caption).__name__}, not text")
    if not caption.strip():
        raise Reject("bad_caption", f"{where}: caption is empty")
    return caption.strip()
