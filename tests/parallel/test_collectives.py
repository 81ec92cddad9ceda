"""The compiled train step's collectives are what the sharding strategy implies (parsed
from the HLO of the partitioned program, 8 fake CPU devices, tiny model)."""

import re

import jax
import pytest

from sora_jax import config as config_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import setup
from sora_jax.training import plan
from sora_jax.training import step as step_lib

BATCH, TOKENS = 16, 80  # global batch; 5 x 4 x 4 video tokens of the demo bucket


def compiled_hlo(devices, **mesh) -> tuple[str, dict]:
    config = config_lib.load_config("experiments/demo.py:tiny")
    config.data.global_batch_size = BATCH
    config.mesh.update(mesh)
    m = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    geometry = plan.dataset_geometry(config)
    model, tx, _, abstract, shardings = setup.setup_state(config, geometry, m, rules)
    jitted = step_lib.jit_train_step(model, tx, config, m, shardings)
    steps = plan.config_step_shapes(config, geometry, m.shape["data"] * m.shape["fsdp"])
    compiled, _ = plan.compile_steps(jitted, abstract, geometry, steps, config, m, rules)
    return next(iter(compiled.values())).as_text(), abstract.params


def collectives(hlo: str, op: str) -> list[tuple[int, ...]]:
    """Result shapes of every `op` in the program (tuple results flattened)."""
    shapes = []
    for line in hlo.splitlines():
        if f" {op}(" not in line or "=" not in line:
            continue
        result = line.split("=", 1)[1].split(f" {op}(")[0]
        for dims in re.findall(r"[fsu]\d+\[([\d,]*)\]", result):
            shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def big_weights(params) -> set[tuple[int, ...]]:
    """Shapes of the blocks' projection matrices (attention, MLP): what FSDP gathers. (For
    the small adaLN projection outside the blocks XLA may gather the [B, 1, D] activations
    instead, which is cheaper.)"""
    return {
        tuple(x.shape)
        for x in jax.tree.leaves(params["blocks_0"])
        if x.ndim >= 2 and x.size >= 4096
    }


def full_activation(shape) -> bool:
    return len(shape) >= 2 and shape[0] == BATCH and TOKENS in shape[1:]


@pytest.fixture(scope="module")
def fsdp(devices):
    return compiled_hlo(devices, ici_data=1, ici_fsdp=8)


def test_fsdp_gathers_weights_and_reduces_their_gradients(fsdp):
    hlo, params = fsdp
    gathered = set(collectives(hlo, "all-gather"))
    weights = big_weights(params)
    assert weights and weights <= gathered, weights - gathered  # every matrix is gathered
    # Gradients of sharded weights are reduced across the fsdp group: reduce-scatter on
    # GPU/TPU; XLA's CPU backend writes it as an all-reduce of the full gradient.
    reduced = set(collectives(hlo, "reduce-scatter")) | set(collectives(hlo, "all-reduce"))
    assert weights <= reduced, weights - reduced


def test_fsdp_never_gathers_full_activations(fsdp):
    hlo, _ = fsdp
    for op in ("all-gather", "all-to-all", "all-reduce"):
        bad = [s for s in collectives(hlo, op) if full_activation(s)]
        assert not bad, (op, bad)


def test_pure_data_parallel_only_all_reduces_gradients(devices):
    hlo, params = compiled_hlo(devices, ici_data=8, ici_fsdp=1)
    # Parameters are replicated: only the per-sample metrics [B] are gathered.
    assert set(collectives(hlo, "all-gather")) <= {(BATCH,)}
    assert big_weights(params) <= set(collectives(hlo, "all-reduce"))
    assert not [s for s in collectives(hlo, "all-reduce") if full_activation(s)]
