"""Videos from a run's checkpoint: the one code path of `sora_jax.sample`, the evaluators
and the in-training sample hooks.

`Generator.from_workdir` rebuilds the model from the run's resolved config and the
dataset manifest, restores the parameters (an EMA or the raw ones) into the current mesh,
and `generate` runs the ODE sampler with classifier-free guidance, data-parallel over the
batch, then decodes latents back to pixels with the run's tokenizer. `sample_to_dir`
samples a list of requests (`sora_jax.evaluation.requests`, validated before the restore)
in batches and writes videos, JSON sidecars and a contact sheet.

A run whose config has a `distill` section is a few-step student (sora_jax/training/
distill.py): it is sampled with the consistency sampler (sora_jax/diffusion/consistency.py)
on the same time grid, its guidance in its weights (`cfg_scale` must be 1), text-to-video
only; `sampler` in its sidecars reads 'consistency'.

A run whose config has an `experts` section holds Wan 2.2 A14B's two experts
(sora_jax/run/experts.py): each sampler step runs the expert of its time
(`wan_experts.sampling_apply_fn`: the high-noise expert for t >= experts.boundary_ratio).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.data import native, shards, tokenization
from sora_jax.diffusion import conditioning, consistency, flow, sampler
from sora_jax.evaluation.requests import (
    Request,
    SampleOptions,
    load_given_pixels,
    pixel_shape,
    validate_requests,
)
from sora_jax.models import dit, wan_experts
from sora_jax.models import text as text_lib
from sora_jax.models import tokenizer as tokenizer_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import experts as experts_run
from sora_jax.run import params as params_lib
from sora_jax.run import setup


def sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def params_sha256(params) -> str:
    """sha256 over every parameter leaf in path order: path, dtype, shape and bytes."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    h = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Generator:
    def __init__(self, config, manifest, params, step: int, weights: str):
        self.config = config
        self.manifest = manifest
        self.params = params
        self.step = step
        self.weights = weights
        self.mesh = mesh_lib.create_mesh(config.mesh)
        self.rules = mesh_lib.logical_rules(config.mesh)
        if experts_run.enabled(config):  # Wan 2.2 A14B: each step runs the expert of its t
            self.model = experts_run.model_for(config, manifest)
            self.apply_fn = wan_experts.sampling_apply_fn(self.model)
        else:
            self.model = setup.model_for(config, manifest)
            self.apply_fn = dit.make_apply_fn(self.model)
        self.tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
        self.text_encoder = text_lib.build_text_encoder(config.text_encoder)
        self._compiled: dict[Any, Any] = {}
        # A few-step student (a distillation run) samples with the consistency sampler.
        self.student = is_student(config)

    @classmethod
    def from_workdir(
        cls,
        workdir: str | os.PathLike,
        config: ml_collections.ConfigDict | None = None,
        *,
        step: int | None = None,
        ema_decay: float | None = None,
    ) -> Generator:
        """Loads a run's parameters: EMA with `ema_decay` (> 0), or the raw ones (0/None);
        a LoRA run's factors come merged into its base."""
        workdir = pathlib.Path(workdir)
        if config is None:
            config = config_lib.load_run_config(workdir)
        ckpt_dir = workdir / "checkpoints"
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(
                f"{ckpt_dir} does not exist: train first (python -m sora_jax.train "
                f"--config=... --workdir={workdir})"
            )
        manifest = shards.read_manifest(tokenization.dataset_dir(config, workdir))
        manifest = native.init_manifest(config, manifest)  # native shapes: no buckets
        mesh = mesh_lib.create_mesh(config.mesh)
        rules = mesh_lib.logical_rules(config.mesh)
        # EMA or raw weights; for a LoRA run the factors merged into its frozen base.
        restore = (
            experts_run.restore_params_for_sampling  # {'high': ..., 'low': ...}
            if experts_run.enabled(config)
            else params_lib.restore_params_for_sampling
        )
        params, step, weights = restore(
            workdir, config, manifest, mesh, rules, step=step, ema_decay=ema_decay
        )
        return cls(config, manifest, params, step, weights)

    @functools.cached_property
    def params_hash(self) -> str:
        """sha256 of the restored parameters (`params_sha256`), computed once."""
        return params_sha256(self.params)

    def _latent_shape(self, options: SampleOptions) -> tuple[int, ...]:
        return self.tokenizer.latent_shape(*pixel_shape(self.config, options))

    def _alpha(self, options: SampleOptions, shape) -> float:
        if options.shift > 0:
            return float(options.shift)
        return flow.shift_alpha(self.config.diffusion, shape, tuple(self.config.model.patch_size))

    def _sampler_fn(self, options, alpha, sharding, args):
        """The compiled sampler for these options and argument shapes, and its compile time."""
        has_cond = args[4] is not None
        fn_key = (
            tuple((a.shape, str(a.dtype)) for a in args if a is not None),
            has_cond,
            options.num_steps,
            options.cfg_scale,
            options.sampler,
            alpha,
        )
        if fn_key in self._compiled:
            return self._compiled[fn_key], 0.0

        def run(params, noise, text, mask, cond_latents, cond_mask, key_data):
            if self.student:
                return consistency.sample(
                    self.apply_fn,
                    params,
                    noise,
                    text,
                    mask,
                    jax.random.wrap_key_data(key_data),
                    num_steps=options.num_steps,
                    alpha=alpha,
                    cond_channels=int(self.config.model.get("cond_channels", 0) or 0),
                )
            return sampler.sample(
                self.apply_fn,
                params,
                noise,
                text,
                mask,
                num_steps=options.num_steps,
                cfg_scale=options.cfg_scale,
                alpha=alpha,
                method=options.sampler,
                cond_latents=cond_latents,
                cond_mask=cond_mask,
                cond_channels=int(self.config.model.get("cond_channels", 0) or 0),
                cache_threshold=cache_threshold(self.config),
            )

        t0 = time.perf_counter()
        shardings = (None, *(sharding if a is not None else None for a in args))
        jitted = jax.jit(run, in_shardings=shardings, out_shardings=sharding)
        self._compiled[fn_key] = jitted.lower(self.params, *args).compile()
        return self._compiled[fn_key], time.perf_counter() - t0

    def generate(
        self,
        prompts: Sequence[str],
        options: SampleOptions,
        *,
        seeds: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
        given: np.ndarray | None = None,
        task: str = "t2v",
        pad_to: int = 0,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Samples one video per prompt: `[N, T, H, W, 3]` float in [-1, 1], and timings.

        Prompt i draws its noise from `fold_in(key(seeds[i]), indices[i])` (default: the
        options' seed and i), so a video does not depend on the batch it is sampled in.
        `given` `[N, T_g, H, W, 3]` pixel frames in [-1, 1] are encoded with the tokenizer and
        held fixed as the first latent frames (`task` 'i2v' or 'continuation'). `pad_to`
        pads the batch to that many rows (one compiled shape for every batch).
        """
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty: every prompt must be non-empty text")
        if self.student:
            check_student_options(self.config, options, given is not None)
        n = len(prompts)
        seeds = [options.seed] * n if seeds is None else list(seeds)
        indices = list(range(n)) if indices is None else list(indices)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text, mask = self.text_encoder.encode(list(prompts))
        timings["text_encode_s"] = time.perf_counter() - t0

        shape = self._latent_shape(options)
        alpha = self._alpha(options, shape)
        shards_ = mesh_lib.mesh_shape(self.config.mesh, self.mesh.devices.size)
        per = shards_["data"] * shards_["fsdp"]
        padded = -(-max(n, pad_to) // per) * per  # batch rounded up to the data-parallel width

        def pad(x, fill=0):
            x = np.asarray(x)
            return np.concatenate([x, np.full((padded - n, *x.shape[1:]), fill, x.dtype)])

        text, mask = pad(text), pad(mask, False)
        seeds_a = pad(np.asarray(seeds, np.uint32))
        indices_a = pad(np.asarray(indices, np.uint32))
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_a, indices_a)
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
        cond_latents = cond_mask = None
        if given is not None:
            t0 = time.perf_counter()
            z = np.asarray(self.tokenizer.encode(np.asarray(given, np.float32)), np.float32)
            k = z.shape[1]
            cond_latents = np.zeros((padded, *shape), np.float32)
            cond_latents[:n, :k] = z  # [N, k, H', W', C]: the first k latent frames
            cond_mask = np.asarray(conditioning.task_mask(task, padded, shape[0], k))
            timings["encode_given_s"] = time.perf_counter() - t0

        sharding = mesh_lib.batch_sharding(self.mesh)
        # Placed explicitly: inside a mesh context (the trainer's eval hook) jnp results
        # are committed replicated arrays, which jit would not reshard implicitly.
        args = [noise, text, mask, cond_latents, cond_mask, jax.random.key_data(keys)]
        args = [None if a is None else jax.device_put(a, sharding) for a in args]
        with jax.set_mesh(self.mesh):
            fn, timings["compile_s"] = self._sampler_fn(options, alpha, sharding, args)
            t0 = time.perf_counter()
            latents = fn(self.params, *args)
            latents = np.asarray(jax.device_get(latents))[:n]
        timings["denoise_s"] = time.perf_counter() - t0
        timings["denoise_per_step_s"] = timings["denoise_s"] / options.num_steps
        t0 = time.perf_counter()
        video = np.clip(np.asarray(self.tokenizer.decode(latents)), -1.0, 1.0)
        timings["decode_s"] = time.perf_counter() - t0
        return video, timings

    def checkpoint_info(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights}


def cache_threshold(config: ml_collections.ConfigDict) -> float:
    """`sample.cache_threshold`: the ODE sampler's step-skipping cache (0 = off, the default;
    sora_jax/diffusion/sampler.py)."""
    return float(config.sample.get("cache_threshold", 0.0) or 0.0)


def is_student(config: ml_collections.ConfigDict) -> bool:
    """Whether a run is a few-step student: its config has a `distill` section."""
    return config.get("distill") is not None


def check_student_options(config, options: SampleOptions, given: bool = False) -> None:
    """A student samples text-to-video with cfg 1 (its guidance is in its weights)."""
    if options.cfg_scale != 1.0:
        raise ValueError(
            f"cfg={options.cfg_scale:g}: this run is a few-step student with guidance "
            f"distill.cfg_scale={config.distill.cfg_scale:g} in its weights; sample it with "
            "--cfg=1 (sample.cfg_scale=1)"
        )
    if given:
        raise ValueError(
            "--image/--video: a few-step student is distilled for text-to-video only; "
            "sample the teacher run for image-to-video or continuation"
        )


def slug(text: str, max_len: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "prompt"


def write_samples(
    outdir: str | os.PathLike,
    videos: np.ndarray,
    prompts: Sequence[str],
    params: dict[str, Any],
    *,
    fps: float = 8.0,
    scale: int = 1,
) -> list[pathlib.Path]:
    """Writes `<index>_<slug>.mp4`, a JSON sidecar for each, and `contact_sheet.png`."""
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (video, prompt) in enumerate(zip(videos, prompts, strict=True)):
        path = outdir / f"{i:03d}_{slug(prompt)}.mp4"
        video_io.write_video(path, video, fps=fps, scale=scale)
        sidecar = {**params, "prompt": prompt, "index": i, "shape": list(video.shape)}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        paths.append(path)
    sheet = video_io.contact_sheet([video_io.to_uint8(v) for v in videos])
    video_io.write_png(outdir / "contact_sheet.png", sheet, scale=max(1, scale // 2))
    return paths


def _batch_key(config, request: Request) -> tuple:
    """Requests with equal keys share one compiled sampler and run in one batch."""
    o = dataclasses.replace(request.options, seed=0)
    shape = pixel_shape(config, o)
    kind = "image" if request.image else "video" if request.video else ""
    return (shape, o.num_steps, o.cfg_scale, o.sampler, o.shift, kind, o.cond_frames)


def batches(config, requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """Requests grouped by `_batch_key` (first-appearance order), in chunks of batch_size."""
    groups: dict[tuple, list[Request]] = {}
    for r in requests:
        groups.setdefault(_batch_key(config, r), []).append(r)
    out = []
    for group in groups.values():
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_clip(config, outdir: pathlib.Path, request: Request, video, gif: bool) -> pathlib.Path:
    """`<outdir>/<index>_<prompt slug>.mp4` (and a .gif beside it if asked) of one request's
    video at `sample.fps`, upscaled by `sample.video_scale`; the mp4's path."""
    path = outdir / f"{request.index:03d}_{slug(request.prompt)}.mp4"
    fps, scale = config.sample.fps, config.sample.video_scale
    video_io.write_video(path, video, fps=fps, scale=scale)
    if gif:
        video_io.write_video(path.with_suffix(".gif"), video, fps=fps, scale=scale)
    return path


def summarize(config, gen: Generator, outdir: pathlib.Path, written: dict, totals: dict) -> dict:
    """Writes `contact_sheet.png` of the `written` videos (`{index: (path, video)}`) and
    returns the job's summary: output folder, sheet, videos in request order, checkpoint,
    weights and timings."""
    order = sorted(written)
    sheet = video_io.contact_sheet([video_io.to_uint8(written[i][1]) for i in order])
    sheet_path = video_io.write_png(
        outdir / "contact_sheet.png", sheet, scale=max(1, config.sample.video_scale // 2)
    )
    return {
        "output": str(outdir),
        "contact_sheet": str(sheet_path),
        "videos": [str(written[i][0]) for i in order],
        "checkpoint_step": gen.step,
        "weights": gen.weights,
        "params_sha256": gen.params_hash,
        "timings": totals,
    }


def sample_to_dir(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    prompts: Sequence[str],
    options: SampleOptions,
    *,
    step: int | None = None,
    ema_decay: float | None = None,
    output: str | os.PathLike | None = None,
    generator: Generator | None = None,
    requests: Sequence[Request] | None = None,
    batch_size: int = 0,
    gif: bool = False,
    allow_untrained_shape: bool = False,
    log: Callable[[str], None] | None = _stderr,
) -> dict[str, Any]:
    """Samples `requests` (default: one per prompt with `options`, noise index = position)
    and writes videos, sidecars and a contact sheet; returns a summary.

    Every request is validated before the checkpoint is restored. Requests are batched by
    shape and sampler settings (`batch_size`, default `sample.batch_size`); `log` gets a
    time split per batch and an ETA after the first of several.
    """
    if requests is None:
        requests = [Request(p, options, index=i) for i, p in enumerate(prompts)]
    requests = list(requests)
    tokenizer = generator.tokenizer if generator else None
    validate_requests(
        config,
        None if generator else workdir,
        requests,
        allow_untrained_shape=allow_untrained_shape,
        tokenizer=tokenizer,
    )
    log = log or (lambda line: None)
    t0 = time.perf_counter()
    gen = generator or Generator.from_workdir(workdir, config, step=step, ema_decay=ema_decay)
    restore_s = time.perf_counter() - t0
    outdir = pathlib.Path(output or pathlib.Path(workdir) / "samples" / str(gen.step))
    outdir.mkdir(parents=True, exist_ok=True)
    base = {
        **gen.checkpoint_info(),
        "params_sha256": gen.params_hash,
        "fps": config.sample.fps,
        "tokenizer": gen.tokenizer.id,
        "text_encoder": gen.text_encoder.id,
        "workdir": str(workdir),
    }
    todo = batches(config, requests, batch_size or int(config.sample.batch_size))
    totals: dict[str, float] = {"restore_s": restore_s}
    written: dict[int, tuple[pathlib.Path, np.ndarray]] = {}
    started = time.perf_counter()
    for b, batch in enumerate(todo):
        o = batch[0].options
        shape = pixel_shape(config, o)
        given, task, k = None, "t2v", 0
        if batch[0].image or batch[0].video:
            loaded = [load_given_pixels(r, gen.tokenizer, *shape) for r in batch]
            given = np.stack([g for g, _, _ in loaded])
            task, k = loaded[0][1], loaded[0][2]
            weights = dict(zip(conditioning.TASKS, conditioning.task_weights(config.diffusion)))
            if weights[task] <= 0:
                log(
                    f"warning: the run was trained without the {task!r} task (diffusion.tasks="
                    f"{dict(config.diffusion.tasks)}): the given frames are kept, but the "
                    "generated ones may not follow them"
                )
        videos, timings = gen.generate(
            [r.prompt for r in batch],
            o,
            seeds=[r.options.seed for r in batch],
            indices=[r.index for r in batch],
            given=given,
            task=task,
        )
        t1 = time.perf_counter()
        alpha = gen._alpha(o, gen._latent_shape(o))
        for r, video in zip(batch, videos, strict=True):
            path = write_clip(config, outdir, r, video, gif)
            sidecar = {
                **base,
                **dataclasses.asdict(r.options),
                **({"sampler": "consistency"} if gen.student else {}),
                **({"cache_threshold": cache_threshold(config)} if cache_threshold(config) else {}),
                "num_frames": shape[0],
                "height": shape[1],
                "width": shape[2],
                "shift_alpha": alpha,
                "prompt": r.prompt,
                "index": r.index,
                "noise": "normal(fold_in(key(seed), index), latent_shape) float32",
                "latent_shape": list(gen._latent_shape(o)),
                "shape": list(video.shape),
                "task": task,
                "given_latent_frames": k,
                "image": r.image,
                "image_sha256": sha256_file(r.image) if r.image else "",
                "video": r.video,
                "video_sha256": sha256_file(r.video) if r.video else "",
            }
            path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True))
            written[r.index] = (path, video)
        timings["write_s"] = time.perf_counter() - t1
        for key, value in timings.items():
            totals[key] = totals.get(key, 0.0) + value
        line = (
            f"batch {b + 1}/{len(todo)}: {len(batch)} video(s) {'x'.join(map(str, shape))}, "
            f"text {timings['text_encode_s']:.2f} s, compile {timings['compile_s']:.2f} s, "
            f"denoise {timings['denoise_s']:.2f} s ({timings['denoise_per_step_s'] * 1e3:.1f} "
            f"ms/step x {o.num_steps}), decode {timings['decode_s']:.2f} s, "
            f"write {timings['write_s']:.2f} s"
        )
        if b == 0 and len(todo) > 1:
            per_batch = time.perf_counter() - started - timings["compile_s"]
            line += f"; ETA {per_batch * (len(todo) - 1):.1f} s for {len(todo) - 1} more"
        log(line)
    totals["denoise_per_step_s"] = totals.get("denoise_s", 0.0) / max(
        1, sum(b[0].options.num_steps for b in todo)
    )
    return summarize(config, gen, outdir, written, totals)
