"""The jitted, sharded train step: equal to a single-device step, skips non-finite updates,
and its randomness depends only on (seed, step)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sora_jax import config as config_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.training import step as step_lib

DEMO = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "demo.py")
MANIFEST = {
    "tokenizer": {"latent_channels": 12},
    "text_encoder": {"dim": 64, "max_length": 8},
    "buckets": {"5x16x16": {"shape": [5, 8, 8, 12]}},
}


def make(config, devices):
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    model, tx, init_fn, _, shardings = setup.setup_state(config, MANIFEST, mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    step = jax.jit(
        step_lib.make_train_step(model, tx, config, schedule),
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
    )
    return mesh, rules, state, step


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((n, 5, 8, 8, 12)).astype(np.float32),
        "text": rng.standard_normal((n, 8, 64)).astype(np.float32),
        "text_mask": rng.random((n, 8)) < 0.7,
    }


def run(config, devices, batches):
    mesh, rules, state, step = make(config, devices)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for b in batches:
            b = jax.device_put(b, mesh_lib.batch_sharding(mesh))
            state, metrics = step(state, b)
            losses.append(float(metrics["train/loss"]))
    return jax.device_get(state), losses


@pytest.fixture(scope="module")
def single(devices):
    """Two steps of the tiny config on one device: the reference of the sharded runs."""
    config = config_lib.load_config(f"{DEMO}:tiny")
    return run(config, devices[:1], [batch(seed=0), batch(seed=1)])


@pytest.mark.parametrize(
    "mesh_sizes, context_parallel",
    [
        (dict(ici_data=-1), "none"),  # pure data
        (dict(ici_data=1, ici_fsdp=-1), "none"),  # FSDP
        (dict(ici_data=-1, ici_tensor=2), "none"),  # tensor
        (dict(ici_data=-1, ici_context=2), "ulysses"),
        (dict(ici_data=-1, ici_context=4), "ring"),
        (dict(ici_data=2, ici_fsdp=2, ici_context=2), "ring"),  # mixed
    ],
)
def test_sharded_step_matches_single_device(devices, single, mesh_sizes, context_parallel):
    """Loss, and parameters after two updates (so gradients too), against one device."""
    config = config_lib.load_config(f"{DEMO}:tiny")
    reference, ref_losses = single
    config.mesh.update(mesh_sizes)
    config.model.context_parallel = context_parallel
    sharded, losses = run(config, devices, [batch(seed=0), batch(seed=1)])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(sharded.step) == 2


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_the_whole_batch(devices, single, accum):
    config = config_lib.load_config(f"{DEMO}:tiny")
    whole, whole_losses = single
    config.optimizer.grad_accum_steps = accum
    split, losses = run(config, devices[:1], [batch(seed=0), batch(seed=1)])
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(split.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_batch_is_skipped(devices):
    config = config_lib.load_config(f"{DEMO}:tiny")
    mesh, rules, state, step = make(config, devices)
    bad = batch()
    bad["latents"][0, 0, 0, 0, 0] = np.nan
    before = jax.device_get(state.params)
    with jax.set_mesh(mesh):
        state, metrics = step(state, jax.device_put(bad, mesh_lib.batch_sharding(mesh)))
    assert int(metrics["train/skipped"]) == 1
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_step_randomness_depends_on_seed_and_step_only():
    a = step_lib.step_key(3, jnp.int32(7))
    b = step_lib.step_key(3, jnp.int32(7))
    c = step_lib.step_key(3, jnp.int32(8))
    assert jnp.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert not jnp.array_equal(jax.random.key_data(a), jax.random.key_data(c))


@pytest.mark.parametrize("cond_channels", [0, 13])
def test_conditioning_tasks_through_the_step(devices, cond_channels):
    # Given frames by per-frame t = 0 alone (0), or also as C + 1 = 13 input channels.
    config = config_lib.load_config(f"{DEMO}:tiny")
    with config.unlocked():
        config.diffusion.tasks = {"t2v": 1.0, "i2v": 1.0, "continuation": 1.0}
        config.diffusion.cond_dropout = 0.1
        config.model.cond_channels = cond_channels
    mesh = mesh_lib.create_mesh(config.mesh, devices[:1])
    rules = mesh_lib.logical_rules(config.mesh)
    model = setup.model_for(config, MANIFEST)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    x, t, text, mask = setup.example_inputs(config, MANIFEST)
    x = jnp.zeros(x.shape[:-1] + (12 + cond_channels,))  # the model reads C + cond channels
    init_fn = state_lib.make_init_fn(model, tx, (x, t, text, mask), (0.99,))
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    step = jax.jit(step_lib.make_train_step(model, tx, config, schedule))
    new = state
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # lr(0) = 0 (warmup), step 1 moves the zero-initialized head (adaLN-Zero), and the
        # conditioning channels (non-zero on given frames only, whose outputs the loss
        # ignores) reach the loss once attention gates open: from step 3.
        for seed in range(4):
            new, metrics = step(new, batch(seed=seed))
    tasks = np.asarray(metrics["train/task"])
    assert tasks.shape == (8,) and set(tasks.tolist()) <= {0, 1, 3}
    assert np.isfinite(float(metrics["train/loss"])) and int(metrics["train/skipped"]) == 0
    if cond_channels:  # the conditioning rows of the patch embedding start at 0, then learn
        kernel = lambda s: np.asarray(s.params["patch_embedding"]["kernel"])  # [P·C_in, D]
        rows = np.arange(kernel(state).shape[0]) % (12 + cond_channels) >= 12
        assert np.all(kernel(state)[rows] == 0.0) and np.any(kernel(new)[rows] != 0.0)


def test_conditioning_config_errors_before_compiling():
    config = config_lib.load_config(f"{DEMO}:tiny")
    with config.unlocked():
        config.diffusion.tasks = {"t2v": 1.0, "i2v": 0.5}
        config.model.cond_channels = 5
    model = setup.model_for(config, MANIFEST)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    with pytest.raises(config_lib.ConfigError, match=r"model.cond_channels=5 .* = 13"):
        step_lib.make_train_step(model, tx, config, schedule)
