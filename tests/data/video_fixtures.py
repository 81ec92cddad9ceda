"""Real media files made with PyAV for the tokenization tests: several containers and codecs,
odd sizes, several frame rates, short and long clips, and broken files.

Frame `t` of every video is `pattern(t, h, w)`: smooth horizontal and vertical ramps plus a
bright square moving right, so resizing and cropping can be checked against an independent
resize of the same frames and the frame order is visible.
"""

from __future__ import annotations

import fractions
import json
import pathlib

import av
import numpy as np


def pattern(t: int, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    img[..., 0] = 40 + 160 * x / max(w - 1, 1)
    img[..., 1] = 40 + 160 * y / max(h - 1, 1)
    img[..., 2] = 90
    side = max(2, min(h, w) // 4)
    left = int((t * 3) % max(w - side, 1))
    top = (h - side) // 2
    img[top : top + side, left : left + side] = (250, 250, 60)
    return img.astype(np.uint8)


def write(path, codec, pix_fmt, size, fps, frames, options=None):
    h, w = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps), options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(t, h, w), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_audio_only(path):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(4000) / 10) * 1000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# name -> (codec, pix_fmt, (h, w), fps, frames). Expected buckets with the `tiny` grid of
# experiments/videos.py (1:1 32x32 and 16x16, 16:9 24x40, 9:16 40x24; 1, 5, 9 frames),
# target fps 10, clip_stride 4, at most 3 clips per video, no upscaling:
GOOD = {
    # 16:9 at 12 fps: interval round(12/10) = 1, 40 frames -> 9-frame windows at 0, 4, 8.
    "landscape.mp4": ("libx264", "yuv420p", (180, 320), 12, 40),
    # 9:16 VP9 at 24 fps: interval 2, 30 frames -> 15 at 12 fps -> windows 0, 4 (0+9<=15, 4+9<=15).
    "portrait.webm": ("libvpx-vp9", "yuv420p", (854, 480), 24, 30),
    # 853x480 (odd width) lossless FFV1 at 30 fps: interval 3, 20 frames -> 7 -> one 5-frame clip.
    "odd.mkv": ("ffv1", "yuv444p", (480, 853), 30, 20),
    # 17x17 MJPEG at 10 fps: too small for 32x32 -> 16x16; 12 frames -> 5-frame windows 0, 4.
    "tiny.avi": ("mjpeg", "yuvj444p", (17, 17), 10, 12),
    # Two frames: only a 1-frame bucket fits; windows 0 (and 4 does not fit).
    "short.mp4": ("libx264", "yuv420p", (64, 64), 10, 2),
}
EXPECTED = {
    "landscape.mp4": ("9x24x40", [0, 4, 8], 1),
    "portrait.webm": ("9x40x24", [0, 4], 2),
    "odd.mkv": ("5x24x40", [0], 3),
    "tiny.avi": ("5x16x16", [0, 4], 1),
    "short.mp4": ("1x32x32", [0], 1),
}  # file -> (bucket, window starts in output frames, frame interval)


def make_dataset(root: pathlib.Path) -> pathlib.Path:
    """Writes the files and `manifest.jsonl` (with bad lines) under `root`; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    vp9 = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    for name, (codec, fmt, size, fps, frames) in GOOD.items():
        options = vp9 if codec == "libvpx-vp9" else {"crf": "12"} if codec == "libx264" else {}
        write(root / name, codec, fmt, size, fps, frames, options)
        rows.append({"path": name, "caption": f"the clip {name}", "source": "fixture"})
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (root / "empty.mkv").write_bytes(b"")
    data = (root / "landscape.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 3])  # mp4 index at the end: unreadable
    write_audio_only(root / "audio.wav")
    rows += [
        {"path": "corrupt.mp4", "caption": "random bytes"},
        {"path": "empty.mkv", "caption": "nothing"},
        {"path": "cut.mp4", "caption": "a third of a file"},
        {"path": "audio.wav", "caption": "sound only"},
        {"path": "missing.mp4", "caption": "not there"},
        {"path": "landscape.mp4", "caption": "   "},
        {"path": "landscape.mp4", "caption": 42},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


BAD = {  # manifest line (0-based, in the order written) -> reason
    5: "unreadable",
    6: "unreadable",
    7: "unreadable",
    8: "no_video_stream",
    9: "missing_file",
    10: "bad_caption",
    11: "bad_caption",
    12: "bad_entry",
}


# A folder of "own videos" with sidecar captions, as the README's own-videos path takes it:
# name -> (codec, pix_fmt, (h, w), fps, frames). With the `tiny` grid (every frame kept,
# one clip per video, global batch 4) they fill 9x32x32 (6), 9x24x40 (6) and 1x32x32 (4),
# leave 5x32x32 with 2 (demoted to 1x32x32 by the tokenizer), and 9x40x24 (2), 5x24x40 (1)
# and 5x16x16 (1) below one batch with no fuller bucket of their aspect ratio.
H264, VP9 = ("libx264", "yuv420p"), ("libvpx-vp9", "yuv420p")
MJPEG, FFV1, MPEG4 = ("mjpeg", "yuvj444p"), ("ffv1", "yuv444p"), ("mpeg4", "yuv420p")
FOLDER = {
    "square/a.mp4": (*H264, (64, 64), 10, 12),
    "square/b.webm": (*VP9, (48, 48), 24, 10),
    "square/c.mkv": (*FFV1, (40, 40), 30, 9),
    "square/d.avi": (*MJPEG, (36, 36), 15, 11),
    "square/e.mp4": (*MPEG4, (32, 32), 25, 9),
    "square/f.mov": (*H264, (56, 56), 25, 16),
    "square/short_a.mp4": (*H264, (48, 48), 10, 6),
    "square/short_b.webm": (*VP9, (64, 64), 12, 7),
    "wide/a.mp4": (*H264, (180, 320), 12, 12),
    "wide/b.webm": (*VP9, (72, 128), 24, 10),
    "wide/c.avi": (*MJPEG, (90, 160), 30, 9),
    "wide/d.mkv": (*FFV1, (45, 80), 15, 10),
    "wide/e.mp4": (*MPEG4, (36, 64), 25, 9),
    "wide/f.mkv": (*H264, (54, 96), 8, 14),
    "wide/short.mp4": (*H264, (36, 64), 10, 6),
    "tall/a.mp4": (*H264, (128, 72), 10, 10),
    "tall/b.webm": (*VP9, (80, 48), 20, 9),
    "stills/a.mp4": (*H264, (48, 48), 10, 2),
    "stills/b.avi": (*MJPEG, (64, 64), 5, 1),
    "stills/c.mkv": (*FFV1, (33, 33), 10, 3),
    "stills/d.webm": (*VP9, (40, 40), 10, 2),
    "small/a.avi": (*MJPEG, (17, 17), 10, 6),
}
FOLDER_BROKEN = ("broken/corrupt.mp4",)  # random bytes: rejected as unreadable


def make_folder(root: pathlib.Path) -> pathlib.Path:
    """Writes FOLDER's videos and a caption `name.txt` beside each, plus the broken files."""
    vp9 = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    for name, (codec, fmt, size, fps, frames) in FOLDER.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        options = vp9 if codec == "libvpx-vp9" else {"crf": "12"} if codec == "libx264" else {}
        write(path, codec, fmt, size, fps, frames, options)
        path.with_suffix(".txt").write_text(f"a clip named {path.stem} from {path.parent.name}\n")
    for name in FOLDER_BROKEN:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.random.default_rng(1).bytes(3000))
        path.with_suffix(".txt").write_text("a broken file\n")
    return root
