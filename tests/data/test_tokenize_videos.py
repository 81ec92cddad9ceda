"""The tokenization job over real media files (tests/data/video_fixtures.py): buckets,
shapes and pixels of every good clip, a reject line for every bad input, resume after
SIGKILL, two processes vs one, inspect previews, and the VAE round trip."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grain
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import holdout, previews, records, shards, tokenization
from sora_jax.data import pipeline as pipeline_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import video_fixtures as fx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
STRIDE, MAX_CLIPS, UNIT = 4, 3, 2


def make_config(media: pathlib.Path, out: pathlib.Path, **tokenize) -> ml_collections.ConfigDict:
    spec = f"{ROOT}/experiments/videos.py:tiny,manifest={media / 'manifest.jsonl'},fps=10"
    c = config_lib.load_config(spec)
    c.data.dataset_dir = str(out)
    c.data.tokenize.clip_stride = STRIDE
    c.data.tokenize.max_clips_per_video = MAX_CLIPS
    c.data.tokenize.inputs_per_shard = UNIT
    c.data.tokenize.max_reject_fraction = 0.9
    c.data.tokenize.min_bucket_clips = 0  # exact assignment here; demotion: test_own_videos
    c.data.tokenize.holdout_fraction = 0.0  # every clip in the training split, but in
    # test_holdout_split_is_disjoint_stable_and_never_trained_on
    for k, v in tokenize.items():
        c.data.tokenize[k] = v
    return c


def cli_args(media: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [
        sys.executable, "-m", "sora_jax.tokenize",
        f"--config={ROOT}/experiments/videos.py:tiny,manifest={media / 'manifest.jsonl'},fps=10",
        f"--workdir={out.parent}", f"--config.data.dataset_dir={out}",
        f"--config.data.tokenize.clip_stride={STRIDE}",
        f"--config.data.tokenize.max_clips_per_video={MAX_CLIPS}",
        f"--config.data.tokenize.inputs_per_shard={UNIT}",
        "--config.data.tokenize.max_reject_fraction=0.9", "--batch_size=4",
        "--config.data.tokenize.min_bucket_clips=0",
        "--config.data.tokenize.holdout_fraction=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return fx.make_dataset(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def tokenized(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "data"
    summary = tokenization.run(make_config(media, out), out.parent, batch_size=4)
    return out, summary


def all_records(out: pathlib.Path) -> dict[str, list[dict]]:
    """Every shard's records by relative path, in file order."""
    result = {}
    for path in sorted(out.glob("*/*.array_record")):
        source = grain.sources.ArrayRecordDataSource([str(path)])
        result[str(path.relative_to(out))] = [
            records.decode_record(source[i]) for i in range(len(source))
        ]
    return result


def reference_clip(path: pathlib.Path, bucket: str, start: int, interval: int) -> np.ndarray:
    """The clip cut and fitted independently: every frame decoded, PIL box resize to cover,
    centre crop. uint8 [T, H, W, 3]."""
    t, h, w = (int(x) for x in bucket.split("x"))
    frames = video_io.read_video(path)
    picked = frames[[(start + j) * interval for j in range(t)]]
    sh, sw = picked.shape[1:3]
    s = max(h / sh, w / sw)
    rh, rw = max(h, round(sh * s)), max(w, round(sw * s))
    out = []
    for f in picked:
        img = np.asarray(Image.fromarray(f).resize((rw, rh), Image.Resampling.BOX))
        top, left = (rh - h) // 2, (rw - w) // 2
        out.append(img[top : top + h, left : left + w])
    return np.stack(out)


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_good_clips_land_in_expected_buckets_with_the_source_pixels(media, tokenized):
    out, summary = tokenized
    recs = [r for rs in all_records(out).values() for r in rs]
    by_file: dict[str, list[dict]] = {}
    for r in recs:
        by_file.setdefault(pathlib.Path(r["source_id"].split("#")[0]).name, []).append(r)
    assert set(by_file) == set(fx.EXPECTED)
    for name, (bucket, starts, interval) in fx.EXPECTED.items():
        got = by_file[name]
        assert [int(r["source_id"].split("#")[1]) for r in got] == [s * interval for s in starts]
        t, h, w = (int(x) for x in bucket.split("x"))
        fps = fx.GOOD[name][3] / interval
        for r, s in zip(got, starts, strict=True):
            # pixels tokenizer (space_to_depth 1): latents are the pixels in [-1, 1]
            assert r["latents"].shape == (t, h, w, 3), name
            assert r["num_frames"] == t and r["fps"] == pytest.approx(fps)
            assert r["caption"] == f"the clip {name}"
            assert json.loads(r["extra"]) == {"source": "fixture"}
            pixels = (np.asarray(r["latents"], np.float32) + 1) * 127.5
            ref = reference_clip(media / name, bucket, s, interval)
            # FFmpeg's area filter vs PIL's box filter (29-40 dB here), and float16 storage;
            # a crop off by a pixel or a wrong frame scores under 22 dB
            assert psnr(pixels, ref) > 27, (name, psnr(pixels, ref))
    buckets = summary["buckets"]
    for bucket, starts, _ in fx.EXPECTED.values():
        assert buckets[bucket]["count"] >= len(starts)
    assert sum(b["count"] for b in buckets.values()) == len(recs)
    assert {b: v["count"] for b, v in buckets.items() if v["count"]} == {
        "9x24x40": 3, "9x40x24": 2, "5x24x40": 1, "5x16x16": 2, "1x32x32": 1,
    }  # fmt: skip


def test_every_bad_input_is_a_reject_with_its_reason(tokenized):
    out, summary = tokenized
    lines = [json.loads(x) for x in (out / shards.REJECTS).read_text().splitlines()]
    assert {r["input"]: r["reason"] for r in lines} == fx.BAD
    assert all(r["detail"] and r["id"] for r in lines)
    assert summary["rejects"] == len(fx.BAD)
    assert summary["rejects_by_reason"] == {
        "bad_caption": 2, "bad_entry": 1, "missing_file": 1, "no_video_stream": 1,
        "unreadable": 3,
    }  # fmt: skip
    manifest = shards.read_manifest(out)
    assert manifest["source"]["num_inputs"] == len(fx.GOOD) + len(fx.BAD)


def test_too_many_rejects_fail_the_job_after_writing_everything(media, tmp_path):
    out = tmp_path / "data"
    config = make_config(media, out, max_reject_fraction=0.5)  # 8 of 13 inputs are bad
    with pytest.raises(tokenization.RejectLimitError, match="rejects.jsonl"):
        tokenization.run(config, tmp_path, batch_size=4, show_progress=False)
    assert shards.read_manifest(out)["rejects"] == len(fx.BAD)


def test_a_different_config_into_the_same_directory_is_refused(media, tokenized):
    out, _ = tokenized
    config = make_config(media, out, fit="pad")
    with pytest.raises(ValueError, match="clip_options"):
        tokenization.run(config, out.parent, show_progress=False)


def test_two_processes_write_exactly_what_one_writes(media, tokenized, tmp_path):
    one, _ = tokenized
    two = tmp_path / "data"
    config = make_config(media, two)
    first = tokenization.run(config, tmp_path, process_index=0, process_count=2)
    assert not first["stats"]["complete"] and not (two / shards.MANIFEST).exists()
    second = tokenization.run(config, tmp_path, process_index=1, process_count=2)
    assert second["stats"]["complete"]
    assert first["stats"]["inputs"] + second["stats"]["inputs"] == len(fx.GOOD) + len(fx.BAD)
    a, b = all_records(one), all_records(two)
    assert list(a) == list(b)
    for path in a:
        assert [records.encode_record(r) for r in a[path]] == [
            records.encode_record(r) for r in b[path]
        ], path
    assert (one / shards.REJECTS).read_text() == (two / shards.REJECTS).read_text()
    assert shards.read_manifest(one)["buckets"] == shards.read_manifest(two)["buckets"]


def held_out_records(out: pathlib.Path) -> dict[str, list[dict]]:
    result = {}
    for path in sorted(holdout.directory(out).glob("*/*.array_record")):
        source = grain.sources.ArrayRecordDataSource([str(path)])
        result[str(path.relative_to(out))] = [
            records.decode_record(source[i]) for i in range(len(source))
        ]
    return result


def input_of(record: dict) -> str:
    return record["source_id"].rsplit("#", 1)[0]  # `<input id>#<first source frame>`


def test_holdout_split_is_disjoint_stable_and_never_trained_on(media, tokenized, tmp_path):
    full, _ = tokenized  # the same inputs without a split
    fraction = 0.4
    a, b = tmp_path / "a", tmp_path / "b"
    tokenization.run(make_config(media, a, holdout_fraction=fraction), tmp_path, batch_size=4)
    # b: process 0 of 2, then a "restart" that lost unit 0's marker, as one process.
    config = make_config(media, b, holdout_fraction=fraction)
    tokenization.run(config, tmp_path, process_index=0, process_count=2, batch_size=4)
    units_dir = b / tokenization.UNITS
    (units_dir / "00000.json").unlink()
    tokenization.run(config, tmp_path, process_index=0, process_count=1, batch_size=4)
    train_a, held_a = all_records(a), held_out_records(a)
    for x, y in ((train_a, all_records(b)), (held_a, held_out_records(b))):
        assert list(x) == list(y)
        for path in x:
            assert [records.encode_record(r) for r in x[path]] == [
                records.encode_record(r) for r in y[path]
            ], path
    manifest = shards.read_manifest(a)
    assert manifest == shards.read_manifest(b)

    # A partition of the inputs: every clip of the split-free dataset on exactly one side.
    train_ids = {input_of(r) for rs in train_a.values() for r in rs}
    held_ids = {input_of(r) for rs in held_a.values() for r in rs}
    assert train_ids and held_ids and not train_ids & held_ids
    src = config.data.source
    assert all(holdout.held_out(holdout.key(src, i), 0, fraction) for i in held_ids)
    assert not any(holdout.held_out(holdout.key(src, i), 0, fraction) for i in train_ids)
    assert holdout.key(src, str(media / "sub" / "a.mp4")) == "sub/a.mp4"  # moves with the data
    everything = sorted(records.encode_record(r) for rs in all_records(full).values() for r in rs)
    both = [*train_a.values(), *held_a.values()]
    assert sorted(records.encode_record(r) for rs in both for r in rs) == everything
    split = manifest["holdout"]
    assert split["fraction"] == fraction and split["inputs"] == len(held_ids)
    assert sum(e["count"] for e in split["buckets"].values()) == sum(map(len, held_a.values()))
    assert all(
        not f.startswith("holdout/") for e in manifest["buckets"].values() for f in e["files"]
    )
    with pytest.raises(ValueError, match="job.json|holdout"):  # a changed split is refused
        tokenization.run(make_config(media, a, holdout_fraction=0.5), tmp_path)

    # The training pipeline reads every training record of an epoch and no held-out one.
    pipe = pipeline_lib.Pipeline(
        a, seed=0, global_batch_size=1, data_parallel=1, prefetch=0, process_index=0,
        process_count=1, fields=("latents", "source_id"),
    )  # fmt: skip
    seen = []
    for k, spec in enumerate(pipe.buckets):
        if spec.weight > 0:
            seen += [str(x) for blk in pipe._reader.epoch_dataset(k, 0) for x in blk["source_id"]]
    assert sorted(seen) == sorted(r["source_id"] for rs in train_a.values() for r in rs)


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_uninterrupted_shards(media, tmp_path):
    # 60 good inputs in 30 units: the job runs for seconds, so a kill lands mid-run.
    lines = [
        json.dumps({"path": name, "caption": f"copy {k} of {name}"})
        for k in range(12)
        for name in fx.GOOD
    ]
    (media / "many.jsonl").write_text("\n".join(lines) + "\n")
    args = [a.replace("manifest.jsonl", "many.jsonl") for a in cli_args(media, tmp_path / "x")]
    config = make_config(media, tmp_path / "one")
    config.data.source.manifest = str(media / "many.jsonl")
    tokenization.run(config, tmp_path, batch_size=4, show_progress=False)
    one, out = tmp_path / "one", tmp_path / "x"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list((out / tokenization.UNITS).glob("0*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no unit finished in 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / tokenization.UNITS).glob("0*.json")))
    assert 1 <= done < len(lines) // UNIT and not (out / shards.MANIFEST).exists()
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    stats = json.loads(rerun.stdout.decode().strip().splitlines()[-1])
    assert stats["inputs"] == len(lines) - UNIT * done  # finished units were skipped
    a, b = all_records(one), all_records(out)
    assert list(a) == list(b)
    for path in a:
        assert [r["source_id"] for r in a[path]] == [r["source_id"] for r in b[path]]
        assert [records.encode_record(r) for r in a[path]] == [
            records.encode_record(r) for r in b[path]
        ]
    assert not list(out.glob("*/*.tmp"))  # the killed run's partial shard was rewritten
    assert shards.read_manifest(one)["buckets"] == shards.read_manifest(out)["buckets"]


def test_inspect_reports_buckets_and_writes_decoded_previews(tokenized, tmp_path):
    out, summary = tokenized
    report = previews.inspect(out, output=tmp_path / "previews", per_bucket=2)
    text = previews.format_report(report)
    for name, b in summary["buckets"].items():
        assert report["buckets"][name]["count"] == b["count"]
        if b["count"]:
            assert name in text
            gifs = report["buckets"][name]["previews"]
            assert len(gifs) == min(2, b["count"])
            first = all_records(out)[b["files"][0]][0]
            video = video_io.read_video(gifs[0])
            t, h, w = b["pixel_shape"][:3]
            assert video.shape == (t, h, w, 3)
            # the preview is the stored clip (GIF palette quantization aside)
            stored = (np.asarray(first["latents"], np.float32) + 1) * 127.5
            assert psnr(video, stored) > 25
            assert (tmp_path / "previews" / name / "contact_sheet.png").is_file()
    assert report["rejects"]["unreadable"] == 3


def test_vae_latents_decode_to_the_source_clip_at_the_tokenizers_quality(media, tmp_path):
    from sora_jax.models import tokenizer as tokenizer_lib
    from sora_jax.models import vae, vae_artifact

    cfg = vae.PRESETS["tiny"]
    params = vae.init_params(cfg, jax.random.key(0))
    vae_artifact.export_tokenizer(
        tmp_path / "tok", params, cfg, vae.LatentNorm.identity(cfg.z_dim), name="t"
    )
    (media / "two.jsonl").write_text(
        json.dumps({"path": "landscape.mp4", "caption": "a"})
        + "\n"
        + json.dumps({"path": "tiny.avi", "caption": "b"})
        + "\n"
    )
    config = make_config(media, tmp_path / "data")
    config.data.source.manifest = str(media / "two.jsonl")
    config.tokenizer = ml_collections.ConfigDict(dict(name="vae", path=str(tmp_path / "tok")))
    tokenization.run(config, tmp_path, batch_size=3, show_progress=False)  # 8 devices: pads
    tok = tokenizer_lib.build_tokenizer(config.tokenizer)
    recs = [r for rs in all_records(tmp_path / "data").values() for r in rs]
    assert len(recs) == 3 + 2
    for r in recs:
        name = pathlib.Path(r["source_id"].split("#")[0]).name
        bucket, _, interval = fx.EXPECTED[name]
        start = int(r["source_id"].split("#")[1]) // interval
        ref = reference_clip(media / name, bucket, start, interval)
        direct = np.asarray(tok.encode(ref[None].astype(np.float32) / 127.5 - 1))[0]
        stored = np.asarray(r["latents"], np.float32)
        assert stored.shape == direct.shape
        via_shard = (np.asarray(tok.decode(stored[None]))[0] + 1) * 127.5
        via_direct = (np.asarray(tok.decode(direct[None]))[0] + 1) * 127.5
        assert abs(psnr(via_shard, ref) - psnr(via_direct, ref)) < 0.5


def test_image_folder_and_a_mixture_with_videos(media, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shapes = {"square": (40, 40), "wide": (60, 100), "tall": (50, 30), "nocap": (40, 40)}
    for name, (h, w) in shapes.items():
        Image.fromarray(fx.pattern(0, h, w)).save(images / f"{name}.png")
        if name != "nocap":
            (images / f"{name}.txt").write_text(f"an image {name}\n")
    config = make_config(media, tmp_path / "data")
    with config.unlocked():
        config.data.source = ml_collections.ConfigDict(
            dict(
                name="mixture",
                parts=dict(
                    a_videos=config.data.source.to_dict(),
                    b_images=dict(name="images", folder=str(images), manifest=""),
                ),
            )
        )
    summary = tokenization.run(config, tmp_path, batch_size=4, show_progress=False)
    recs = [r for rs in all_records(tmp_path / "data").values() for r in rs]
    got = {
        pathlib.Path(r["source_id"].split("#")[0]).stem: r["latents"].shape
        for r in recs
        if r["source_id"].startswith("b_images:")
    }
    # sorted file order: nocap, square, tall, wide; each a 1-frame clip of its aspect's bucket
    assert got == {"square": (1, 32, 32, 3), "wide": (1, 24, 40, 3), "tall": (1, 40, 24, 3)}
    assert all(r["fps"] == 0.0 for r in recs if r["source_id"].startswith("b_images:"))
    lines = [json.loads(x) for x in (tmp_path / "data" / shards.REJECTS).read_text().splitlines()]
    bad = {r["id"].split(":", 1)[0] for r in lines}
    assert bad == {"a_videos", "b_images"} and len(lines) == len(fx.BAD) + 1
    assert any(r["id"].endswith("nocap.png") and r["reason"] == "bad_caption" for r in lines)
    assert summary["source"]["num_inputs"] == len(fx.GOOD) + len(fx.BAD) + len(shapes)


def test_a_header_without_length_is_counted_by_decoding(media, monkeypatch):
    from sora_jax.data import sources
    from sora_jax.data import video_files as vf

    assert vf.count_frames(media / "landscape.mp4") == len(
        video_io.read_video(media / "landscape.mp4")
    )
    real = vf.probe

    def no_length(path):  # as a streamed container reports: no frame count, no duration
        info = real(path)
        return vf.VideoInfo(frames=0, fps=info.fps, height=info.height, width=info.width)

    monkeypatch.setattr(vf, "probe", no_length)
    config = make_config(media, media / "unused")
    source = sources.build_source(
        config.data.source,
        buckets_lib.buckets_from_config(config.data),
        sources.ClipOptions.from_config(config.data),
    )
    index = [e.path.name for e in source.entries].index("landscape.mp4")
    clips = source.clips(index)
    bucket, starts, interval = fx.EXPECTED["landscape.mp4"]
    assert [c.bucket for c in clips] == [bucket] * len(starts)
    assert [c.source_id.split("#")[1] for c in clips] == [str(s * interval) for s in starts]
