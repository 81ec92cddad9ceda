"""Packing vs buckets on one mixed set of clips, from shapes alone (no model, no pixels).

    python benchmarks/packing.py [--clips=20000] [--rows=16] [--tokens_per_row=32760] \\
        [--window=1024] [--seed=0]

Draws `--clips` clips from the mixed distribution of docs/data_pipeline.md ("Packing: the
measured distribution": four aspect ratios, three source resolutions, three durations with
jitter, at realistic frequencies) and gives each
- its **native shape** (sora_jax.data.native: max_area 480 x 832, max_frames 81 at 16 fps,
  a causal VAE of stride 4 x 8 x 8 and patch 1 x 2 x 2, so sides are multiples of 16), then
  packs them (sora_jax.data.packing, rows of `--tokens_per_row` tokens, `--rows` rows per
  step, first-fit decreasing over `--window` clips) and reports the padding fraction;
- its **bucket** (sora_jax.data.buckets.assign, crop fit, no upscaling) in a grid of the
  same budget (480p/360p/240p areas x 16:9, 9:16, 4:3, 1:1 x 33, 49, 81 frames), each bucket
  batched to the same tokens per step (`⌊B L / n_b⌋` clips, data.tokens_per_device's rule)
  under the remainder rule, and reports what that wastes: compute slots left empty by
  batches that do not fill the step's budget, samples dropped (the remainder, buckets under
  one batch, clips no bucket takes), and the content each trained clip loses (pixels
  cropped to the bucket's aspect, frames cut to its length, resolution lost to a smaller
  bucket).

Both are one epoch over the same clips. Record the figures in docs/perf.md.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import numpy as np

from sora_jax.data import buckets, native, packing

FPS = 16
# The measured distribution (docs/data_pipeline.md): name -> (value, frequency).
ASPECTS = {"16:9": (16 / 9, 0.55), "9:16": (9 / 16, 0.25), "4:3": (4 / 3, 0.10), "1:1": (1.0, 0.10)}
SHORT_SIDES = {"720p": (720, 0.50), "360p": (360, 0.30), "240p": (240, 0.20)}
SECONDS = {"2s": (2.0, 0.30), "3s": (3.0, 0.30), "5s": (5.0, 0.40)}  # each +-0.5 s uniform
# The native budget and the bucket grid: Wan 2.1's 480p setting (832 x 480, 81 frames).
NATIVE = native.NativeOptions(
    max_area=480 * 832, max_frames=81, multiple=16, temporal=4, patch_frames=1
)
GRID = buckets.grid(
    {"480p": round(math.sqrt(480 * 832)), "360p": round(math.sqrt(360 * 640)), "240p": 320},
    {"16:9": 16 / 9, "9:16": 9 / 16, "4:3": 4 / 3, "1:1": 1.0},
    (33, 49, 81),
    multiple=16,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=20000, help="clips drawn")
    p.add_argument("--rows", type=int, default=16, help="rows (B) per global step")
    p.add_argument("--tokens_per_row", type=int, default=32760, help="L, tokens per row")
    p.add_argument("--window", type=int, default=1024, help="clips per packing window")
    p.add_argument("--max_segments", type=int, default=64, help="clips per row at most")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def draw(n: int, seed: int) -> list[tuple[int, int, int]]:
    """`n` clips as (available frames at 16 fps, displayed height, width)."""
    rng = np.random.default_rng(seed)

    def pick(table):
        values, p = zip(*table.values(), strict=True)
        return np.asarray(values)[rng.choice(len(values), n, p=np.asarray(p) / sum(p))]

    aspect, short, seconds = pick(ASPECTS), pick(SHORT_SIDES), pick(SECONDS)
    seconds = seconds + rng.uniform(-0.5, 0.5, n)
    clips = []
    for a, s, d in zip(aspect, short, seconds, strict=True):
        h, w = (s, round(s * a)) if a >= 1 else (round(s / a), s)
        clips.append((int(d * FPS) + 1, int(h), int(w)))
    return clips


def tokens(t: int, h: int, w: int) -> int:
    """Tokens of a pixel clip: causal VAE 4 x 8 x 8, patch 1 x 2 x 2."""
    return (1 + (t - 1) // 4) * (h // 16) * (w // 16)


def packed(clips, args) -> dict:
    shapes = [NATIVE.bucket(*c) for c in clips]
    kept = [i for i, s in enumerate(shapes) if not isinstance(s, str)]
    n = [tokens(shapes[i].frames, shapes[i].height, shapes[i].width) for i in kept]
    crop = []  # the rounding: pixels of the resized frame cut to multiples of 16
    for i in kept:
        t, h, w = clips[i]
        g = buckets.fit_geometry(h, w, shapes[i], "crop")
        crop.append(1 - shapes[i].height * shapes[i].width / (g.resize[0] * g.resize[1]))
    opts = packing.PackingOptions(args.tokens_per_row, args.rows, args.window, args.max_segments)
    report = packing.PackPlan(n, args.seed, opts).report(0)
    return {
        **report,
        "dropped_clips": len(clips) - len(kept),
        "shapes": len({(s.frames, s.height, s.width) for s in (shapes[i] for i in kept)}),
        "cropped_pixels": float(np.mean(crop)),
        "native_tokens": dict(zip(kept, n, strict=True)),
    }


def bucketed(clips, native_tokens: dict[int, int], args) -> dict:
    table = [
        buckets.Bucket(name, spec["frames"], spec["height"], spec["width"])
        for name, spec in GRID.items()
    ]
    by_name = {b.name: b for b in table}
    budget = args.rows * args.tokens_per_row  # tokens per step, as a packed step
    members: dict[str, list[int]] = {}
    unplaced = Counter()  # why no bucket takes a clip
    for i, (t, h, w) in enumerate(clips):
        b = buckets.assign(t, h, w, table, key=str(i), policy="crop")
        if b is None:
            unplaced["too_short" if all(x.frames > t for x in table) else "too_small"] += 1
        else:
            members.setdefault(b.name, []).append(i)
    slots = useful = dropped = 0
    content = 0.0  # native tokens' worth of content the trained clips keep
    content_kept, crop, cut, res = [], [], [], []
    for name, ids in members.items():
        b = by_name[name]
        n_b = tokens(b.frames, b.height, b.width)
        g = budget // n_b  # clips per step at this token budget
        steps = len(ids) // g  # the remainder rule; 0 = under one batch, left out
        slots += steps * budget
        useful += steps * g * n_b
        dropped += len(ids) - steps * g
        for k, i in enumerate(ids):  # the first steps * g stand for the trained ones
            t, h, w = clips[i]
            geo = buckets.fit_geometry(h, w, b, "crop")
            fov = b.height * b.width / (geo.resize[0] * geo.resize[1])  # of the frame kept
            nat = NATIVE.bucket(t, h, w)
            frames = b.frames / nat.frames if not isinstance(nat, str) else 1.0
            scale = (geo.resize[0] / h) / (nat.height / h) if not isinstance(nat, str) else 1
            crop.append(1 - fov)
            cut.append(1 - min(1.0, frames))
            res.append(1 - min(1.0, scale**2))
            content_kept.append(fov * min(1.0, frames) * min(1.0, scale**2))
            if k < steps * g:
                content += native_tokens.get(i, 0) * content_kept[-1]
    unplaced_total = sum(unplaced.values())
    trained = len(clips) - dropped - unplaced_total
    return {
        "buckets_used": sum(1 for ids in members.values() if ids),
        "token_slots": slots,
        "useful_tokens": useful,
        "padding_fraction": 1 - useful / slots if slots else 1.0,
        "dropped_clips": dropped + unplaced_total,
        "dropped_fraction": (dropped + unplaced_total) / len(clips),
        "dropped_too_short": unplaced["too_short"] / len(clips),
        "dropped_too_small": unplaced["too_small"] / len(clips),
        "dropped_remainder": dropped / len(clips),  # remainder rule, buckets under a batch
        "trained_clips": trained,
        "cropped_pixels": float(np.mean(crop)),
        "cut_frames": float(np.mean(cut)),
        "resolution_lost": float(np.mean(res)),
        "content_kept": float(np.mean(content_kept)),
        "content_per_slot": content / slots if slots else 0.0,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    clips = draw(args.clips, args.seed)
    p = packed(clips, args)
    nat = p.pop("native_tokens")
    b = bucketed(clips, nat, args)
    # Native content reaching the model per computed token slot: packing trains every
    # clip whole; buckets train the kept part of the clips they do not drop.
    p_eff = sum(nat.values()) / p["token_slots"]
    b_eff = b["content_per_slot"]
    mix = Counter(f"{t}" for t, _, _ in clips)
    print(
        f"clips {len(clips)}  ({len(mix)} frame counts, {p['shapes']} native shapes; "
        f"B={args.rows} rows x L={args.tokens_per_row} tokens, window {args.window})"
    )
    print("                              packed     bucketed")
    print(f"padding fraction          {p['padding_fraction']:9.4f}  {b['padding_fraction']:9.4f}")
    dropped = p["dropped_clips"] / len(clips)
    print(f"dropped clips fraction    {dropped:9.4f}  {b['dropped_fraction']:9.4f}")
    print(
        f"  of which too short {b['dropped_too_short']:.4f}, too small (no bucket without "
        f"upscaling) {b['dropped_too_small']:.4f}, remainder rule {b['dropped_remainder']:.4f}"
    )
    print(f"cropped pixels            {p['cropped_pixels']:9.4f}  {b['cropped_pixels']:9.4f}")
    print(f"cut frames                {0.0:9.4f}  {b['cut_frames']:9.4f}")
    print(f"resolution lost           {0.0:9.4f}  {b['resolution_lost']:9.4f}")
    print(f"content per token slot    {p_eff:9.4f}  {b_eff:9.4f}")
    print(
        f"packed: {p['rows']} rows, {p['clips_per_row']:.2f} clips/row, order shift mean "
        f"{p['order_shift_mean']:.0f} clips; bucketed: {b['buckets_used']} buckets"
    )
    print(json.dumps({"packed": p, "bucketed": b}, sort_keys=True))


if __name__ == "__main__":
    main()
