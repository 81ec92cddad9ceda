"""TensorFlow Datasets video datasets as a tokenization source (`data.source.name='tfds'`).

    data.source = sources.source_config('tfds', dataset='bair_robot_pushing_small',
                                        data_dir='/data/tfds', caption_template='a robot arm')

The dataset must already be prepared under `data_dir` in the ArrayRecord file format
(`tfds build --file_format=array_record` or `builder.download_and_prepare(file_format=
'array_record')`): it is read with `tfds.data_source`, random access by example index, and
nothing is downloaded. Example `i` is input `i`. Its `video_key` feature (`[T, H, W, C]`
uint8, C = 1 or 3) is cut into clips and fitted to buckets like a video file (frame rate
`fps` of the config, since TFDS records none; 0 = keep every frame). Captions come from
`caption_template`, formatted with the example's scalar features (class labels by name):
`'a person doing {label}'`. Datasets whose frames are TFDS `Video` features need TensorFlow
installed to decode them; `Tensor` features do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import video_files as vf
from sora_jax.data.buckets import Bucket
from sora_jax.data.clips import Clip, check_caption


class TFDSSource:
    def __init__(self, config, buckets: Sequence[Bucket], options):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(
                "data.source.name='tfds' needs tensorflow-datasets: pip install "
                "'tensorflow-datasets>=4.9' (and tensorflow for datasets with Video features)"
            ) from e
        if not config.dataset:
            raise ValueError("data.source.dataset is empty: name a TFDS dataset, e.g. 'ucf101'")
        self.name = f"{config.dataset}/{config.split}"
        try:
            self.ds = tfds.data_source(
                config.dataset, split=config.split, data_dir=config.data_dir or None,
                download=False,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - tfds raises many types; say what to do
            raise ValueError(
                f"cannot open TFDS dataset {config.dataset!r} split {config.split!r} in "
                f"data_dir={config.data_dir!r}: {e}. Prepare it first in the array_record "
                "format (tfds build --file_format=array_record --data_dir=...)"
            ) from e
        self.features = self.ds.dataset_info.features
        self.key, self.template = config.video_key, config.caption_template
        self.fps = float(config.fps)
        if self.key not in self.features:
            raise ValueError(
                f"data.source.video_key={self.key!r} is not a feature of {self.name}; it has "
                f"{sorted(self.features.keys())}"
            )
        n = len(self.ds)
        self.length = min(n, int(config.max_examples)) if config.max_examples else n
        self.buckets, self.options = list(buckets), options

    def __len__(self) -> int:
        return self.length

    def input_id(self, index: int) -> str:
        return f"tfds:{self.name}/{index}"

    def _caption(self, example: dict) -> str:
        fields = {}
        for k, v in example.items():
            v = np.asarray(v)
            if v.ndim:
                continue
            feature = self.features[k]
            if hasattr(feature, "int2str"):
                fields[k] = feature.int2str(int(v))
            else:
                fields[k] = v.item().decode() if isinstance(v.item(), bytes) else v.item()
        try:
            return self.template.format(**fields)
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"data.source.caption_template={self.template!r} names {e}, which is not a "
                f"scalar feature of {self.name}; it has {sorted(fields)}"
            ) from e

    def clips(self, index: int, timers: dict[str, float] | None = None):
        example = self.ds[index]
        caption = check_caption(self._caption(example), self.input_id(index))
        frames = np.asarray(example[self.key])
        if frames.ndim == 3:  # [T, H, W] grey
            frames = frames[..., None]
        if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8:
            raise vf.Reject(
                "bad_size", f"{self.input_id(index)}: frames {frames.shape} {frames.dtype}"
            )
        if frames.shape[-1] == 1:
            frames = np.repeat(frames, 3, axis=-1)
        t, h, w, _ = frames.shape
        if t == 0:
            raise vf.Reject("no_frames", self.input_id(index))
        o = self.options
        if min(h, w) < o.min_side or max(h, w) > o.max_side:
            raise vf.Reject("bad_size", f"{self.input_id(index)}: {w}x{h}")
        interval = vf.frame_interval(self.fps, o.fps)
        avail = vf.available_frames(t, interval)
        key = self.input_id(index)
        bucket = buckets_lib.assign(
            avail, h, w, self.buckets, key=key, policy=o.fit, max_upscale=o.max_upscale,
            seed=o.seed,
        )  # fmt: skip
        if bucket is None:
            reason = "too_short" if all(b.frames > avail for b in self.buckets) else "too_small"
            raise vf.Reject(reason, f"{key}: {avail} frames of {w}x{h}")
        starts = vf.window_starts(avail, bucket.frames, o.clip_stride, o.max_clips_per_video)
        geometry = buckets_lib.fit_geometry(h, w, bucket, o.fit)
        need = vf.needed_frames(starts, bucket.frames, interval)
        fitted = vf.fit_frames(frames, need, geometry, (bucket.height, bucket.width), timers)
        out = []
        for s in starts:
            idx = [(s + j) * interval for j in range(bucket.frames)]
            video = np.stack([fitted[i] for i in idx]).astype(np.float32) / 127.5 - 1.0
            out.append(
                Clip(index, bucket.name, video, caption, f"{key}#{s * interval}",
                     vf.output_fps(self.fps, interval))
            )  # fmt: skip
        return out
