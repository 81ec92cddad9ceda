"""Both Wan 2.2 A14B experts in one run: the state of a config with an `experts` section,
for the trainer (training/experts.py), the sampler and the evaluators (evaluation/
generate.py) alike (docs/wan.md, "Both experts in one run").

    config.experts = ConfigDict(dict(boundary_ratio=0.875))   # diffusers' boundary_ratio

The model is `wan_experts.TwoExpertDiT` over two VideoDiTs of `config.model`: the state's
`params`, optimizer state and every EMA are trees `{'high': ..., 'low': ...}`, each expert's
leaves carrying the VideoDiT's logical axis names, so the mesh shards each expert as it
would shard a one-expert run. LoRA (`lora.rank > 0`) factors each expert separately with
the same `lora.targets`: `params = {'high': factors, 'low': factors}` on a frozen `base`
of both experts. Training times are drawn over all of [0, 1] (`diffusion.time_range` must
be left at its default) and each sample goes to its expert by the boundary rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.config import ConfigError
from sora_jax.models import lora as lora_lib
from sora_jax.models import wan_experts
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import params as params_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether a run trains two experts: its config has an `experts` section."""
    return config.get("experts") is not None


def check_config(config: ml_collections.ConfigDict) -> float:
    """The boundary ratio of a two-expert config, or a ConfigError naming the field."""
    try:
        ratio = wan_experts.check_boundary(config.experts.get("boundary_ratio", -1.0))
    except ValueError as e:
        raise ConfigError(str(e).replace("model.boundary_ratio", "experts.boundary_ratio")) from e
    lo, hi = config.diffusion.get("time_range", None) or (0.0, 1.0)
    if (float(lo), float(hi)) != (0.0, 1.0):
        raise ConfigError(
            f"diffusion.time_range=({lo}, {hi}) restricts one expert's run; a two-expert run "
            "(config.experts) draws times over [0, 1] and routes each sample to its expert: "
            "remove diffusion.time_range, or drop config.experts to train one expert"
        )
    return ratio


def model_for(config: ml_collections.ConfigDict, manifest: dict[str, Any]):
    """The TwoExpertDiT of a config: two VideoDiTs of `config.model` and the boundary."""
    ratio = check_config(config)
    return wan_experts.two_experts(setup.model_for(config, manifest), ratio)


def make_init_fn(model, tx, example_inputs: tuple, ema_decays: tuple[float, ...], lora=None):
    """`init(rng) -> TrainState` (boxed leaves) of both experts; with LoRA each expert's
    kernels get their own factors (`lora.targets` matched inside each expert's tree)."""

    def init(rng):
        params = model.init(rng, *example_inputs)["params"]  # {'high': ..., 'low': ...}
        trained = params
        if lora is not None and lora.enabled:
            trained = {
                name: lora_lib.init(jax.random.fold_in(rng, 1 + i), params[name], lora)
                for i, name in enumerate(("high", "low"))
            }
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=trained,
            opt_state=tx.init(trained),
            ema={state_lib.ema_key(d): trained for d in ema_decays},
            base=params if trained is not params else None,
        )

    return init


def setup_state(config, manifest, mesh, rules):
    """`setup.setup_state` for two experts: `(model, tx, init_fn, abstract, shardings)`."""
    model = model_for(config, manifest)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    init_fn = make_init_fn(
        model,
        tx,
        setup.example_inputs(config, manifest),
        tuple(config.optimizer.ema_decays),
        lora=lora_lib.LoraConfig.from_config(config.get("lora")),
    )
    abstract, shardings = state_lib.abstract_state(init_fn, mesh, rules)
    abstract, shardings = setup.with_text_encoder(config, abstract, shardings, mesh)
    return model, tx, init_fn, abstract, shardings


def restore_params_for_sampling(
    workdir, config, manifest, mesh, rules, *, step=None, ema_decay=None
):
    """`(params, step, weights)` of a two-expert run: `{'high': ..., 'low': ...}` (raw or an
    EMA; LoRA factors merged into the recorded base), as `params.restore_params_for_sampling`
    for one model."""
    params, step, weights = params_lib.restore_params_for_sampling(
        workdir, config, manifest, mesh, rules, step=step, ema_decay=ema_decay, build=setup_state
    )
    return params, step, weights + f" (two experts, boundary {check_config(config):g})"
