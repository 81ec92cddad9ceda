"""The in-training evaluation, every `eval_every_steps`: the fixed-noise validation loss
per bucket and timestep (sora_jax/evaluation/val_loss.py) and a fixed-seed sample grid
through the code of `sora_jax.sample`, written to `samples/<step>/`."""

from __future__ import annotations

import jax

from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib
from sora_jax.evaluation.val_loss import ValidationLoss
from sora_jax.models import lora as lora_lib
from sora_jax.run import train_state as state_lib


class Evaluator:
    """Evaluates a live train state: `evaluator(state, step) -> {'eval/…': value}`; the
    samples use the weights `sample.ema_decay` names (a LoRA run's factors merged)."""

    def __init__(self, config, workdir, pipeline, model, mesh, manifest):
        self.config, self.workdir, self.mesh, self.manifest = config, workdir, mesh, manifest
        self.val_loss = ValidationLoss(config, pipeline, model, mesh)

    def _params(self, state):
        decay = self.config.sample.get("ema_decay", 0.0)
        params, weights = state.params, "raw"
        if decay:
            params, weights = state.ema[state_lib.ema_key(decay)], f"ema {decay:g}"
        if state.base is not None:  # LoRA: the model is the base with the factors merged
            lora = lora_lib.LoraConfig.from_config(self.config.get("lora"))
            params = jax.jit(lora_lib.merge, static_argnums=2)(state.base, params, lora.scale)
        return params, weights

    def validation(self, state) -> dict[str, float]:
        return self.val_loss(self._params(state)[0], state.text_encoder)

    def samples(self, state, step: int) -> None:
        params, weights = self._params(state)
        gen = generate.Generator(self.config, self.manifest, params, step, weights)
        if state.text_encoder is not None:  # the copy on the mesh, not a second one
            gen.text_encoder.use_params(state.text_encoder)
        options = requests_lib.SampleOptions.from_config(self.config.sample)
        generate.sample_to_dir(
            self.config, self.workdir, list(self.config.sample.prompts), options, generator=gen
        )

    def __call__(self, state, step: int) -> dict[str, float]:
        out = self.validation(state)
        if self.config.sample.get("prompts"):
            self.samples(state, step)
        return out
