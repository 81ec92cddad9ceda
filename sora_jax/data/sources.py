"""Sources of raw clips for the tokenization job, chosen by `data.source.name`.

A source is a sequence of inputs (files, synthetic clip indices, ...). Input `i` becomes
zero or more `Clip`s, pixels `[T, H, W, 3]` in [-1, 1] already fitted to a bucket, or a
`Reject` with its reason (sora_jax.data.video_files.REASONS). Inputs are the unit of
deterministic work splitting: `clips(i)` depends on `i` and the config only.

    synthetic  the built-in captioned set (sora_jax.data.synthetic); clip i is rendered
               at bucket `i mod len(buckets)` in the config's bucket order
    videos     video files listed in a manifest (CSV or JSONL: path, caption, optional
               fps / frames / height / width, further fields kept as `extra`) or found
               in a folder with sidecar captions (`clip.mp4` + `clip.txt`)
    images     image files, the same way; each is a 1-frame clip for T = 1 buckets
    tfds       a TensorFlow Datasets video dataset by name (sora_jax.data.tfds_source)
    mixture    the concatenation of named sub-sources (`data.source.parts`), in name order

`source_config(name, **fields)` gives a complete section with every field's default.
Clip cutting (target fps, fit policy, windows) is set by `data.tokenize` (`ClipOptions`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import synthetic, tfds_source
from sora_jax.data import video_files as vf
from sora_jax.data.buckets import Bucket
from sora_jax.data.clips import Clip, ClipOptions, check_caption
from sora_jax.data.video_files import Reject


class SyntheticSource:
    """The built-in captioned set of coloured shapes (sora_jax.data.synthetic)."""

    def __init__(self, config, buckets: Sequence[Bucket], options: ClipOptions):
        del options
        self.num_clips = int(config.num_clips)
        self.seed = int(config.seed)
        self.motion = synthetic.check_motion(str(config.get("motion", "straight")))
        self.buckets = list(buckets)
        if self.num_clips <= 0:
            raise ValueError(f"data.source.num_clips={self.num_clips} must be positive")

    def __len__(self) -> int:
        return self.num_clips

    def input_id(self, index: int) -> str:
        return f"synthetic/{self.seed}/{index}"

    def clips(self, index: int, timers: dict[str, float] | None = None) -> list[Clip]:
        del timers
        b = self.buckets[index % len(self.buckets)]
        item = synthetic.synthetic_clip(index, self.seed, b.frames, b.height, b.width, self.motion)
        clip = Clip(index, b.name, item["video"], item["caption"], item["source_id"], item["fps"])
        return [clip]


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: pathlib.Path
    caption: Any = None
    fps: float = 0.0  # override of the container's rate; 0 = read it
    extra: dict[str, Any] | None = None
    error: str = ""  # why the manifest line is unusable


_MANIFEST_FIELDS = ("path", "caption", "fps", "frames", "height", "width")


def _entry(row: dict, base: pathlib.Path, where: str) -> _Entry:
    path = row.get("path")
    if not isinstance(path, str) or not path:
        return _Entry(base, error=f"{where}: no 'path'")
    fps = row.get("fps") or 0.0
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        return _Entry(base / path, error=f"{where}: fps={fps!r} is not a number")
    extra = {k: v for k, v in row.items() if k not in _MANIFEST_FIELDS and v not in ("", None)}
    return _Entry(base / path, row.get("caption"), fps, extra or None)


def read_manifest_file(path: str | pathlib.Path) -> list[_Entry]:
    """Entries of a CSV (header row with `path`, `caption`, ...) or JSONL manifest; paths
    are relative to the manifest's folder. Unparseable lines become entries that reject."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.source.manifest={str(path)!r} does not exist")
    base = path.parent
    entries = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(
                    f"{path}: the CSV header {reader.fieldnames} has no 'path' column; "
                    "the first row must name the columns, e.g. path,caption"
                )
            for n, row in enumerate(reader, start=2):
                entries.append(_entry(row, base, f"{path}:{n}"))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                entries.append(_Entry(base, error=f"{path}:{n}: not JSON ({e})"))
                continue
            if not isinstance(row, dict):
                entries.append(_Entry(base, error=f"{path}:{n}: not a JSON object"))
                continue
            entries.append(_entry(row, base, f"{path}:{n}"))
    else:
        raise ValueError(f"data.source.manifest={str(path)!r}: use a .csv or .jsonl file")
    return entries


def _folder_entries(folder: str, suffixes, caption_suffix: str, default: str) -> list[_Entry]:
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data.source.folder={folder!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    entries = []
    for p in files:
        side = p.with_suffix(caption_suffix)
        caption = side.read_text(errors="replace").strip() if side.is_file() else default or None
        entries.append(_Entry(p, caption))
    return entries


class FileSource:
    """Video (or image) files from `data.source.manifest` or `data.source.folder`."""

    def __init__(self, config, buckets: Sequence[Bucket], options: ClipOptions, kind: str):
        self.buckets, self.options, self.kind = list(buckets), options, kind
        if bool(config.get("manifest")) == bool(config.get("folder")):
            raise ValueError(
                f"data.source (name={config.name!r}) needs exactly one of `manifest` (a CSV or "
                "JSONL file of path,caption) and `folder` (files with sidecar captions)"
            )
        if config.get("manifest"):
            self.entries = read_manifest_file(config.manifest)
        else:
            suffixes = vf.IMAGE_SUFFIXES if kind == "images" else vf.VIDEO_SUFFIXES
            self.entries = _folder_entries(
                config.folder,
                suffixes,
                config.get("caption_suffix", ".txt"),
                config.get("default_caption", ""),
            )
        if not self.entries:
            where = config.get("manifest") or config.get("folder")
            raise ValueError(f"data.source: no {kind} found in {where!r}")

    def __len__(self) -> int:
        return len(self.entries)

    def input_id(self, index: int) -> str:
        return str(self.entries[index].path)

    def clips(self, index: int, timers: dict[str, float] | None = None) -> list[Clip]:
        e = self.entries[index]
        if e.error:
            raise Reject("bad_entry", e.error)
        caption = check_caption(e.caption, str(e.path))
        info = vf.probe(e.path)
        o = self.options
        sides = (info.height, info.width)
        if min(sides) < o.min_side or max(sides) > o.max_side:
            raise Reject("bad_size", f"{e.path}: {info.width}x{info.height}")
        fps = e.fps or info.fps
        interval = vf.frame_interval(fps, o.fps)
        # Headers without a length (some streamed containers): count the frames once.
        known = info.frames if info.frames > 0 else vf.count_frames(e.path, timers)
        for _ in range(2):  # a second pass when the header overstated the length
            avail = vf.available_frames(known, interval)
            if o.native is not None:  # the clip's own shape (sora_jax.data.native)
                bucket = o.native.bucket(avail, info.height, info.width)
                if isinstance(bucket, str):
                    raise Reject(bucket, f"{e.path}: {avail} frames of {info.width}x{info.height}")
            else:
                bucket = buckets_lib.assign(
                    avail, info.height, info.width, self.buckets, key=str(e.path),
                    policy=o.fit, max_upscale=o.max_upscale, seed=o.seed,
                )  # fmt: skip
            if bucket is None:
                reason = "too_short" if all(b.frames > avail for b in self.buckets) else "too_small"
                raise Reject(reason, f"{e.path}: {avail} frames of {info.width}x{info.height}")
            starts = vf.window_starts(avail, bucket.frames, o.clip_stride, o.max_clips_per_video)
            fit = "crop" if o.native is not None else o.fit  # native: the rounding only
            geometry = buckets_lib.fit_geometry(info.height, info.width, bucket, fit)
            need = vf.needed_frames(starts, bucket.frames, interval)
            frames, count = vf.decode(e.path, need, geometry, (bucket.height, bucket.width), timers)
            if count == 0:
                raise Reject("no_frames", str(e.path))
            clips = []
            for s in starts:
                idx = [(s + j) * interval for j in range(bucket.frames)]
                if all(i in frames for i in idx):
                    video = np.stack([frames[i] for i in idx]).astype(np.float32) / 127.5 - 1.0
                    clips.append(
                        Clip(
                            index=index,
                            bucket=bucket.name,
                            video=video,
                            caption=caption,
                            source_id=f"{e.path}#{s * interval}",
                            fps=0.0 if self.kind == "images" else vf.output_fps(fps, interval),
                            extra=e.extra,
                        )
                    )
            if clips:
                return clips
            if count >= known:
                break
            known = count  # the decode found the real length: cut the clips again
        raise Reject("truncated", f"{e.path}: header says {info.frames} frames, decoded {count}")


class MixtureSource:
    """The inputs of `data.source.parts` (name -> source section), concatenated in sorted
    name order; input ids are prefixed with the part's name."""

    def __init__(self, config, buckets: Sequence[Bucket], options: ClipOptions):
        if not config.get("parts"):
            raise ValueError("data.source.name='mixture' needs data.source.parts: name -> source")
        self.parts = [
            (n, build_source(config.parts[n], buckets, options)) for n in sorted(config.parts)
        ]
        self.offsets = np.cumsum([0] + [len(s) for _, s in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int):
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        name, source = self.parts[k]
        return name, source, index - int(self.offsets[k])

    def input_id(self, index: int) -> str:
        name, source, local = self._locate(index)
        return f"{name}:{source.input_id(local)}"

    def clips(self, index: int, timers: dict[str, float] | None = None) -> list[Clip]:
        name, source, local = self._locate(index)
        out = source.clips(local, timers)
        for c in out:
            c.index, c.source_id = index, f"{name}:{c.source_id}"
        return out


def _tfds(config, buckets, options):
    return tfds_source.TFDSSource(config, buckets, options)


SOURCES = {
    "synthetic": SyntheticSource,
    "videos": lambda c, b, o: FileSource(c, b, o, "videos"),
    "images": lambda c, b, o: FileSource(c, b, o, "images"),
    "tfds": _tfds,
    "mixture": MixtureSource,
}

# Every field of each source's config section, with its default (`source_config`).
SOURCE_FIELDS: dict[str, dict[str, Any]] = {
    "synthetic": dict(num_clips=256, seed=0, motion="straight"),
    "videos": dict(manifest="", folder="", caption_suffix=".txt", default_caption=""),
    "images": dict(manifest="", folder="", caption_suffix=".txt", default_caption=""),
    "tfds": dict(
        dataset="",
        split="train",
        data_dir="",
        caption_template="",
        video_key="video",
        fps=0.0,
        max_examples=0,
    ),  # fmt: skip
    "mixture": dict(parts={}),
}


def source_config(name: str, **fields: Any) -> ml_collections.ConfigDict:
    """A complete `data.source` section: `source_config('videos', folder='/data/clips')`."""
    if name not in SOURCE_FIELDS:
        raise ValueError(f"data.source.name={name!r} is unknown; known: {sorted(SOURCES)}")
    unknown = set(fields) - set(SOURCE_FIELDS[name])
    if unknown:
        raise ValueError(
            f"source {name!r} has no fields {sorted(unknown)}; it has {sorted(SOURCE_FIELDS[name])}"
        )
    return ml_collections.ConfigDict({"name": name, **SOURCE_FIELDS[name], **fields})


def build_source(config, buckets: Sequence[Bucket], options: ClipOptions | None = None):
    """The source of a `data.source` section."""
    if config.name not in SOURCES:
        raise ValueError(f"data.source.name={config.name!r} is unknown; known: {sorted(SOURCES)}")
    return SOURCES[config.name](config, buckets, options or ClipOptions())
