"""Device meshes and logical sharding rules (docs/design.md, Parallelism).

The mesh has axes `('data', 'fsdp', 'context', 'tensor')`. Sizes come from the config as
`ici_<axis>` (within a slice / host group) and `dcn_<axis>` (across slices), at most one
of each family `-1` (fill with what is left). Model code names logical axes only; the
config's `mesh.logical_axis_rules` map them to mesh axes, so the same model runs on one
CPU (no rules: every constraint is a no-op) or sharded over a pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:  # annotations only: the model code (and the GPU benchmark) runs without it
    import ml_collections

AXES = ("data", "fsdp", "context", "tensor")

# Default logical -> mesh rules: parameters FSDP-sharded over `fsdp`, heads and MLP width
# over `tensor`, activations' batch over ('data', 'fsdp') and length over `context`.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_text_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("layers", None),
)


def _fill(sizes: dict[str, int], total: int, family: str) -> dict[str, int]:
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(
            f"mesh: at most one {family}_* size may be -1, got {[f'{family}_{a}' for a in free]}"
        )
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if total % known:
            raise ValueError(
                f"mesh: {total} {'slices' if family == 'dcn' else 'devices per slice'} are not "
                f"divisible by the fixed {family}_* sizes (product {known}); change "
                f"mesh.{family}_{free[0]} or the others"
            )
        sizes = {**sizes, free[0]: total // known}
    elif known != total:
        raise ValueError(
            f"mesh: {family}_* sizes {sizes} multiply to {known}, but there are {total} "
            f"{'slices' if family == 'dcn' else 'devices per slice'}; set one size to -1"
        )
    return sizes


def mesh_shape(
    mesh_config: ml_collections.ConfigDict,
    device_count: int | None = None,
    num_slices: int = 1,
) -> dict[str, int]:
    """Total size of each mesh axis (ici x dcn), with the `-1` entries filled."""
    if device_count is None:
        device_count = jax.device_count()
    if device_count % num_slices:
        raise ValueError(f"{device_count} devices do not split into {num_slices} slices")
    dcn = _fill({a: int(mesh_config.get(f"dcn_{a}", 1)) for a in AXES}, num_slices, "dcn")
    ici = _fill(
        {a: int(mesh_config.get(f"ici_{a}", 1)) for a in AXES},
        device_count // num_slices,
        "ici",
    )
    return {a: ici[a] * dcn[a] for a in AXES}


def num_slices(devices: Sequence[jax.Device]) -> int:
    """Slices (TPU pods joined over the data-center network) among `devices`."""
    return 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)


def mesh_shape_on(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> dict[str, int]:
    """`mesh_shape` on `devices` (default: all of this run's), slices included."""
    devices = list(devices if devices is not None else jax.devices())
    return mesh_shape(mesh_config, len(devices), num_slices(devices))


def config_errors(
    mesh_config: ml_collections.ConfigDict,
    global_batch_size: int,
    bucket_batches: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> list[str]:
    """The `mesh` section against this machine's devices and the global batches: the sizes
    fill the devices, and every global batch (`data.global_batch_size`, and each explicit
    `data.buckets.<b>.global_batch_size` in `bucket_batches`) splits into equal rows over
    the batch shards `data x fsdp`, each of which one or several processes hold
    (data/global_batch.py). `devices`: the run's (default: this machine's)."""
    try:
        shape = mesh_shape_on(mesh_config, devices)
    except ValueError as e:
        return [str(e)]
    batch_shards = shape["data"] * shape["fsdp"]
    sizes = " x ".join(
        f"mesh.{f}_{a}={int(mesh_config.get(f'{f}_{a}', 1))}"
        for a in ("data", "fsdp")
        for f in ("ici", "dcn")
        if int(mesh_config.get(f"{f}_{a}", 1)) != 1
    )
    fields = {"data.global_batch_size": global_batch_size}
    fields.update(
        {f"data.buckets.{b}.global_batch_size": g for b, g in (bucket_batches or {}).items()}
    )
    return [
        f"{field}={g} is not divisible by the batch shards data x fsdp = {batch_shards} of "
        f"the mesh ({sizes or 'all 1'}; sizes {shape}): its rows cannot be split over them; "
        "change one of them"
        for field, g in fields.items()
        if g % batch_shards
    ]


def target_platform() -> str:
    """The platform of the computation being traced: that of the current mesh's devices
    (`jax.set_mesh`, as the trainer, the sampler and the planner set it), else JAX's default
    backend. Kernel choices ask this, not the host: a plan compiled on a CPU host for a TPU
    topology is a TPU program."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def create_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The device mesh of a config, with Auto axis types (logical rules need them)."""
    devices = list(devices if devices is not None else jax.devices())
    slices = num_slices(devices)
    shape = mesh_shape(mesh_config, len(devices), slices)
    if slices > 1:
        ici = _fill(
            {a: int(mesh_config.get(f"ici_{a}", 1)) for a in AXES},
            len(devices) // slices,
            "ici",
        )
        dcn = [shape[a] // ici[a] for a in AXES]
        grid = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in AXES], dcn, devices, allow_split_physical_axes=True
        )
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    if devices[0].platform == "cpu":
        grid = np.asarray(devices).reshape([shape[a] for a in AXES])
    else:  # axes laid along the physical torus (TPU) or NVLink domains (GPU)
        grid = mesh_utils.create_device_mesh(
            [shape[a] for a in AXES], devices, allow_split_physical_axes=True
        )
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_rules(mesh_config: ml_collections.ConfigDict) -> tuple:
    """The config's logical -> mesh axis rules as flax expects them."""
    rules = mesh_config.get("logical_axis_rules", None) or DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (abstract or real)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dimension over ('data', 'fsdp'); every context/tensor rank sees the sample."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
