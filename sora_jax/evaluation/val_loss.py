"""The fixed-noise validation loss of a set of parameters on one fixed batch per bucket
(sora_jax.diffusion.validation): the same numbers in training (the eval hook,
sora_jax/training/eval_hook.py) and from a checkpoint (the `val_loss` evaluator).

By default the batch of a bucket is the first batch the data schedule draws from it:
training data, so the number tracks fit, not generalization. Given `batches` (host
batches by bucket, e.g. the held-out split's records, sora_jax.data.holdout) it is those.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import linen as nn

from sora_jax.data import pipeline as pipeline_lib
from sora_jax.diffusion import flow, validation
from sora_jax.models import dit
from sora_jax.models import text as text_lib


class ValidationLoss:
    """`eval/val_<loss name>/<bucket>` of parameters on each weighted bucket's fixed batch."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        pipeline,
        model: nn.Module,
        mesh,
        batches: dict[str, dict[str, Any]] | None = None,
    ):
        """`pipeline` gives each weighted bucket's first batch, unless `batches` (bucket ->
        host batch of `fields` and its 'layout', as `to_global_batch` takes) is given."""
        self.config, self.pipeline, self.mesh = config, pipeline, mesh
        self.batches = batches
        self.apply_fn = dit.make_apply_fn(model)
        self.text_encoder = text_lib.step_encoder(config.text_encoder)  # embed='train_step'
        self._fns: dict[str, Any] = {}

    def _keys(self) -> list[str]:
        if self.batches is not None:
            return list(self.batches)
        return [b.key for b in self.pipeline.buckets if b.weight > 0]

    def _batch(self, key: str) -> dict[str, jax.Array]:
        if self.batches is not None:
            host = self.batches[key]
            fields = [k for k in host if k != "layout"]
        else:
            step = self.pipeline.first_step_of_each_bucket()[key]
            host = self.pipeline.batch_at(step)
            fields = self.pipeline.fields
        batch = pipeline_lib.to_global_batch(host, self.mesh, fields=fields)
        return {k: batch[k] for k in fields}

    def __call__(self, params, text_params=None) -> dict[str, float]:
        """The losses of `params`; with the text encoder in the step, the batch's ids are
        embedded with `text_params` (by default the encoder's weights, read once)."""
        if self.text_encoder is not None and text_params is None:
            self.text_encoder.load()
            text_params = self.text_encoder.params
        out = {}
        cond = int(self.config.model.get("cond_channels", 0) or 0)
        for key in self._keys():
            batch = self._batch(key)
            if key not in self._fns:
                shape = tuple(batch["latents"].shape[1:])  # [T', H', W', C]
                alpha = flow.shift_alpha(
                    self.config.diffusion, shape, tuple(self.config.model.patch_size)
                )

                def fn(params, text_params, batch, alpha=alpha):
                    key = jax.random.key(self.config.seed + 1)
                    if self.text_encoder is not None:
                        batch = text_lib.embed_batch(self.text_encoder, text_params, batch)
                    return validation.validation_loss(
                        self.apply_fn, params, batch, key, self.config.diffusion, alpha,
                        cond_channels=cond,
                    )  # fmt: skip

                self._fns[key] = jax.jit(fn)
            values = self._fns[key](params, text_params, batch)
            for name, value in jax.device_get(values).items():
                out[f"eval/val_{name}/{key}"] = float(value)
        return out
