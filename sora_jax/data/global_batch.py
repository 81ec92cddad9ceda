"""Host batches of every process -> one global `jax.Array` per field (pipeline.py's output
placed on the mesh; re-exported as `pipeline.to_global_batch`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def to_global_batch(
    host_batch: dict[str, Any],
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    fields: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Host batches of every process -> global `jax.Array`s sharded over `batch_axes`.

    The global batch is the processes' host batches concatenated in process order; rows
    are split over the devices of `batch_axes` (replicated over the other mesh axes).
    `fields` defaults to every numeric array; other entries ('bucket', 'step') pass
    through unchanged.
    """
    if fields is None:
        fields = [
            k
            for k, v in host_batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" or isinstance(v, jax.Array)
        ]
    sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    shards_per_batch = int(np.prod([mesh.shape[a] for a in batch_axes]))
    out = dict(host_batch)
    for k in fields:
        rows = host_batch[k].shape[0] * jax.process_count()
        if rows % shards_per_batch:
            raise ValueError(
                f"batch field {k!r} has {rows} global rows, not divisible by the "
                f"{shards_per_batch} shards of mesh axes {tuple(batch_axes)}: make "
                "data.global_batch_size a multiple of the data x fsdp mesh size"
            )
        out[k] = jax.make_array_from_process_local_data(sharding, host_batch[k])
    return out
