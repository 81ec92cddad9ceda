"""Display orientation in the tokenization job, and native-shape tokenization
(`data.tokenize.mode='native'`): each clip's shape follows the budget rule, its pixels are
the source's, its shape is recorded in the record and the manifest; units, processes and
rejects work as in bucketed mode; the bucketed pipeline refuses a native dataset."""

from __future__ import annotations

import fractions
import json
import math
import pathlib
import sys

import av
import grain
import numpy as np
import pytest
from PIL import Image

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.data import native, records, shards, tokenization
from sora_jax.data import pipeline as pipeline_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import video_fixtures as fx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]

# name -> (coded (h, w), fps, frames, display rotation counterclockwise). "phone.mp4" is a
# phone's portrait video: coded landscape 72 x 128, shown turned clockwise (-90), 128 x 72.
MEDIA = {
    "phone.mp4": ((72, 128), 10, 12, -90),
    "wide.mp4": ((90, 160), 10, 14, 0),
    "square.mp4": ((50, 50), 10, 6, 0),
    "short.mp4": ((64, 64), 10, 1, 0),
    "tiny.mp4": ((18, 18), 10, 9, 0),  # 18 x 18 floors to 16 x 16
}
MULTIPLE, MAX_AREA, MAX_FRAMES = 8, 40 * 24, 9


def write(path: pathlib.Path, size, fps, frames, rotation) -> None:
    h, w = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps), options={"crf": "8"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(fx.pattern(t, h, w), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_media")
    rows = []
    for name, spec in MEDIA.items():
        write(root / name, *spec)
        rows.append({"path": name, "caption": f"the clip {name}"})
    rows.append({"path": "missing.mp4", "caption": "not there"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_config(media: pathlib.Path, out: pathlib.Path, mode: str = "buckets"):
    c = config_lib.load_config(
        f"{ROOT}/experiments/videos.py:tiny,manifest={media / 'manifest.jsonl'},fps=10"
    )
    c.data.dataset_dir = str(out)
    c.data.tokenize.inputs_per_shard = 2
    c.data.tokenize.max_reject_fraction = 0.9
    c.data.tokenize.min_bucket_clips = 0
    c.data.tokenize.holdout_fraction = 0.0
    if mode == "native":
        with c.unlocked():
            c.data.tokenize.mode = "native"
            c.data.tokenize.max_area = MAX_AREA
            c.data.tokenize.max_frames = MAX_FRAMES
            c.data.tokenize.multiple = MULTIPLE
    return c


def read_all(out: pathlib.Path, files) -> list[dict]:
    result = []
    for f in files:
        source = grain.sources.ArrayRecordDataSource([str(out / f)])
        result += [records.decode_record(source[i]) for i in range(len(source))]
    return result


def reference(path: pathlib.Path, t: int, h: int, w: int) -> np.ndarray:
    """The first `t` displayed frames (read_video turns them), PIL box resize to cover
    `h x w`, centre crop: uint8 [t, h, w, 3]."""
    frames = video_io.read_video(path)[:t]
    sh, sw = frames.shape[1:3]
    s = max(h / sh, w / sw)
    rh, rw = max(h, round(sh * s)), max(w, round(sw * s))
    out = []
    for f in frames:
        img = np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BOX))
        top, left = (rh - h) // 2, (rw - w) // 2
        out.append(img[top : top + h, left : left + w])
    return np.stack(out)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def by_name(recs):
    return {pathlib.Path(r["source_id"].split("#")[0]).name: r for r in recs}


def test_a_phone_video_is_bucketed_portrait_the_right_way_up(media, tmp_path):
    out = tmp_path / "data"
    tokenization.run(make_config(media, out), tmp_path, batch_size=4, show_progress=False)
    manifest = shards.read_manifest(out)
    files = [f for b in manifest["buckets"].values() for f in b["files"]]
    rec = by_name(read_all(out, files))["phone.mp4"]
    # 128 x 72 displayed (9:16) goes to the tiny grid's portrait bucket 9x40x24, never a
    # landscape one as the coded 72 x 128 would
    assert rec["latents"].shape == (9, 40, 24, 3)
    video = np.round((rec["latents"].astype(np.float32) + 1) * 127.5)
    assert psnr(video, reference(media / "phone.mp4", 9, 40, 24)) > 30
    # the pattern's moving square runs along the coded width, which is now the height:
    # the bright marker's row moves down from frame to frame
    rows = [np.argmax(f[..., 2].mean(axis=1)) for f in video[:5]]
    assert rows == sorted(rows) and rows[-1] > rows[0]


def expected_shape(size, rotation, frames) -> tuple[int, int, int]:
    """The native rule written out for the test: displayed sides, area budget, floor to
    MULTIPLE; frames capped at MAX_FRAMES (the pixels tokenizer takes any count)."""
    h, w = size if rotation % 180 == 0 else size[::-1]
    s = min(1.0, math.sqrt(MAX_AREA / (h * w)))
    return (
        min(frames, MAX_FRAMES),
        int(h * s) // MULTIPLE * MULTIPLE,
        int(w * s) // MULTIPLE * MULTIPLE,
    )


@pytest.fixture(scope="module")
def native_dataset(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("native_run") / "data"
    config = make_config(media, out, "native")
    summary = tokenization.run(config, out.parent, batch_size=4, show_progress=False)
    return out, summary, config


def test_native_clips_keep_their_aspect_and_duration_within_the_budget(media, native_dataset):
    out, summary, _ = native_dataset
    manifest = shards.read_manifest(out)
    assert manifest["schema_version"] == shards.NATIVE_SCHEMA_VERSION
    assert manifest["mode"] == "native" and manifest["buckets"] == {}
    section = manifest["native"]
    recs = read_all(out, section["files"])
    got = by_name(recs)
    assert set(got) == {"phone.mp4", "wide.mp4", "square.mp4", "short.mp4", "tiny.mp4"}
    for name, (size, _, frames, rotation) in MEDIA.items():
        r = got[name]
        t, h, w = expected_shape(size, rotation, frames)
        assert r["latents"].shape == (t, h, w, 3), name
        assert r["shape"].tolist() == [t, h, w] and r["num_frames"] == t
        assert h * w <= MAX_AREA and h % MULTIPLE == 0 and w % MULTIPLE == 0
        dh, dw = size if rotation % 180 == 0 else size[::-1]
        # only the rounding is cropped: the aspect ratio moves by less than one block
        assert abs(w / h - dw / dh) <= dw / dh * (MULTIPLE / min(h, w)) + 1e-9, name
        video = np.round((r["latents"].astype(np.float32) + 1) * 127.5)
        # 25 dB: swscale resizes yuv420 before converting, the reference after (as in
        # test_tokenize_videos); a wrong crop, turn or frame order falls well below
        assert psnr(video, reference(media / name, t, h, w)) > 25, name
    assert got["phone.mp4"]["shape"].tolist() == [9, 40, 16]  # portrait, 128x72 shrunk
    # the manifest's shapes list every record in file order, and their histogram
    listed = [s for f in section["files"] for s in section["shapes"][f]]
    assert listed == [r["shape"].tolist() for r in recs]
    assert sum(section["shape_counts"].values()) == section["count"] == len(recs)
    assert manifest["rejects_by_reason"] == {"missing_file": 1}
    assert section["options"]["multiple"] == MULTIPLE


def test_native_units_and_processes_write_the_same_dataset(media, native_dataset, tmp_path):
    out, _, config = native_dataset
    two = tmp_path / "data"
    config2 = make_config(media, two, "native")
    for p in (1, 0):
        tokenization.run(
            config2, tmp_path, process_index=p, process_count=2, batch_size=4,
            show_progress=False,
        )  # fmt: skip
    a, b = shards.read_manifest(out), shards.read_manifest(two)
    assert a["native"] == b["native"]
    for f in a["native"]["files"]:
        assert (out / f).read_bytes() == (two / f).read_bytes()
    # a re-run with a different budget into the same directory is refused
    with config2.unlocked():
        config2.data.tokenize.max_area = 2 * MAX_AREA
    with pytest.raises(ValueError, match="native"):
        tokenization.run(config2, tmp_path, batch_size=4, show_progress=False)


def test_the_bucketed_pipeline_refuses_a_native_dataset(native_dataset):
    out, _, config = native_dataset
    with pytest.raises(ValueError, match="native-shape dataset"):
        pipeline_lib.from_config(config, out.parent, data_parallel=1)


def test_native_options_follow_the_tokenizers_frame_rule():
    vae = native.NativeOptions(max_frames=20, multiple=16, temporal=4, patch_frames=1)
    assert [vae.frames_for(n) for n in (1, 4, 5, 8, 9, 100)] == [1, 1, 5, 5, 9, 17]
    two = native.NativeOptions(multiple=16, temporal=4, patch_frames=2)  # T' = 1 + k even
    assert two.frames_for(12) == 5 and two.latent_frames(5) == 2 and two.frames_for(4) == 0
    assert native.NativeOptions(multiple=16).bucket(9, 15, 200) == "too_small"
    assert native.NativeOptions(multiple=16, max_area=256 * 256).size_for(1080, 1920) == (
        192,
        336,
    )  # 1920x1080 at 65,536 pixels: 341.3 x 192 -> floored to 16s
