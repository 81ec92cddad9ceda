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

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.config import ConfigError
from sora_jax.models import lora as lora_lib
from sora_jax.models import text as text_lib
from sora_jax.models import wan_experts
from sora_jax.run import checkpoint as ckpt_lib
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
    encoder = text_lib.step_encoder(config.text_encoder)
    if encoder is not None:  # the frozen text encoder in the step, as setup.setup_state
        text_shardings = encoder.param_shardings(mesh)
        text_abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            encoder.abstract_params(),
            text_shardings,
        )
        abstract = abstract.replace(text_encoder=text_abstract)
        shardings = shardings.replace(text_encoder=text_shardings)
    return model, tx, init_fn, abstract, shardings


def restore_params_for_sampling(
    workdir, config, manifest, mesh, rules, *, step=None, ema_decay=None
):
    """`(params, step, weights)` of a two-expert run: `{'high': ..., 'low': ...}` (raw or an
    EMA; LoRA factors merged into the recorded base), as `params.restore_params_for_sampling`
    for one model."""
    workdir = pathlib.Path(workdir)
    _, _, init_fn, abstract, shardings = setup_state(config, manifest, mesh, rules)
    if ema_decay:
        key = state_lib.ema_key(ema_decay)
        if key not in abstract.ema:
            raise ValueError(
                f"the run keeps no EMA with decay {ema_decay}; it has "
                f"{list(config.optimizer.ema_decays)} (use 0 for the raw parameters)"
            )
        target, weights = {"ema": {key: abstract.ema[key]}}, f"ema {ema_decay:g}"
    else:
        target, weights = {"params": abstract.params}, "raw"
    with jax.set_mesh(mesh):
        restored, step = ckpt_lib.restore_params(workdir / "checkpoints", target, step)
    params = restored["ema"][key] if ema_decay else restored["params"]
    lora = lora_lib.LoraConfig.from_config(config.get("lora"))
    if lora.enabled:
        base = params_lib.lora_base(workdir, init_fn, abstract, shardings, mesh, rules, config)
        with jax.set_mesh(mesh):
            params = jax.jit(lora_lib.merge, static_argnums=2)(base, params, lora.scale)
        weights += f" + lora r={lora.rank}"
    return params, step, weights + f" (two experts, boundary {check_config(config):g})"
