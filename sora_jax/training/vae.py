r"""Training the causal VAE tokenizer on pixel clips, then exporting it as an artifact.

The step minimizes, on clips `x [B, T, H, W, 3]` in [-1, 1],

    loss  = recon + kl_weight · kl
    recon = mean |x - x_hat|   (loss.recon = 'l1')   or   mean (x - x_hat)²   ('l2')
    kl    = mean over latent elements of (mean² + exp(logvar) - 1 - logvar) / 2
    psnr  = 10 log10(2² / mse)   (pixels in [-1, 1] span 2: the PSNR of [0, 1] pixels)

where `x_hat` decodes `z = mean + exp(logvar / 2) eps`, `eps` drawn from
`fold_in(key(seed), step)` (docs/design.md, Decisions), so a resumed run draws the same noise.

The family `VAE` plugs into the one training loop (training/loop.py, by `model.name=
'causal_vae'`), so a VAE run has every guarantee of a DiT run: resume from the newest
readable checkpoint, refusal of a structure-changing resume, `--init_from`, non-finite
updates skipped and rolled back, SIGTERM save-and-exit, the watchdog. Data are synthetic clips
(sora_jax.data.synthetic) rendered on the fly: global row `p = step · B + i` is training
clip `perm_e[p mod N]`, `perm_e` a permutation drawn from `(data.source.seed, epoch e)`,
so batches depend on the step alone and a checkpoint's data state is that step. Held-out
clips are indices `N .. N + data.eval_clips - 1` of the same seed, never trained on. The
end of a run (not a preempted one) writes WORKDIR/tokenizer/ (export_tokenizer) with latent
statistics measured on `export.norm_clips` training clips.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from sora_jax.data import synthetic
from sora_jax.models import vae as vae_lib
from sora_jax.models import vae_artifact
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import train_state as state_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import families
from sora_jax.training import plan as plan_lib
from sora_jax.training.step import apply_update, step_key

# The VAE config check lives with the other config checks (sora_jax/run/validate.py).
validate_config = validate_lib.validate_vae


# --- Data -------------------------------------------------------------------------------


def clip_indices(seed: int, num_clips: int, rows: range) -> list[int]:
    """Training clip of each global row: `perm_e[p mod N]` with `e = p // N`."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for p in rows:
        e = p // num_clips
        if e not in perms:
            perms[e] = np.random.default_rng([seed, e]).permutation(num_clips)
        out.append(int(perms[e][p % num_clips]))
    return out


def render(data: ml_collections.ConfigDict, indices) -> np.ndarray:
    """Synthetic clips `[B, T, H, W, 3]` float32 in [-1, 1]."""
    return np.stack(
        [
            synthetic.synthetic_clip(i, data.source.seed, data.frames, data.height, data.width)[
                "video"
            ]
            for i in indices
        ]
    ).astype(np.float32, copy=False)


def host_batch(config: ml_collections.ConfigDict, step: int) -> dict[str, np.ndarray]:
    """This process's rows of step `step`'s global batch (processes in order)."""
    per_host = config.data.global_batch_size // jax.process_count()
    lo = step * config.data.global_batch_size + jax.process_index() * per_host
    idx = clip_indices(
        config.data.source.seed, config.data.source.num_clips, range(lo, lo + per_host)
    )
    return {"video": render(config.data, idx)}


# --- State and step ---------------------------------------------------------------------


def make_init_fn(cfg: vae_lib.VAEConfig, tx: optax.GradientTransformation, ema_decays):
    """`init(rng) -> TrainState` with boxed (logically named) parameters."""

    def init(rng):
        params = vae_lib.init_params(cfg, rng, boxed=True)
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),  # boxed too: moments take the parameters' shardings
            ema={state_lib.ema_key(d): params for d in ema_decays},
        )

    return init


def make_vae_train_step(
    model: vae_lib.CausalVAE,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
):
    """`train_step(state, batch) -> (state, metrics)` for `batch = {'video': [B,T,H,W,3]}`.

    Like step.make_train_step: a step with a non-finite loss or gradient keeps the state
    (except the step counter) and reports `train/skipped = 1`.
    """
    decays = tuple(config.optimizer.ema_decays)
    kl_weight, recon_kind = float(config.loss.kl_weight), config.loss.recon

    def train_step(state, batch):
        video = batch["video"]
        key = step_key(config.seed, state.step)

        def loss_fn(params):
            x_hat, mean, logvar = model.apply({"params": params}, video, key)
            err = x_hat - video
            mse = jnp.mean(jnp.square(err))
            recon = jnp.mean(jnp.abs(err)) if recon_kind == "l1" else mse
            kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
            return recon + kl_weight * kl, (recon, kl, mse)

        (loss, (recon, kl, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, finite, grad_norm = apply_update(state, grads, loss, tx, decays)
        metrics = {
            "train/loss": loss,
            "train/recon": recon,
            "train/kl": kl,
            "train/psnr": 10.0 * jnp.log10(4.0 / mse),
            "train/grad_norm": grad_norm,
            "train/lr": schedule(state.step),
            "train/skipped": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    return train_step


# --- Evaluation -------------------------------------------------------------------------


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-clip PSNR `[B]` in dB of clips `[B, T, H, W, 3]` in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean(np.square(np.asarray(x, np.float64) - y), axis=(1, 2, 3, 4))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def reconstruct(cfg: vae_lib.VAEConfig, params, video) -> jax.Array:
    """Encode (means) and decode, clipped to [-1, 1]: what the tokenizer round trip gives."""
    norm = vae_lib.LatentNorm.identity(cfg.z_dim)  # normalization cancels in a round trip
    return vae_lib.decode(cfg, params, norm, vae_lib.encode(cfg, params, norm, video))


def held_out(config: ml_collections.ConfigDict, batch: int = 16):
    """Batches of the held-out clips (indices N .. N + eval_clips - 1)."""
    n = config.data.source.num_clips
    for lo in range(n, n + config.data.eval_clips, batch):
        yield render(config.data, range(lo, min(lo + batch, n + config.data.eval_clips)))


def evaluate(config, cfg: vae_lib.VAEConfig, params) -> dict[str, float]:
    """Mean per-clip PSNR of the held-out round trip."""
    scores = [psnr(x, np.asarray(reconstruct(cfg, params, x))) for x in held_out(config)]
    return {"eval/psnr": float(np.mean(np.concatenate(scores)))}


def export_params(config, state):
    """The parameters to export: the EMA of `export.ema_decay`, or the raw ones when 0."""
    decay = config.export.ema_decay
    if not decay:
        return state.params
    key = state_lib.ema_key(decay)
    if key not in state.ema:
        raise ValueError(
            f"export.ema_decay={decay} is not in optimizer.ema_decays="
            f"{tuple(config.optimizer.ema_decays)}; add it there or set export.ema_decay=0"
        )
    return state.ema[key]


# --- The family: what the shared loop (training/loop.py) trains ------------------------


class Clips:
    """The training clips as the loop's data source: the batch of step `n` is
    `host_batch(config, n)`, so the state to save is the next step alone."""

    fields = ("video",)

    def __init__(self, config: ml_collections.ConfigDict):
        self.config, self.step = config, 0
        d = config.data
        self.key = f"{d.frames}x{d.height}x{d.width}"  # the one bucket, named as the DiT's

    def __next__(self) -> dict[str, Any]:
        batch = host_batch(self.config, self.step)
        out = {**batch, "bucket": self.key, "step": self.step}
        self.step += 1
        return out

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def report(self) -> str:
        d = self.config.data
        return (
            f"data: synthetic clips {self.key} (seed {d.source.seed}), {d.source.num_clips} "
            f"training clips, {d.eval_clips} held out, global batch {d.global_batch_size}"
        )

    def close(self) -> None:
        pass


class VAE(families.Family):
    """The causal VAE on rendered clips; after the last step it exports WORKDIR/tokenizer
    (or `export.dir`) with latent statistics of `export.norm_clips` training clips."""

    def data(self):
        self.cfg = vae_lib.config_from_model(self.config.model)
        self.clips = Clips(self.config)
        return self.clips

    def state(self):
        self.model = vae_lib.CausalVAE(self.cfg)
        self.tx = optimizer_lib.make_optimizer(self.config.optimizer, self.config.total_steps)
        init_fn = make_init_fn(self.cfg, self.tx, tuple(self.config.optimizer.ema_decays))
        abstract, shardings = state_lib.abstract_state(init_fn, self.mesh, self.rules)
        return init_fn, abstract, shardings

    def describe(self, state) -> str:
        cfg = self.cfg
        return (
            f"VAE: {state_lib.param_count(state.params):,} parameters, compression "
            f"{cfg.temporal}x{cfg.spatial}x{cfg.spatial}"
        )

    def compile(self, abstract, shardings) -> dict[str, families.CompiledStep]:
        config, mesh = self.config, self.mesh
        schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
        jitted = jax.jit(
            make_vae_train_step(self.model, self.tx, config, schedule),
            in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
            out_shardings=(shardings, mesh_lib.replicated(mesh)),
            donate_argnums=(0,),
        )
        d = config.data
        shape = (d.global_batch_size, d.frames, d.height, d.width, 3)
        batch = {
            "video": jax.ShapeDtypeStruct(
                shape, jnp.float32, sharding=mesh_lib.batch_sharding(mesh)
            )
        }
        with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
            exe = jitted.lower(abstract, batch).compile()
        step = families.CompiledStep(
            exe, batch, d.global_batch_size, tokens=None, flops=None,
            fingerprint=plan_lib.step_fingerprint(exe.as_text()),
        )  # fmt: skip
        return {self.clips.key: step}

    def evaluate(self, state, step: int) -> dict[str, float]:
        if step >= self.config.total_steps:
            return {}  # the end is measured once, by `finish`, on the exported weights
        return evaluate(self.config, self.cfg, export_params(self.config, state))

    def finish(self, state, writer, start: int) -> dict[str, Any]:
        config, cfg = self.config, self.cfg
        params = jax.device_get(export_params(config, state))
        scores = evaluate(config, cfg, params)
        if start < config.total_steps:  # a run resumed after its end has this line already
            writer.write(config.total_steps, scores)
        norm_idx = range(config.export.norm_clips)
        norm = vae_artifact.measure_norm(
            cfg,
            params,
            (render(config.data, norm_idx[i : i + 16]) for i in range(0, len(norm_idx), 16)),
        )
        out = pathlib.Path(config.export.dir or self.workdir / "tokenizer")
        info = {
            "steps": config.total_steps,
            "data": json.loads(config.data.to_json_best_effort()),
            "norm_clips": config.export.norm_clips,
            **scores,
        }
        digest = ""
        if jax.process_index() == 0:
            digest = vae_artifact.export_tokenizer(
                out, params, cfg, norm, name=config.export.name, info=info
            )
        return {"tokenizer": str(out), "hash": digest, **scores}
