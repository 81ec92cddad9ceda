"""TrainState and its sharded initialization (docs/design.md, The model and the step).

The state is a pytree `step, params, opt_state, ema (decay -> params)`, plus `base` for LoRA
fine-tuning (`config.lora.rank > 0`, sora_jax/models/lora.py): then `params` (and the
optimizer state and the EMA) hold only the LoRA factors and `base` the frozen model, which
checkpoints leave out (it is reloaded from the run's `init_from`). Without LoRA `base` is
None. Likewise `text_encoder` holds the frozen text encoder's parameters when it runs in the
step (`text_encoder.embed='train_step'`, sora_jax/models/text.py), read from its weight
files at every start and never checkpointed; otherwise None. The state is never
materialized on one device: `jax.eval_shape` gives the abstract state with its logical
axis names, the config's rules turn those into shardings, and `jax.jit(init,
out_shardings=...)` creates every shard where it lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from sora_jax.models import lora as lora_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: dict[str, Any]  # ema_key(decay) -> params averaged with that decay
    base: Any = None  # LoRA: the frozen model parameters; None for full fine-tuning
    text_encoder: Any = None  # embed='train_step': the frozen text encoder's parameters


# Frozen parts of a state: not trained, not checkpointed, put back after every restore.
FROZEN = ("base", "text_encoder")


def with_frozen(state, source):
    """`state` with the frozen parts of `source` (a restored state gets the live ones)."""
    return state.replace(**{name: getattr(source, name) for name in FROZEN})


def ema_key(decay: float) -> str:
    """`0.999 -> 'decay_0p999'`: a key without dots, safe as a checkpoint path component."""
    return f"decay_{decay:g}".replace(".", "p")


def make_init_fn(
    model: nn.Module,
    tx: optax.GradientTransformation,
    example_inputs: tuple,
    ema_decays: tuple[float, ...],
    lora=None,
) -> Callable[[jax.Array], TrainState]:
    """`init(rng) -> TrainState` whose leaves are still `nn.LogicallyPartitioned` boxes.

    With `lora` (a LoraConfig with rank > 0) the trainable `params` are the LoRA factors of
    the model's parameters, which become the frozen `base`."""

    def init(rng):
        params = model.init(rng, *example_inputs)["params"]
        if lora is not None and lora.enabled:
            factors = lora_lib.init(jax.random.fold_in(rng, 1), params, lora)
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=factors,
                opt_state=tx.init(factors),
                ema={ema_key(d): factors for d in ema_decays},
                base=params,
            )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema={ema_key(d): params for d in ema_decays},
        )

    return init


def abstract_state(init_fn: Callable, mesh: Mesh, rules) -> tuple[TrainState, Any]:
    """The abstract (unboxed) state and its shardings, without allocating anything."""
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    with nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def create_sharded_state(init_fn: Callable, mesh: Mesh, rules, seed: int) -> TrainState:
    """Initializes the state directly into its shardings."""
    _, shardings = abstract_state(init_fn, mesh, rules)

    def init_unboxed(rng):
        return nn.meta.unbox(init_fn(rng))

    # No logical rules in context here: the out_shardings place every leaf, and flax would
    # otherwise constrain kernels inside their initializers, before they take their shape.
    with jax.set_mesh(mesh):
        return jax.jit(init_unboxed, out_shardings=shardings)(jax.random.key(seed))


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
