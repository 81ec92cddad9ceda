"""Mesh sizes from config and logical shardings."""

import ml_collections
import pytest

from sora_jax.parallel import mesh as mesh_lib


def cfg(**sizes):
    c = ml_collections.ConfigDict({f"ici_{a}": 1 for a in mesh_lib.AXES})
    c.update(sizes)
    return c


def test_fill_and_errors():
    assert mesh_lib.mesh_shape(cfg(ici_data=-1, ici_fsdp=2), 8) == {
        "data": 4,
        "fsdp": 2,
        "context": 1,
        "tensor": 1,
    }
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.mesh_shape(cfg(ici_data=-1, ici_fsdp=-1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.mesh_shape(cfg(ici_data=-1, ici_fsdp=3), 8)
    with pytest.raises(ValueError, match="set one size to -1"):
        mesh_lib.mesh_shape(cfg(ici_data=2), 8)


def test_create_mesh_axes(devices):
    mesh = mesh_lib.create_mesh(cfg(ici_data=2, ici_fsdp=2, ici_context=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
    assert mesh.axis_names == mesh_lib.AXES
