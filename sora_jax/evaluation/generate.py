"""Videos from a run's checkpoint: the one code path of `sora_jax.sample`, the evaluators
and the in-training sample hooks.

`Generator.from_workdir` rebuilds the model from the run's resolved config and the
dataset manifest, restores the parameters (an EMA or the raw ones) into the current mesh,
and `generate` runs the ODE sampler with classifier-free guidance, data-parallel over the
batch, then decodes latents back to pixels with the run's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import config as config_lib
from sora_jax import video_io
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import shards, tokenization
from sora_jax.diffusion import flow, sampler
from sora_jax.models import text as text_lib
from sora_jax.models import tokenizer as tokenizer_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.training import checkpoint as ckpt_lib
from sora_jax.training import loop
from sora_jax.training import state as state_lib
from sora_jax.training import step as step_lib


@dataclasses.dataclass
class SampleOptions:
    num_steps: int = 25
    cfg_scale: float = 3.0
    sampler: str = "euler"
    seed: int = 0
    bucket: str = ""  # '' = the first bucket of data.buckets
    shift: float = 0.0  # 0 = the training shift of the config

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


class Generator:
    def __init__(self, config, manifest, params, step: int, weights: str):
        self.config = config
        self.manifest = manifest
        self.params = params
        self.step = step
        self.weights = weights
        self.mesh = mesh_lib.create_mesh(config.mesh)
        self.rules = mesh_lib.logical_rules(config.mesh)
        self.model = loop.model_for(config, manifest)
        self.apply_fn = step_lib.make_apply_fn(self.model)
        self.tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
        self.text_encoder = text_lib.build_text_encoder(config.text_encoder)
        self._compiled: dict[Any, Any] = {}

    @classmethod
    def from_workdir(
        cls,
        workdir: str | os.PathLike,
        config: ml_collections.ConfigDict | None = None,
        *,
        step: int | None = None,
        ema_decay: float | None = None,
    ) -> Generator:
        """Loads a run's parameters: EMA with `ema_decay` (> 0), or the raw ones (0/None)."""
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
        mesh = mesh_lib.create_mesh(config.mesh)
        rules = mesh_lib.logical_rules(config.mesh)
        _, _, _, abstract, _ = loop.setup_state(config, manifest, mesh, rules)
        if ema_decay:
            key = state_lib.ema_key(ema_decay)
            if key not in abstract.ema:
                raise ValueError(
                    f"the run keeps no EMA with decay {ema_decay}; it has "
                    f"{list(config.optimizer.ema_decays)} (use 0 for the raw parameters)"
                )
            target = {"ema": {key: abstract.ema[key]}}
            weights = f"ema {ema_decay:g}"
        else:
            target = {"params": abstract.params}
            weights = "raw"
        with jax.set_mesh(mesh):
            restored, step = ckpt_lib.restore_params(ckpt_dir, target, step)
        params = restored["ema"][key] if ema_decay else restored["params"]
        return cls(config, manifest, params, step, weights)

    def _latent_shape(self, bucket: str) -> tuple[int, ...]:
        name = bucket or buckets_lib.buckets_from_config(self.config.data)[0].name
        b = buckets_lib.bucket_by_name(self.config.data, name)
        return self.tokenizer.latent_shape(b.frames, b.height, b.width)

    def generate(
        self, prompts: Sequence[str], options: SampleOptions
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Samples one video per prompt: `[N, T, H, W, 3]` float in [-1, 1], and timings."""
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty: every prompt must be non-empty text")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text, mask = self.text_encoder.encode(list(prompts))
        timings["text_encode_s"] = time.perf_counter() - t0

        shape = self._latent_shape(options.bucket)
        alpha = (
            options.shift
            if options.shift > 0
            else flow.shift_alpha(self.config.diffusion, shape, tuple(self.config.model.patch_size))
        )
        n = len(prompts)
        shards_ = mesh_lib.mesh_shape(self.config.mesh, self.mesh.devices.size)
        per = shards_["data"] * shards_["fsdp"]
        padded = -(-n // per) * per  # batch rounded up to the data-parallel width
        text = np.concatenate([text, np.zeros((padded - n, *text.shape[1:]), text.dtype)])
        mask = np.concatenate([mask, np.zeros((padded - n, *mask.shape[1:]), bool)])
        # Noise per prompt index from (seed, index): a prompt's video does not depend on
        # the batch it is sampled in.
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(options.seed), i))(
            jnp.arange(padded)
        )
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)

        fn_key = (shape, padded, options.num_steps, options.cfg_scale, options.sampler, alpha)
        sharding = mesh_lib.batch_sharding(self.mesh)
        # Placed explicitly: inside a mesh context (the trainer's eval hook) jnp results
        # are committed replicated arrays, which jit would not reshard implicitly.
        noise = jax.device_put(noise, sharding)
        if fn_key not in self._compiled:

            def run(params, noise, text, mask):
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
                    cond_channels=int(self.config.model.get("cond_channels", 0) or 0),
                )

            self._compiled[fn_key] = jax.jit(
                run, in_shardings=(None, sharding, sharding, sharding), out_shardings=sharding
            )
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            latents = self._compiled[fn_key](self.params, noise, text, mask)
            latents = np.asarray(jax.device_get(latents))[:n]
        timings["denoise_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        video = np.clip(np.asarray(self.tokenizer.decode(latents)), -1.0, 1.0)
        timings["decode_s"] = time.perf_counter() - t0
        return video, timings

    def checkpoint_info(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights}


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
) -> dict[str, Any]:
    """Samples `prompts` and writes videos, sidecars and a contact sheet; returns a summary."""
    gen = generator or Generator.from_workdir(workdir, config, step=step, ema_decay=ema_decay)
    videos, timings = gen.generate(prompts, options)
    outdir = pathlib.Path(output or pathlib.Path(workdir) / "samples" / str(gen.step))
    params = {
        **dataclasses.asdict(options),
        **gen.checkpoint_info(),
        "fps": config.sample.fps,
        "tokenizer": gen.tokenizer.id,
        "text_encoder": gen.text_encoder.id,
    }
    t0 = time.perf_counter()
    paths = write_samples(
        outdir, videos, prompts, params, fps=config.sample.fps, scale=config.sample.video_scale
    )
    timings["write_s"] = time.perf_counter() - t0
    return {
        "output": str(outdir),
        "videos": [str(p) for p in paths],
        "checkpoint_step": gen.step,
        "weights": gen.weights,
        "timings": timings,
    }
