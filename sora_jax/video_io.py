"""Reading and writing videos and images: mp4 / webm / gif through PyAV, PNG by hand.

Videos are `[T, H, W, 3]` RGB, either uint8 or float in [-1, 1] (the models' pixel range;
-1 is black). Model-sized videos are tiny (32 x 32), so writers take `scale`: an integer
nearest-neighbour enlargement that keeps pixels sharp instead of letting a player blur
them.

Format notes:
- mp4 (H.264) and webm (VP9) store yuv420p, whose chroma is subsampled 2 x 2: both sides
  must be even, so after scaling an odd side is padded by repeating its last row/column
  (read_video then returns the padded size). Colour edges are softened by the chroma
  subsampling; `scale >= 2` keeps them crisp.
- gif stores 256 palette colours. One palette serves the whole clip (no flicker): exact
  when the clip has <= 256 distinct colours (true of synthetic clips), else the 256 most
  frequent colours at 5 bits per channel. Frame delays are whole centiseconds, so 8 fps is
  stored as 12 cs frames (8.33 fps).
- PNG is written with zlib (no extra dependency); read it back with `read_video`.

Display orientation: a phone holds its sensor landscape and records portrait video as
landscape frames plus a display matrix (the container's rotation side data) saying "turn
this 90 degrees". `display_transform` reads the matrix FFmpeg attaches to a decoded frame
and names the transform a player applies (the rule of the `ffmpeg` command line's
autorotate, so flips are honoured too); `orient` applies it to `[..., H, W, 3]` arrays.
`read_video` returns frames the right way up, as players show them.
"""

from __future__ import annotations

import fractions
import math
import os
import pathlib
import struct
import zlib

import av
import numpy as np

# suffix -> (PyAV codec, pixel format stored, needs even sides)
VIDEO_FORMATS = {
    ".mp4": ("libx264", "yuv420p", True),
    ".webm": ("libvpx-vp9", "yuv420p", True),
    ".gif": ("gif", "pal8", False),
}
# Encoder options: H.264 CRF 18 is the usual "visually lossless" setting (x264 docs; the
# default is 23); VP9 needs an explicit CRF with bitrate 0 for constant quality.
CODEC_OPTIONS = {"libx264": {"crf": "18"}, "libvpx-vp9": {"crf": "24", "b": "0"}}


def to_uint8(video) -> np.ndarray:
    """`[T, H, W, 3]` (or an image `[H, W, 3]`) float in [-1, 1] -> uint8 of the same
    shape, `round((x + 1) * 127.5)` clipped to [0, 255]; uint8 passes through unchanged."""
    video = np.asarray(video)
    if video.ndim not in (3, 4) or video.shape[-1] != 3:
        raise ValueError(
            f"expected RGB pixels [T, H, W, 3] or [H, W, 3], got shape {video.shape}; "
            "move channels last and drop the batch axis"
        )
    if video.dtype == np.uint8:
        return video
    if video.dtype == np.bool_ or np.issubdtype(video.dtype, np.integer):
        raise ValueError(
            f"pixels of dtype {video.dtype} are ambiguous: pass uint8 in [0, 255] or float "
            "in [-1, 1]"
        )
    x = video.astype(np.float32)  # also converts bfloat16 from JAX
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{bad} of {x.size} pixel values are NaN or infinite (did sampling diverge?); "
            "there is no faithful uint8 value for them"
        )
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _enlarge(video: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of `[..., H, W, 3]` by an integer factor."""
    if scale == 1:
        return video
    return np.repeat(np.repeat(video, scale, axis=-3), scale, axis=-2)


def _pad_even(video: np.ndarray) -> np.ndarray:
    """Pads `[T, H, W, 3]` to even H and W by repeating the last row/column (yuv420p)."""
    _, h, w, _ = video.shape
    return np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _palettize(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 `[T, H, W, 3]` -> palette indices `[T, H, W]` uint8 and palette `[256, 3]`."""
    r, g, b = (video[..., c].astype(np.int64) for c in range(3))
    packed = (r << 16) | (g << 8) | b  # [T, H, W] 24-bit colour
    colours, index = np.unique(packed, return_inverse=True)
    palette = np.zeros((256, 3), np.uint8)
    if len(colours) <= 256:
        palette[: len(colours)] = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], -1)
        return index.reshape(packed.shape).astype(np.uint8), palette
    # Popularity palette: bin at 5 bits per channel, keep the 256 fullest bins, each
    # represented by the mean of its pixels, and map every bin to its nearest entry.
    code = ((r >> 3) << 10) | ((g >> 3) << 5) | (b >> 3)  # [T, H, W] in [0, 32768)
    flat = code.ravel()
    counts = np.bincount(flat, minlength=1 << 15)
    sums = np.stack(
        [np.bincount(flat, weights=video[..., c].ravel(), minlength=1 << 15) for c in range(3)],
        -1,
    )  # [32768, 3]
    present = np.flatnonzero(counts)
    kept = present[np.argsort(-counts[present], kind="stable")[:256]]
    means = sums / np.maximum(counts, 1)[:, None]  # [32768, 3] mean colour of each bin
    entries = np.round(means[kept])  # [K <= 256, 3]
    palette[: len(kept)] = entries.astype(np.uint8)
    d = ((means[present, None, :] - entries[None, :, :]) ** 2).sum(-1)  # [bins, K]
    lut = np.zeros(1 << 15, np.uint8)
    lut[present] = np.argmin(d, axis=1)  # [len(present)] nearest palette entry
    return lut[code], palette


def write_video(path: str | os.PathLike, video, fps: float = 8.0, scale: int = 1) -> pathlib.Path:
    """Writes `video` `[T, H, W, 3]` (uint8 or float in [-1, 1]) to `path`, choosing the
    format by suffix (`VIDEO_FORMATS`), and returns the path. `scale` enlarges each pixel
    to `scale x scale` (nearest neighbour) so small videos are viewable. Creates parent
    directories."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ValueError(
            f"cannot write video {path}: unknown suffix {path.suffix!r}; supported: "
            f"{sorted(VIDEO_FORMATS)}"
        )
    if not (isinstance(scale, int | np.integer) and scale >= 1):
        raise ValueError(f"write_video({path}): scale={scale!r} must be a positive integer")
    if not fps > 0:
        raise ValueError(f"write_video({path}): fps={fps!r} must be positive")
    video = to_uint8(video)
    if video.ndim != 4:
        raise ValueError(
            f"write_video({path}) expects a video [T, H, W, 3], got {video.shape}; "
            "use write_png for a single image"
        )
    codec, pix_fmt, even = VIDEO_FORMATS[suffix]
    video = _enlarge(video, int(scale))
    if even:
        video = _pad_even(video)
    num_frames, height, width, _ = video.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fractions.Fraction(float(fps)).limit_denominator(1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=CODEC_OPTIONS.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "gif":
            indices, palette = _palettize(video)
            argb = np.concatenate([np.full((256, 1), 255, np.uint8), palette], axis=1)
            frames = (
                av.VideoFrame.from_ndarray((indices[t], argb), format="pal8")
                for t in range(num_frames)
            )
        else:
            frames = (av.VideoFrame.from_ndarray(f, format="rgb24") for f in video)
        for frame in frames:
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return path


# Transforms a display matrix can ask for, as `orient` applies them to [..., H, W, C]
# (names after FFmpeg's `transpose` filter; 'transpose' swaps rows and columns, keeping the
# top-left corner, 'antitranspose' swaps them about the other diagonal).
TRANSFORMS = ("", "cclock", "clock", "rot180", "hflip", "vflip", "transpose", "antitranspose")
_SWAPS_SIDES = {"cclock", "clock", "transpose", "antitranspose"}


def display_transform(frame: av.VideoFrame) -> str:
    """The transform (`TRANSFORMS`) that shows `frame` the right way up, from the display
    matrix FFmpeg attaches to decoded frames ('' when it has none).

    The matrix `m` (3 x 3 int32, 16.16 fixed point, row major) rotates by
    `rho = -atan2(m[1], m[0])` degrees counterclockwise (`frame.rotation`); the player turns
    the picture by `theta = -rho` clockwise, and the signs of `m[0]`, `m[3]`, `m[4]` say
    whether it is mirrored too. This follows the autorotate rule of FFmpeg's command-line
    tool (fftools, `get_rotation` and the transpose/hflip/vflip filters it inserts);
    angles that are not a multiple of 90 degrees (rare, synthetic) are rounded to one."""
    matrix = None
    for data in frame.side_data:
        if "DISPLAYMATRIX" in str(data.type):
            matrix = np.frombuffer(bytes(data), "<i4")
            break
    if matrix is None or len(matrix) < 9:
        return ""
    m = matrix.astype(np.float64) / 65536.0
    if math.hypot(m[0], m[3]) == 0 or math.hypot(m[1], m[4]) == 0:
        return ""  # degenerate matrix: FFmpeg ignores it too
    rho = -math.degrees(
        math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3]))
    )  # counterclockwise rotation, = frame.rotation
    theta = int(round(-rho / 90.0)) * 90 % 360  # clockwise turn the player applies
    if theta == 90:
        return "transpose" if m[3] > 0 else "clock"
    if theta == 270:
        return "antitranspose" if m[3] < 0 else "cclock"
    if theta == 180:
        flips = (m[0] < 0, m[4] < 0)
        return {(True, True): "rot180", (True, False): "hflip", (False, True): "vflip"}.get(
            flips, ""
        )
    return "vflip" if m[4] < 0 else ""


def swaps_sides(transform: str) -> bool:
    """Whether `transform` turns an `H x W` picture into `W x H`."""
    return transform in _SWAPS_SIDES


def orient(pixels: np.ndarray, transform: str) -> np.ndarray:
    """`pixels` `[..., H, W, C]` with `transform` (`TRANSFORMS`, from `display_transform`)
    applied: `[..., H, W, C]`, or `[..., W, H, C]` for the quarter turns."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown display transform {transform!r}; known: {TRANSFORMS}")
    rows, cols = pixels.ndim - 3, pixels.ndim - 2
    if transform == "cclock":
        out = np.rot90(pixels, 1, axes=(rows, cols))
    elif transform == "clock":
        out = np.rot90(pixels, -1, axes=(rows, cols))
    elif transform == "rot180":
        out = np.rot90(pixels, 2, axes=(rows, cols))
    elif transform == "hflip":
        out = np.flip(pixels, cols)
    elif transform == "vflip":
        out = np.flip(pixels, rows)
    elif transform == "transpose":
        out = np.swapaxes(pixels, rows, cols)
    elif transform == "antitranspose":  # a clockwise quarter turn, then upside down
        out = np.flip(np.rot90(pixels, -1, axes=(rows, cols)), rows)
    else:
        return pixels
    return np.ascontiguousarray(out)


def read_video(path: str | os.PathLike, *, autorotate: bool = True) -> np.ndarray:
    """Decodes every frame of the first video stream of `path` (any format FFmpeg reads,
    PNG included) to uint8 `[T, H, W, 3]` RGB, turned the way the container's display
    matrix says (`display_transform`; `autorotate=False`: as coded)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(
                    f"{path} has no video stream (streams: {[s.type for s in container.streams]})"
                )
            frames, transform = [], ""
            for f in container.decode(video=0):
                if not frames and autorotate:
                    transform = display_transform(f)
                frames.append(f.to_ndarray(format="rgb24"))
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode {path}: {e}") from e
    if not frames:
        raise ValueError(f"{path} has a video stream but no decodable frames")
    return orient(np.stack(frames), transform)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def write_png(path: str | os.PathLike, image, scale: int = 1) -> pathlib.Path:
    """Writes an RGB image `[H, W, 3]` (uint8 or float in [-1, 1]) as an 8-bit PNG,
    enlarged `scale` times by nearest neighbour; creates parent directories."""
    path = pathlib.Path(path)
    image = to_uint8(image)
    if image.ndim != 3:
        raise ValueError(
            f"write_png({path}) expects an image [H, W, 3], got {image.shape}; pick a frame "
            "or build a contact_sheet"
        )
    image = np.ascontiguousarray(_enlarge(image, int(scale)))
    height, width, _ = image.shape
    # Each scanline is prefixed with filter type 0 (none), per the PNG spec (RFC 2083 §6).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def contact_sheet(
    videos, columns: int = 5, gap: int = 2, scale: int = 1, gap_value: int = 128
) -> np.ndarray:
    """Tiles `videos` (each `[T, H, W, 3]`, uint8 or float) into one uint8 image
    `[H', W', 3]`: one row per video, `columns` frames evenly spaced from first to last
    (fewer for shorter videos), separated by `gap` pixels of grey `gap_value` so black
    backgrounds stay apart. Videos of different sizes are placed top-left in tiles of the
    largest size."""
    videos = [to_uint8(v) for v in videos]
    if not videos:
        raise ValueError("contact_sheet got no videos")
    if columns < 1 or gap < 0:
        raise ValueError(f"contact_sheet: columns={columns} must be >= 1 and gap={gap} >= 0")
    for i, v in enumerate(videos):
        if v.ndim != 4:
            raise ValueError(f"contact_sheet: video {i} has shape {v.shape}, not [T, H, W, 3]")
    videos = [_enlarge(v, int(scale)) for v in videos]
    tile_h = max(v.shape[1] for v in videos)
    tile_w = max(v.shape[2] for v in videos)
    sheet = np.full(
        (len(videos) * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, 3),
        gap_value,
        np.uint8,
    )
    for row, v in enumerate(videos):
        num_frames, h, w, _ = v.shape
        picks = np.unique(np.round(np.linspace(0, num_frames - 1, columns)).astype(int))
        for col, t in enumerate(picks):
            y, x = gap + row * (tile_h + gap), gap + col * (tile_w + gap)
            sheet[y : y + h, x : x + w] = v[t]
    return sheet


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The first frame of an image file (PNG, JPEG or any format FFmpeg reads) as uint8
    `[H, W, 3]` RGB."""
    return read_video(path)[0]


def fit_frames(video, height: int, width: int) -> np.ndarray:
    """uint8 `[T, H, W, 3]` -> uint8 `[T, height, width, 3]`: the largest centred crop of
    the target aspect ratio, then resized with FFmpeg's area filter (a box average when
    shrinking). A clip already of the target size is returned unchanged."""
    video = to_uint8(video)
    if video.ndim != 4:
        raise ValueError(f"fit_frames expects a video [T, H, W, 3], got {video.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"fit_frames: height={height} and width={width} must be >= 1")
    _, h, w, _ = video.shape
    if (h, w) == (height, width):
        return video
    # Crop to the target aspect: keep the full side whose ratio is the tighter one.
    if h * width > w * height:  # too tall
        ch, cw = max(1, round(w * height / width)), w
    else:  # too wide (or equal aspect)
        ch, cw = h, max(1, round(h * width / height))
    y, x = (h - ch) // 2, (w - cw) // 2
    video = np.ascontiguousarray(video[:, y : y + ch, x : x + cw])
    out = []
    for frame in video:
        f = av.VideoFrame.from_ndarray(frame, format="rgb24")
        f = f.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
        out.append(f.to_ndarray())
    return np.stack(out)
