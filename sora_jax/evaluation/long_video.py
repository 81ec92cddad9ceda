"""Videos longer than a run's training clips: the causal rollout, or sliding-window
continuation for a full-attention model.

- A causal run (`model.causal_chunk_frames > 0`) rolls out chunk by chunk over its KV cache
  (sora_jax/diffusion/rollout.py): `sample.rollout_window` past chunks (W; default the
  training clip's chunks minus one, so W + 1 chunks fit the trained positions) and the
  context noise level `sample.context_t` (default `diffusion.forcing_context_t`).
- Any other run continues itself (`continuation_videos`): the first clip is sampled from
  text, then each next clip of the bucket's length is sampled with the last `cond_frames`
  latent frames of the video so far given (task 'continuation' of
  sora_jax/diffusion/conditioning.py, what `sora_jax.sample --video` does), and its new
  frames appended, until the video is long enough: today's sliding-window continuation.

Both return pixels `[N, num_frames, H, W, 3]` in [-1, 1] for prompts, with noise keyed by
`fold_in(key(seed), index)` as `Generator.generate` does.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.data import buckets as buckets_lib
from sora_jax.diffusion import forcing, rollout
from sora_jax.evaluation import generate
from sora_jax.evaluation.generate import Generator
from sora_jax.evaluation.requests import Request, SampleOptions, pixel_shape, validate_requests
from sora_jax.models import dit


def is_causal(config) -> bool:
    return forcing.chunk_frames(config.model) > 0


def window(config) -> int:
    """W, the chunks a causal run's rollout keeps (`sample.rollout_window`; -1 or absent:
    the training clip's chunks minus one)."""
    w = int(config.sample.get("rollout_window", -1))
    if w > 0:
        return w
    frames = max(b.frames for b in buckets_lib.buckets_from_config(config.data))
    return max(1, frames // forcing.chunk_frames(config.model) - 1)


def context_t(config) -> float:
    """t_ctx of the rollout: `sample.context_t`, else the run's `diffusion.forcing_context_t`."""
    value = config.sample.get("context_t", None)
    if value is None:
        value = config.diffusion.get("forcing_context_t", forcing.DEFAULT_CONTEXT_T)
    return float(value)


def rollout_videos(
    gen: Generator,
    prompts: Sequence[str],
    options: SampleOptions,
    num_frames: int,
    *,
    seeds: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    window_chunks: int | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """A causal run's videos of `num_frames` pixel frames (module docstring) and timings."""
    config, model = gen.config, gen.model
    chunk = forcing.chunk_frames(config.model)
    _, height, width = pixel_shape(config, options)
    latent = gen.tokenizer.latent_shape(num_frames, height, width)  # [T', H', W', C]
    if latent[0] % chunk:
        raise ValueError(
            f"--num_frames={num_frames} gives {latent[0]} latent frames, not whole chunks of "
            f"model.causal_chunk_frames={chunk}: choose a multiple of {chunk} latent frames"
        )
    w = window_chunks or window(config)
    n = len(prompts)
    seeds = [options.seed] * n if seeds is None else list(seeds)
    indices = list(range(n)) if indices is None else list(indices)
    timings: dict[str, float] = {}
    text, mask = gen.text_encoder.encode(list(prompts))
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
        jnp.asarray(seeds, jnp.uint32), jnp.asarray(indices, jnp.uint32)
    )
    # The trained clip's shift (the rollout denoises chunks as the clips were trained).
    alpha = gen._alpha(options, gen._latent_shape(dataclasses.replace(options, num_frames=0)))
    patch = model.patch_size
    chunk_shape = (chunk, *latent[1:])
    chunk_grid = (chunk // patch[0], latent[1] // patch[1], latent[2] // patch[2])
    params = gen.params
    if model.scan_layers:  # the cached call runs per-layer blocks
        params = dit.unstack_layers(params)
        model = model.clone(scan_layers=False)
    guided = options.cfg_scale != 1.0
    cache = rollout.new_cache(model, n * (2 if guided else 1), w, chunk_grid)

    def run(params, keys, text, mask, cache):
        return rollout.rollout(
            rollout.cached_apply_fn(model), params, keys, text, mask, cache,
            num_chunks=latent[0] // chunk, chunk_shape=chunk_shape,
            num_steps=options.num_steps, cfg_scale=options.cfg_scale, alpha=alpha,
            context_t=context_t(config),
        )  # fmt: skip

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(params, keys, text, mask, cache).compile()
    timings["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents = np.asarray(jax.device_get(compiled(params, keys, text, mask, cache)))
    timings["denoise_s"] = time.perf_counter() - t0
    video = np.clip(np.asarray(gen.tokenizer.decode(latents)), -1.0, 1.0)
    return video[:, :num_frames], timings


def continuation_videos(
    gen: Generator,
    prompts: Sequence[str],
    options: SampleOptions,
    num_frames: int,
    *,
    cond_frames: int = 0,
    seeds: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Sliding-window continuation (module docstring): clips of the bucket's length, each
    given the last `cond_frames` latent frames (default half the clip's, at least 1) of the
    video so far. Clip j draws the noise index `index + j · 100003` (a prime: clips and
    prompts never share a stream). Pixel tokenizers only (the given pixels are the latents)."""
    config = gen.config
    clip, height, width = pixel_shape(config, dataclasses.replace(options, num_frames=0))
    k = cond_frames or max(1, clip // 2)
    if gen.tokenizer.latent_shape(clip, height, width)[0] != clip:
        raise ValueError(
            "continuation_videos needs a tokenizer without temporal compression (pixels): "
            "given pixel frames must map to latent frames one to one"
        )
    n = len(prompts)
    seeds = [options.seed] * n if seeds is None else list(seeds)
    indices = list(range(n)) if indices is None else list(indices)
    clip_opts = dataclasses.replace(options, num_frames=clip, cond_frames=k)
    video, timings = gen.generate(prompts, clip_opts, seeds=seeds, indices=indices)
    j = 0
    while video.shape[1] < num_frames:
        j += 1
        given = video[:, -k:]
        nxt, t = gen.generate(
            prompts,
            clip_opts,
            seeds=seeds,
            indices=[i + j * 100_003 for i in indices],
            given=given,
            task="continuation",
        )
        video = np.concatenate([video, nxt[:, k:]], axis=1)
        for key, value in t.items():
            timings[key] = timings.get(key, 0.0) + value
    return video[:, :num_frames], timings


def long_videos(gen: Generator, prompts, options, num_frames: int, **kw):
    """`rollout_videos` for a causal run, else `continuation_videos`."""
    if is_causal(gen.config):
        return rollout_videos(gen, prompts, options, num_frames, **kw)
    return continuation_videos(gen, prompts, options, num_frames, **kw)


def sample_to_dir(
    config,
    workdir,
    requests: Sequence[Request],
    *,
    step: int | None = None,
    ema_decay: float | None = None,
    output=None,
    gif: bool = False,
    log=generate._stderr,
) -> dict[str, Any]:
    """`sora_jax.sample` for a causal run: each request rolled out to its `num_frames`
    (any length: whole chunks), written as `generate.sample_to_dir` writes (mp4, optional
    gif, a JSON sidecar per video with the rollout's window and t_ctx, a contact sheet).
    Requests are checked at the bucket's length first; images and videos are refused (the
    rollout is text-to-video)."""
    for r in requests:
        if r.image or r.video:
            raise ValueError(
                "a causal run (model.causal_chunk_frames > 0) samples text-to-video rollouts: "
                "drop --image/--video (its own past conditions every chunk)"
            )
    at_bucket = [
        dataclasses.replace(r, options=dataclasses.replace(r.options, num_frames=0))
        for r in requests
    ]
    validate_requests(config, workdir, at_bucket)
    gen = Generator.from_workdir(workdir, config, step=step, ema_decay=ema_decay)
    outdir = pathlib.Path(output or pathlib.Path(workdir) / "samples" / str(gen.step))
    outdir.mkdir(parents=True, exist_ok=True)
    groups: dict[Any, list[Request]] = {}
    for r in requests:
        groups.setdefault(dataclasses.astuple(r.options), []).append(r)
    written, totals = {}, {}
    for batch in groups.values():
        o = batch[0].options
        frames = pixel_shape(config, o)[0]
        videos, timings = rollout_videos(
            gen, [r.prompt for r in batch], o, frames,
            seeds=[r.options.seed for r in batch], indices=[r.index for r in batch],
        )  # fmt: skip
        log(
            f"rollout: {len(batch)} video(s) of {frames} frames, compile "
            f"{timings['compile_s']:.2f} s, denoise {timings['denoise_s']:.2f} s"
        )
        for key, value in timings.items():
            totals[key] = totals.get(key, 0.0) + value
        for r, video in zip(batch, videos, strict=True):
            path = generate.write_clip(config, outdir, r, video, gif)
            sidecar = {
                **gen.checkpoint_info(),
                "params_sha256": gen.params_hash,
                **dataclasses.asdict(r.options),
                "sampler": "rollout",
                "rollout_window": window(config),
                "context_t": context_t(config),
                "num_frames": frames,
                "prompt": r.prompt,
                "index": r.index,
                "shape": list(video.shape),
                "workdir": str(workdir),
            }
            path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True))
            written[r.index] = (path, video)
    return generate.summarize(config, gen, outdir, written, totals)
