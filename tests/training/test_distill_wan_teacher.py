"""A distillation teacher can be an imported Wan 2.1 checkpoint: the tiny diffusers model of
tests/models/golden/wan_dit imported with `python -m sora_jax.wan import` (checkpoints/0
holding {'params': tree}, model_config.json) is read by distill_step.load_teacher into the
student's sharded abstract parameters, and check_teacher_model compares the student with
the import's model_config.json (an import saves no config with its checkpoint)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax import wan as wan_cli
from sora_jax.config import ConfigError
from sora_jax.models import wan_import
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.training import distill_step, plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
DISTILL = str(ROOT / "experiments" / "distill.py")
TINY = ROOT / "tests" / "models" / "golden" / "wan_dit" / "tiny"


def _student(teacher: pathlib.Path, **fields):
    """experiments/distill.py:tiny with the import's model fields, text width and latent
    channels (`model_config.json`), reading its `params`; and the dataset geometry."""
    saved = json.loads((teacher / wan_cli.MODEL_CONFIG_FILE).read_text())
    config = config_lib.load_config(f"{DISTILL}:tiny,teacher={teacher}")
    config.distill.teacher_source = "params"
    config.mesh.ici_fsdp = 4  # data 2 x fsdp 4: the teacher sharded as the student
    with config.unlocked():
        config.model.update(saved["model"])
        config.update_from_flattened_dict(fields)
    config.text_encoder.dim = saved["data"]["text_dim"]
    manifest = plan.dataset_geometry(config)
    channels = saved["data"]["latent_channels"]  # Wan's latents, not demo's pixels
    manifest["tokenizer"]["latent_channels"] = channels
    for bucket in manifest["buckets"].values():
        bucket["shape"][-1] = channels
    return config, manifest


def test_imported_wan_checkpoint_is_a_distillation_teacher(tmp_path, devices):
    teacher = tmp_path / "wan_import"
    wan_cli.import_diffusers(TINY, teacher, scan_layers=False)
    config, manifest = _student(teacher)
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
    _, _, _, abstract, _ = distill_step.setup_state(config, manifest, mesh, rules)
    fresh = jax.tree.map(
        lambda a: jax.device_put(np.full(a.shape, 7.0, a.dtype), a.sharding), abstract.params
    )
    with jax.set_mesh(mesh):
        params, source = distill_step.load_teacher(config, abstract.params, fresh)
    assert source == f"{teacher / 'checkpoints'}/0"
    want, _, _, _ = wan_import.load_diffusers(TINY, scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), want)
    assert all(
        p.sharding.is_equivalent_to(a.sharding, p.ndim)
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract.params), strict=True)
    )

    # Same parameter shapes, another model (demo's sincos positions on top of Wan's RoPE):
    # refused from model_config.json, where the shapes alone would load.
    config, _ = _student(teacher, **{"model.pos_embed": "sincos"})
    with pytest.raises(ConfigError, match=r"model\.pos_embed: teacher 'none' vs student 'sincos'"):
        distill_step.check_teacher_model(config, teacher / "checkpoints", 0)
