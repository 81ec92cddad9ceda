r"""Held-out reconstruction PSNR of the trained VAE tokenizer against blurred baselines.

    python benchmarks/vae_quality.py --config=experiments/vae.py --workdir=runs/vae
    python benchmarks/vae_quality.py --config=experiments/vae.py --workdir=runs/vae --eval_only

Trains with `sora_jax.training.loop.train` (resuming in WORKDIR; `--eval_only` reuses
WORKDIR/tokenizer), then scores the held-out clips (indices N .. N + data.eval_clips - 1
of the synthetic set, never trained on) by mean per-clip PSNR, pixels in [-1, 1] with
peak-to-peak 2 (the PSNR of [0, 1] pixels):

- model:        the tokenizer round trip `decode(encode(x))` (WORKDIR/tokenizer);
- blurred mean: every frame replaced by the clip's temporal mean frame, box-blurred by
                s x s average pooling and nearest upsampling (s = spatial compression);
- box per frame (reference): each frame s x s average pooled and upsampled, no temporal
                mean: 3 values per latent pixel per *pixel* frame.

Record results in docs/vae.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from sora_jax import config as config_lib
from sora_jax.models import vae_artifact
from sora_jax.training import loop
from sora_jax.training import vae as vae_training


def box(x: np.ndarray, s: int) -> np.ndarray:
    """`[..., H, W, 3]` -> s x s block means repeated back to `[..., H, W, 3]`."""
    *lead, h, w, c = x.shape
    blocks = x.reshape(*lead, h // s, s, w // s, s, c).mean(axis=(-4, -2))  # [..., H/s, W/s, 3]
    return np.repeat(np.repeat(blocks, s, axis=-3), s, axis=-2)


def blurred_mean(x: np.ndarray, s: int) -> np.ndarray:
    """Clips `[B, T, H, W, 3]` -> each clip's temporal mean frame, box-blurred, over all T."""
    return np.broadcast_to(box(x.mean(axis=1, keepdims=True), s), x.shape)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/vae.py", help="experiment file[:variant]")
    p.add_argument("--workdir", required=True, help="run directory (tokenizer in ./tokenizer)")
    p.add_argument("--eval_only", action="store_true", help="reuse WORKDIR/tokenizer")
    args = p.parse_args(argv)
    config = config_lib.load_config(args.config)

    start = time.perf_counter()
    if not args.eval_only:
        summary = loop.train(config, args.workdir)  # model.name='causal_vae'
        print(json.dumps(summary, indent=2))
    train_s = time.perf_counter() - start
    path = pathlib.Path(config.export.dir or pathlib.Path(args.workdir) / "tokenizer")
    tok = vae_artifact.load_tokenizer(path)
    s = tok.config.spatial

    scores = {"model": [], "blurred_mean": [], "box_per_frame": []}
    for x in vae_training.held_out(config):
        scores["model"].append(vae_training.psnr(x, np.asarray(tok.decode(tok.encode(x)))))
        scores["blurred_mean"].append(vae_training.psnr(x, blurred_mean(x, s)))
        scores["box_per_frame"].append(vae_training.psnr(x, box(x, s)))
    result = {k: float(np.mean(np.concatenate(v))) for k, v in scores.items()}
    d = config.data
    latent = tok.latent_shape(d.frames, d.height, d.width)
    pixels = d.frames * d.height * d.width * 3
    print(f"tokenizer {tok.id} hash {tok.hash[:16]}  clip {d.frames}x{d.height}x{d.width}x3 -> ")
    print(f"  latent {'x'.join(map(str, latent))} ({pixels / np.prod(latent):.1f}x fewer values)")
    print(f"held-out clips: {d.eval_clips}   train+export wall: {train_s:.0f} s")
    for name, value in result.items():
        print(f"  PSNR {name:<14} {value:6.2f} dB")
    return {**result, "train_wall_s": train_s}


if __name__ == "__main__":
    main()
