"""The tokenization job: raw clips -> tokenized, bucketed ArrayRecord shards + manifest.

For each bucket, the source's clips are cut into shards of `data.records_per_shard`
records; shard k holds the bucket's clips k*n ... (k+1)*n - 1 in source order. A shard is
written to a temporary name and renamed when complete, so a killed job re-run skips the
finished shards and writes the rest: no duplicates, no holes. With `process_count > 1`
each process writes the shards `k = process_index (mod process_count)`; process 0 writes
the manifest once all shards exist.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import shards, sources
from sora_jax.models import text as text_lib
from sora_jax.models import tokenizer as tokenizer_lib


def dataset_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
    """`data.dataset_dir`, or WORKDIR/data when it is empty."""
    return pathlib.Path(config.data.dataset_dir or pathlib.Path(workdir) / "data")


def expected_manifest_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a dataset must have been tokenized with to train this config."""
    tok = tokenizer_lib.build_tokenizer(config.tokenizer).manifest_entry()
    txt = text_lib.build_text_encoder(config.text_encoder).manifest_entry()
    return {
        "tokenizer.id": tok["id"],
        "tokenizer.hash": tok["hash"],
        "tokenizer.latent_channels": tok["latent_channels"],
        "text_encoder.id": txt["id"],
        "text_encoder.hash": txt["hash"],
        "text_encoder.dim": txt["dim"],
    }


def _encode(clips, tokenizer, text_encoder) -> list[dict[str, Any]]:
    video = np.stack([c.video for c in clips])  # [B, T, H, W, 3]
    latents = np.asarray(tokenizer.encode(video), np.float32)  # [B, T', H', W', C]
    text, mask = text_encoder.encode([c.caption for c in clips])
    records = []
    for i, c in enumerate(clips):
        records.append(
            {
                "latents": latents[i].astype(np.float16),
                "first_frame_latents": latents[i, :1].astype(np.float16),
                "text": text[i],
                "text_mask": mask[i],
                "caption": c.caption,
                "source_id": c.source_id,
                "fps": c.fps,
                "num_frames": int(c.video.shape[0]),
            }
        )
    return records


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Tokenizes `config.data.source` into shards; returns the manifest."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    out = dataset_dir(config, workdir)
    out.mkdir(parents=True, exist_ok=True)
    bucket_list = buckets_lib.buckets_from_config(config.data)
    tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
    text_encoder = text_lib.build_text_encoder(config.text_encoder)
    source = sources.build_source(config.data.source, bucket_list)
    per_shard = int(config.data.records_per_shard)

    # The work: every (bucket, shard) pair; this process takes every process_count-th.
    work = []
    for b in bucket_list:
        idx = source.indices(b.name)
        for k in range(0, (len(idx) + per_shard - 1) // per_shard):
            work.append((b, k, idx[k * per_shard : (k + 1) * per_shard]))
    mine = [w for i, w in enumerate(work) if i % process_count == process_index]
    todo = [w for w in mine if not shards.shard_path(out, w[0].name, w[1]).exists()]
    start = time.perf_counter()
    progress = tqdm(
        total=sum(len(w[2]) for w in todo),
        desc=f"tokenize {out}",
        unit="clip",
        disable=jax.process_index() != 0 and process_count > 1,
    )
    for bucket, k, indices in todo:
        with shards.ShardWriter(out, bucket.name, k) as writer:
            for lo in range(0, len(indices), batch_size):
                clips = [source.clip(i) for i in indices[lo : lo + batch_size]]
                for record in _encode(clips, tokenizer, text_encoder):
                    writer.write(record)
                progress.update(len(clips))
    progress.close()
    elapsed = time.perf_counter() - start

    manifest = {
        "tokenizer": tokenizer.manifest_entry(),
        "text_encoder": text_encoder.manifest_entry(),
        "source": {"name": config.data.source.name, "num_clips": len(source)},
        "buckets": {},
        "rejects": 0,
    }
    for b in bucket_list:
        files = shards.completed_shards(out, b.name)
        count = len(source.indices(b.name))
        manifest["buckets"][b.name] = {
            "shape": list(tokenizer.latent_shape(b.frames, b.height, b.width)),
            "pixel_shape": [b.frames, b.height, b.width, 3],
            "count": count,
            "files": [str(f.relative_to(out)) for f in files],
        }
    expected_files = sum(
        (len(source.indices(b.name)) + per_shard - 1) // per_shard for b in bucket_list
    )
    complete = sum(len(v["files"]) for v in manifest["buckets"].values()) == expected_files
    if process_index == 0 and complete:
        shards.write_manifest(out, manifest)
        (out / "rejects.jsonl").touch()
    done = sum(len(w[2]) for w in todo)
    manifest["stats"] = {
        "clips_written": done,
        "seconds": elapsed,
        "clips_per_s": done / elapsed if elapsed > 0 else None,
        "complete": complete,
    }
    return manifest
