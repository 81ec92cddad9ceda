"""Both Wan 2.2 A14B experts in one run (config.experts, training/experts.py): each sample's
gradient reaches only the expert of its time, a tiny run trains both experts and resumes
exactly, and sampling it runs the high expert for t >= boundary and the low one below."""

import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sora_jax import config as config_lib
from sora_jax import wan
from sora_jax.data import tokenization
from sora_jax.diffusion import flow, sampler
from sora_jax.evaluation import generate
from sora_jax.models import dit, wan_experts, wan_export
from sora_jax.training import loop, plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
RATIO = 0.875
SMALL = {"model.dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.mlp_dim": 64}
SMALL["model.pos_embed"] = "none"  # Wan's architecture, so the run exports to diffusers


def _config(**overrides):
    c = config_lib.load_config(f"{ROOT / 'experiments' / 'demo.py'}:tiny")
    c.update_from_flattened_dict({**SMALL, "log_every_steps": 1, "checkpoint_every_steps": 2})
    c.update_from_flattened_dict({"total_steps": 4, "data.global_batch_size": 8, **overrides})
    with c.unlocked():
        c.experts = ml_collections.ConfigDict(dict(boundary_ratio=RATIO))
    return c


@functools.cache
def _tiny_experts():
    expert = dit.build_model(
        {"dim": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}, in_channels=4, text_dim=8
    )
    model = wan_experts.two_experts(expert, RATIO)
    x = jnp.zeros((1, 2, 4, 4, 4))
    text, mask = jnp.zeros((1, 3, 8)), jnp.ones((1, 3), bool)
    params = jax.tree.map(
        lambda a: a.value if hasattr(a, "value") else a,
        jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,)), text, mask)["params"],
        is_leaf=lambda a: hasattr(a, "value"),
    )

    @jax.jit
    def grads(m_params, t, x_0, eps, text, mask):
        # d/dparams of the summed per-sample losses; `m_params` is a two-expert tree or,
        # with `t` of one expert's samples, that expert's own tree (then `expert` runs).
        m = model if "high" in m_params else expert
        apply = lambda p_, *a: m.apply({"params": p_}, *a)  # noqa: E731
        loss = lambda p: jnp.sum(flow.per_sample_loss(apply, p, x_0, eps, t, text, mask))  # noqa: E731
        return jax.grad(loss)(m_params)

    return model, expert, params, grads


def _inputs(b):
    keys = jax.random.split(jax.random.key(1), 3)
    x_0 = jax.random.normal(keys[0], (b, 2, 4, 4, 4))
    return x_0, jax.random.normal(keys[1], x_0.shape), jax.random.normal(keys[2], (b, 3, 8))


def _norm(tree):
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("side", ["high", "low"])
def test_a_batch_on_one_side_of_the_boundary_trains_only_its_expert(side):
    _, _, params, grads_fn = _tiny_experts()
    # 0.875 itself goes to the high expert (diffusers compares timestep >= 875).
    t = jnp.array([0.875, 0.9, 0.99, 1.0]) if side == "high" else jnp.array([0.0, 0.3, 0.6, 0.87])
    x_0, eps, text = _inputs(4)
    grads = grads_fn(params, t, x_0, eps, text, jnp.ones((4, 3), bool))
    other = "low" if side == "high" else "high"
    assert _norm(grads[other]) == 0.0  # exactly: not one sample reached it
    assert _norm(grads[side]) > 0.0


def test_a_mixed_batch_gives_each_expert_the_gradient_of_its_own_samples():
    _, _, params, grads_fn = _tiny_experts()
    t = jnp.array([0.95, 0.2, 0.875, 0.5, 0.874, 1.0])
    high = np.asarray(wan_experts.expert_index(t, RATIO)) == wan_experts.HIGH
    assert high.tolist() == [True, False, True, False, False, True]
    x_0, eps, text = _inputs(6)
    mask = jnp.ones((6, 3), bool)
    grads = grads_fn(params, t, x_0, eps, text, mask)
    for name, rows in (("high", high), ("low", ~high)):
        # The reference: the one expert alone on its own samples only.
        idx = np.nonzero(rows)[0]
        want = grads_fn(params[name], t[idx], x_0[idx], eps[idx], text[idx], mask[idx])
        for g, w in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def test_per_frame_times_route_by_the_generated_frames_time():
    # i2v: the given frame 0 carries t = 0; the sample's time is its generated frames'.
    t = jnp.array([[0.0, 0.9, 0.9], [0.0, 0.5, 0.5]])
    assert np.asarray(wan_experts.sample_time(t)).tolist() == pytest.approx([0.9, 0.5])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("tokenized")
    tokenization.run(_config(), work)
    return work / "data"


def _run(tmp_path, dataset, name, **overrides):
    work = tmp_path / name
    if not work.exists():
        work.mkdir()
        shutil.copytree(dataset, work / "data")
    return loop.train(_config(**overrides), work), work


def _state(work, step):
    return ocp.StandardCheckpointer().restore(work / "checkpoints" / str(step) / "state")


def test_two_expert_run_trains_both_resumes_exactly_and_samples_by_the_boundary(
    dataset, tmp_path, capsys
):
    summary, straight = _run(tmp_path, dataset, "straight")
    assert summary["final_step"] == 4
    assert "two experts (boundary 0.875)" in capsys.readouterr().out
    a2 = jax.tree.map(np.asarray, _state(straight, 2))
    a4 = jax.tree.map(np.asarray, _state(straight, 4))
    # Both experts' parameters and EMA are their own trees, and both move from step 2 to 4.
    assert set(a4["params"]) == {"high", "low"}
    for name in ("high", "low"):
        moved = [
            np.abs(x - y).max()
            for x, y in zip(
                jax.tree.leaves(a2["params"][name]),
                jax.tree.leaves(a4["params"][name]),
                strict=True,
            )
        ]
        assert max(moved) > 0, name
    assert set(next(iter(a4["ema"].values()))) == {"high", "low"}

    # Interrupted after step 2, then resumed: the same state at 4, bit for bit.
    _run(tmp_path, dataset, "resumed", total_steps=2)
    _, resumed = _run(tmp_path, dataset, "resumed")
    b4 = jax.tree.map(np.asarray, _state(resumed, 4))
    for x, y in zip(jax.tree.leaves(a4), jax.tree.leaves(b4), strict=True):
        np.testing.assert_array_equal(x, y)

    # The run exports as a WanPipeline folder with its boundary (python -m sora_jax.wan export).
    params, fields, _ = wan.load_run_params(straight)
    assert wan.saved_boundary_ratio(straight) == RATIO
    index = wan_export.export_two_experts(params, fields, tmp_path / "export", boundary_ratio=RATIO)
    assert index["boundary_ratio"] == RATIO
    for folder in ("transformer", "transformer_2"):
        assert (tmp_path / "export" / folder / "diffusion_pytorch_model.safetensors").is_file()

    # Sampling the run: its model function is the two-expert one, and every step's output
    # is the expert of that step's time (checked against an Euler loop that picks by hand).
    gen = generate.Generator.from_workdir(straight, _config())
    assert set(gen.params) == {"high", "low"}
    b, steps, alpha = 8, 6, 3.0
    noise = jax.random.normal(jax.random.key(3), (b, 2, 8, 8, 12))
    text = jax.random.normal(jax.random.key(4), (b, 8, 64))
    mask = jnp.ones((b, 8), bool)
    # Compiled once for both parameter orders (op by op, each network call is slow to run).
    sample = jax.jit(functools.partial(sampler.sample, gen.apply_fn, num_steps=steps, alpha=alpha))
    got = sample(gen.params, noise, text, mask)
    ts = np.asarray(sampler.time_grid(steps, alpha))
    sides = ["high" if 1000 * t >= 1000 * RATIO else "low" for t in ts[:-1]]
    assert "high" in sides and "low" in sides
    expert = jax.jit(gen.model.high.apply)
    x = noise
    for i, side in enumerate(sides):
        v = expert({"params": gen.params[side]}, x, jnp.full((b,), ts[i]), text, mask)
        x = x + (ts[i + 1] - ts[i]) * v
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
    # With the experts swapped the result differs: the routing is what makes it match.
    swapped = {"high": gen.params["low"], "low": gen.params["high"]}
    other = sample(swapped, noise, text, mask)
    assert np.abs(np.asarray(other) - np.asarray(x)).max() > 1e-3


def test_plan_holds_both_experts(devices, capsys):
    """--mode=plan of a two-expert run compiles the two-expert state: the step's outputs
    (the new state: parameters, optimizer state, EMA) are twice one expert's per device."""
    one, two = _config(), _config()
    with one.unlocked():
        del one["experts"]
    for c in (one, two):
        c.mesh.ici_data, c.mesh.ici_fsdp = 1, 8
    (p1,) = plan.plan(one, devices=devices)
    (p2,) = plan.plan(two, devices=devices)
    assert f"two experts (boundary {RATIO:g})" in capsys.readouterr().out
    assert p2.output_gb == pytest.approx(2 * p1.output_gb, rel=0.02), (p1, p2)
