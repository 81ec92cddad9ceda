"""LoRA fine-tuning and t2v -> i2v surgery on the tiny model: closed-form parameter counts,
merge / unmerge, merged weights against LoRA applied to activations, real train steps that
move only the factors, checkpoints without the base, resume, export, and zero-row surgery."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sora_jax import config as config_lib
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import tokenization
from sora_jax.models import lora as lora_lib
from sora_jax.models import surgery
from sora_jax.models.layers import NamedDense
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import params as params_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import loop, plan

DEMO = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "demo.py")
ATTN = lora_lib.DEFAULT_TARGETS
FFN = r"blocks.*/ffn/(wi|wo)/kernel"


def tiny(**overrides):
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.total_steps = 4
    config.data.global_batch_size = 8
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        with node.unlocked():
            node[last] = value
    return config


def model_and_inputs(config, batch=2, seed=0):
    geometry = plan.dataset_geometry(config)
    model = setup.model_for(config, geometry)
    x = setup.example_inputs(config, geometry, batch)
    rng = np.random.default_rng(seed)
    inputs = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in x[:3]]
    inputs[1] = jnp.asarray(rng.uniform(0, 1, x[1].shape), jnp.float32)  # t in [0, 1]
    return model, (*inputs, x[3])


@jax.jit
def randomized(tree, seed=1, scale=0.05):
    """Every leaf perturbed: the zero-initialized gates and head of a fresh DiT would make
    its output (and every LoRA gradient but the head's) exactly zero."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


merge = jax.jit(lora_lib.merge, static_argnums=2)
unmerge = jax.jit(lora_lib.unmerge, static_argnums=2)


def forward(model):
    return jax.jit(lambda params, *inputs: model.apply({"params": params}, *inputs))


def base_and_lora(config, seed=0):
    """`(model, inputs, randomized base, LoRA factors at init, LoraConfig)`, built in one jit
    (op-by-op on 8 CPU devices compiles every small op)."""
    model, inputs = model_and_inputs(config)
    cfg = lora_lib.LoraConfig.from_config(config.lora)

    @jax.jit
    def make(key):
        boxed = model.init(key, *inputs)["params"]
        factors = lora_lib.init(jax.random.fold_in(key, 1), boxed, cfg)
        return randomized(nn.meta.unbox(boxed)), nn.meta.unbox(factors)

    base, factors = make(jax.random.key(seed))
    return model, inputs, base, factors, cfg


# --- Parameter tree transform -----------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("targets", [ATTN, FFN])
def test_trainable_count_is_the_closed_form(scan, targets):
    config = tiny(**{"model.scan_layers": scan, "lora.rank": 4, "lora.targets": targets})
    d, f, n, r = config.model.dim, config.model.mlp_dim, config.model.num_layers, 4
    # Attention: q, k, v [D -> N E = D] and out [N E = D -> D], self and cross: 8 per block.
    # FFN: wi [D -> F], wo [F -> D].
    want = n * (8 * r * (d + d) if targets == ATTN else r * (d + f) + r * (f + d))
    model, inputs = model_and_inputs(config)
    cfg = lora_lib.LoraConfig.from_config(config.lora)
    boxed = jax.eval_shape(
        lambda k: lora_lib.init(k, model.init(k, *inputs)["params"], cfg), jax.random.key(0)
    )
    assert lora_lib.count(boxed) == want
    # Logical names: the rank axis replicated, the rest as the base kernel's.
    lead = ("layers",) if scan else ()
    blk = "blocks" if scan else "blocks_0"
    if targets == ATTN:
        q, o = boxed[blk]["self_attn"]["query"]["kernel"], boxed[blk]["cross_attn"]["out"]["kernel"]
        assert q["lora_a"].names == (*lead, "embed", None)
        assert q["lora_b"].names == (*lead, None, "heads", "kv")
        assert o["lora_a"].names == (*lead, "heads", "kv", None)
        assert o["lora_b"].names == (*lead, None, "embed")
        assert o["lora_a"].value.shape == (*(n,) * scan, config.model.num_heads, d // 4, r)


def test_merge_at_init_is_the_base_and_unmerge_inverts_merge():
    config = tiny(**{"lora.rank": 4, "lora.alpha": 8.0})
    model, inputs, base, factors, cfg = base_and_lora(config)
    apply = forward(model)
    merged = merge(base, factors, cfg.scale)
    jax.tree.map(np.testing.assert_array_equal, merged, base)  # B = 0: exactly the base
    np.testing.assert_array_equal(apply(merged, *inputs), apply(base, *inputs))
    trained = randomized(factors, seed=3, scale=0.1)  # B no longer zero
    merged = merge(base, trained, cfg.scale)
    q = merged["blocks_1"]["self_attn"]["query"]["kernel"]
    assert np.abs(q - base["blocks_1"]["self_attn"]["query"]["kernel"]).max() > 1e-3
    wi = merged["blocks_1"]["ffn"]["wi"]["kernel"]  # not targeted: untouched
    np.testing.assert_array_equal(wi, base["blocks_1"]["ffn"]["wi"]["kernel"])
    back = unmerge(merged, trained, cfg.scale)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, base)


def test_merged_weights_equal_lora_applied_to_activations():
    """The reference applies LoRA unmerged: every targeted dense layer outputs
    `x W + b + scale (x A) B`, by intercepting the base model's layers."""
    config = tiny(**{"lora.rank": 3, "lora.alpha": 6.0})
    model, inputs, base, factors, cfg = base_and_lora(config)
    trained = randomized(factors, seed=4, scale=0.2)
    pairs = lora_lib.factors(trained)

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if not isinstance(mod, NamedDense) or context.method_name != "__call__":
            return y
        name = "/".join(mod.scope.path) + "/kernel"
        if name not in pairs:
            return y
        a, b = pairs[name]
        x = args[0]
        axis = tuple(sorted(ax % x.ndim for ax in mod.axis))
        xa = jax.lax.dot_general(x, a, ((axis, tuple(range(len(axis)))), ((), ())))  # [.., r]
        return y + cfg.scale * jnp.tensordot(xa, b, axes=1)

    @jax.jit
    def unmerged(params, *x):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": params}, *x)

    apply = forward(model)
    want = unmerged(base, *inputs)
    got = apply(merge(base, trained, cfg.scale), *inputs)
    assert np.abs(want - apply(base, *inputs)).max() > 1e-3  # the factors matter
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_export_and_load_round_trip(tmp_path):
    config = tiny(**{"lora.rank": 2, "lora.alpha": 3.0, "model.scan_layers": True})
    _, _, base, factors, cfg = base_and_lora(config)
    trained = randomized(factors, seed=5)
    path = lora_lib.export(tmp_path / "lora.safetensors", trained, cfg)
    loaded, loaded_cfg = lora_lib.load(path)
    assert loaded_cfg == cfg
    assert jax.tree.structure(loaded) == jax.tree.structure(trained)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(trained))
    with pytest.raises(FileNotFoundError, match="lora.export"):
        lora_lib.load(tmp_path / "nope.safetensors")


def test_validate_names_real_kernels_for_a_regex_that_matches_none():
    validate_lib.validate(tiny(**{"lora.rank": 4}))  # the default targets match
    with pytest.raises(config_lib.ConfigError, match=r"matches no kernel.*self_attn/query/kernel"):
        validate_lib.validate(tiny(**{"lora.rank": 4, "lora.targets": r"blocks.*/attn/q/kernel"}))
    with pytest.raises(config_lib.ConfigError, match=r"lora.rank=-1"):
        validate_lib.validate(tiny(**{"lora.rank": -1}))


# --- Surgery ------------------------------------------------------------------------------


def test_surgery_keeps_the_t2v_output_for_any_conditioning_input():
    t2v_config, i2v_config = tiny(), tiny(**{"model.cond_channels": 13})
    t2v, (x_t, t, text, mask) = model_and_inputs(t2v_config)
    i2v, _ = model_and_inputs(i2v_config)
    init = jax.jit(lambda k: nn.meta.unbox(t2v.init(k, x_t, t, text, mask)["params"]))
    params = randomized(init(jax.random.key(0)))
    extended = surgery.add_input_channels(params, t2v.patch_size, 13)
    assert extended["patch_embedding"]["kernel"].shape == (4 * 25, 64)
    want = forward(t2v)(params, x_t, t, text, mask)
    apply = forward(i2v)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        cond = jnp.asarray(3.0 * rng.standard_normal((*x_t.shape[:-1], 13)), jnp.float32)
        got = apply(extended, jnp.concatenate([x_t, cond], -1), t, text, mask)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want).max() > 1e-2  # a non-trivial output


# --- Through the trainer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("tokenized")
    tokenization.run(tiny(), work)
    return work / "data"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, devices):
    """A 'trained' t2v run: a randomized full state saved as step 5."""
    config = tiny()
    mesh = mesh_lib.create_mesh(config.mesh, devices[:1])
    rules = mesh_lib.logical_rules(config.mesh)
    _, _, init_fn, _, _ = setup.setup_state(config, plan.dataset_geometry(config), mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, 0)
    state = state.replace(params=randomized(state.params))
    directory = tmp_path_factory.mktemp("base") / "checkpoints"
    mngr = ckpt_lib.manager(directory, async_save=False)
    with jax.set_mesh(mesh):
        ckpt_lib.save(mngr, 5, state, {"next_step": 5})
    mngr.close()
    return directory.parent, jax.device_get(state.params)


def _workdir(tmp_path, dataset, name="run"):
    work = tmp_path / name
    work.mkdir()
    shutil.copytree(dataset, work / "data")
    return work


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_lora_steps_move_only_the_factors(dataset, base_run, tmp_path, devices):
    """Real steps (the trainer's jitted step on a pipeline batch): the base stays bit-identical,
    B moves off zero, and the optimizer state and EMA cover exactly the factors."""
    base_dir, base_params = base_run
    work = _workdir(tmp_path, dataset)
    config = tiny(**{"lora.rank": 4, "mesh.ici_fsdp": 2, "mesh.ici_data": 2})
    mesh = mesh_lib.create_mesh(config.mesh, devices[:4])
    rules = mesh_lib.logical_rules(config.mesh)
    pipe = pipeline_lib.from_config(config, work, data_parallel=4)
    model, tx, init_fn, abstract, shardings = setup.setup_state(config, pipe.manifest, mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    opts = setup.options(config)
    with jax.set_mesh(mesh):
        state = params_lib.init_from(state, abstract, str(base_dir), opts, mesh, workdir=work)
    assert json.loads((work / "lora_base.json").read_text())["checkpoint"].endswith("/5")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.base), base_params)
    lora_leaves = jax.tree.leaves(state.params)
    # Adam's two moments per factor leaf, and nothing of the base.
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.params)
    arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # not step counts
    assert sum(x.size for x in arrays) == 2 * lora_lib.count(state.params)
    first = jax.device_get(state.params)
    from sora_jax.training import step as step_lib

    jitted = step_lib.jit_train_step(model, tx, config, mesh, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for _ in range(3):
            host = next(pipe)
            batch = pipeline_lib.to_global_batch(host, mesh, fields=pipe.fields)
            state, metrics = jitted(state, {k: batch[k] for k in pipe.fields})
            assert int(metrics["train/skipped"]) == 0 and float(metrics["train/grad_norm"]) > 0
    pipe.close()
    got = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, got.base, base_params)  # frozen, bit-identical
    moved = {k: np.abs(v - _flat(first)[k]).max() for k, v in _flat(got.params).items()}
    assert all(v > 0 for k, v in moved.items() if "lora_b" in k), moved
    assert len(lora_leaves) == len(moved) == 2 * 8 * config.model.num_layers
    ema = got.ema[state_lib.ema_key(config.optimizer.ema_decays[0])]
    assert jax.tree.structure(ema) == jax.tree.structure(got.params)


@pytest.mark.slow
def test_lora_run_checkpoints_factors_only_and_resumes_exactly(dataset, base_run, tmp_path):
    base_dir, _ = base_run
    straight, resumed = _workdir(tmp_path, dataset, "a"), _workdir(tmp_path, dataset, "b")
    config = tiny(**{"lora.rank": 4, "training.init_from": str(base_dir)})
    summary = loop.train(config, straight)
    assert summary["final_step"] == 4 and summary["parameters"] == 2 * 8 * 4 * 64 * 2
    saved = ckpt_lib.saved_shapes(straight / "checkpoints", 4, "")
    assert not any(k.startswith("base") for k in saved)  # the base is not re-saved
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved if k.startswith("params/"))
    # Stop at step 2, then resume to 4: the base comes back from lora_base.json.
    loop.train(
        tiny(**{"lora.rank": 4, "training.init_from": str(base_dir), "total_steps": 2}), resumed
    )
    loop.train(config, resumed)
    a = ocp_restore(straight / "checkpoints" / "4" / "state")
    b = ocp_restore(resumed / "checkpoints" / "4" / "state")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # Sampling parameters: the recorded base with the factors merged.
    geometry = plan.dataset_geometry(config)
    mesh = mesh_lib.create_mesh(config.mesh)
    rules = mesh_lib.logical_rules(config.mesh)
    params, step, weights = params_lib.restore_params_for_sampling(
        straight, config, geometry, mesh, rules
    )
    assert step == 4 and weights == "raw + lora r=4"
    want = lora_lib.merge(base_run[1], a["params"], 1.0)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
        jax.device_get(params),
        want,
    )
    # The sampler restores the same merged parameters (sora_jax.sample, the evaluators).
    from sora_jax.evaluation import generate

    gen = generate.Generator.from_workdir(straight, config)
    assert gen.weights == "raw + lora r=4" and gen.step == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(gen.params), jax.device_get(params))


def ocp_restore(path):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(path)


def test_init_from_a_t2v_run_into_an_i2v_model_adds_zero_rows(base_run, devices, capsys):
    base_dir, base_params = base_run
    config = tiny(**{"model.cond_channels": 13})
    mesh = mesh_lib.create_mesh(config.mesh, devices[:2])
    rules = mesh_lib.logical_rules(config.mesh)
    model, _, init_fn, abstract, _ = setup.setup_state(
        config, plan.dataset_geometry(config), mesh, rules
    )
    state = state_lib.create_sharded_state(init_fn, mesh, rules, 0)
    with jax.set_mesh(mesh):
        state = params_lib.init_from(
            state, abstract, str(base_dir), setup.options(config), mesh, patch=model.patch_size
        )
    assert "added 13 conditioning input channels with zero rows" in capsys.readouterr().out
    got = jax.device_get(state.params)
    want = surgery.add_input_channels(base_params, model.patch_size, 13)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    "arg", ["size=1_3b,mode=lora,device=h100x8,i2v", "size=14b,mode=full,device=v5p8"]
)
def test_wan_finetune_presets_validate(arg):
    """The presets' LoRA targets match the Wan kernels (checked on the abstract 1.3B / 14B
    model), and full fine-tuning turns LoRA off."""
    path = pathlib.Path(DEMO).with_name("wan_finetune.py")
    config = config_lib.load_config(f"{path}:{arg}")
    validate_lib.validate(config)
    assert config.lora.rank == (32 if "lora" in arg else 0)
    assert config.model.cond_channels == (17 if "i2v" in arg else 0)
    params = lora_lib.model_params_shape(config.model)
    hits = lora_lib.target_paths(params, config.lora.targets)
    assert len(hits) == 10  # q, k, v, o of self and cross attention, wi, wo: stacked blocks
