"""The in-training evaluation. With `config.evals` (name -> {type, every_steps, options}),
each entry whose `every_steps` divides the step runs through the evaluator that
`sora_jax.evaluate` runs on a checkpoint (sora_jax/evaluation/evaluators.py), on the live
weights, into `eval/<step>/<name>.json` and the scalars `eval/<name>/<score>`. Without it,
every `eval_every_steps`: the fixed-noise validation loss per bucket and timestep
(sora_jax/evaluation/val_loss.py) and a fixed-seed sample grid through the code of
`sora_jax.sample`, written to `samples/<step>/`.

A sample grid (the legacy one, or an entry of type `samples`) also comes back as an image,
its contact sheet (one row of evenly spaced frames per prompt, uint8 `[H, W, 3]`), under
`eval/samples` or `eval/<name>/samples`: the metrics writer puts images in TensorBoard
and scalars in metrics.jsonl and TensorBoard (sora_jax/training/metrics.py)."""

from __future__ import annotations

import jax
import numpy as np

from sora_jax import video_io
from sora_jax.evaluation import evaluators, generate
from sora_jax.evaluation import requests as requests_lib
from sora_jax.evaluation.val_loss import ValidationLoss
from sora_jax.models import lora as lora_lib
from sora_jax.run import train_state as state_lib

# The name `due` gives the evaluation of a config without `evals`.
LEGACY = "eval_every_steps"


def schedule(config) -> dict[str, int]:
    """Evaluation name -> its period in steps (0 = never in training)."""
    evals = evaluators.named_evals(config)
    if evals:
        return {name: int(e.get("every_steps", 0)) for name, e in evals.items()}
    return {LEGACY: int(config.get("eval_every_steps", 0))}


def due(config, step: int) -> list[str]:
    """The evaluations that run after step `step` (counted from 1)."""
    return [n for n, every in schedule(config).items() if every > 0 and step % every == 0]


class Evaluator:
    """Evaluates a live train state: `evaluator(state, step) -> {'eval/…': value}`, on the
    weights `sample.ema_decay` names (a LoRA run's factors merged): those
    `sora_jax.evaluate` restores from the step's checkpoint."""

    def __init__(self, config, workdir, pipeline, model, mesh, manifest):
        self.config, self.workdir, self.mesh, self.manifest = config, workdir, mesh, manifest
        self.evals = evaluators.named_evals(config)
        if not self.evals:
            self.val_loss = ValidationLoss(config, pipeline, model, mesh)

    def _params(self, state):
        decay = self.config.sample.get("ema_decay", 0.0)
        params, weights = state.params, "raw"
        if decay:
            params, weights = state.ema[state_lib.ema_key(decay)], f"ema {decay:g}"
        if state.base is not None:  # LoRA: the model is the base with the factors merged
            lora = lora_lib.LoraConfig.from_config(self.config.get("lora"))
            params = jax.jit(lora_lib.merge, static_argnums=2)(state.base, params, lora.scale)
            weights += f" + lora r={lora.rank}"  # as params.restore_params_for_sampling
        return params, weights

    def _generator(self, state, step: int) -> generate.Generator:
        params, weights = self._params(state)
        gen = generate.Generator(self.config, self.manifest, params, step, weights)
        if state.text_encoder is not None:  # the copy on the mesh, not a second one
            gen.text_encoder.use_params(state.text_encoder)
        return gen

    def validation(self, state) -> dict[str, float]:
        return self.val_loss(self._params(state)[0], state.text_encoder)

    def samples(self, state, step: int) -> dict[str, np.ndarray]:
        options = requests_lib.SampleOptions.from_config(self.config.sample)
        summary = generate.sample_to_dir(
            self.config,
            self.workdir,
            list(self.config.sample.prompts),
            options,
            generator=self._generator(state, step),
        )
        return {"eval/samples": video_io.read_image(summary["contact_sheet"])}

    def named(self, state, step: int, names: list[str]) -> dict[str, float | np.ndarray]:
        """The entries `names` of `config.evals`, as `sora_jax.evaluate --evals` runs them:
        their scalars, and the contact sheet of each that wrote one."""
        gen = self._generator(state, step)
        options = requests_lib.SampleOptions.from_config(self.config.sample)
        out = {}
        for name in names:
            report = evaluators.evaluate(
                self.config, self.workdir, options, step=step, generator=gen, name=name
            )
            out.update(evaluators.scalars(name, report))
            if report.get("contact_sheet"):
                out[f"eval/{name}/samples"] = video_io.read_image(report["contact_sheet"])
        return out

    def __call__(self, state, step: int) -> dict[str, float | np.ndarray]:
        if self.evals:
            return self.named(state, step, due(self.config, step))
        out = self.validation(state)
        if self.config.sample.get("prompts"):
            out.update(self.samples(state, step))
        return out
