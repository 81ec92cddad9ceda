"""Video and image files: round trips through each format keep frame count, size (times
`scale`) and pixels (exactly for gif and PNG, within a stated error for lossy codecs)."""

import av
import numpy as np
import pytest

from sora_jax import video_io
from sora_jax.data import synthetic
from sora_jax.evaluation import adherence


def _video(index=0, shape=(9, 32, 32)):
    return synthetic.synthetic_clip(index, 0, *shape)["video"]


def test_to_uint8():
    x = np.array([[[[-1.0, 0.0, 1.0]]], [[[-2.0, 0.002, 3.0]]]], np.float32)  # [2, 1, 1, 3]
    u = video_io.to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == x.shape
    np.testing.assert_array_equal(u[:, 0, 0], [[0, 128, 255], [0, 128, 255]])
    assert video_io.to_uint8(u) is u
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_io.to_uint8(np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        video_io.to_uint8(np.full((1, 2, 2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="int64"):
        video_io.to_uint8(np.zeros((1, 2, 2, 3), np.int64))


# Mean absolute error per pixel value (0-255) of synthetic clips after an H.264 / VP9 round
# trip: measured ~1.8 at scale 1 (2x2 chroma subsampling blurs colour edges of a 32 px
# frame) and ~0.3 at scale 4; bounds leave a margin for codec builds.
@pytest.mark.parametrize(
    "suffix, scale, max_mae",
    [(".mp4", 1, 3.0), (".mp4", 4, 0.8), (".webm", 2, 1.2), (".gif", 1, 0.0), (".gif", 3, 0.0)],
)
def test_round_trip(tmp_path, suffix, scale, max_mae):
    for index in range(3):
        video = _video(index)
        path = video_io.write_video(tmp_path / "sub" / f"clip{suffix}", video, scale=scale)
        back = video_io.read_video(path)
        assert back.dtype == np.uint8
        assert back.shape == (9, 32 * scale, 32 * scale, 3)
        expected = np.repeat(np.repeat(video_io.to_uint8(video), scale, 1), scale, 2)
        mae = np.abs(back.astype(np.float64) - expected).mean()
        assert mae <= max_mae, (suffix, scale, mae)
        # What a viewer sees still matches the caption.
        caption = synthetic.clip_spec(index).caption
        assert adherence.score([back], [caption])["both"] == 1.0


def test_mp4_pads_odd_sizes_to_even(tmp_path):
    video = _video(shape=(5, 15, 21))
    back = video_io.read_video(video_io.write_video(tmp_path / "odd.mp4", video))
    assert back.shape == (5, 16, 22, 3)
    back = video_io.read_video(video_io.write_video(tmp_path / "odd.gif", video))
    np.testing.assert_array_equal(back, video_io.to_uint8(video))  # gif: exact, no padding


def test_gif_with_more_than_256_colours_is_close(tmp_path):
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, (4, 32, 32, 3)).astype(np.float32)
    video = np.clip(_video(shape=(4, 32, 32)) + noise, -1, 1)
    assert len(np.unique(video_io.to_uint8(video).reshape(-1, 3), axis=0)) > 256
    back = video_io.read_video(video_io.write_video(tmp_path / "noisy.gif", video))
    assert np.abs(back.astype(float) - video_io.to_uint8(video)).mean() < 4.0


def test_write_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"clip\.avi.*'\.gif', '\.mp4', '\.webm'"):
        video_io.write_video(tmp_path / "clip.avi", _video())
    with pytest.raises(ValueError, match="scale=0"):
        video_io.write_video(tmp_path / "clip.mp4", _video(), scale=0)
    with pytest.raises(ValueError, match="write_png"):
        video_io.write_video(tmp_path / "clip.mp4", _video()[0])


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        video_io.read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        video_io.read_video(junk)


def test_png_and_contact_sheet(tmp_path):
    videos = [_video(i) for i in range(3)] + [_video(3, shape=(3, 16, 24))]
    sheet = video_io.contact_sheet(videos, columns=4, gap=2)
    # Rows = videos, columns = frames; tiles are the largest video's size.
    assert sheet.shape == (4 * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)
    first = video_io.to_uint8(videos[0])
    np.testing.assert_array_equal(sheet[2:34, 2:34], first[0])  # top-left: frame 0
    np.testing.assert_array_equal(sheet[2:34, -34:-2], first[-1])  # top-right: last frame
    assert (sheet[:2] == 128).all()  # grey gap
    # The short 3-frame video fills 3 tiles; the fourth stays grey.
    assert (sheet[-34:-2, -34:-2] == 128).all()
    path = video_io.write_png(tmp_path / "a" / "sheet.png", sheet, scale=2)
    back = video_io.read_video(path)  # decoded by FFmpeg, an independent PNG reader
    np.testing.assert_array_equal(back[0], np.repeat(np.repeat(sheet, 2, 0), 2, 1))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        video_io.write_png(tmp_path / "v.png", videos[0])


def write_rotated(path, coded, degrees, hflip=False):
    """An H.264 mp4 of the uint8 frames `coded` [T, H, W, 3] with a display matrix of a
    `degrees` counterclockwise rotation (then a mirror), as a phone writes portrait video."""
    t, h, w, _ = coded.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.set_display_rotation(degrees, hflip=hflip)
        for f in coded:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def marked_frames(t=2, h=32, w=48):
    """Landscape frames: a dark gradient with a white 8 x 8 marker at the top-left corner."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 0] = np.linspace(20, 120, w, dtype=np.uint8)[None, None, :]
    frames[:, :8, :8] = 255
    return frames


def marker_corner(frame):
    """Which corner of `frame` [H, W, 3] holds the white marker: 'tl', 'tr', 'bl' or 'br'."""
    h, w, _ = frame.shape
    corners = {
        "tl": frame[:6, :6], "tr": frame[:6, w - 6 :],
        "bl": frame[h - 6 :, :6], "br": frame[h - 6 :, w - 6 :],
    }  # fmt: skip
    return max(corners, key=lambda k: corners[k].mean())


# rotation (counterclockwise, as PyAV and the display matrix state it), mirror -> where a
# player shows the coded top-left corner, and whether the picture is portrait.
@pytest.mark.parametrize(
    "degrees, hflip, corner, portrait",
    [
        (90, False, "bl", True),  # a quarter turn counterclockwise: top-left goes down
        (-90, False, "tr", True),  # clockwise (the usual phone held upright): goes right
        (180, False, "br", False),
        (0, True, "tr", False),  # mirrored only
    ],
)
def test_read_video_turns_frames_the_way_the_display_matrix_says(
    tmp_path, degrees, hflip, corner, portrait
):
    coded = marked_frames()
    path = write_rotated(tmp_path / "phone.mp4", coded, degrees, hflip)
    raw = video_io.read_video(path, autorotate=False)
    assert raw.shape == coded.shape and marker_corner(raw[0]) == "tl"
    shown = video_io.read_video(path)
    assert shown.shape == ((2, 48, 32, 3) if portrait else coded.shape)
    assert marker_corner(shown[0]) == corner
    if not hflip:  # an independent reference: np.rot90 by PyAV's own frame.rotation
        np.testing.assert_array_equal(shown, np.rot90(raw, degrees // 90, axes=(1, 2)))
    # the gradient runs along the coded width, which a quarter turn makes the height
    axis = 0 if portrait else 1
    profile = shown[0, 10:-10, 10:-10, 0].astype(float).mean(axis=1 - axis)
    assert abs(profile[-1] - profile[0]) > 40
