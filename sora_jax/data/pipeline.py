"""The training input pipeline: tokenized shards -> one global bucket per step -> batches.

Every global step `s` trains on one bucket (one shape per step, DESIGN.md §3), the same
on every host: `bucket_schedule(seed, s, weights)` hashes `(seed, s)` to a uniform
`u ∈ [0, 1)` and inverts the CDF of the normalized weights.

Records of bucket `b` (`n_b` records, global batch `G`, `P` processes, host batch
`g = G / P`): epoch `e` of the bucket is a grain global shuffle of its ArrayRecord files,
seeded from `(seed, b, e)`, so every epoch has its own permutation `π_e`.

**Remainder rule.** Each epoch's permutation is truncated to `E_b = ⌊n_b / G⌋` global
batches: the `n_b mod G` records at the end of `π_e` are skipped in that epoch (different
records each epoch, since `π_e` changes). Global batch `j` of the epoch is
`π_e[j G : (j + 1) G]`; process `p` reads its rows `p, p + P, p + 2P, …` (grain's
`ds[p::P]` sharding), so processes read disjoint records, and the set of records in a
global batch does not depend on `P`.

The `k`-th time bucket `b` is drawn is its batch `k`: epoch `k // E_b`, batch
`k mod E_b`. `k` is the number of steps before `s` that drew `b`, derived from the
schedule, so the pipeline's whole state is the next step: a batch is a pure function of
`(dataset, seed, weights, G, P, p, s)`, whatever `worker_count` and `prefetch` are.
"""

from __future__ import annotations

import os
import pathlib
import queue
import sys
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax.data import records, shards

# Steps addressable by the pipeline's step-indexed grain dataset (effectively unbounded).
_MAX_STEPS = sys.maxsize // 2
# Steps per chunk when counting earlier draws of each bucket (see _Schedule).
_CHUNK = 1 << 16
_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (Steele et al. 2014): a bijective 64-bit mix, uint64 -> uint64."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_M64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(*words: int | np.ndarray) -> np.ndarray:
    """Counter-based hash of a tuple of integers (arrays broadcast), uint64."""
    h = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):
        for w in words:
            # Python ints (any sign) reduced mod 2^64; int64 arrays wrap the same way.
            w = np.uint64(w % 2**64) if isinstance(w, int) else np.asarray(w).astype(np.uint64)
            h = _splitmix64(h ^ w)
    return h


def bucket_schedule(seed: int, steps: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Bucket index of each global step; identical on every host.

    `u = hash(seed, step) / 2^64 ∈ [0, 1)`, bucket `= min{i : u < Σ_{j ≤ i} w_j / Σ w}`, so
    bucket `i` is drawn with probability `w_i / Σ w` and a zero weight is never drawn.

    Args:
      seed: the run's seed.
      steps: int[...] global step indices.
      weights: w[B], non-negative, not all zero.

    Returns:
      int32[...] bucket indices, the shape of `steps`.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"bucket weights must be non-negative and not all zero, got {weights}")
    cdf = np.cumsum(w) / w.sum()
    steps = np.asarray(steps, np.int64)
    u = (_hash(seed, 0x5EED_B0C4E7, steps) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    # side='right' skips zero-weight buckets (empty CDF intervals); the clip guards the
    # last CDF value rounding below 1.
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1).astype(np.int32)


class _Schedule:
    """`locate(step) -> (bucket, k)`: the step's bucket and how often it was drawn before.

    Draw counts are kept at chunk boundaries (`_CHUNK` steps), computed vectorized on
    first use, so jumping to step 10^7 on resume costs ~150 vectorized chunks, once.
    """

    def __init__(self, seed: int, weights: Sequence[float]):
        self.seed, self.weights = seed, list(weights)
        self._before = [np.zeros(len(self.weights), np.int64)]  # counts at chunk starts
        self._chunk: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def _chunk_buckets(self, c: int) -> np.ndarray:
        if self._chunk is None or self._chunk[0] != c:
            steps = np.arange(c * _CHUNK, (c + 1) * _CHUNK)
            self._chunk = (c, bucket_schedule(self.seed, steps, self.weights))
        return self._chunk[1]

    def locate(self, step: int) -> tuple[int, int]:
        c, i = divmod(step, _CHUNK)
        with self._lock:
            while len(self._before) <= c:
                done = len(self._before) - 1
                counts = np.bincount(self._chunk_buckets(done), minlength=len(self.weights))
                self._before.append(self._before[-1] + counts)
            chunk = self._chunk_buckets(c)
            bucket = int(chunk[i])
            return bucket, int(self._before[c][bucket] + np.count_nonzero(chunk[:i] == bucket))


class _Select:
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


class _BatchReader:
    """`step -> host batch`: a pure function of the step (picklable for grain workers)."""

    def __init__(self, buckets: list[dict[str, Any]], *, seed, global_batch, index, count, fields):
        self.buckets, self.seed, self.fields = buckets, seed, tuple(fields)
        self.global_batch, self.index, self.count = global_batch, index, count
        self.schedule = _Schedule(seed, [b["weight"] for b in buckets])
        self._epochs: dict[int, tuple[int, grain.MapDataset]] = {}

    def epoch_dataset(self, b: int, epoch: int) -> grain.MapDataset:
        """Bucket `b`'s host batches in `epoch`: shuffle → remainder rule → shard → batch."""
        cached = self._epochs.get(b)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        spec = self.buckets[b]
        epoch_seed = int(_hash(self.seed, zlib.crc32(spec["name"].encode()), epoch)) >> 32
        ds = grain.MapDataset.source(spec["source"]).shuffle(seed=epoch_seed)
        ds = ds[: spec["batches_per_epoch"] * self.global_batch]  # remainder rule
        ds = ds[self.index :: self.count]  # this process's rows of every global batch
        ds = ds.map(_Select(spec["name"], self.fields, spec["shape"]))
        ds = ds.batch(self.global_batch // self.count, drop_remainder=True)
        self._epochs[b] = (epoch, ds)
        return ds

    def __call__(self, step: int) -> dict[str, Any]:
        b, k = self.schedule.locate(step)
        epoch, j = divmod(k, self.buckets[b]["batches_per_epoch"])
        batch = dict(self.epoch_dataset(b, epoch)[j])
        batch["bucket"] = self.buckets[b]["name"]
        batch["step"] = step
        return batch


def _fill(source: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: moves batches, or the error that ended `source`, into `out`."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for batch in source:
            if not put(batch):
                return
    except BaseException as e:  # raised again by Pipeline.__next__ in the consumer
        put(e)


class Pipeline:
    """Iterator of host-local batches, one bucket per global step, resumable by step.

    Each `next()` returns `{field: np.ndarray[G / P, ...], 'bucket': str, 'step': int}`.
    With `prefetch > 0` a background thread keeps up to `prefetch` batches ready; with
    `worker_count > 0` grain reads that many steps in parallel threads. Neither changes
    any batch. Call `close()` (or use `with`) to stop the threads.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        *,
        global_batch_size: int,
        seed: int,
        bucket_weights: dict[str, float] | None = None,
        fields: Sequence[str] = ("latents", "text", "text_mask"),
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
        worker_count: int = 0,
    ):
        self.dataset_dir = pathlib.Path(dataset_dir)
        if not self.dataset_dir.is_dir():
            raise FileNotFoundError(
                f"dataset directory {self.dataset_dir} does not exist: tokenize the data "
                "first (python -m sora_jax.tokenize) or fix data.dataset_dir"
            )
        self.manifest = shards.read_manifest(self.dataset_dir)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.global_batch_size, self.seed = int(global_batch_size), int(seed)
        self.prefetch, self.worker_count = int(prefetch), int(worker_count)
        if self.global_batch_size <= 0 or self.global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the "
                f"process count {self.process_count}"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {process_index} not in [0, {self.process_count})")
        if self.prefetch < 0 or self.worker_count < 0:
            raise ValueError(f"prefetch {prefetch} and worker_count {worker_count} must be >= 0")
        self.bucket_weights = self._weights(bucket_weights)
        self.buckets = [self._bucket(n, w) for n, w in self.bucket_weights.items()]
        self._reader = _BatchReader(
            self.buckets,
            seed=self.seed,
            global_batch=self.global_batch_size,
            index=self.process_index,
            count=self.process_count,
            fields=fields,
        )
        self._next_step = 0
        self._source: Iterator[dict[str, Any]] | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- Setup --------------------------------------------------------------------------

    def _weights(self, bucket_weights: dict[str, float] | None) -> dict[str, float]:
        table = self.manifest.get("buckets", {})
        if bucket_weights is None:  # proportional to the records of each bucket
            return {name: float(table[name]["count"]) for name in sorted(table)}
        unknown = [n for n in bucket_weights if n not in table]
        if unknown:
            raise ValueError(
                f"buckets {unknown} are not in {self.dataset_dir / shards.MANIFEST} (it has "
                f"{sorted(table)}): tokenize them or remove them from the weights"
            )
        weights = {n: float(w) for n, w in bucket_weights.items()}
        bad = {n: w for n, w in weights.items() if not w >= 0}
        if bad or not any(w > 0 for w in weights.values()):
            raise ValueError(f"bucket weights must be >= 0 and not all zero, got {weights}")
        return weights

    def _bucket(self, name: str, weight: float) -> dict[str, Any]:
        entry = self.manifest["buckets"][name]
        count, G = int(entry["count"]), self.global_batch_size
        spec = {"name": name, "weight": weight, "shape": list(entry["shape"]), "count": count}
        spec["batches_per_epoch"] = count // G
        spec["source"] = None
        if weight == 0:
            return spec
        if count == 0 or not entry.get("files"):
            raise ValueError(
                f"bucket {name!r} has weight {weight} but no records: remove it from the "
                "weights or tokenize data for it"
            )
        if count < G:
            raise ValueError(
                f"bucket {name!r} has {count} records, fewer than one global batch of {G}: "
                "tokenize more data for it, lower data.global_batch_size, or give it weight 0"
            )
        files = [self.dataset_dir / f for f in entry["files"]]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"bucket {name!r}: manifest lists missing shards {absent}")
        spec["source"] = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        if len(spec["source"]) != count:
            raise ValueError(
                f"bucket {name!r}: its shards hold {len(spec['source'])} records, the manifest "
                f"says {count}: the dataset is incomplete or stale, re-tokenize it"
            )
        return spec

    def report(self) -> str:
        """What the run will read: records, weight and epoch length per bucket."""
        G, P_ = self.global_batch_size, self.process_count
        total = sum(b["weight"] for b in self.buckets)
        lines = [
            f"data: {self.dataset_dir}  global batch {G} = {P_} process(es) x {G // P_}  "
            f"seed {self.seed}",
            f"  {'bucket':<16} {'shape':<18} {'records':>9} {'weight':>8} {'steps/epoch':>11} "
            f"{'skipped/epoch':>13}",
        ]
        for b in self.buckets:
            lines.append(
                f"  {b['name']:<16} {str(b['shape']):<18} {b['count']:>9} "
                f"{b['weight'] / total:>8.3f} {b['batches_per_epoch']:>11} "
                f"{b['count'] - b['batches_per_epoch'] * G:>13}"
            )
        unused = sorted(set(self.manifest["buckets"]) - set(self.bucket_weights))
        if unused:
            lines.append(f"  not trained on (no weight): {unused}")
        return "\n".join(lines)

    # --- State --------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: the next global step, plus what it depends on."""
        return {
            "step": self._next_step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "bucket_weights": dict(self.bucket_weights),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at `state['step']`; prefetched batches are discarded."""
        mine = self.get_state()
        diffs = [
            f"{k}: state has {state[k]!r}, pipeline has {mine[k]!r}"
            for k in ("seed", "global_batch_size", "bucket_weights")
            if k in state and state[k] != mine[k]
        ]
        if diffs:
            raise ValueError(
                "the data state was saved by a pipeline with other settings, so resuming "
                "would not continue the same data stream:\n  " + "\n  ".join(diffs) + "\n"
                "restore with the same seed, data.global_batch_size and data.buckets, or "
                "start a new workdir"
            )
        self.close()
        self._next_step = int(state["step"])

    # --- Iteration ----------------------------------------------------------------------

    def _start(self) -> None:
        steps = grain.MapDataset.range(self._next_step, _MAX_STEPS).map(self._reader)
        if self.worker_count > 0:  # grain reads `worker_count` steps at once, in order
            options = grain.ReadOptions(
                num_threads=self.worker_count,
                prefetch_buffer_size=max(self.worker_count, self.prefetch),
            )
            self._source = iter(steps.to_iter_dataset(options))
        else:
            self._source = (self._reader(s) for s in range(self._next_step, _MAX_STEPS))
        if self.prefetch > 0:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.prefetch)
            # The thread holds no reference to `self`, so an unclosed Pipeline is still
            # garbage-collected, and __del__ stops the thread.
            self._thread = threading.Thread(
                target=_fill, args=(self._source, self._queue, self._stop), daemon=True
            )
            self._thread.start()

    def __iter__(self) -> Pipeline:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._source is None:
            self._start()
        if self._queue is None:
            batch = next(self._source)
        else:
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self.close()
                raise batch
        assert batch["step"] == self._next_step, (batch["step"], self._next_step)
        self._next_step += 1
        return batch

    def close(self) -> None:
        """Stops the prefetch thread and grain's readers; iteration may restart after."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        source, self._source, self._queue, self._thread = self._source, None, None, None
        if hasattr(source, "close"):
            source.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the daemon thread dies with it
            pass


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
