"""Rows that follow the mesh (sora_jax/data/global_batch.py), in one process: the 8 fake
CPU devices laid out as if on several hosts (`process_of`), each mesh's row layout per
process, the pipeline's reads under those layouts against one process's global batch,
and the global arrays built from them. tests/parallel/test_multiprocess.py runs the same
layouts as real processes."""

import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sora_jax.data import global_batch as rows_lib
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import shards
from sora_jax.parallel import mesh as mesh_lib

AXES = mesh_lib.AXES


def _mesh(devices, order, shape):
    """A mesh of `shape` (data, fsdp, context, tensor) over `devices` taken in `order`."""
    return Mesh(np.asarray(devices)[list(order)].reshape(shape), AXES)


IN_ORDER = range(8)
# Tensor pairs (i, i + 4): each pair spans the two 4-device hosts.
PAIRS_ACROSS = (0, 4, 1, 5, 2, 6, 3, 7)

# name -> (device order, mesh shape, devices per host, {process: blocks}, readers, spanning)
LAYOUTS = {
    "context8": (IN_ORDER, (1, 1, 8, 1), 4, {0: (0,), 1: (0,)}, 1, ("context",)),
    "data2_context4": (IN_ORDER, (2, 1, 4, 1), 4, {0: (0,), 1: (1,)}, 2, ()),
    "data4_tensor2": (IN_ORDER, (4, 1, 1, 2), 4, {0: (0, 1), 1: (2, 3)}, 2, ()),
    "data4_tensor2_across": (
        PAIRS_ACROSS, (4, 1, 1, 2), 4, {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}, 1, ("tensor",)
    ),
    "data2_context4_4hosts": (
        IN_ORDER, (2, 1, 4, 1), 2, {0: (0,), 1: (0,), 2: (1,), 3: (1,)}, 2, ("context",)
    ),
    "data2_fsdp2_tensor2": (IN_ORDER, (2, 2, 1, 2), 4, {0: (0, 1), 1: (2, 3)}, 2, ()),
}  # fmt: skip


def _layouts(devices, name):
    order, shape, per_host, _, _, _ = LAYOUTS[name]
    mesh = _mesh(devices, order, shape)
    hosts = 8 // per_host
    return mesh, [
        rows_lib.row_layout(mesh, process_index=p, process_of=lambda d: d.id // per_host)
        for p in range(hosts)
    ]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_row_layout_follows_the_batch_sharding(devices, name):
    _, shape, _, blocks, readers, spanning = LAYOUTS[name]
    _, layouts = _layouts(devices, name)
    assert {p: lay.mine for p, lay in enumerate(layouts)} == blocks
    for lay in layouts:
        assert lay.shards == shape[0] * shape[1] and lay.readers == readers
        assert lay.spanning == spanning and lay.axes == ("data", "fsdp")
    # Processes holding the same blocks are the same reader, whatever their index.
    for a in layouts:
        for b in layouts:
            assert (a.reader == b.reader) == (a.mine == b.mine)


def test_rows_of_a_layout():
    lay = rows_lib.RowLayout(4, (1, 3))
    np.testing.assert_array_equal(lay.rows(8), [2, 3, 6, 7])
    np.testing.assert_array_equal(rows_lib.process_blocks(1, 2).rows(6), [3, 4, 5])
    with pytest.raises(ValueError, match="does not split into 4 blocks"):
        lay.rows(6)


# A small tokenized dataset: bucket -> (latent shape, records); latents carry the id.
BUCKETS = {"a": ((2, 4, 4, 3), 36), "b": ((1, 2, 2, 3), 20)}
FIELDS = ("latents", "id")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    manifest, next_id = {"buckets": {}}, 0
    for name, (shape, count) in BUCKETS.items():
        with shards.ShardWriter(root, name, 0) as writer:
            for _ in range(count):
                writer.write({"latents": np.full(shape, next_id, np.float32), "id": next_id})
                next_id += 1
        files = shards.completed_shards(root, name)
        manifest["buckets"][name] = {
            "shape": list(shape),
            "count": count,
            "files": [str(f.relative_to(root)) for f in files],
        }
    shards.write_manifest(root, manifest)
    return root


def _pipe(dataset, **kw):
    kw = {"global_batch_size": 8, "seed": 3, "fields": FIELDS, "prefetch": 0, **kw}
    return pipeline_lib.Pipeline(dataset, **kw)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_processes_read_the_rows_of_their_shards(dataset, devices, name):
    mesh, layouts = _layouts(devices, name)
    steps = 12  # several epochs of both buckets
    whole = [_pipe(dataset).batch_at(s) for s in range(steps)]
    hosts = [_pipe(dataset, layout=lay, process_count=len(layouts)) for lay in layouts]
    for s in range(steps):
        ids = whole[s]["id"]
        for lay, pipe in zip(layouts, hosts):
            host = pipe.batch_at(s)
            assert host["layout"] == lay and host["bucket"] == whole[s]["bucket"]
            np.testing.assert_array_equal(host["id"], ids[lay.rows(len(ids))])
            np.testing.assert_array_equal(host["latents"], whole[s]["latents"][lay.rows(len(ids))])
    # The global arrays: each device of the mesh gets its batch shard's rows, taken from
    # the host batch of the (simulated) process that owns it.
    for s in range(3):
        for lay, pipe in zip(layouts, hosts):
            batch = rows_lib.to_global_batch(pipe.batch_at(s), mesh, fields=FIELDS)
            assert batch["id"].shape == whole[s]["id"].shape
            for shard in batch["id"].addressable_shards:
                if shard.index[0].indices(8)[0] // (8 // lay.shards) in lay.mine:
                    np.testing.assert_array_equal(shard.data, whole[s]["id"][shard.index])


def test_a_batch_not_splitting_over_the_shards_is_refused(dataset, devices):
    _, layouts = _layouts(devices, "data4_tensor2")
    with pytest.raises(ValueError, match="positive multiple of the 4 batch shards of mesh axes"):
        _pipe(dataset, global_batch_size=6, layout=layouts[0], process_count=2)


def test_a_process_lacking_rows_of_its_devices_is_named(dataset, devices):
    """Rows read for process blocks (each process half the batch) on a context-8 mesh,
    where each process's devices hold every row: the error names the rows and the axes."""
    mesh, layouts = _layouts(devices, "context8")
    host = _pipe(dataset, process_index=1, process_count=2).batch_at(0)
    with pytest.raises(ValueError) as e:
        rows_lib.to_global_batch(host, mesh, fields=FIELDS, need=layouts[1])
    text = str(e.value)
    assert "different share of the batch than the mesh needs" in text
    assert "holds rows [4, 8) of 8 (2 blocks, one per process)" in text
    assert "hold rows [0, 8) (the 1 batch shards of mesh axes data x fsdp; mesh axes " in text
    assert "['context'] span processes)" in text


def test_state_restores_onto_another_layout(dataset, devices):
    """A state saved by 2 processes with blocks per process restores onto the context-8
    layout (each process all rows) and continues with the same global batches."""
    first = _pipe(dataset, process_index=0, process_count=2)
    with first:
        for _ in range(5):
            next(first)
        state = first.get_state()
    _, layouts = _layouts(devices, "context8")
    again = _pipe(dataset, layout=layouts[1], process_count=2)
    again.set_state(state)
    whole = _pipe(dataset)
    with again:
        for s in range(5, 9):
            np.testing.assert_array_equal(next(again)["id"], whole.batch_at(s)["id"])


def test_check_batch_names_the_share_and_the_mesh(devices):
    from sora_jax.training import plan

    mesh = _mesh(devices, IN_ORDER, (2, 1, 4, 1))
    sharding = mesh_lib.batch_sharding(mesh, 2)
    want = {"latents": jax.ShapeDtypeStruct((4, 3), np.float32, sharding=sharding)}
    rows = {"latents": jax.ShapeDtypeStruct((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"different share of the batch.*'data', 'fsdp'"):
        plan.check_batch(rows, want, "a")
    shape = {"latents": jax.ShapeDtypeStruct((4, 5), np.float32)}
    with pytest.raises(ValueError, match="shards disagree with the config"):
        plan.check_batch(shape, want, "a")


def test_validation_and_plan_refuse_rows_that_do_not_split(devices):
    """A batch whose rows cannot be split over the batch shards is refused before anything
    compiles (`--mode=plan` validates first), naming the fields and the mesh."""
    from sora_jax import config as config_lib
    from sora_jax.run import validate as validate_lib
    from sora_jax.training import plan

    config = config_lib.load_config(f"{pathlib.Path(__file__).parents[2]}/experiments/demo.py:tiny")
    config.mesh.ici_tensor = 2  # data fills the rest: 4 batch shards
    config.data.global_batch_size = 6
    with config.data.buckets["5x16x16"].unlocked():
        config.data.buckets["5x16x16"].global_batch_size = 2
    for check in (validate_lib.validate, plan.plan):
        with pytest.raises(config_lib.ConfigError) as e:
            check(config)
        text = str(e.value)
        assert "data.global_batch_size=6 is not divisible by the batch shards" in text
        assert "data.buckets.5x16x16.global_batch_size=2" in text
        assert "mesh.ici_data=-1" in text and "'tensor': 2" in text
    config.data.global_batch_size = 4  # context 8 on 2 hosts: 1 shard, any batch splits
    config.mesh.ici_tensor, config.mesh.ici_context = 1, 8
    with config.data.buckets["5x16x16"].unlocked():
        config.data.buckets["5x16x16"].global_batch_size = 1
    validate_lib.validate(config)


def test_a_batch_smaller_than_the_process_count(dataset, devices):
    """Context 8 over 2 hosts: a global batch of 1, the same row on both processes."""
    _, layouts = _layouts(devices, "context8")
    whole = _pipe(dataset, global_batch_size=1)
    hosts = [_pipe(dataset, global_batch_size=1, layout=lay, process_count=2) for lay in layouts]
    for s in range(4):
        ids = [h.batch_at(s)["id"] for h in hosts]
        assert ids[0].shape == (1,) and ids[0] == ids[1] == whole.batch_at(s)["id"]
    with pytest.raises(ValueError, match="positive multiple of the process count 2"):
        _pipe(dataset, global_batch_size=1, process_index=0, process_count=2)  # no mesh
