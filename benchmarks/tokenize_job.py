r"""Throughput of the tokenization job on real video files, and where the time goes.

    python benchmarks/tokenize_job.py                       # 32 H.264 640x360 24 fps videos
    python benchmarks/tokenize_job.py --videos=64 --size=720x1280 --tokenizer=vae

Writes `--videos` H.264 mp4 files of `--frames` frames (smooth ramps and a moving square)
with PyAV into a temporary folder with sidecar captions, then runs the real job
(sora_jax.data.tokenization, config experiments/videos.py:tiny: a 32px bucket grid, target
12 fps, up to 2 clips per video) and prints clips/s with the split reported by the job:
decode (FFmpeg decoding), resize (RGB conversion, swscale resize, crop), encode (tokenizer +
text encoder), write (record serialization + ArrayRecord). `--tokenizer=vae` encodes with
a freshly initialized `tiny` causal VAE (its speed does not depend on the weights) instead
of the pixels tokenizer. Record results in docs/perf.md.
"""

from __future__ import annotations

import argparse
import fractions
import json
import pathlib
import tempfile
import time

import av
import jax
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax.data import tokenization

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_videos(folder: pathlib.Path, n: int, size: tuple[int, int], frames: int, fps: int):
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([40 + 160 * x / w, 40 + 160 * y / h, np.full_like(x, 90.0)], -1)
    for i in range(n):
        path = folder / f"clip{i:04d}.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=fractions.Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for t in range(frames):
                img = base.copy()
                left = (t * 7 + i * 13) % (w - h // 4)
                img[h // 3 : h // 3 + h // 4, left : left + h // 4] = (250, 250, 60)
                frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        path.with_suffix(".txt").write_text(f"a yellow square, video {i}\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--size", default="360x640", help="height x width of the source videos")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--tokenizer", default="pixels", choices=["pixels", "vae"])
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "videos").mkdir()
        t0 = time.perf_counter()
        write_videos(tmp / "videos", args.videos, size, args.frames, args.fps)
        made = time.perf_counter() - t0
        config = config_lib.load_config(
            f"{ROOT}/experiments/videos.py:tiny,folder={tmp / 'videos'},fps=12"
        )
        config.data.dataset_dir = str(tmp / "data")
        config.data.tokenize.clip_stride = 8
        config.data.tokenize.max_clips_per_video = 2
        config.data.tokenize.inputs_per_shard = 16
        if args.tokenizer == "vae":
            from sora_jax.models import vae, vae_artifact

            cfg = vae.PRESETS["tiny"]
            params = vae.init_params(cfg, jax.random.key(0))
            norm = vae.LatentNorm.identity(cfg.z_dim)
            vae_artifact.export_tokenizer(tmp / "tok", params, cfg, norm, name="bench")
            config.tokenizer = ml_collections.ConfigDict(dict(name="vae", path=str(tmp / "tok")))
        summary = tokenization.run(config, tmp, batch_size=args.batch, show_progress=False)
    s = summary["stats"]
    split = s["time_split_s"]
    result = {
        "device": jax.devices()[0].device_kind,
        "videos": args.videos,
        "source": f"{args.size} {args.fps} fps, {args.frames} frames, H.264",
        "tokenizer": args.tokenizer,
        "clips": s["clips_written"],
        "seconds": round(s["seconds"], 2),
        "clips_per_s": round(s["clips_per_s"], 2),
        "videos_per_s": round(s["inputs_per_s"], 2),
        "split_s": split,
        "split_pct": {k: round(100 * v / s["seconds"], 1) for k, v in split.items()},
        "making_the_videos_s": round(made, 2),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
