"""`--init_from`: parameters (or an EMA) of another run's checkpoint into a new model, with
a load report; mismatches are errors unless allowed by pattern."""

import pathlib

import jax
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.training import plan

DEMO = str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "demo.py")


def _state(config, devices, seed):
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    geometry = plan.dataset_geometry(config)
    _, _, init_fn, abstract, _ = setup.setup_state(config, geometry, mesh, rules)
    return mesh, abstract, state_lib.create_sharded_state(init_fn, mesh, rules, seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, devices):
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.data.global_batch_size = 8
    config.mesh.ici_fsdp = 4
    mesh, _, state = _state(config, devices[:4], seed=7)
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    mngr = ckpt_lib.manager(directory, async_save=False)
    with jax.set_mesh(mesh):
        ckpt_lib.save(mngr, 5, state, {"next_step": 5})
    mngr.close()
    return directory.parent, jax.device_get(state)


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_same_model_loads_every_leaf_onto_another_mesh(saved, devices):
    workdir, old = saved
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.data.global_batch_size = 8
    config.mesh.ici_data = 2  # another mesh than the one that saved
    mesh, abstract, fresh = _state(config, devices[:2], seed=0)
    with jax.set_mesh(mesh):
        params, report = ckpt_lib.load_for_init(workdir, abstract.params, fresh.params)
    assert report["missing"] == report["unexpected"] == report["reshaped"] == []
    assert report["loaded"] == len(jax.tree.leaves(fresh.params))
    got, want = _flat(params), _flat(old.params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The EMA is a source too (here equal to the params: no step was taken).
    key = state_lib.ema_key(config.optimizer.ema_decays[0])
    with jax.set_mesh(mesh):
        ema, _ = ckpt_lib.load_for_init(
            workdir / "checkpoints" / "5", abstract.params, fresh.params, source=f"ema/{key}"
        )
    got, want = _flat(ema), _flat(old.ema[key])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_added_conditioning_channels_need_an_allow_pattern(saved, devices):
    workdir, old = saved
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.data.global_batch_size = 8
    with config.unlocked():
        config.model.cond_channels = 13  # the patch embedding grows: a reshaped leaf
    mesh, abstract, fresh = _state(config, devices[:1], seed=0)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"reshaped patch_embedding/kernel"):
        ckpt_lib.load_for_init(workdir, abstract.params, fresh.params)
    with jax.set_mesh(mesh):
        params, report = ckpt_lib.load_for_init(
            workdir, abstract.params, fresh.params, allow=("patch_embedding/*",)
        )
    assert [r.split(":")[0] for r in report["reshaped"]] == ["patch_embedding/kernel"]
    got, want, init = _flat(params), _flat(old.params), _flat(fresh.params)
    key = "['patch_embedding']['kernel']"
    np.testing.assert_array_equal(got[key], init[key])  # kept fresh
    for k in want:
        if k != key:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bad_path_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="workdir"):
        ckpt_lib.resolve_checkpoint(tmp_path / "nope")
