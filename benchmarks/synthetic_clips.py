"""Rendering time of the synthetic captioned clips (sora_jax.data.synthetic), per clip shape.

    python benchmarks/synthetic_clips.py [--clips=500] [--shapes=9x32x32,5x16x16,17x64x64]

Renders clips 0 .. N-1 of seed 0 with `synthetic.synthetic_clip` (spec, render,
caption; what the tokenization job's synthetic source does per clip) and prints ms/clip
and clips/s for each `frames x height x width`. Record results in docs/perf.md.
"""

from __future__ import annotations

import argparse
import time

from sora_jax.data import synthetic


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=500, help="clips rendered per shape")
    p.add_argument("--shapes", default="9x32x32,5x16x16,17x64x64", help="T x H x W, comma list")
    args = p.parse_args(argv)
    print(f"{'shape':>10} {'clips':>6} {'ms/clip':>8} {'clips/s':>9}")
    rows = []
    for shape in args.shapes.split(","):
        t, h, w = (int(n) for n in shape.split("x"))
        synthetic.synthetic_clip(0, 0, t, h, w)  # one untimed warm-up call
        start = time.perf_counter()
        for i in range(args.clips):
            synthetic.synthetic_clip(i, 0, t, h, w)
        seconds = time.perf_counter() - start
        ms = 1e3 * seconds / args.clips
        rows.append({"shape": shape, "clips": args.clips, "ms_per_clip": ms})
        print(f"{shape:>10} {args.clips:>6} {ms:>8.3f} {args.clips / seconds:>9.0f}")
    return rows


if __name__ == "__main__":
    main()
