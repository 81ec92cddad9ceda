r"""Tokenize (and train on) your own videos: a folder with sidecar captions or a manifest.

    python -m sora_jax.tokenize --config=experiments/videos.py:folder=/data/clips \
        --workdir=runs/videos
    python -m sora_jax.tokenize --config=experiments/videos.py:manifest=/data/clips.csv \
        --workdir=runs/videos --part=0/4            # one of 4 independent processes
    python -m sora_jax.tokenize --mode=inspect --dataset=runs/videos/data

A manifest is CSV (header `path,caption[,fps,...]`) or JSONL (`{"path": ..., "caption":
...}`), paths relative to the manifest; a folder holds `name.mp4` next to `name.txt`.
`images` reads image files instead (1-frame clips for the T = 1 buckets).

Buckets come from `sora_jax.data.buckets.grid`: named resolutions x aspect ratios x frame
counts, sides rounded to multiples of the tokenizer stride x patch. The default is a
256px grid (1:1, 16:9, 9:16; 1, 17 and 33 frames) for the Wan-shaped VAE at
`tokenizer.path` and MiniLM captions; `tiny` is a 32px grid of 1, 5 and 9 frames with the
pixels tokenizer, hash-word captions and a global batch of 4, which runs in seconds on a
CPU (tests use it); `steps=N` sets the training length. Buckets that real data leaves
sparse are handled by default (README "Your own videos", docs/tokenize.md). Clip options
are `data.tokenize` (documented in experiments/demo.py, docs/tokenize.md).
"""

import pathlib

import ml_collections

from sora_jax import config as config_lib
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import sources

demo = config_lib.load_module(str(pathlib.Path(__file__).with_name("demo.py")))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, tiny=False, folder="", manifest="", images=False, fps=0.0, steps=-1
    )
    c = demo.get_config(("tiny," if arg.tiny else "") + f"steps={arg.steps}")
    kind = "images" if arg.images else "videos"
    c.data.source = sources.source_config(kind, folder=arg.folder, manifest=arg.manifest)
    aspects = {"1:1": 1.0, "16:9": 16 / 9, "9:16": 9 / 16}
    if arg.tiny:
        table = buckets_lib.grid({"32px": 32}, aspects, (1, 5, 9), multiple=8)
        table.update(buckets_lib.grid({"16px": 16}, {"1:1": 1.0}, (1, 5), multiple=8))
        c.data.tokenize.inputs_per_shard = 4
        # A handful of real files: a small batch, so most buckets hold one (docs/tokenize.md).
        c.data.global_batch_size = 4
        c.tokenizer.space_to_depth = 1
    else:
        table = buckets_lib.grid({"256px": 256}, aspects, (1, 17, 33), multiple=16)
        c.data.tokenize.inputs_per_shard = 256
        c.tokenizer = ml_collections.ConfigDict(
            dict(name="vae", path="", preset="wan2_1", decode_chunk_frames=1, decode_tile=0)
        )
        c.text_encoder = ml_collections.ConfigDict(
            dict(name="minilm", max_length=32, batch_size=64, dtype="float32", embed="tokenize")
        )
    c.data.buckets = ml_collections.ConfigDict(table)
    c.data.tokenize.fps = arg.fps
    # Inputs held out from training, by a hash of their id (docs/tokenize.md, "Held-out
    # split"): about this fraction goes to DATASET/holdout/, where the val_loss,
    # reconstruction and fvd evaluators read it; 0 = none. tiny: a handful of files, so more.
    c.data.tokenize.holdout_fraction = 0.15 if arg.tiny else 0.05
    # Sparse buckets: the tokenizer demotes their clips to a fuller bucket of the same aspect
    # ratio (data.tokenize.min_bucket_clips, -1 = one global batch), and the trainer leaves
    # out what stays under one batch, reporting it; data.strict_buckets=True makes it an error.
    c.data.tokenize.min_bucket_clips = -1
    c.data.strict_buckets = False
    # Sample a 1:1 video bucket (the first frame count above 1).
    c.sample.bucket = next(n for n, b in table.items() if b["frames"] > 1)
    # The demo's prompt_adherence scores its coloured shapes; own videos: validation loss.
    c.evaluate.type = "val_loss"
    # What val_loss, reconstruction and fvd score against: 'holdout' (the held-out split),
    # 'synthetic' (synthetic clips; val_loss: the first training batch of each bucket) or
    # 'auto' (the held-out split when the dataset has one); docs/sampling.md.
    c.evaluate.reference = "auto"
    # I3D FVD protocol: clips resampled to this many frames (Unterthiner et al. 2018: 16).
    c.evaluate.fvd_frames = 16
    # The evaluators the trainer runs, each every `every_steps` (0 = only offline), and
    # `sora_jax.evaluate` runs on a checkpoint (all, or --evals=name,...): name -> type,
    # schedule and the `evaluate` fields it overrides; results in WORKDIR/eval/<step>/<name>.json
    # and as `eval/<name>/<score>` in metrics.jsonl and TensorBoard (docs/sampling.md).
    # On the held-out split: validation loss often, reconstruction and Fréchet distance
    # (random features: `fd_random_conv`; fvd_features='i3d' with weights gives `fvd_i3d`)
    # less often. tiny: every other step and at the end of a 4-step run, on 3 clips.
    period = 2 if arg.tiny else 500
    c.evals = ml_collections.ConfigDict()
    c.evals.val_loss = dict(type="val_loss", every_steps=period)
    c.evals.reconstruction = dict(type="reconstruction", every_steps=2 * period)
    c.evals.fd = dict(type="fvd", every_steps=2 * period, num_videos=8 if arg.tiny else 256)
    return c
