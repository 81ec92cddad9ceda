"""Useful tokens per second of the packed train step against the bucketed one, in one run.

    python benchmarks/packed_step.py [--clips=2000] [--space=2] [--time=4] [--rows=2] \\
        [--dim=64] [--layers=2] [--text_len=32] [--reps=5] [--iters=2]

The clips are benchmarks/packing.py's mixed distribution (docs/data_pipeline.md, "Packing:
the measured distribution": aspect, source resolution and duration at their frequencies),
scaled down so a CPU can step them: pixel sides / `--space`, frame rate / `--time` (the
native budget 480 x 832 px, 81 frames and the 36-bucket grid scaled alike; VAE 4 x 8 x 8,
patch 1 x 2 x 2, 16 latent channels). At the defaults a clip is 98 to 2,244 tokens and
`L` = the largest clip's tokens.

- **packed**: one epoch of rows of `L` tokens (sora_jax.data.packing, first-fit decreasing),
  `--rows` rows per step, every clip at its native shape; one executable
  (`step.jit_packed_train_step`, compiled as `plan.compile_packed_step` does), timed on the
  epoch's real rows (segment ids, positions, per-clip captions).
- **bucketed**: the same clips assigned to the scaled grid (crop, no upscaling), each bucket
  batched to the same `B L` tokens per step (`⌊B L / n_b⌋` clips) under the remainder rule,
  as benchmarks/packing.py models it: clips that are too short, too small or in the remainder
  are dropped; one executable per trained bucket (`step.jit_train_step`, compiled by
  `plan.compile_steps`), each timed on a batch of its shape.

Both use the same model, AdamW (`experiments/demo.py`'s optimizer, EMA, donation) and one
state; random latents and captions (`--text_len` tokens each, all valid). Each repetition
times the packed step (`--iters` steps on each of up to 8 of the epoch's batches), then every
bucket's step (`--iters` steps each), alternating; an epoch's time is `E_packed t_packed`
against `Σ_b E_b t_b`, `E` the steps per epoch (`--clock=cpu`: CPU seconds of the process,
steadier than wall seconds on a machine other jobs share). Per epoch, it reports:

- **tokens stepped / s**: non-padding video tokens the step computes on: packed, every
  clip's native tokens; bucketed, `E_b ⌊B L / n_b⌋ n_b` (cropped, shortened clips, dropped
  ones absent);
- **native tokens covered / s**: each trained clip's native tokens times the fraction of its
  content the step sees (packed: 1; bucketed: pixels kept by the crop x frames kept x the
  area kept by a smaller bucket, as benchmarks/packing.py counts it); a dropped clip
  covers nothing.

and their packed / bucketed ratios, the median over repetitions; and, load-independent, the
model's forward FLOPs per token stepped on each side (`forward_flops`: counted from the
shapes, every row slot of the packed step, and what attention over each clip's own
`n_i²` scores would leave), whose ratio is the tokens / s ratio at equal FLOP rates. A
dropped clip or a cropped pixel costs the bucketed step nothing, so it is waste of data
(coverage per epoch, benchmarks/packing.py), not of compute. Figures in docs/perf.md.
`--max_buckets=N` times only the N most-stepped buckets (a partial epoch, for the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import numpy as np
import packing as distribution  # benchmarks/packing.py: benchmarks/ leads sys.path
from flax import linen as nn

from sora_jax import config as config_lib
from sora_jax.data import buckets, native
from sora_jax.data import packing as packing_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.training import plan
from sora_jax.training import step as step_lib

CHANNELS = 16  # latent channels of the causal VAE (Wan 2.1's)
PATCH = (1, 2, 2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=2000, help="clips drawn")
    p.add_argument("--space", type=int, default=2, help="pixel sides divided by this")
    p.add_argument("--time", type=int, default=4, choices=(1, 2, 4), help="fps divided by this")
    p.add_argument("--rows", type=int, default=2, help="B: rows per packed step")
    p.add_argument("--tokens_per_row", type=int, default=0, help="L; 0 = the largest clip's")
    p.add_argument("--window", type=int, default=256, help="clips per packing window")
    p.add_argument("--max_segments", type=int, default=8, help="K: clips per row at most")
    p.add_argument("--dim", type=int, default=64, help="DiT width")
    p.add_argument("--layers", type=int, default=2, help="DiT blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text_len", type=int, default=32, help="S: text tokens per caption")
    p.add_argument("--attention", default="blockwise", help="model.attention_impl")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    p.add_argument("--iters", type=int, default=2, help="timed steps per executable per batch")
    p.add_argument("--batches", type=int, default=8, help="packed batches timed per rep")
    p.add_argument(
        "--max_buckets", type=int, default=0,
        help="time only the N buckets with the most steps (a partial figure: tests); 0 = all",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="what a step's time is")
    return p.parse_args(argv)


def scaled(args):
    """The distribution's clips, native budget and bucket grid, scaled by --space/--time."""
    s, r = args.space, args.time
    clips = [
        (1 + (t - 1) // r, round(h / s), round(w / s))
        for t, h, w in distribution.draw(args.clips, args.seed)
    ]
    opts = native.NativeOptions(
        max_area=480 * 832 // s**2, max_frames=1 + 80 // r, multiple=16, temporal=4
    )
    grid = buckets.grid(
        {
            "480p": round(math.sqrt(480 * 832) / s),
            "360p": round(math.sqrt(360 * 640) / s),
            "240p": round(320 / s),
        },
        {"16:9": 16 / 9, "9:16": 9 / 16, "4:3": 4 / 3, "1:1": 1.0},
        (1 + 32 // r, 1 + 48 // r, 1 + 80 // r),
        multiple=16,
    )
    return clips, opts, grid


def bucket_epoch(clips, native_tokens: dict[int, int], opts, grid, budget: int) -> dict:
    """One bucketed epoch as benchmarks/packing.py's `bucketed` models it: each clip to its
    bucket (crop, no upscaling), `⌊budget / n_b⌋` clips per step, the remainder rule. Per
    trained bucket: its shape, tokens per clip, batch, steps and the native content its
    trained clips keep (native tokens x pixels kept x frames kept x area kept)."""
    table = [
        buckets.Bucket(name, spec["frames"], spec["height"], spec["width"])
        for name, spec in grid.items()
    ]
    members: dict[str, list[int]] = {}
    unplaced = 0
    for i, (t, h, w) in enumerate(clips):
        b = buckets.assign(t, h, w, table, key=str(i), policy="crop")
        if b is None:
            unplaced += 1
        else:
            members.setdefault(b.name, []).append(i)
    by_name = {b.name: b for b in table}
    per_bucket, dropped, kept = {}, unplaced, []
    for name, ids in members.items():
        b = by_name[name]
        n_b = distribution.tokens(b.frames, b.height, b.width)
        g = budget // n_b
        steps = len(ids) // g  # 0: fewer clips than one batch, left out
        dropped += len(ids) - steps * g
        content = 0.0
        for i in ids[: steps * g]:  # the first steps * g stand for the trained ones
            t, h, w = clips[i]
            geo = buckets.fit_geometry(h, w, b, "crop")
            fov = b.height * b.width / (geo.resize[0] * geo.resize[1])
            nat = opts.bucket(t, h, w)
            frames, scale = 1.0, 1.0
            if not isinstance(nat, str):
                frames = min(1.0, b.frames / nat.frames)
                scale = min(1.0, (geo.resize[0] / nat.height) ** 2)
            kept.append(fov * frames * scale)
            content += native_tokens.get(i, 0) * kept[-1]
        if steps:
            per_bucket[name] = dict(bucket=b, tokens=n_b, batch=g, steps=steps, content=content)
    slots = budget * sum(e["steps"] for e in per_bucket.values())
    useful = sum(e["steps"] * e["batch"] * e["tokens"] for e in per_bucket.values())
    return {
        "per_bucket": per_bucket,
        "padding_fraction": 1 - useful / slots,
        "dropped_fraction": dropped / len(clips),
        "content_kept": float(np.mean(kept)),
    }


def forward_flops(args, rows: int, length: int, native: list[int], steps: int, per_bucket):
    """Model forward FLOPs per epoch, counted: per token and block `28 D²` (q, k, v, o,
    the cross-attention's q and o, an MLP of 4 D) + `4 n_ctx D` (self-attention scores and
    values over `n_ctx` keys) + `4 S_ctx D` (cross-attention over `S_ctx` text tokens);
    training is about 3x forward on both sides. Packed: every row slot, `n_ctx = L` (every
    block computed, as the kernels do today) or the clip's own `n_i` (segment-skipping
    attention: `Σ n_i²`), `S_ctx = K S`; bucketed: `n_ctx = n_b`, `S_ctx = S`. The timestep
    path (per sample, or per time slot of a row) and the text's own projections are left out."""
    d, layers, s_ctx = args.dim, args.layers, args.max_segments * args.text_len
    slots = steps * rows * length
    dense = 28 * d * d + 4 * s_ctx * d
    packed = layers * slots * (dense + 4 * length * d)
    skipping = layers * (slots * dense + 4 * d * sum(n * n for n in native))
    bucketed = layers * sum(
        e["steps"] * e["batch"] * e["tokens"] * (28 * d * d + 4 * (e["tokens"] + args.text_len) * d)
        for e in per_bucket.values()
    )
    return {"packed": packed, "packed_segment_skipping": skipping, "bucketed": bucketed}


def latent(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent `[T', H', W', C]` of a pixel shape: causal VAE 4 x 8 x 8."""
    return (1 + (frames - 1) // 4, height // 8, width // 8, CHANNELS)


def make_config(args, length: int, bucket_shape):
    c = config_lib.load_config("experiments/demo.py:packed")
    c.model.update(
        dim=args.dim, num_layers=args.layers, num_heads=args.heads, mlp_dim=4 * args.dim,
        patch_size=PATCH, attention_impl=args.attention, pos_embed="none",
    )  # fmt: skip
    c.text_encoder.max_length = args.text_len
    f, h, w = bucket_shape
    with c.unlocked():  # one bucket the model is initialized from (plan.packed_init_manifest)
        c.data.buckets = {"init": dict(frames=f, height=h, width=w, weight=1.0)}
    c.data.packing.update(
        tokens_per_row=length, rows_per_batch=args.rows, window=args.window,
        max_segments=args.max_segments,
    )  # fmt: skip
    c.diffusion.caption_dropout = 0.1
    return c


def packed_batches(plan_, grids, args, length, rng, count):
    """Host arrays of the first `count` steps of epoch 0 (PackedPipeline's layout, random
    latents and captions)."""
    b, k, s = args.rows, args.max_segments, args.text_len
    out = []
    for step in range(count):
        batch = {
            "tokens": rng.standard_normal((b, length, 4 * CHANNELS)).astype(np.float32),
            "segment_ids": np.zeros((b, length), np.int32),
            "positions": np.zeros((b, length, 3), np.int32),
            "segment_shapes": np.zeros((b, k, 3), np.int32),
            "text": rng.standard_normal((b, k, s, 64)).astype(np.float32),
            "text_mask": np.ones((b, k, s), bool),
        }
        for r, row in enumerate(plan_.batch(step)):
            cursor = 0
            for j, i in enumerate(row):
                n = int(np.prod(grids[i]))
                batch["segment_ids"][r, cursor : cursor + n] = j + 1
                batch["positions"][r, cursor : cursor + n] = packing_lib._grid(grids[i])
                batch["segment_shapes"][r, j] = grids[i]
                cursor += n
        out.append(batch)
    return out


# --clock: wall seconds, or the CPU seconds of all the process's threads (steadier than wall
# time on a machine shared with other jobs: time spent waiting for a core is not counted).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step, state, batches, iters, clock=time.perf_counter):
    """Runs `iters` steps on each batch; returns (state, seconds per step on `clock`)."""
    state, metrics = step(state, batches[0])  # a first call outside the clock
    jax.block_until_ready(metrics)
    t0 = clock()
    for batch in batches:
        for _ in range(iters):
            state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return state, (clock() - t0) / (iters * len(batches))


def main(argv=None) -> None:
    args = parse_args(argv)
    clips, opts, grid = scaled(args)
    shapes = [opts.bucket(*c) for c in clips]
    kept = [i for i, sh in enumerate(shapes) if not isinstance(sh, str)]
    grids = {
        i: np.array(latent(shapes[i].frames, shapes[i].height, shapes[i].width)[:3])
        // np.array(PATCH)
        for i in kept
    }
    n_native = {i: int(np.prod(g)) for i, g in grids.items()}
    length = args.tokens_per_row or max(n_native.values())
    order = np.array(kept)
    b = bucket_epoch(clips, n_native, opts, grid, args.rows * length)
    per_bucket = b.pop("per_bucket")
    trained_buckets = len(per_bucket)
    if args.max_buckets > 0:  # the most-stepped buckets only: a partial bucketed epoch
        top = sorted(per_bucket, key=lambda k: -per_bucket[k]["steps"])[: args.max_buckets]
        per_bucket = {k: per_bucket[k] for k in top}
    pack_plan = packing_lib.PackPlan(
        [n_native[i] for i in order],
        args.seed,
        packing_lib.PackingOptions(length, args.rows, args.window, args.max_segments),
    )
    report = pack_plan.report(0)
    steps_packed = report["steps"]
    native_total = sum(n_native.values())

    # One model and state for both steps (parameters do not depend on the video's shape).
    biggest = max(per_bucket.values(), key=lambda e: e["tokens"])["bucket"]
    config = make_config(args, length, (biggest.frames, biggest.height, biggest.width))
    mesh = mesh_lib.create_mesh(config.mesh)
    rules = mesh_lib.logical_rules(config.mesh)
    geometry = {
        "tokenizer": {"latent_channels": CHANNELS},
        "text_encoder": {"dim": 64, "max_length": args.text_len, "embed": "tokenize"},
        "buckets": {
            name: {"shape": list(latent(e["bucket"].frames, e["bucket"].height, e["bucket"].width))}
            for name, e in per_bucket.items()
        },
    }
    init_geometry = plan.packed_init_manifest(config, geometry)
    model, tx, init_fn, abstract, shardings = setup.setup_state(config, init_geometry, mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    params = state_lib.param_count(state.params)

    t0 = time.perf_counter()
    packed_jit = step_lib.jit_packed_train_step(model, tx, config, mesh, shardings)
    packed_exe, _ = plan.compile_packed_step(
        packed_jit,
        abstract,
        plan.packed_abstract_batch(config, geometry, mesh),
        config,
        mesh,
        rules,
    )
    packed_compile = time.perf_counter() - t0
    steps = [
        plan.StepShape(name, tuple(geometry["buckets"][name]["shape"]), e["batch"])
        for name, e in per_bucket.items()
    ]
    t0 = time.perf_counter()
    bucket_jit = step_lib.jit_train_step(model, tx, config, mesh, shardings)
    bucket_exes, _ = plan.compile_steps(bucket_jit, abstract, geometry, steps, config, mesh, rules)
    bucket_compile = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)
    sharding = mesh_lib.batch_sharding(mesh)

    def put(batch):
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}

    pbatches = [
        put(x)
        for x in packed_batches(pack_plan, [grids[i] for i in order], args, length, rng,
                                min(args.batches, steps_packed))
    ]  # fmt: skip
    bbatches = {
        st.key: put(
            {
                "latents": rng.standard_normal((st.global_batch, *st.shape)).astype(np.float16),
                "text": rng.standard_normal((st.global_batch, args.text_len, 64)).astype(
                    np.float32
                ),
                "text_mask": np.ones((st.global_batch, args.text_len), bool),
            }
        )
        for st in steps
    }
    stepped = {
        "packed": native_total,
        "bucketed": sum(e["steps"] * e["batch"] * e["tokens"] for e in per_bucket.values()),
    }
    covered = {"packed": native_total, "bucketed": sum(e["content"] for e in per_bucket.values())}
    flops = forward_flops(
        args, args.rows, length, list(n_native.values()), steps_packed, per_bucket
    )
    # Tokens per FLOP against the bucketed step: the ratio tokens / s would have at equal
    # FLOP rates (with `Σ n_i²` attention, what skipping disjoint segments' blocks could give).
    flop_ratio = {
        k: (stepped["packed"] / flops[k]) / (stepped["bucketed"] / flops["bucketed"])
        for k in ("packed", "packed_segment_skipping")
    }
    reps, clock = [], CLOCKS[args.clock]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for _ in range(args.reps):
            state, t_packed = timed(packed_exe, state, pbatches, args.iters, clock)
            t_bucket = {}
            for st in steps:
                state, t_bucket[st.key] = timed(bucket_exes[st.key], state, [bbatches[st.key]],
                                                args.iters, clock)  # fmt: skip
            epoch = {
                "packed": steps_packed * t_packed,
                "bucketed": sum(per_bucket[k]["steps"] * t for k, t in t_bucket.items()),
            }
            reps.append({"t_packed": t_packed, "t_bucket": t_bucket, "epoch_s": epoch})

    def median(fn):
        return statistics.median(fn(r) for r in reps)

    figures = {}
    for side in ("packed", "bucketed"):
        figures[side] = {
            "epoch_s": median(lambda r, s=side: r["epoch_s"][s]),
            "tokens_stepped_per_s": median(lambda r, s=side: stepped[s] / r["epoch_s"][s]),
            "native_tokens_covered_per_s": median(lambda r, s=side: covered[s] / r["epoch_s"][s]),
        }
    ratio_stepped = median(
        lambda r: (
            stepped["packed"]
            / r["epoch_s"]["packed"]
            / (stepped["bucketed"] / r["epoch_s"]["bucketed"])
        )
    )
    ratio_covered = median(
        lambda r: (
            covered["packed"]
            / r["epoch_s"]["packed"]
            / (covered["bucketed"] / r["epoch_s"]["bucketed"])
        )
    )
    slot_s_packed = median(lambda r: r["t_packed"] / (args.rows * length))
    slot_s_bucket = median(
        lambda r: (
            sum(per_bucket[k]["steps"] * t for k, t in r["t_bucket"].items())
            / sum(e["steps"] * e["batch"] * e["tokens"] for e in per_bucket.values())
        )
    )

    print(
        f"clips {len(clips)} (space /{args.space}, time /{args.time}): {len(kept)} kept "
        f"native, {len({tuple(g) for g in grids.values()})} shapes, "
        f"{min(n_native.values())}-{max(n_native.values())} tokens; DiT dim {args.dim} x "
        f"{args.layers} blocks ({params:,} parameters), text {args.text_len} tokens, "
        f"attention {args.attention}, devices {jax.devices()[0].device_kind}"
    )
    print(
        f"packed: {steps_packed} steps of {args.rows} x {length} tokens, padding "
        f"{report['padding_fraction']:.4f}, {report['clips_per_row']:.2f} clips/row, one "
        f"executable (compile {packed_compile:.1f} s)"
    )
    print(
        f"bucketed: {sum(e['steps'] for e in per_bucket.values())} steps over "
        f"{len(per_bucket)} of {trained_buckets} trained buckets ({len(per_bucket)} "
        f"executables, compile "
        f"{bucket_compile:.1f} s), padding {b['padding_fraction']:.4f}, clips dropped "
        f"{b['dropped_fraction']:.4f}, content kept per trained clip {b['content_kept']:.4f}"
    )
    print(
        f"repetitions {args.reps} (median), {args.iters} steps per executable per batch, "
        f"{args.clock} clock (seconds below: {args.clock} seconds)"
    )
    print("                                  packed      bucketed     ratio")
    print(
        f"epoch time (s)               {figures['packed']['epoch_s']:11.2f}   "
        f"{figures['bucketed']['epoch_s']:11.2f}"
    )
    print(
        f"tokens stepped / s           {figures['packed']['tokens_stepped_per_s']:11.1f}   "
        f"{figures['bucketed']['tokens_stepped_per_s']:11.1f}   {ratio_stepped:7.3f}"
    )
    print(
        f"native tokens covered / s    {figures['packed']['native_tokens_covered_per_s']:11.1f}"
        f"   {figures['bucketed']['native_tokens_covered_per_s']:11.1f}   {ratio_covered:7.3f}"
    )
    print(
        f"seconds per token slot       {slot_s_packed * 1e6:9.2f} us   "
        f"{slot_s_bucket * 1e6:9.2f} us   (bucketed: per clip token)"
    )
    print(
        f"forward FLOPs per token       {flops['packed'] / stepped['packed'] / 1e3:9.0f} k    "
        f"{flops['bucketed'] / stepped['bucketed'] / 1e3:9.0f} k    "
        f"{flop_ratio['packed']:7.3f}   (tokens per FLOP ratio)"
    )
    print(
        f"  with Σ n_i² attention       "
        f"{flops['packed_segment_skipping'] / stepped['packed'] / 1e3:9.0f} k    "
        f"{flops['bucketed'] / stepped['bucketed'] / 1e3:9.0f} k    "
        f"{flop_ratio['packed_segment_skipping']:7.3f}"
    )
    print(
        json.dumps(
            {
                "flops_forward_epoch": flops,
                "ratio_tokens_per_flop": flop_ratio,
                "ratio_tokens_stepped": ratio_stepped,
                "ratio_native_tokens_covered": ratio_covered,
                "figures": figures,
                "per_bucket_s": {
                    k: statistics.median(r["t_bucket"][k] for r in reps) for k in per_bucket
                },
                "packed_step_s": [r["t_packed"] for r in reps],
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
