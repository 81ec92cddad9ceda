"""Rectified flow end to end on a toy set where the caption fully determines the content.

    python benchmarks/flow_toy.py                 # ~3.5 minutes on a shared 2-core CPU
    python benchmarks/flow_toy.py --steps=1500 --pattern_scale=0.25 --noise_std=1.0

Four captions (two colours x two shapes), each mapped to a fixed random latent pattern
P_k `[T', H', W', C]`; a clip is `x_0 = pattern_scale · P_k + noise_std · n`. By default the
caption fully determines the content (noise 0.1); the second command makes the caption a
weak signal next to each clip's own variation. Two VideoDiT models of the `tiny` preset
are trained with the real loss (`sora_jax.diffusion.flow.loss_fn`): a conditional one
(caption dropout 0.1) and an unconditional one (caption dropout 1: it only ever sees the
null conditioning). Reported, on a held-out batch with fixed noise and times
(`sora_jax.diffusion.validation`):

- validation loss of the conditional model with its captions, with the null text (its
  own unconditional branch), and of the unconditional model: with the caption the pattern
  is known, so the conditional loss should be far below both baselines;
- prompt adherence of samples (`sora_jax.diffusion.sampler`, Euler) at guidance 1, 2, 4
  (`--cfg_scales`) and with the null text: the fraction whose nearest pattern is the
  prompt's, and the mean distance to the prompt's pattern over the mean distance between
  patterns; the same for held-out data (what a perfect model reproduces at guidance 1),
  and the accuracy of the conditional model at the steps of `--probe_at` during training.

Figures are recorded in docs/diffusion.md.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from sora_jax.diffusion import flow, sampler, validation
from sora_jax.models import build_model
from sora_jax.models.text import HashWordsEncoder
from sora_jax.run import optimizer as optimizer_lib

# Two colours x two shapes: captions differ by one word, patterns share a component.
CAPTIONS = ("a red square", "a red circle", "a blue square", "a blue circle")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per model")
    p.add_argument("--batch", type=int, default=32, help="clips per training step")
    p.add_argument("--latent", default="2x4x4x4", help="latent T' x H' x W' x C")
    p.add_argument("--pattern_scale", type=float, default=1.0, help="s in x_0 = s P_k + std n")
    p.add_argument("--noise_std", type=float, default=0.1, help="per-clip deviation from s P_k")
    p.add_argument("--samples", type=int, default=64, help="samples per caption and scale")
    p.add_argument("--sample_steps", type=int, default=25, help="Euler steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--probe_at", default="25,50,100", help="steps at which adherence is also measured"
    )
    p.add_argument("--cfg_scales", default="1,2,4", help="guidance scales of the samples")
    args = p.parse_args(argv)
    args.probe_at = tuple(int(v) for v in args.probe_at.split(",") if v)
    args.cfg_scales = tuple(float(v) for v in args.cfg_scales.split(",") if v)
    return args


def diffusion_config(caption_dropout: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            time_sampling="logit_normal",
            logit_mean=0.0,
            logit_std=1.0,
            shift=1.0,
            shift_base_tokens=256,
            caption_dropout=caption_dropout,
            loss_weighting="none",
        )
    )


def optimizer_config(lr: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            schedule="cosine",
            warmup_steps=20,
            lr_end=0.05,
            decay_fraction=0.2,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip=1.0,
        )
    )


class ToyData:
    """Patterns `[K, T', H', W', C]`, caption embeddings `[K, S, D]` and masks `[K, S]`."""

    def __init__(self, shape, pattern_scale, noise_std, seed):
        # P_{colour, shape} = (A_colour + B_shape) / sqrt(2): unit variance per element.
        a, b = jax.random.normal(jax.random.key(seed), (2, 2, *shape))
        patterns = jnp.stack([a[0] + b[0], a[0] + b[1], a[1] + b[0], a[1] + b[1]]) / 2**0.5
        self.patterns = pattern_scale * patterns
        self.text, self.mask = (jnp.asarray(a) for a in HashWordsEncoder(64, 8).encode(CAPTIONS))
        self.noise_std = noise_std

    def batch(self, key, n: int) -> tuple[dict, jax.Array]:
        k_label, k_noise = jax.random.split(key)
        labels = jax.random.randint(k_label, (n,), 0, len(CAPTIONS))
        x_0 = self.patterns[labels]
        x_0 = x_0 + self.noise_std * jax.random.normal(k_noise, x_0.shape)
        return {"latents": x_0, "text": self.text[labels], "text_mask": self.mask[labels]}, labels


def make_apply(model):
    return lambda p, x_t, t, text, mask: model.apply({"params": p}, x_t, t, text, mask)


def train(model, data, args, caption_dropout: float, seed: int, probe=None):
    """Trains one model; `probe(params, step)` runs after each step in `args.probe_at`."""
    shape = data.patterns.shape[1:]
    cfg = diffusion_config(caption_dropout)
    tx = optimizer_lib.make_optimizer(optimizer_config(args.lr), args.steps)
    x = jnp.zeros((1, *shape))
    # Jitted: an eager init compiles each of its hundreds of small ops on its own.
    init = jax.jit(lambda k: model.init(k, x, jnp.zeros(1), data.text[:1], data.mask[:1]))
    params = nn.meta.unbox(init(jax.random.key(seed))["params"])
    apply_fn = make_apply(model)

    @jax.jit
    def step(params, opt_state, i):
        key = jax.random.fold_in(jax.random.key(seed), i)
        batch, _ = data.batch(jax.random.fold_in(key, 100), args.batch)
        loss_of = lambda p: flow.loss_fn(apply_fn, p, batch, key, cfg)[0]
        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    opt_state = tx.init(params)
    t0, losses, probe_s = time.perf_counter(), [], 0.0
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, i)
        losses.append(loss)
        if probe is not None and i + 1 in args.probe_at:
            t_probe = time.perf_counter()
            probe(params, i + 1)
            probe_s += time.perf_counter() - t_probe
    losses = np.asarray(jax.device_get(losses))
    seconds = time.perf_counter() - t0 - probe_s  # training only, compile included
    return params, float(losses[-50:].mean()), seconds


def nearest_pattern(x: jax.Array, data: ToyData, labels: jax.Array) -> dict[str, float]:
    """Fraction of clips `x [N, T', H', W', C]` nearest to their caption's pattern, and the
    mean distance to it over the mean distance between patterns."""
    k = len(CAPTIONS)
    flat_x = x.reshape(x.shape[0], -1)  # [N, T'·H'·W'·C]
    flat_p = data.patterns.reshape(k, -1)  # [K, T'·H'·W'·C]
    d = jnp.sqrt(jnp.sum((flat_x[:, None] - flat_p[None]) ** 2, -1))  # [N, K]
    between = jnp.sqrt(jnp.sum((flat_p[:, None] - flat_p[None]) ** 2, -1))  # [K, K]
    between = jnp.mean(between[~jnp.eye(k, dtype=bool)])
    return {
        "accuracy": float(jnp.mean(jnp.argmin(d, 1) == labels)),
        "distance": float(jnp.mean(d[jnp.arange(x.shape[0]), labels]) / between),
    }


def adherence(apply_fn, params, data, args, cfg_scale: float, null_text: bool = False):
    labels = jnp.repeat(jnp.arange(len(CAPTIONS)), args.samples)  # [K·n]
    shape = data.patterns.shape[1:]
    noise = jax.random.normal(jax.random.key(args.seed + 7), (labels.shape[0], *shape))
    text, mask = data.text[labels], data.mask[labels]
    if null_text:
        text, mask = flow.null_conditioning(text, mask)
    run = jax.jit(
        lambda p, z: sampler.sample(
            apply_fn, p, z, text, mask, num_steps=args.sample_steps, cfg_scale=cfg_scale
        )
    )
    return nearest_pattern(run(params, noise), data, labels)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = tuple(int(v) for v in args.latent.split("x"))
    data = ToyData(shape, args.pattern_scale, args.noise_std, args.seed)
    model_cfg = dict(name="video_dit", preset="tiny", patch_size=(1, 2, 2))
    model = build_model(model_cfg, in_channels=shape[-1], text_dim=64)
    result: dict = {"args": vars(args), "backend": jax.default_backend()}

    scales = args.cfg_scales
    apply_fn = make_apply(model)

    def probe(params, step):  # adherence of the conditional model during training
        result.setdefault("adherence_during_training", {})[f"step_{step}"] = {
            f"cfg_{s:g}": adherence(apply_fn, params, data, args, s)["accuracy"] for s in scales
        }

    cond_params, cond_train, cond_s = train(model, data, args, 0.1, args.seed, probe)
    uncond_params, uncond_train, uncond_s = train(model, data, args, 1.0, args.seed + 1)
    result["train"] = {
        "conditional": {"final_loss": cond_train, "seconds": cond_s},
        "unconditional": {"final_loss": uncond_train, "seconds": uncond_s},
    }

    # Validation: 256 held-out clips, fixed noise and times.
    held_out, held_labels = data.batch(jax.random.key(args.seed + 12345), 256)
    text, mask = flow.null_conditioning(held_out["text"], held_out["text_mask"])
    null = {**held_out, "text": text, "text_mask": mask}
    key, cfg = jax.random.key(args.seed + 99), diffusion_config(0.0)

    def val(params, batch):
        out = validation.validation_loss(apply_fn, params, batch, key, cfg)
        return {k: float(v) for k, v in out.items()}

    result["validation"] = {
        "conditional": val(cond_params, held_out),
        "conditional_null_text": val(cond_params, null),
        "unconditional_model": val(uncond_params, held_out),
    }

    # Adherence: the held-out data themselves, then samples of the final models.
    result["adherence"] = {"data": nearest_pattern(held_out["latents"], data, held_labels)}
    for s in scales:
        result["adherence"][f"cfg_{s:g}"] = adherence(apply_fn, cond_params, data, args, s)
    result["adherence"]["null_text"] = adherence(apply_fn, cond_params, data, args, 1.0, True)
    result["adherence"]["unconditional_model"] = adherence(
        apply_fn, uncond_params, data, args, 1.0, True
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
