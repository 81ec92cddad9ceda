"""Model and train-state construction from a config and a dataset manifest: the one place
that the training loop, the planner (`--mode=plan`), the sampler and the evaluators build
a run's VideoDiT, optimizer and abstract sharded state from.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sora_jax.data import buckets as buckets_lib
from sora_jax.models import build_model
from sora_jax.models import lora as lora_lib
from sora_jax.models import text as text_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import train_state as state_lib


def model_for(config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> nn.Module:
    """The VideoDiT for a config, sized to the dataset's latent channels and text width."""
    return build_model(
        config.model,
        in_channels=manifest["tokenizer"]["latent_channels"],
        text_dim=manifest["text_encoder"]["dim"],
    )


def example_inputs(config, manifest, batch: int = 1) -> tuple:
    """Zero inputs of the first bucket's shape, for initialization and abstract shapes."""
    first = buckets_lib.buckets_from_config(config.data)[0].name
    shape = manifest["buckets"][first]["shape"]
    max_len = manifest["text_encoder"]["max_length"]
    # Conditioning channels (given latents + mask) are concatenated to x_t by the loss.
    channels = shape[-1] + int(config.model.get("cond_channels", 0) or 0)
    return (
        jnp.zeros((batch, *shape[:-1], channels), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, max_len, manifest["text_encoder"]["dim"]), jnp.float32),
        jnp.ones((batch, max_len), bool),
    )


def setup_state(config, manifest, mesh, rules):
    """The model, the optimizer, the init function and the abstract sharded state (with
    the frozen text encoder's parameters when it runs in the step; `init_fn` leaves them
    None, `place_text_encoder` reads them)."""
    model = model_for(config, manifest)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    init_fn = state_lib.make_init_fn(
        model,
        tx,
        example_inputs(config, manifest),
        tuple(config.optimizer.ema_decays),
        lora=lora_lib.LoraConfig.from_config(config.get("lora")),
    )
    abstract, shardings = state_lib.abstract_state(init_fn, mesh, rules)
    abstract, shardings = with_text_encoder(config, abstract, shardings, mesh)
    return model, tx, init_fn, abstract, shardings


def with_text_encoder(config, abstract, shardings, mesh):
    """`(abstract, shardings)` with the frozen text encoder the step runs
    (`text_encoder.embed='train_step'`) added, sharded on the mesh; unchanged otherwise."""
    encoder = text_lib.step_encoder(config.text_encoder)
    if encoder is None:
        return abstract, shardings
    text_shardings = encoder.param_shardings(mesh)
    text_abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        encoder.abstract_params(),
        text_shardings,
    )
    return (
        abstract.replace(text_encoder=text_abstract),
        shardings.replace(text_encoder=text_shardings),
    )


def place_text_encoder(state, config, shardings):
    """`state` with the frozen text encoder read onto the mesh (`text_encoder.embed=
    'train_step'`); unchanged otherwise."""
    encoder = text_lib.step_encoder(config.text_encoder)
    if encoder is None:
        return state
    params = encoder.load_sharded(shardings.text_encoder)
    print(
        f"text encoder {encoder.id} in the train step: "
        f"{state_lib.param_count(params):,} frozen parameters ({encoder.load_report.source})",
        flush=True,
    )
    return state.replace(text_encoder=params)


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.training` over its defaults (configs written before a field existed work)."""
    out = ml_collections.ConfigDict(
        dict(
            init_from="",
            init_from_source="params",
            init_from_allow=(),
            max_consecutive_skips=5,
            watchdog_factor=20.0,
            watchdog_min_timeout_s=600.0,
            checkpoint_keep_period=0,
            profile_steps=(),
        )
    )
    out.update(dict(config.get("training", {})))
    return out
