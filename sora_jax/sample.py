r"""Sample videos from a run's checkpoint.

    python -m sora_jax.sample --config=experiments/demo.py --workdir=runs/demo \
        --prompt="a red circle moving up quickly" [--cfg=3 --steps=25 --seed=0]
    python -m sora_jax.sample ... --prompts=prompts.jsonl --batch_size=4 --gif
    python -m sora_jax.sample ... --prompt="..." --image=first_frame.png     # image-to-video
    python -m sora_jax.sample ... --prompt="..." --video=clip.mp4            # continuation

Without --config, the run's resolved WORKDIR/config.json is used (written by
`sora_jax.train`). Without --prompt/--prompts, samples `sample.prompts` of the config.
Every request is checked (frame rule of the tokenizer, sizes, trained buckets, files)
before the checkpoint is restored or anything compiles. Writes `<index>_<slug>.mp4` (and
`.gif` with --gif) with a JSON sidecar of every parameter needed to reproduce it, and a
contact sheet, into --output (default WORKDIR/samples/<step>/); prints a time split per
batch to stderr and a JSON summary to stdout. docs/sampling.md lists every flag and the
JSONL prompt format.

`--cache_threshold=X` turns on the ODE sampler's step-skipping cache (sora_jax/diffusion/
sampler.py: a step reuses the last velocity while the accumulated relative change of its
input stays under X); sidecars record it.

A causal run (`model.causal_chunk_frames > 0`) is rolled out chunk by chunk over its KV
cache to any `--num_frames` (docs/sampling.md, Long videos).

A distillation run (a few-step student, experiments/distill.py) is sampled the same way:
its recorded `distill` section selects the consistency sampler, `--steps=1..4`, `--cfg=1`.
"""

import json
import sys

from absl import flags

from sora_jax import entry
from sora_jax.evaluation import generate, long_video
from sora_jax.evaluation import requests as requests_lib

PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
PROMPTS = flags.DEFINE_string(
    "prompts", None, "A file with one prompt per line, or JSONL (.jsonl) with per-prompt options."
)
STEPS = flags.DEFINE_integer(
    "steps", None, "ODE steps, or a student's consistency steps, 1-4 (default: sample.num_steps)."
)
CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: sample.cfg_scale).")
SAMPLER = flags.DEFINE_enum("sampler", None, ["euler", "heun"], "ODE method.")
SEED = flags.DEFINE_integer("seed", None, "Noise seed (default: sample.seed).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
EMA = flags.DEFINE_float("ema", None, "EMA decay of the weights; 0 = raw parameters.")
OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
BUCKET = flags.DEFINE_string("bucket", None, "Bucket of data.buckets (default: sample.bucket).")
NUM_FRAMES = flags.DEFINE_integer("num_frames", None, "Pixel frames (default: the bucket's).")
RESOLUTION = flags.DEFINE_string("resolution", None, "HEIGHTxWIDTH in pixels, e.g. 32x32.")
ASPECT = flags.DEFINE_string("aspect", None, "W:H; picks the trained bucket of that aspect.")
SHIFT = flags.DEFINE_float("shift", None, "Timestep shift alpha (default: the training shift).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Videos per batch (sample.batch_size).")
GIF = flags.DEFINE_bool("gif", False, "Also write each video as a GIF.")
IMAGE = flags.DEFINE_string("image", None, "Image-to-video: PNG/JPG used as the first frame.")
VIDEO = flags.DEFINE_string("video", None, "Continuation: a video whose last frames are given.")
COND_FRAMES = flags.DEFINE_integer(
    "cond_frames", None, "Latent frames given from --video (default: half of them)."
)
CACHE = flags.DEFINE_float(
    "cache_threshold",
    None,
    "Step-skipping cache of the ODE sampler: reuse the last velocity while the accumulated "
    "relative input change stays under this; 0 = off (default: sample.cache_threshold).",
)
ALLOW_UNTRAINED = flags.DEFINE_bool(
    "allow_untrained_shape", False, "Sample shapes outside the trained buckets."
)


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config(from_workdir=True)
    if CACHE.value is not None:
        if CACHE.value < 0 or (CACHE.value > 0 and generate.is_student(config)):
            print(
                f"error: --cache_threshold={CACHE.value} must be >= 0, and 0 for a few-step "
                "student (the cache skips steps of the ODE sampler)",
                file=sys.stderr,
            )
            sys.exit(2)
        with config.unlocked():
            config.sample.cache_threshold = CACHE.value
    s = config.sample
    try:
        options = requests_lib.SampleOptions.from_config(
            s,
            num_steps=STEPS.value,
            cfg_scale=CFG.value,
            sampler=SAMPLER.value,
            seed=SEED.value,
            bucket=BUCKET.value,
            shift=SHIFT.value,
            num_frames=NUM_FRAMES.value,
            cond_frames=COND_FRAMES.value,
        )
        options = requests_lib.with_overrides(
            config, options, {"resolution": RESOLUTION.value, "aspect": ASPECT.value}
        )
        files = {"image": IMAGE.value or "", "video": VIDEO.value or ""}
        requests = [
            requests_lib.Request(p, options, index=i, **files)
            for i, p in enumerate(PROMPT.value or [])
        ]
        if PROMPTS.value:
            requests += requests_lib.read_prompts(PROMPTS.value, config, options, len(requests))
        if not PROMPT.value and not PROMPTS.value:
            requests = [
                requests_lib.Request(p, options, index=i, **files) for i, p in enumerate(s.prompts)
            ]
        if long_video.is_causal(config):  # any --num_frames: the KV-cache rollout
            summary = long_video.sample_to_dir(
                config, entry.WORKDIR.value, requests, step=STEP.value, output=OUTPUT.value,
                ema_decay=s.ema_decay if EMA.value is None else EMA.value, gif=GIF.value,
            )  # fmt: skip
            print(json.dumps(summary, indent=2))
            return
        for r in requests:  # a student: cfg 1, text-to-video (its guidance is distilled)
            if generate.is_student(config):
                generate.check_student_options(config, r.options, bool(r.image or r.video))
        requests_lib.validate_requests(
            config, entry.WORKDIR.value, requests, allow_untrained_shape=ALLOW_UNTRAINED.value
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = generate.sample_to_dir(
        config,
        entry.WORKDIR.value,
        [r.prompt for r in requests],
        options,
        requests=requests,
        step=STEP.value,
        ema_decay=s.ema_decay if EMA.value is None else EMA.value,
        output=OUTPUT.value,
        batch_size=BATCH_SIZE.value or 0,
        gif=GIF.value,
        allow_untrained_shape=ALLOW_UNTRAINED.value,
    )
    print(json.dumps(summary, indent=2))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
