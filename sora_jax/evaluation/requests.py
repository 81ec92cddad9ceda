"""Sampling requests: what to sample, resolved and checked before any checkpoint is restored.

A `Request` is one video to sample: a prompt, its `SampleOptions` (steps, guidance scale,
sampler, seed, bucket or shape, timestep shift), an optional input image (image-to-video)
or video (continuation), and the noise index it draws from its seed, so a video does not
depend on the batch it lands in.

Options are resolved in three layers, each overriding the one before: the config's
`sample.*` section (`SampleOptions.from_config`), the command-line flags of
`python -m sora_jax.sample`, and the fields of a JSONL prompt line (`read_prompts`,
`PROMPT_FIELDS`; `resolution` and `aspect` pick a shape or a trained bucket).

`validate_requests` reports every bad request at once, reading only files' existence and
the tokenizer's compression: empty prompts, unknown samplers, frame counts and sizes the
tokenizer and patch size cannot take, shapes outside the trained buckets, or for a run on
native shapes outside its budget (`data.native.sample_shape_errors`; unless allowed),
missing input files, and a workdir without checkpoints. `load_given_pixels` reads a
request's image or video frames once it is sampled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from sora_jax import video_io
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import native
from sora_jax.models import tokenizer as tokenizer_lib


@dataclasses.dataclass
class SampleOptions:
    num_steps: int = 25
    cfg_scale: float = 3.0
    sampler: str = "euler"
    seed: int = 0
    bucket: str = ""  # '' = the first bucket of data.buckets
    shift: float = 0.0  # 0 = the training shift of the config
    num_frames: int = 0  # pixel frames; 0 = the bucket's
    height: int = 0  # pixels; 0 = the bucket's
    width: int = 0  # pixels; 0 = the bucket's
    cond_frames: int = 0  # latent frames given from a video; 0 = half of T' (at least 1)

    @classmethod
    def from_config(cls, sample: ml_collections.ConfigDict, **overrides) -> SampleOptions:
        """The config's `sample` section, with the non-None `overrides` (e.g. flags) applied."""
        fields = dict(
            num_steps=sample.num_steps,
            cfg_scale=sample.cfg_scale,
            sampler=sample.sampler,
            seed=sample.seed,
            bucket=sample.bucket,
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


@dataclasses.dataclass
class Request:
    """One video to sample: its prompt, options, optional input image (i2v) or video
    (continuation), and `index`, the noise stream of `options.seed` it draws from."""

    prompt: str
    options: SampleOptions
    image: str = ""
    video: str = ""
    index: int = 0
    source: str = ""  # where the request came from (file:line), for error messages


def pixel_shape(config: ml_collections.ConfigDict, options: SampleOptions) -> tuple[int, int, int]:
    """The `(frames, height, width)` a request samples: its bucket's, with overrides."""
    name = options.bucket or buckets_lib.buckets_from_config(config.data)[0].name
    b = buckets_lib.bucket_by_name(config.data, name)
    return (
        options.num_frames or b.frames,
        options.height or b.height,
        options.width or b.width,
    )


def _compression(tokenizer) -> tuple[int, int]:
    """(temporal, spatial) compression of a tokenizer, from its manifest entry."""
    r, s, _ = tokenizer.manifest_entry()["compression"]
    return int(r), int(s)


def _nearest_frames(frames: int, r: int) -> str:
    lo = 1 + r * max((frames - 1) // r, 0)
    return f"{lo} or {lo + r}" if frames > 1 else f"{lo}"


def request_errors(
    config: ml_collections.ConfigDict,
    tokenizer,
    request: Request,
    *,
    allow_untrained_shape: bool = False,
) -> list[str]:
    """What is wrong with one request (empty if fine); reads files' existence only, so it
    runs in milliseconds, before any checkpoint is restored or anything compiles."""
    errors = []
    where = f"{request.source}: " if request.source else ""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        errors.append(f"{where}the prompt is empty: every prompt must be non-empty text")
    o = request.options
    if o.sampler not in ("euler", "heun"):
        errors.append(f"{where}sampler={o.sampler!r} is unknown; use 'euler' or 'heun'")
    if o.num_steps < 1:
        errors.append(f"{where}steps={o.num_steps} must be >= 1")
    if o.shift < 0:
        errors.append(f"{where}shift={o.shift} must be > 0 (or 0 = the training shift)")
    try:
        frames, height, width = pixel_shape(config, o)
    except ValueError as e:
        return errors + [f"{where}{e}"]
    r, s = _compression(tokenizer)
    patch = tuple(config.model.get("patch_size", None) or (1, 1, 1))
    if frames < 1 or (frames - 1) % r:
        errors.append(
            f"{where}num_frames={frames} is not of the form 1 + {r}k that tokenizer "
            f"{tokenizer.id} (temporal compression {r}) needs; the nearest allowed counts are "
            f"{_nearest_frames(frames, r)}"
        )
    else:
        latent_t = 1 + (frames - 1) // r
        if latent_t % patch[0]:
            errors.append(
                f"{where}num_frames={frames} gives {latent_t} latent frames, not a multiple of "
                f"the temporal patch {patch[0]} (model.patch_size)"
            )
    for name, size, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if size < 1 or size % (s * p):
            errors.append(
                f"{where}{name}={size} is not divisible by tokenizer stride {s} x patch {p} = "
                f"{s * p}; use a multiple of {s * p}, e.g. {max(s * p, size // (s * p) * s * p)}"
            )
    trained = {b.shape: b.name for b in buckets_lib.buckets_from_config(config.data)}
    if native.mode(config) == "native":  # trained on native shapes: a budget, not buckets
        if not errors and not allow_untrained_shape:
            shape_errors = native.sample_shape_errors(config, tokenizer, frames, height, width)
            errors += [f"{where}{e}" for e in shape_errors]
    elif not errors and (frames, height, width) not in trained and not allow_untrained_shape:
        listed = ", ".join(f"{n} (frames x height x width)" for n in trained.values())
        errors.append(
            f"{where}shape {frames}x{height}x{width} is outside the buckets the model was "
            f"trained on: {listed}; pass --allow_untrained_shape to sample it anyway"
        )
    if request.image and request.video:
        errors.append(f"{where}give an image (i2v) or a video (continuation), not both")
    for kind, path in (("image", request.image), ("video", request.video)):
        if path and not pathlib.Path(path).is_file():
            errors.append(f"{where}{kind} file {path} does not exist")
    if (request.image or request.video) and not errors:
        latent_t = 1 + (frames - 1) // r
        if latent_t < 2:
            errors.append(
                f"{where}an input {'image' if request.image else 'video'} needs >= 2 latent "
                f"frames to generate; num_frames={frames} gives {latent_t}"
            )
        elif request.video and o.cond_frames and not 1 <= o.cond_frames < latent_t:
            errors.append(
                f"{where}cond_frames={o.cond_frames} must be in [1, {latent_t - 1}] (latent "
                f"frames given from the video, of {latent_t})"
            )
    return errors


def validate_requests(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike | None,
    requests: Sequence[Request],
    *,
    allow_untrained_shape: bool = False,
    tokenizer=None,
) -> None:
    """Raises a ValueError listing every bad request, or FileNotFoundError for a missing
    workdir/checkpoint, before anything is restored or compiled."""
    if workdir is not None:
        ckpt = pathlib.Path(workdir) / "checkpoints"
        if not ckpt.is_dir():
            raise FileNotFoundError(
                f"{ckpt} does not exist: --workdir must be a trained run (python -m "
                f"sora_jax.train --config=... --workdir={workdir})"
            )
    if not requests:
        raise ValueError("no prompts to sample: give --prompt, --prompts=FILE or sample.prompts")
    tokenizer = tokenizer or tokenizer_lib.build_tokenizer(config.tokenizer)
    errors = []
    for i, r in enumerate(requests):
        errs = request_errors(config, tokenizer, r, allow_untrained_shape=allow_untrained_shape)
        errors += [e if r.source else f"prompt {i}: {e}" for e in errs]
    if errors:
        raise ValueError("invalid sampling request:\n  " + "\n  ".join(errors))


def load_given_pixels(request: Request, tokenizer, frames: int, height: int, width: int):
    """The given pixel frames of a request, float `[T_given, H, W, 3]` in [-1, 1], its task
    and its number of given latent frames; `(None, 't2v', 0)` without image or video.

    An image is the first pixel frame (i2v, latent frame 0). A video gives its last
    `1 + r (k - 1)` frames, which a causal VAE encodes into exactly k latent frames
    (continuation, latent frames 0 .. k-1)."""
    if not (request.image or request.video):
        return None, "t2v", 0
    r, _ = _compression(tokenizer)
    if request.image:
        pixels = video_io.fit_frames(video_io.read_image(request.image)[None], height, width)
        return pixels.astype(np.float32) / 127.5 - 1.0, "i2v", 1
    latent_t = 1 + (frames - 1) // r
    k = request.options.cond_frames or max(1, latent_t // 2)
    need = 1 + r * (k - 1)
    clip = video_io.read_video(request.video)
    if clip.shape[0] < need:
        raise ValueError(
            f"video {request.video} has {clip.shape[0]} frames; continuing with {k} given latent "
            f"frames needs its last {need} (set cond_frames lower)"
        )
    pixels = video_io.fit_frames(clip[clip.shape[0] - need :], height, width)
    return pixels.astype(np.float32) / 127.5 - 1.0, "continuation", k


# --- Requests from the command line and prompt files ------------------------------------

# JSONL fields of a prompt line besides `prompt` -> SampleOptions field (None: handled apart).
PROMPT_FIELDS = {
    "seed": "seed",
    "cfg": "cfg_scale",
    "steps": "num_steps",
    "sampler": "sampler",
    "shift": "shift",
    "num_frames": "num_frames",
    "bucket": "bucket",
    "cond_frames": "cond_frames",
    "resolution": None,
    "aspect": None,
    "image": None,
    "video": None,
}


def parse_resolution(text: str) -> tuple[int, int]:
    """`'32x48'` (height x width) -> (32, 48)."""
    h, sep, w = str(text).lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(h), int(w)
    except ValueError:
        raise ValueError(f"resolution={text!r} must read HxW in pixels, e.g. 32x32") from None


def bucket_for_aspect(config: ml_collections.ConfigDict, aspect: str) -> str:
    """The trained bucket whose width:height is `aspect` ('16:9', '1:1' or 1.78), within 2%."""
    try:
        w, sep, h = str(aspect).partition(":")
        ratio = float(w) / float(h) if sep else float(w)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect={aspect!r} must read W:H (e.g. 16:9) or a number W/H") from None
    table = buckets_lib.buckets_from_config(config.data)
    best = min(table, key=lambda b: abs(b.width / b.height - ratio))
    if abs(best.width / best.height - ratio) > 0.02 * ratio:
        have = ", ".join(f"{b.name} ({b.width / b.height:.3g})" for b in table)
        raise ValueError(f"no trained bucket has aspect {aspect} (W/H {ratio:.3g}); have {have}")
    return best.name


def with_overrides(
    config: ml_collections.ConfigDict, options: SampleOptions, fields: dict[str, Any]
) -> SampleOptions:
    """`options` with request fields applied: the SampleOptions names of PROMPT_FIELDS,
    `resolution` ('HxW') and `aspect` (a bucket by aspect ratio)."""
    updates = {}
    for key, value in fields.items():
        if value is None or key in ("prompt", "image", "video"):
            continue
        if key == "resolution":
            updates["height"], updates["width"] = parse_resolution(value)
        elif key == "aspect":
            updates["bucket"] = bucket_for_aspect(config, value)
        else:
            name = PROMPT_FIELDS[key]
            kind = type(getattr(options, name))
            try:
                updates[name] = kind(value) if kind is not int else _as_int(key, value)
            except (TypeError, ValueError):
                raise ValueError(f"{key}={value!r} is not of type {kind.__name__}") from None
    return dataclasses.replace(options, **updates)


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key}={value!r} is not an int")
    return int(value)


def read_prompts(
    path: str | os.PathLike, config: ml_collections.ConfigDict, options: SampleOptions, start: int
) -> list[Request]:
    """Requests of a prompt file: one prompt per line, or JSONL (`.jsonl`) objects with a
    `prompt` and optional PROMPT_FIELDS. Blank lines are skipped; a bad line is a
    ValueError naming the file and line. Relative image/video paths are relative to the
    file's directory. Noise indices count on from `start`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file {path} does not exist")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        index = start + len(requests)
        if path.suffix.lower() != ".jsonl":
            requests.append(Request(line.strip(), options, index=index, source=where))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{where}: each line must be an object with a "prompt" string')
        unknown = sorted(set(row) - set(PROMPT_FIELDS) - {"prompt"})
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {unknown}; known: prompt, {', '.join(PROMPT_FIELDS)}"
            )
        try:
            opts = with_overrides(config, options, row)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        files = {}
        for kind in ("image", "video"):
            if row.get(kind):
                p = pathlib.Path(row[kind]).expanduser()
                files[kind] = str(p if p.is_absolute() else path.parent / p)
        requests.append(Request(row["prompt"], opts, index=index, source=where, **files))
    return requests
