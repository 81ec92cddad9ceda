"""`step -> host batch`: the records a process reads for one global step (pipeline.py).

Epoch `e` of bucket `b` (`n_b` records, global batch `G_b`) is a grain global shuffle
`π_e` of its ArrayRecord files seeded from `(seed, b, e)`, truncated to
`E_b = ⌊n_b / G_b⌋` global batches (the remainder rule). Global batch `j` of the epoch is
`π_e[j G_b : (j + 1) G_b]`, row `r` of it the record `π_e[j G_b + r]`: a pure function of
`(seed, b, e, j, r)`. A process reads the rows its `RowLayout` names (global_batch.py):
the blocks of its devices' batch shards on a mesh, or block `p` of `P` without one. So
processes that share a batch shard read the same records in the same order, and a global
batch (its records, their order, hence every per-row random number of the step) does not
depend on the process count or on how the rows are spread over processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sora_jax.data import mixture, records
from sora_jax.data.global_batch import RowLayout
from sora_jax.data.schedule import Schedule, hash_ints


class Select:
    """Decodes a record and keeps `fields`, checking them (picklable for grain workers)."""

    def __init__(self, bucket: str, fields: Sequence[str], shape: Sequence[int]):
        self.bucket, self.fields, self.shape = bucket, tuple(fields), tuple(shape)

    def __call__(self, data: bytes) -> dict[str, Any]:
        record = records.decode_record(data)
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise ValueError(
                f"records of bucket {self.bucket!r} lack fields {missing} (they have "
                f"{sorted(record)}): drop them from the pipeline's fields or re-tokenize"
            )
        latents = record.get("latents")
        if "latents" in self.fields and tuple(latents.shape) != self.shape:
            raise ValueError(
                f"a record of bucket {self.bucket!r} has latents {latents.shape}, the "
                f"manifest says {list(self.shape)}: the dataset is corrupt, re-tokenize it"
            )
        return {f: record[f] for f in self.fields}


class BatchReader:
    """`step -> host batch`: a pure function of the step (shared by grain's threads)."""

    def __init__(
        self,
        buckets: list[mixture.BucketSpec],
        sources: list,
        *,
        seed: int,
        layout: RowLayout,
        fields: Sequence[str],
    ):
        self.buckets, self.sources, self.seed, self.fields = buckets, sources, seed, tuple(fields)
        self.layout = layout
        self.schedule = Schedule(seed, [b.weight for b in buckets])
        # bucket index -> (k_0, e_0): draw k >= k_0 reads epoch e_0 + (k - k_0) // E_b.
        self.base: dict[int, tuple[int, int]] = {}
        self._epochs: dict[int, tuple[int, grain.MapDataset]] = {}

    def epoch_and_batch(self, b: int, k: int) -> tuple[int, int]:
        """Epoch and batch index of bucket `b`'s `k`-th draw."""
        k0, e0 = self.base.get(b, (0, 0))
        assert k >= k0, f"draw {k} of bucket {self.buckets[b].key!r} precedes its base {k0}"
        epoch, j = divmod(k - k0, self.buckets[b].batches_per_epoch)
        return e0 + epoch, j

    def epoch_dataset(self, b: int, epoch: int) -> grain.MapDataset:
        """Bucket `b`'s blocks in `epoch`: shuffle → remainder rule → decode → blocks of
        `G_b / D` rows (block `j D + s` is block `s` of global batch `j`)."""
        cached = self._epochs.get(b)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        spec = self.buckets[b]
        epoch_seed = int(hash_ints(self.seed, zlib.crc32(spec.key.encode()), epoch)) >> 32
        ds = grain.MapDataset.source(self.sources[b]).shuffle(seed=epoch_seed)
        ds = ds[: spec.batches_per_epoch * spec.global_batch]  # remainder rule
        ds = ds.map(Select(spec.key, self.fields, spec.shape))  # lazy: only rows read
        ds = ds.batch(spec.global_batch // self.layout.shards, drop_remainder=True)
        self._epochs[b] = (epoch, ds)
        return ds

    def __call__(self, step: int) -> dict[str, Any]:
        b, k = self.schedule.locate(step)
        epoch, j = self.epoch_and_batch(b, k)
        blocks, shards = self.epoch_dataset(b, epoch), self.layout.shards
        parts = [blocks[j * shards + s] for s in self.layout.mine]  # this process's rows
        if len(parts) == 1:
            batch = dict(parts[0])
        else:
            batch = {f: np.concatenate([p[f] for p in parts]) for f in self.fields}
        batch["bucket"] = self.buckets[b].key
        batch["step"] = step
        batch["layout"] = self.layout
        return batch
