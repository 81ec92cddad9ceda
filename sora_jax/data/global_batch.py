"""Which rows of a global batch each process reads, and host batches -> global `jax.Array`s
(pipeline.py's output placed on the mesh; re-exported as `pipeline.to_global_batch`).

A global batch of `G` rows is sharded over the mesh axes `('data', 'fsdp')`: it is cut into
`D = data x fsdp` equal blocks ("batch shards"), block `s` = rows `[s G/D, (s + 1) G/D)`,
and every device of shard `s` (all its `context` and `tensor` ranks) holds block `s`. A
process must therefore hold the blocks of its own (addressable) devices: `row_layout`
reads them off the batch sharding (`devices_indices_map`). When a `context` or `tensor`
group spans processes, several processes hold the same block; they read the same rows,
since a row is a pure function of `(seed, step, row index)` (pipeline.py), never of the
process. Without a mesh (one process, or a pipeline built by hand) `process_blocks` gives
process `p` of `P` block `p` of `P`: the split pipeline.py always had.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """The rows of every global batch that this process reads and holds.

    The global batch is cut into `shards` equal blocks; this process holds blocks `mine`
    (ascending) and its host batch is their rows, block after block.
    """

    shards: int  # D: equal blocks of the global batch
    mine: tuple[int, ...]  # the blocks this process holds, ascending
    readers: int = 1  # distinct sets of blocks over all processes (processes sharing one
    reader: int = 0  # set read the same rows); this process's set among them, in order
    axes: tuple[str, ...] = ()  # mesh axes the blocks follow; () = one block per process
    spanning: tuple[str, ...] = ()  # other mesh axes whose groups span processes

    def rows(self, global_batch: int) -> np.ndarray:
        """int64[len(mine) G/D]: the global row indices of this process's host batch."""
        if global_batch % self.shards:
            raise ValueError(f"a global batch of {global_batch} does not split into {self.where()}")
        g = global_batch // self.shards
        return (np.asarray(self.mine, np.int64)[:, None] * g + np.arange(g)).reshape(-1)

    def where(self) -> str:
        """The blocks in words, for messages."""
        if not self.axes:
            return f"{self.shards} blocks, one per process"
        span = f"; mesh axes {list(self.spanning)} span processes" if self.spanning else ""
        return f"the {self.shards} batch shards of mesh axes {' x '.join(self.axes)}{span}"

    def describe(self) -> str:
        """One line for the data report."""
        return (
            f"rows: {self.where()}; {self.readers} distinct reader(s), this process reads "
            f"blocks {list(self.mine)} (reader {self.reader})"
        )


def process_blocks(process_index: int, process_count: int) -> RowLayout:
    """Process `p` of `P` holds block `p` of `P` (no mesh: every process reads its own)."""
    return RowLayout(process_count, (process_index,), process_count, process_index)


def row_layout(
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    *,
    process_index: int | None = None,
    process_of: Callable[[Any], int] | None = None,
) -> RowLayout:
    """The blocks of the global batch held by `process_index`'s devices of `mesh`.

    `process_of(device)` defaults to `device.process_index` (tests pass their own to lay a
    one-process mesh out as if over several hosts). Readers are the distinct sets of
    blocks, ordered by their first block, so processes that share a batch shard get the
    same reader index whatever their process indices are.
    """
    process_of = process_of or (lambda d: d.process_index)
    process_index = jax.process_index() if process_index is None else process_index
    batch_axes = tuple(batch_axes)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
    # A global batch of D rows: device -> the one row (= batch shard) it holds.
    index_map = NamedSharding(mesh, P(batch_axes)).devices_indices_map((shards,))
    held: dict[int, set[int]] = {}
    for device, index in index_map.items():
        start = index[0].indices(shards)[0]
        held.setdefault(int(process_of(device)), set()).add(start)
    if process_index not in held:
        raise ValueError(f"process {process_index} holds no device of the mesh {dict(mesh.shape)}")
    sets = sorted({tuple(sorted(s)) for s in held.values()})
    mine = tuple(sorted(held[process_index]))
    procs = np.vectorize(lambda d: int(process_of(d)), otypes=[np.int64])(mesh.devices)
    spanning = tuple(
        a
        for i, a in enumerate(mesh.axis_names)
        if a not in batch_axes and (procs != np.take(procs, [0], axis=i)).any()
    )
    return RowLayout(shards, mine, len(sets), sets.index(mine), batch_axes, spanning)


def to_global_batch(
    host_batch: dict[str, Any],
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    fields: Sequence[str] | None = None,
    *,
    need: RowLayout | None = None,
) -> dict[str, Any]:
    """Host batches of every process -> global `jax.Array`s sharded over `batch_axes`.

    The host batch's rows are those of its `'layout'` entry (a `RowLayout`, set by the
    pipeline; without one, block `p` of `P` for process `p`). Each local device gets the
    rows of its batch shard (replicated over the other mesh axes); a process lacking rows
    its devices need is an error naming the mesh axes. `fields` defaults to every numeric
    array; other entries ('bucket', 'step', 'layout') pass through unchanged. `need`, the
    rows this process's devices hold, defaults to `row_layout(mesh)` with several
    processes (tests pass one to check a simulated process).
    """
    if fields is None:
        fields = [
            k
            for k, v in host_batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" or isinstance(v, jax.Array)
        ]
    batch_axes = tuple(batch_axes)
    have = host_batch.get("layout") or process_blocks(jax.process_index(), jax.process_count())
    if need is None and jax.process_count() > 1:
        need = _this_process(mesh, batch_axes)
    sharding = NamedSharding(mesh, P(batch_axes))
    shards_per_batch = int(np.prod([mesh.shape[a] for a in batch_axes]))
    out = dict(host_batch)
    for k in fields:
        local = np.asarray(host_batch[k])
        if local.shape[0] % len(have.mine):
            raise ValueError(
                f"batch field {k!r} has {local.shape[0]} rows, not a whole number of rows for "
                f"each of the {len(have.mine)} blocks of its layout ({have.where()})"
            )
        rows = local.shape[0] // len(have.mine) * have.shards
        if rows % shards_per_batch:
            raise ValueError(
                f"batch field {k!r} has {rows} global rows, not divisible by the "
                f"{shards_per_batch} shards of mesh axes {batch_axes}: make "
                "data.global_batch_size a multiple of the data x fsdp mesh size"
            )
        position = np.full(rows, -1, np.int64)  # global row -> row of `local`, -1 = absent
        position[have.rows(rows)] = np.arange(local.shape[0])
        if need is not None:
            missing = need.rows(rows)[position[need.rows(rows)] < 0]
            if missing.size:
                held, needed = _ranges(have.rows(rows)), _ranges(need.rows(rows))
                raise ValueError(
                    "this process built a different share of the batch than the mesh needs: "
                    f"field {k!r} holds rows {held} of {rows} ({have.where()}), but the "
                    f"devices of process {jax.process_index()} hold rows {needed} "
                    f"({need.where()}); build the pipeline with the mesh's row layout "
                    "(pipeline.from_config does, from config.mesh)"
                )
        out[k] = jax.make_array_from_callback(
            (rows, *local.shape[1:]), sharding, _rows_of(local, position, rows)
        )
    return out


@functools.lru_cache(maxsize=8)
def _this_process(mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...]) -> RowLayout:
    """`row_layout` of this process, once per mesh (to_global_batch runs every step)."""
    return row_layout(mesh, batch_axes)


def _rows_of(local: np.ndarray, position: np.ndarray, rows: int):
    """`make_array_from_callback`'s callback: a device's index -> its rows of `local`."""

    def callback(index):
        lo, hi, _ = (index[0] if index else slice(None)).indices(rows)
        at = position[lo:hi]
        if at.size and at[0] >= 0 and (np.diff(at) == 1).all():
            return local[at[0] : at[-1] + 1]  # contiguous: a view
        return local[at]

    return callback


def _ranges(rows: np.ndarray) -> str:
    """`[0, 1, 2, 6, 7]` -> `'[0, 3) [6, 8)'`."""
    if not rows.size:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return " ".join(f"[{r[0]}, {r[-1] + 1})" for r in np.split(rows, breaks))
