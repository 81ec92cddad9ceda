"""DMD2 distillation (`distill.method='dmd2'`): the losses' closed forms, one step of the
tiny student against the losses and the fake score's update computed here by hand, the
two time-scale rule. Resume after SIGKILL and the plan's arguments with the fake-score
network are in tests/training/test_distill.py."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax import config as config_lib
from sora_jax.diffusion import conditioning, dmd, flow, sampler
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import optimizer as optimizer_lib
from sora_jax.run import train_state as state_lib
from sora_jax.training import distill_step, dmd_step, plan
from sora_jax.training.step import step_key

DISTILL = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "distill.py")


def test_generator_loss_gradient_is_the_normalized_score_difference():
    k = jax.random.split(jax.random.key(0), 3)
    x0, real, fake = (jax.random.normal(kk, (3, 2, 4, 4, 2)) for kk in k)
    grad = dmd.dmd_gradient(x0, real, fake)
    d = x0[0].size
    weight = np.mean(np.abs(np.asarray(x0 - real)), axis=(1, 2, 3, 4), keepdims=True)
    np.testing.assert_allclose(grad, (fake - real) / weight, rtol=1e-6)
    # ∂L_G/∂x̂_0 = grad / D per sample, and L_G = ½ mean(grad²).
    g_x0 = jax.grad(lambda x: jnp.sum(dmd.generator_loss(x, grad)))(x0)
    np.testing.assert_allclose(g_x0, grad / d, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(
        dmd.generator_loss(x0, grad), 0.5 * jnp.mean(grad**2, axis=(1, 2, 3, 4)), rtol=1e-6
    )
    # Where the fake score equals the real one, the generator gets no gradient.
    np.testing.assert_array_equal(dmd.dmd_gradient(x0, real, real), 0.0)


def _config(**fields):
    config = config_lib.load_config(f"{DISTILL}:tiny,teacher=unused,method=dmd2")
    config.update_from_flattened_dict(fields)
    return config


@pytest.fixture(scope="module")
def setup():
    """A one-device DMD2 state of the tiny model: student θ, teacher θ + noise, fake score
    = teacher (as the family starts it), with the step (K = 2) and a batch."""
    config = _config(
        **{
            "distill.fake_updates_per_generator": 2,
            "mesh.ici_fsdp": 1,
            "optimizer.warmup_steps": 0,
            "model.num_layers": 1,  # one block: the step compiles faster, the maths is the same
        }
    )
    config.mesh.ici_data = 1
    manifest = plan.dataset_geometry(config)
    mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:1])
    rules = mesh_lib.logical_rules(config.mesh)
    model, tx, init_fn, _, _ = distill_step.setup_state(config, manifest, mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    # Host-side (numpy) draws: jax.random's threefry takes longer to compile than the step.
    rng = np.random.default_rng(7)

    def perturbed(params):
        return jax.tree.map(
            lambda p: jax.device_put(
                np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), p.sharding
            ),
            params,
        )

    teacher, student = perturbed(state.params), perturbed(state.params)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    state = state.replace(
        params=student,
        ema={k: copy(student) for k in state.ema},
        base=teacher,
        opt_state={**state.opt_state, "fake_score": copy(teacher)},
    )
    schedule = optimizer_lib.learning_rate(config.optimizer, config.total_steps)
    d = distill_step.options(config)
    step = jax.jit(dmd_step.make_dmd2_step(model, tx, config, schedule, d))
    shape = next(iter(manifest["buckets"].values()))["shape"]
    text_dim = manifest["text_encoder"]["dim"]
    batch = {
        "latents": jnp.asarray(rng.standard_normal((2, *shape), np.float32)),
        "text": jnp.asarray(rng.standard_normal((2, 5, text_dim), np.float32)),
        "text_mask": jnp.array([[True] * 5, [True, True, False, False, False]]),
    }
    return config, model, tx, d, state, step, batch


def _by_hand(config, model, d, state, batch):
    """L_G, L_fake and ∇_φ L_fake of step 0, from the module's equations (jitted)."""
    l_gen, l_fake, g_fake = jax.jit(lambda s, b: _losses(config, model, d, s, b))(state, batch)
    return float(l_gen), float(l_fake), g_fake


def _losses(config, model, d, state, batch):
    apply = lambda p, x, t, s, m: model.apply({"params": p}, x, t, s, m)  # noqa: E731
    x_data, text, mask = batch["latents"], batch["text"], batch["text_mask"]
    b = x_data.shape[0]
    alpha = flow.shift_alpha(config.diffusion, x_data.shape[1:], tuple(config.model.patch_size))
    keys = flow.row_keys(step_key(config.seed, state.step), b)
    draw = lambda p: [jax.random.fold_in(k, p) for k in keys]  # noqa: E731
    t = jnp.stack([dmd.generator_time(k, d.dmd_steps, alpha) for k in draw(18)])
    grid = sampler.time_grid(d.dmd_steps, alpha)
    t = jnp.where(jnp.any(jnp.isclose(t[:, None], grid[None]), axis=1), t, jnp.nan)  # on it
    eps = jnp.stack([jax.random.normal(k, x_data.shape[1:]) for k in draw(19)])
    tau = jnp.stack([dmd.score_time(k, d.dmd_t_min, d.dmd_t_max, alpha) for k in draw(20)])
    eps2 = jnp.stack([jax.random.normal(k, x_data.shape[1:]) for k in draw(21)])
    e = lambda s: s[:, None, None, None, None]  # noqa: E731
    inp = lambda x: conditioning.model_input(x, None, None, 0)  # noqa: E731
    x_t = (1 - e(t)) * x_data + e(t) * eps
    x0 = x_t - e(t) * apply(state.params, inp(x_t), t, text, mask)
    x_tau = (1 - e(tau)) * x0 + e(tau) * eps2
    null_text, null_mask = flow.null_conditioning(text, mask)  # the dropped caption
    v_text = apply(state.base, inp(x_tau), tau, text, mask)
    v_null = apply(state.base, inp(x_tau), tau, null_text, null_mask)
    real = x_tau - e(tau) * (v_null + d.cfg_scale * (v_text - v_null))
    fake_fn = lambda phi: apply(phi, inp(x_tau), tau, text, mask)  # noqa: E731
    fake = x_tau - e(tau) * fake_fn(state.opt_state["fake_score"])
    weight = jnp.mean(jnp.abs(x0 - real), axis=(1, 2, 3, 4), keepdims=True)
    l_gen = 0.5 * jnp.mean(((fake - real) / weight) ** 2, axis=(1, 2, 3, 4))

    def l_fake(phi):
        return jnp.mean((fake_fn(phi) - (eps2 - x0)) ** 2)

    g_fake = jax.grad(l_fake)(state.opt_state["fake_score"])
    return jnp.mean(l_gen), l_fake(state.opt_state["fake_score"]), g_fake


def _max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))  # on the host: no compile


def test_one_step_matches_the_losses_by_hand_and_alternates_players(setup):
    config, model, tx, d, state, step, batch = setup
    l_gen, l_fake, g_fake = _by_hand(config, model, d, state, batch)
    s1, m1 = step(jax.tree.map(jnp.copy, state), batch)  # step 0: generator and fake score
    assert int(m1["train/generator_step"]) == 1 and l_gen > 1e-4
    np.testing.assert_allclose(float(m1["train/generator_loss"]), l_gen, rtol=2e-4)
    np.testing.assert_allclose(float(m1["train/loss"]), l_fake, rtol=2e-4)
    # φ took one optimizer step along ∇_φ L_fake; θ moved; the teacher is untouched.
    fake0 = state.opt_state["fake_score"]

    @jax.jit  # the optimizer's update compiled once, not dispatched op by op
    def fake_step(g, opt, fake):
        updates, _ = tx.update(g, opt, fake)
        return optax.apply_updates(fake, updates)

    want = fake_step(g_fake, state.opt_state["fake_score_opt"], fake0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        s1.opt_state["fake_score"],
        want,
    )
    moved = jax.tree.map(_max_abs_diff, s1.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0
    jax.tree.map(np.testing.assert_array_equal, s1.base, state.base)
    # Step 1 (K = 2): only the fake score is updated; generator, its EMA and Adam state kept.
    s2, m2 = step(jax.tree.map(jnp.copy, s1), batch)
    assert int(m2["train/generator_step"]) == 0 and float(m2["train/generator_loss"]) == 0
    for a, b in [(s2.params, s1.params), (s2.ema, s1.ema)]:
        jax.tree.map(np.testing.assert_array_equal, a, b)
    jax.tree.map(
        np.testing.assert_array_equal, s2.opt_state["generator"], s1.opt_state["generator"]
    )
    changed = jax.tree.map(_max_abs_diff, s2.opt_state["fake_score"], s1.opt_state["fake_score"])
    assert max(jax.tree.leaves(changed)) > 0
    assert int(s2.step) == 2


def test_dmd2_config_errors_name_the_fields():
    config = _config(
        **{"distill.fake_updates_per_generator": 0, "distill.dmd_t_min": 0.9, "distill.method": "x"}
    )
    errors = "\n".join(distill_step.config_errors(config, "cpu"))
    assert "distill.method='x'" in errors
    config = _config(**{"distill.fake_updates_per_generator": 0, "distill.dmd_t_min": 0.99})
    errors = "\n".join(distill_step.config_errors(config, "cpu"))
    assert "distill.fake_updates_per_generator=0" in errors and "distill.dmd_t_min" in errors
