"""One work unit of the tokenization job (tokenization.py): inputs -> clips -> records ->
one shard per bucket plus the unit's marker `_units/<unit:05d>.json`.

The marker holds the unit's input range, its clip counts per bucket, the input of every
clip per bucket (`inputs_by_bucket`: input indices, one per clip, in order; the
demotion pass, demotion.py, re-cuts the inputs of sparse buckets from it) and its rejects;
with a held-out split (holdout.py) also `holdout_counts` and `holdout_inputs_by_bucket`, the
same for the clips of held-out inputs, written to `holdout/<bucket>/<bucket>-<unit>.…`.

In native mode (`Encoder.native`, sora_jax.data.native) every clip goes to the one shard
`native/native-<unit>.array_record`, encoded in batches of one shape, and the marker adds
`shapes_by_bucket`: every record's latent shape `[T', H', W']`, in file order (as
`inputs_by_bucket` is).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import holdout as holdout_lib
from sora_jax.data import native as native_lib
from sora_jax.data import shards, sources
from sora_jax.data.video_files import Reject
from sora_jax.models import tokenizer as tokenizer_lib

UNITS = "_units"


class Encoder:
    """Clips -> records: the tokenizer on batches sharded over the local devices (padded to
    one fixed batch, so each bucket compiles once), the text encoder on the captions (or,
    with `embed='train_step'`, only its tokenizer: the trainer embeds the ids)."""

    def __init__(
        self,
        tokenizer,
        text_encoder,
        batch_size: int,
        embed: str = "tokenize",
        native: bool = False,
    ):
        self.tokenizer, self.text_encoder, self.embed = tokenizer, text_encoder, embed
        self.native = native  # records carry their `shape`; one shard per unit
        self.devices = jax.local_devices()
        n = len(self.devices)
        self.batch = max(n, -(-int(batch_size) // n) * n)
        self.sharded = not isinstance(tokenizer, tokenizer_lib.PixelTokenizer)
        if self.sharded:
            mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
            self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

    def latents(self, video: np.ndarray) -> np.ndarray:
        if not self.sharded:
            return np.asarray(self.tokenizer.encode(video), np.float32)
        n = len(video)
        pad = np.zeros((self.batch - n, *video.shape[1:]), video.dtype)
        x = jax.device_put(np.concatenate([video, pad]), self.sharding)
        return np.asarray(self.tokenizer.encode(x), np.float32)[:n]

    def records(self, clips: list[sources.Clip], timers: dict[str, float]) -> list[dict]:
        t0 = time.perf_counter()
        latents = self.latents(np.stack([c.video for c in clips]))  # [B, T', H', W', C]
        captions = [c.caption for c in clips]
        if self.embed == "train_step":
            text_field, (text, mask) = "text_ids", self.text_encoder.tokenize(captions)
        else:
            text_field, (text, mask) = "text", self.text_encoder.encode(captions)
        timers["encode_s"] = timers.get("encode_s", 0.0) + time.perf_counter() - t0
        out = []
        for i, c in enumerate(clips):
            record = {
                "latents": latents[i].astype(np.float16),
                "first_frame_latents": latents[i, :1].astype(np.float16),
                text_field: text[i],
                "text_mask": mask[i],
                "caption": c.caption,
                "source_id": c.source_id,
                "fps": float(c.fps),
                "num_frames": int(c.video.shape[0]),
            }
            if self.native:  # variable shapes: each record says its own
                record["shape"] = np.asarray(latents.shape[1:4], np.int32)
            if c.extra:
                record["extra"] = json.dumps(c.extra, sort_keys=True, default=str)
            out.append(record)
        return out


def _reject_line(source, index: int, err: Exception) -> dict[str, Any]:
    if isinstance(err, Reject):
        reason, detail = err.reason, err.detail
    else:  # anything unforeseen is still one input's problem, never the job's
        reason, detail = "decode_error", f"{type(err).__name__}: {err}"
    return {"input": index, "id": source.input_id(index), "reason": reason, "detail": detail}


def unit_marker(out: pathlib.Path, unit: int) -> pathlib.Path:
    return out / UNITS / f"{unit:05d}.json"


def run_unit(
    out: pathlib.Path,
    unit: int,
    inputs: Sequence[int],
    source,
    bucket_list: list[buckets_lib.Bucket],
    encoder: Encoder,
    timers: dict[str, float],
    progress=None,
    totals: Counter | None = None,
    held_out: Callable[[int], bool] | None = None,
) -> dict[str, Any]:
    """Tokenizes one unit and writes its shards and marker; returns the marker. `inputs` is
    a range (a unit of the job) or any list of input indices (the demotion pass). The clips
    of inputs for which `held_out(i)` is true go to the held-out split's shards instead."""
    splits = {False: out, True: holdout_lib.directory(out)}  # held out? -> where its shards go
    native = encoder.native

    def shard_of(bucket: str) -> str:  # the shard a clip of `bucket` is written to
        return native_lib.SHARD if native else bucket

    names = [native_lib.SHARD] if native else [b.name for b in bucket_list]
    for name in names:  # leftovers of an earlier, killed attempt at this unit
        for root in splits.values():
            shards.shard_path(root, name, unit).unlink(missing_ok=True)
    counts: dict[bool, Counter] = {False: Counter(), True: Counter()}
    # input index of every clip written, per split and bucket
    by_bucket: dict[bool, dict[str, list[int]]] = {False: {}, True: {}}
    shapes: dict[bool, dict[str, list[list[int]]]] = {False: {}, True: {}}  # native mode
    totals = Counter() if totals is None else totals  # the progress bar's running counts
    rejects = []
    pending: dict[tuple[bool, str], list] = {(h, b.name): [] for h in splits for b in bucket_list}
    with contextlib.ExitStack() as stack:
        writers: dict[tuple[bool, str], shards.ShardWriter] = {}

        def flush(key: tuple[bool, str]) -> None:
            clips, pending[key] = pending[key], []
            if not clips:
                return
            held, bucket = key
            shard = shard_of(bucket)
            if (held, shard) not in writers:
                writer = shards.ShardWriter(splits[held], shard, unit)
                writers[held, shard] = stack.enter_context(writer)
            for c, record in zip(clips, encoder.records(clips, timers), strict=True):
                t0 = time.perf_counter()
                writers[held, shard].write(record)
                timers["write_s"] = timers.get("write_s", 0.0) + time.perf_counter() - t0
                by_bucket[held].setdefault(shard, []).append(c.index)  # in file order
                if native:
                    shapes[held].setdefault(shard, []).append(record["shape"].tolist())
            counts[held][shard] += len(clips)
            totals["clips"] += len(clips)

        for i in inputs:
            try:
                clips = source.clips(i, timers)
            except Exception as e:  # noqa: BLE001 - every input failure is a reject
                rejects.append(_reject_line(source, i, e))
                totals["rejects"] += 1
                clips = []
            held = bool(held_out and clips and held_out(i))
            for c in clips:
                pending.setdefault((held, c.bucket), []).append(c)
                if len(pending[held, c.bucket]) >= encoder.batch:
                    flush((held, c.bucket))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(clips=totals["clips"], rejects=totals["rejects"])
        for key in sorted(pending):  # native: shapes in a fixed order
            flush(key)

    def marker_counts(held: bool) -> dict[str, int]:
        return {n: counts[held][n] for n in names if counts[held][n]}

    marker = {
        "unit": unit,
        "inputs": [inputs.start, inputs.stop] if isinstance(inputs, range) else list(inputs),
        "counts": marker_counts(False),
        "inputs_by_bucket": {b: by_bucket[False][b] for b in sorted(by_bucket[False])},
        "rejects": rejects,
    }
    if native:
        marker["shapes_by_bucket"] = {b: shapes[False][b] for b in sorted(shapes[False])}
    if held_out is not None:
        marker["holdout_counts"] = marker_counts(True)
        marker["holdout_inputs_by_bucket"] = {
            b: by_bucket[True][b] for b in sorted(by_bucket[True])
        }
    path = unit_marker(out, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    shards.atomic_write_text(path, json.dumps(marker, sort_keys=True) + "\n")
    return marker
