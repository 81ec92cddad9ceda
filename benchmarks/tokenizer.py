r"""Encode and decode throughput (pixel frames per second) of the VAE tokenizer.

    python benchmarks/tokenizer.py --preset=tiny --clip=17x64x64 --batch=2
    python benchmarks/tokenizer.py --artifact=runs/vae/tokenizer --clip=9x32x32 --batch=8
    python benchmarks/tokenizer.py --preset=wan2_1 --clip=17x256x256 --chunk=1

A preset uses freshly initialized weights (speed does not depend on their values); an
artifact is loaded as the `vae` tokenizer loads it. The first call of each function
compiles and is not timed; then `--iters` calls are timed to completion. Frames/s counts
pixel frames `B · T` (what a tokenizer pass over a dataset processes). Record results in
docs/vae.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from sora_jax.models import vae as vae_lib
from sora_jax.models import vae_artifact


def timed(fn, iters: int) -> float:
    """Seconds per call of `fn()` after one untimed warm-up (compilation) call."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / iters


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help=f"one of {list(vae_lib.PRESETS)}")
    p.add_argument("--artifact", default="", help="tokenizer directory (overrides --preset)")
    p.add_argument("--clip", default="17x64x64", help="pixel frames x height x width")
    p.add_argument("--batch", type=int, default=1, help="clips per call")
    p.add_argument("--chunk", type=int, default=0, help="decode latent frames per chunk; 0=all")
    p.add_argument("--tile", type=int, default=0, help="decode latent tile side; 0 = whole")
    p.add_argument("--iters", type=int, default=3, help="timed calls (after one warm-up)")
    args = p.parse_args(argv)

    if args.artifact:
        tok = vae_artifact.load_tokenizer(args.artifact)
        cfg, params, norm, name = tok.config, tok.params, tok.norm, tok.id
    else:
        cfg = vae_lib.PRESETS[args.preset]
        params = vae_lib.init_params(cfg, jax.random.key(0))
        norm, name = vae_lib.LatentNorm.identity(cfg.z_dim), f"preset {args.preset}"
    t, h, w = (int(n) for n in args.clip.split("x"))
    if (t - 1) % cfg.temporal or h % cfg.spatial or w % cfg.spatial:
        raise SystemExit(
            f"--clip={args.clip}: frames must be 1 + {cfg.temporal}k and height, width "
            f"multiples of {cfg.spatial} for {name}"
        )
    video = np.random.default_rng(0).uniform(-1, 1, (args.batch, t, h, w, 3)).astype(np.float32)
    video = jax.device_put(video)
    latents = vae_lib.encode(cfg, params, norm, video)

    enc_s = timed(lambda: vae_lib.encode(cfg, params, norm, video), args.iters)
    dec_s = timed(
        lambda: vae_lib.decode(cfg, params, norm, latents, chunk_frames=args.chunk, tile=args.tile),
        args.iters,
    )
    frames = args.batch * t
    result = {"encode_frames_per_s": frames / enc_s, "decode_frames_per_s": frames / dec_s}
    print(
        f"{name}: clip {args.batch}x{args.clip} -> latents {'x'.join(map(str, latents.shape))}, "
        f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s))"
    )
    print(f"  encode {enc_s * 1e3:9.1f} ms/call  {result['encode_frames_per_s']:9.1f} frames/s")
    print(
        f"  decode {dec_s * 1e3:9.1f} ms/call  {result['decode_frames_per_s']:9.1f} frames/s"
        f"  (chunk={args.chunk}, tile={args.tile})"
    )
    return result


if __name__ == "__main__":
    main()
