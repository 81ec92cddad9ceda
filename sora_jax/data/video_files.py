"""Reading clips out of video and image files with PyAV: probe, then decode only what a
clip needs, resized and cropped (or padded) to its bucket.

`probe` opens the container and reads the stream header (frame count: the stream's, else
duration x rate; frame rate; size) and decodes the first frame for its display matrix: a
video coded landscape with a quarter-turn rotation (a phone's portrait video) is reported,
bucketed and decoded portrait, the right way up (sora_jax.video_io.display_transform).
`decode` decodes frames in order and stops after the last one a clip needs; frames that
no clip uses are decoded (codecs need them) but never converted or resized. Each kept
frame is converted to RGB and resized by FFmpeg's swscale in one call (`area`
interpolation, a box filter when shrinking) to the coded orientation of the target size,
turned by the display matrix, then cropped or padded in numpy (sora_jax.data.buckets.fit_geometry).

Every failure is a `Reject` with a reason from `REASONS`, never an exception that stops
the job (sora_jax.data.tokenization writes it to rejects.jsonl).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from sora_jax import video_io
from sora_jax.data.buckets import FitGeometry

# Reasons an input is rejected; the keys of the summary's "rejects by reason".
REASONS = {
    "missing_file": "the path does not exist",
    "unreadable": "FFmpeg cannot open the file (corrupt, empty or not a media file)",
    "no_video_stream": "the container has no video stream",
    "no_frames": "the video stream has no decodable frame",
    "bad_size": "frame size outside [data.tokenize.min_side, data.tokenize.max_side]",
    "bad_caption": "the caption is missing, empty or not text",
    "too_short": "fewer frames (at the target fps) than the smallest bucket",
    "too_small": "too few pixels for every bucket (see data.tokenize.max_upscale)",
    "truncated": "the file ended before the frames its header announced",
    "decode_error": "FFmpeg failed while decoding",
    "bad_entry": "a manifest line that cannot be parsed or names no path",
}


class Reject(Exception):
    """An input that cannot be used; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail or REASONS[reason]}")
        self.reason, self.detail = reason, detail or REASONS[reason]


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    frames: int  # frame count (from the header: an estimate the decode may contradict)
    fps: float  # frames per second; 0 for still images
    height: int  # as displayed: after the display matrix's rotation
    width: int
    transform: str = ""  # the display matrix's transform (sora_jax.video_io.TRANSFORMS)


def _open(path: pathlib.Path):
    if not path.is_file():
        raise Reject("missing_file", f"{path} does not exist")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise Reject("unreadable", f"{path}: {e}") from e


def probe(path: str | os.PathLike) -> VideoInfo:
    """The first video stream's frame count, rate and displayed size (headers, and the
    first frame's display matrix)."""
    path = pathlib.Path(path)
    with _open(path) as container:
        if not container.streams.video:
            kinds = [s.type for s in container.streams]
            raise Reject("no_video_stream", f"{path} has streams {kinds}")
        stream = container.streams.video[0]
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        transform = _first_transform(container, stream)
        if video_io.swaps_sides(transform):
            height, width = width, height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        frames = int(stream.frames or 0)
        if frames <= 0:
            seconds = 0.0
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / av.time_base
            frames = int(round(seconds * fps)) if fps > 0 else 0
        if frames <= 0 and path.suffix.lower() in IMAGE_SUFFIXES:
            frames = 1
    return VideoInfo(frames=frames, fps=fps, height=height, width=width, transform=transform)


def _first_transform(container, stream) -> str:
    """The display transform of the stream's first frame; '' when it has none or does not
    decode (decode() then rejects the file with the decoder's message)."""
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                return video_io.display_transform(frame)
    except (av.FFmpegError, ValueError):
        return ""
    return ""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")


def _place(rgb: np.ndarray, geometry: FitGeometry, size: tuple[int, int]) -> np.ndarray:
    """The resized frame cropped ('crop'), or centred on black ('pad'), to `size` (H, W)."""
    h, w = size
    if rgb.shape[0] <= h and rgb.shape[1] <= w:
        if rgb.shape[:2] == (h, w):
            return rgb
        out = np.zeros((h, w, 3), np.uint8)
        top, left = geometry.pad
        out[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
        return out
    top, left = geometry.crop
    return rgb[top : top + h, left : left + w]


def decode(
    path: str | os.PathLike,
    indices: Sequence[int],
    geometry: FitGeometry,
    size: tuple[int, int],
    timers: dict[str, float] | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """Frames `indices` (0-based, in decode order) of the first video stream, each fitted
    to `size` (H, W) as uint8 `[H, W, 3]`, and the number of frames decoded:
    `({index: frame}, count)`. Decoding stops after the last index wanted, so `count` is
    the file's frame count only when it ended before that. A file that ends early returns
    the frames it has; a decoding error after the first frame does the same. `geometry`
    and `size` are in displayed orientation: frames are resized to the coded orientation
    of that size, then turned as the display matrix says."""
    path = pathlib.Path(path)
    wanted = set(int(i) for i in indices)
    last = max(wanted) if wanted else -1
    timers = timers if timers is not None else {}
    out: dict[int, np.ndarray] = {}
    rh, rw = geometry.resize
    reformatter = VideoReformatter()  # one swscale context for every frame (3x faster)
    with _open(path) as container:
        if not container.streams.video:
            raise Reject("no_video_stream", f"{path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        it = container.decode(stream)
        index, transform = -1, ""
        while index < last:
            t0 = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                break
            except (av.FFmpegError, ValueError) as e:
                if index < 0:
                    raise Reject("decode_error", f"{path}: {e}") from e
                break  # a damaged tail: keep what decoded
            finally:
                timers["decode_s"] = timers.get("decode_s", 0.0) + time.perf_counter() - t0
            index += 1
            if index == 0:
                transform = video_io.display_transform(frame)
            if index not in wanted:
                continue
            t0 = time.perf_counter()
            ch, cw = (rw, rh) if video_io.swaps_sides(transform) else (rh, rw)  # coded
            rgb = reformatter.reformat(
                frame, width=cw, height=ch, format="rgb24", interpolation="AREA"
            )
            upright = video_io.orient(rgb.to_ndarray(), transform)  # [rh, rw, 3]
            out[index] = _place(upright, geometry, size)
            timers["resize_s"] = timers.get("resize_s", 0.0) + time.perf_counter() - t0
    return out, index + 1


def count_frames(path: str | os.PathLike, timers: dict[str, float] | None = None) -> int:
    """Frames of the first video stream, by decoding them all (no conversion): for
    containers whose header gives neither a frame count nor a duration."""
    path = pathlib.Path(path)
    timers = timers if timers is not None else {}
    t0 = time.perf_counter()
    count = 0
    with _open(path) as container:
        if not container.streams.video:
            raise Reject("no_video_stream", f"{path}")
        try:
            for _ in container.decode(container.streams.video[0]):
                count += 1
        except (av.FFmpegError, ValueError) as e:
            if count == 0:
                raise Reject("decode_error", f"{path}: {e}") from e
    timers["decode_s"] = timers.get("decode_s", 0.0) + time.perf_counter() - t0
    if count == 0:
        raise Reject("no_frames", str(path))
    return count


def frame_interval(source_fps: float, target_fps: float) -> int:
    """Source frames per output frame: `round(source / target)`, at least 1; 1 when either
    rate is unknown (0) so the clip keeps every frame."""
    if target_fps <= 0 or source_fps <= 0:
        return 1
    return max(1, int(round(source_fps / target_fps)))


def window_starts(available: int, frames: int, stride: int, max_clips: int) -> list[int]:
    """Start frames (output frame units) of the clips cut from a video of `available`
    frames: 0, stride, 2 stride, ... while a whole clip of `frames` fits, at most
    `max_clips` (0 = no limit); stride 0 = one clip from the start."""
    if available < frames:
        return []
    if stride <= 0:
        return [0]
    count = (available - frames) // stride + 1
    if max_clips > 0:
        count = min(count, max_clips)
    return [k * stride for k in range(count)]


def needed_frames(starts: Sequence[int], frames: int, interval: int) -> list[int]:
    """Source frame indices the windows use, sorted and unique."""
    return sorted({(s + j) * interval for s in starts for j in range(frames)})


def output_fps(source_fps: float, interval: int) -> float:
    return source_fps / interval if source_fps > 0 else 0.0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


def available_frames(source_frames: int, interval: int) -> int:
    """Output frames a video of `source_frames` yields at one frame every `interval`."""
    return ceil_div(max(source_frames, 0), interval)


def fit_frames(
    frames: np.ndarray,
    indices: Sequence[int],
    geometry: FitGeometry,
    size: tuple[int, int],
    timers: dict[str, float] | None = None,
) -> dict[int, np.ndarray]:
    """`decode` for frames already in memory (uint8 `[T, H, W, 3]`, e.g. from TFDS): the
    same swscale resize and crop/pad, `{index: frame}` for the indices that exist."""
    timers = timers if timers is not None else {}
    t0 = time.perf_counter()
    rh, rw = geometry.resize
    reformatter = VideoReformatter()
    out = {}
    for i in indices:
        if 0 <= i < len(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            rgb = reformatter.reformat(
                frame, width=rw, height=rh, format="rgb24", interpolation="AREA"
            )
            out[int(i)] = _place(rgb.to_ndarray(), geometry, size)
    timers["resize_s"] = timers.get("resize_s", 0.0) + time.perf_counter() - t0
    return out
