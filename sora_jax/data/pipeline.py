"""The training input pipeline: tokenized shards -> one global bucket per step -> batches.

Every global step `s` trains on one bucket (one shape per step: docs/design.md, Decisions), the same
on every host: `bucket_schedule(seed, s, weights)` (schedule.py) hashes `(seed, s)` to a
bucket. Which datasets and buckets take part, their weights and each bucket's global batch
`G_b` (fixed, per bucket, or from a token budget) are resolved by mixture.py. The bucket
drawn for a step sets the step's batch: different buckets may have different batch sizes,
every step has one shape.

Records of bucket `b` (reader.py): epoch `e` is a grain global shuffle `π_e` of its
ArrayRecord files seeded from `(seed, b, e)`. **Remainder rule**: each epoch is truncated
to `E_b = ⌊n_b / G_b⌋` global batches; the `n_b mod G_b` records at the end of `π_e` are
skipped in that epoch (different records each epoch, since `π_e` changes). Global batch
`j` of the epoch is `π_e[j G_b : (j + 1) G_b]`.

**Which rows a process reads** follows the mesh (global_batch.py): the batch is sharded
over `('data', 'fsdp')`, and a process reads the rows of the batch shards its devices
hold. When a `context` or `tensor` group spans processes, the processes sharing a batch
shard read the same rows; without a mesh (one process, or `layout` not given) process `p`
of `P` reads rows `[p G_b/P, (p + 1) G_b/P)`. Rows are a pure function of the step and
the row index, so a global batch does not depend on the process count or the layout.

The `k`-th time bucket `b` is drawn is its batch `k`: epoch `k // E_b`, batch
`k mod E_b`. `k` is the number of steps before `s` that drew `b`, derived from the
schedule, so the pipeline's whole state is the next step: a batch is a pure function of
`(datasets, seed, weights, G_b, rows, s)`, whatever `worker_count` and `prefetch` are.

**Changing the process count or the mesh on restore** (elastic continuation). The state
holds no per-process position, so a run saved with `P` processes and restored with `P'`
(or onto a mesh whose context groups span processes) continues at the same global step
with the same global batches, split as the new row layout says: the records of every
later global step are exactly those of an uninterrupted run. If a bucket's global batch
or record count changed instead (a token budget over another number of devices, a
re-tokenized bucket), its position inside the current epoch has no equivalent: that
bucket restarts at the next epoch, with a warning naming it (`epoch_base` in the state,
`(k_0, e_0)`: draw `k ≥ k_0` reads epoch `e_0 + (k - k_0) // E_b`); the other buckets
continue exactly. A changed seed or weights changes the whole schedule, so `set_state` refuses it.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax

from sora_jax.data import bucket_table, holdout, mixture, tokenization
from sora_jax.data import global_batch as rows_lib
from sora_jax.data.global_batch import to_global_batch as to_global_batch
from sora_jax.data.reader import BatchReader
from sora_jax.data.schedule import bucket_schedule as bucket_schedule
from sora_jax.data.schedule import check_schedule_agreement as check_schedule_agreement
from sora_jax.models import text as text_lib
from sora_jax.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

# Steps addressable by the pipeline's step-indexed grain dataset (effectively unbounded).
_MAX_STEPS = sys.maxsize // 2


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

    Each `next()` returns `{field: np.ndarray[rows, ...], 'bucket': str, 'step': int,
    'layout': RowLayout}`: the rows of the global batch that `layout` names (its blocks of
    the batch shards: global_batch.py), by default `G_b / P` rows, block `p` of `P`.
    With `prefetch > 0` a background thread keeps up to `prefetch` batches ready; with
    `worker_count > 0` grain reads that many steps in parallel threads. Neither changes
    any batch. Call `close()` (or use `with`) to stop the threads.

    `dataset_dir` is one dataset directory or a mix (`[{dir, weight, name}, ...]`);
    `bucket_weights`, `global_batch_size`, `bucket_batch_sizes`, `tokens_per_device`,
    `patch_size` and `data_parallel` are as in mixture.py; `expected_manifest` (dotted
    field -> value) is what every manifest must hold to fit the model. A weighted bucket
    with no records or fewer than one global batch is left out and reported, or, with
    `strict_buckets`, an error (`data.strict_buckets`).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike | Sequence[Any],
        *,
        seed: int,
        global_batch_size: int | None = None,
        bucket_weights: str | Mapping[str, float] | None = None,
        bucket_batch_sizes: Mapping[str, int] | None = None,
        tokens_per_device: int = 0,
        patch_size: Sequence[int] = (1, 1, 1),
        data_parallel: int | None = None,
        expected_manifest: Mapping[str, Any] | None = None,
        fields: Sequence[str] | None = None,  # default: step_fields(manifest)
        process_index: int | None = None,
        process_count: int | None = None,
        layout: rows_lib.RowLayout | None = None,  # default: process_blocks(index, count)
        prefetch: int = 2,
        worker_count: int = 0,
        strict_buckets: bool = False,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.seed, self.global_batch_size = int(seed), global_batch_size
        self.prefetch, self.worker_count = int(prefetch), int(worker_count)
        self.tokens_per_device, self.data_parallel = int(tokens_per_device), data_parallel
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {process_index} not in [0, {self.process_count})")
        if self.prefetch < 0 or self.worker_count < 0:
            raise ValueError(f"prefetch {prefetch} and worker_count {worker_count} must be >= 0")
        self.layout = layout or rows_lib.process_blocks(self.process_index, self.process_count)
        table = mixture.resolve(
            dataset_dir,
            bucket_weights=bucket_weights,
            global_batch_size=global_batch_size,
            bucket_batch_sizes=bucket_batch_sizes,
            tokens_per_device=self.tokens_per_device,
            patch_size=patch_size,
            data_parallel=data_parallel,
            process_count=self.process_count,
            layout=self.layout,
            expected=expected_manifest,
            strict=strict_buckets,
        )
        self.table, self.strict_buckets = table, bool(strict_buckets)
        leaked = [f for b in table.buckets for f in b.files if f.startswith(f"{holdout.HOLDOUT}/")]
        if leaked:  # the manifest's `buckets` never list them (holdout.py): a hand-edited one
            raise ValueError(f"held-out shards {leaked[:3]} are listed as training data")
        self.datasets, self.buckets, self.unused = table.datasets, table.buckets, table.unused
        self.manifest = table.manifest  # tokenizer, text encoder; buckets by plain name
        self.fields = tuple(fields or step_fields(self.manifest))
        self.dataset_dir = self.datasets[0].dir
        self.bucket_weights = {b.key: b.weight for b in self.buckets}
        sources = [mixture.open_source(b) if b.weight > 0 else None for b in self.buckets]
        self._reader = BatchReader(
            self.buckets, sources, seed=self.seed, layout=self.layout, fields=self.fields
        )
        self._next_step = 0
        self._source: Iterator[dict[str, Any]] | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- What each step reads -----------------------------------------------------------

    def locate(self, step: int) -> tuple[int, int]:
        """`(bucket index, k)`: the bucket of global `step` and its draws before `step`."""
        return self._reader.schedule.locate(step)

    def epoch_and_batch(self, b: int, k: int) -> tuple[int, int]:
        return self._reader.epoch_and_batch(b, k)

    def bucket_at(self, step: int) -> mixture.BucketSpec:
        return self.buckets[self.locate(step)[0]]

    def batch_at(self, step: int) -> dict[str, Any]:
        """This process's host batch of global `step`, without moving the iterator."""
        return self._reader(step)

    def first_step_of_each_bucket(self, search: int = 100_000) -> dict[str, int]:
        """`{bucket key: the first step that draws it}` over the first `search` steps."""
        found: dict[str, int] = {}
        wanted = {b.key for b in self.buckets if b.weight > 0}
        for step in range(search):
            key = self.bucket_at(step).key
            found.setdefault(key, step)
            if len(found) == len(wanted):
                break
        return found

    def report(self) -> str:
        """What the run will read: per bucket records, weight, batch, tokens, epoch length;
        the buckets left out or merged, and the record totals (bucket_table.py)."""
        table = bucket_table.report(
            self.table, seed=self.seed, processes=self.process_count, strict=self.strict_buckets
        )
        return table + (f"\n  {self.layout.describe()}" if self.process_count > 1 else "")

    def decisions(self) -> dict[str, Any]:
        """Every bucket's fate and the record totals (WORKDIR/data_buckets.json)."""
        return bucket_table.decisions(self.table, strict=self.strict_buckets)

    # --- State --------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: the next global step, plus what it depends on."""
        return {
            "step": self._next_step,
            "seed": self.seed,
            "bucket_weights": dict(self.bucket_weights),
            "global_batch_sizes": {b.key: b.global_batch for b in self.buckets},
            "records": {b.key: b.count for b in self.buckets},
            "epoch_base": {self.buckets[i].key: list(v) for i, v in self._reader.base.items()},
            "process_count": self.process_count,  # informational: any count may restore
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at `state['step']`; prefetched batches are discarded.

        The process count may differ from the saving run's (exact continuation); a bucket
        whose global batch or record count differs restarts at its next epoch, with a
        warning (module docstring).
        """
        mine = self.get_state()
        diffs = [
            f"{k}: state has {state[k]!r}, pipeline has {mine[k]!r}"
            for k in ("seed", "bucket_weights")
            if k in state and state[k] != mine[k]
        ]
        if diffs:
            raise ValueError(
                "the data state was saved by a pipeline with other settings, so resuming "
                "would not continue the same data stream:\n  " + "\n  ".join(diffs) + "\n"
                "restore with the same seed, data.bucket_weights, data.buckets and "
                "data.datasets, or start a new workdir"
            )
        step = int(state["step"])
        old_g = state.get("global_batch_sizes")
        if old_g is None:  # states written before per-bucket batches: one global batch
            old_g = {
                k: state.get("global_batch_size", g) for k, g in mine["global_batch_sizes"].items()
            }
        old_n, old_base = state.get("records", mine["records"]), state.get("epoch_base", {})
        self.close()
        draws = self._reader.schedule.counts_before(step)  # int64[B], k of each bucket
        base: dict[int, tuple[int, int]] = {}
        for i, b in enumerate(self.buckets):
            k0, e0 = (int(x) for x in old_base.get(b.key, (0, 0)))
            g, n = int(old_g.get(b.key, b.global_batch)), int(old_n.get(b.key, b.count))
            if b.weight <= 0 or (g, n) == (b.global_batch, b.count):
                if (k0, e0) != (0, 0):
                    base[i] = (k0, e0)
                continue
            per_epoch = max(n // g, 1)  # E_b when saved
            epoch, j = divmod(int(draws[i]) - k0, per_epoch)
            base[i] = (int(draws[i]), e0 + epoch + (j > 0))
            log.warning(
                f"data: bucket {b.key!r} had global batch {g} and {n} records when saved, now "
                f"{b.global_batch} and {b.count}: its position in epoch {e0 + epoch} does not "
                f"carry over, so from step {step} it starts epoch {base[i][1]} "
                f"({(per_epoch - j) % per_epoch} batches of epoch {e0 + epoch} are skipped); "
                "the other buckets continue exactly"
            )
        saved_p = state.get("process_count", self.process_count)
        if saved_p != self.process_count:
            log.info(
                f"data: state saved with {saved_p} processes, continuing with "
                f"{self.process_count}: the same global batches from step {step}, split "
                f"{self.process_count} ways"
            )
        self._reader.base = base
        self._next_step = step

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


def step_fields(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The record fields the train step reads: latents, and the text embeddings and mask
    or, for a dataset tokenized with `text_encoder.embed='train_step'`, the token ids."""
    return ("latents", *text_lib.record_fields(manifest["text_encoder"]))


def from_config(
    config, workdir: str | os.PathLike, *, data_parallel: int, mesh=None, **kwargs
) -> Pipeline:
    """The trainer's pipeline: `config.data` read as docs/data_pipeline.md describes.

    `data_parallel` is the mesh's `data x fsdp` size (the batch is sharded over those).
    With several processes each reads the rows its devices of `mesh` hold (default: the
    mesh of `config.mesh`, as the trainer builds it; global_batch.py), unless `kwargs`
    set `layout` or `process_index`. Checks every dataset against the model's tokenizer
    and text encoder first; process 0 writes every bucket's fate to
    WORKDIR/data_buckets.json.
    """
    args = bucket_table.pipeline_args(config, tokenization.dataset_dir(config, workdir))
    if jax.process_count() > 1 and not {"layout", "process_index"} & set(kwargs):
        layout = rows_lib.row_layout(mesh or mesh_lib.create_mesh(config.mesh))
        if layout.shards != data_parallel:
            raise ValueError(
                f"data_parallel={data_parallel} is not the mesh's data x fsdp = {layout.shards}"
            )
        kwargs["layout"] = layout
    pipe = Pipeline(
        **args,
        seed=config.seed,
        patch_size=tuple(config.model.patch_size),
        data_parallel=data_parallel,
        expected_manifest=tokenization.expected_manifest_fields(config),
        prefetch=config.data.prefetch,
        worker_count=config.data.worker_count,
        **kwargs,
    )
    missing = [n for n in config.data.buckets if n not in pipe.manifest["buckets"]]
    if missing:
        raise ValueError(
            f"buckets {missing} of data.buckets are in none of the datasets "
            f"{[str(d.dir) for d in pipe.datasets]} (they have "
            f"{sorted(pipe.manifest['buckets'])}); tokenize them or drop them from the config"
        )
    if pipe.process_index == 0:
        bucket_table.write_decisions(workdir, pipe.decisions())
    return pipe
