"""The tokenization job: raw inputs -> tokenized, bucketed ArrayRecord shards + manifest.

Work is cut into units of `data.tokenize.inputs_per_shard` consecutive inputs of the source
(sora_jax.data.sources). Unit `u` turns its inputs into clips, encodes them in batches
(VAE latents, and text embeddings or, with `text_encoder.embed='train_step'`, token ids)
and writes, for every bucket it has clips for, the shard
`<bucket>/<bucket>-<u:05d>.array_record` (records in input order); then it writes its
marker `_units/<u:05d>.json` (clip counts per bucket and its rejects). Shards appear under
their final names only when whole (shards.ShardWriter), and a unit counts as done only once
its marker exists, so:

- a killed job re-run skips the units with markers and redoes the others from scratch
  (deleting any of their shards an earlier run renamed): no duplicates, no holes;
- with `P` processes, process `p` takes the units `u = p (mod P)`: the files do not depend
  on `P`, so any number of processes (or one) writes the same dataset;
- whichever process finds every marker present writes `rejects.jsonl` (every unit's
  rejects, in input order) and the manifest, both atomically and deterministically.

`_units/job.json` records what the shards depend on (source, buckets, clip options, unit
size, tokenizer and text encoder); a re-run with a different config into the same
directory is refused instead of mixing two datasets. Bad inputs never stop the job: each
becomes a line of `rejects.jsonl` (sora_jax.data.video_files.REASONS); the job fails
(`RejectLimitError`, after writing everything) only when the rejected fraction of the
inputs exceeds `data.tokenize.max_reject_fraction`.

With `data.tokenize.holdout_fraction` > 0 the units write the clips of held-out inputs
(holdout.py: a hash of the input's id) to `holdout/<bucket>/…` instead, and the manifest
lists them in its `holdout` section only; the split is part of `_units/job.json`.

With `data.tokenize.mode='native'` (native.py) clips keep their own shapes: each unit
writes one shard `native/native-<u:05d>.array_record`, the job record gains `native` (the
resolved budget), and the manifest (schema version 2) lists the shards and every record's
shape under `native` instead of `buckets`. Sources, units, resume, processes and rejects
are the same code in both modes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections import Counter
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import demotion, holdout, native, shards, sources, units
from sora_jax.data.units import UNITS as UNITS
from sora_jax.models import text as text_lib
from sora_jax.models import tokenizer as tokenizer_lib

JOB = "job.json"


class RejectLimitError(RuntimeError):
    """More inputs were rejected than `data.tokenize.max_reject_fraction` allows."""


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
        "text_encoder.embed": text_lib.embed_mode(config.text_encoder),
    }


def tokenize_option(config: ml_collections.ConfigDict, name: str, default):
    section = config.data.get("tokenize", None) or {}
    return section.get(name, default) if hasattr(section, "get") else default


def _source_record(section: Any) -> Any:
    """`data.source` as the job records it: a synthetic source's default `motion`
    ('straight') is left out, as in jobs written before the option (recursively, for the
    parts of a mixture)."""
    if not isinstance(section, dict):
        return section
    out = {k: _source_record(v) for k, v in section.items()}
    if out.get("name") == "synthetic" and out.get("motion") == "straight":
        del out["motion"]
    return out


def _job_record(config, source, options, per_unit, tokenizer, text_encoder) -> dict[str, Any]:
    bucket_list = buckets_lib.buckets_from_config(config.data)
    job = {
        "source": _source_record(config.data.source.to_dict()),
        "num_inputs": len(source),
        "buckets": {b.name: list(b.shape) for b in bucket_list},
        "keep_prob": {b.name: b.keep_prob for b in bucket_list},
        "clip_options": options.job_fields(),
        "inputs_per_shard": per_unit,
        "tokenizer": tokenizer.hash,
        "text_encoder": text_encoder.hash,
        "min_bucket_clips": demotion.thresholds(config, [b.name for b in bucket_list]),
    }
    fraction, seed = holdout.options(config)
    if fraction > 0:  # absent without a split, as in jobs written before the option
        job["holdout"] = {"fraction": fraction, "seed": seed, "rule": holdout.RULE}
    if options.native is not None:  # absent in bucketed mode, as in jobs written before it
        job["native"] = dataclasses.asdict(options.native)
        job["min_bucket_clips"] = {}  # no buckets to demote
    embed = text_lib.embed_mode(config.text_encoder)
    if embed != "tokenize":  # absent for embeddings, as in jobs written before the option
        job["text_embed"] = embed
    return json.loads(json.dumps(job, sort_keys=True, default=str))  # as read back from disk


def _check_job(out: pathlib.Path, job: dict[str, Any]) -> None:
    path = out / UNITS / JOB
    if path.is_file():
        old = json.loads(path.read_text())
        if "min_bucket_clips" not in old:  # a job begun before the demotion pass: none
            job["min_bucket_clips"] = {}
            old["min_bucket_clips"] = {}
        diffs = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        if diffs:
            raise ValueError(
                f"{out} holds shards tokenized with a different config (differs in {diffs}; "
                f"see {path}): set data.dataset_dir to a new directory, or delete {out} to "
                "start over"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    shards.atomic_write_text(path, json.dumps(job, indent=2, sort_keys=True, default=str) + "\n")


def _assemble(out, bucket_list, markers, demoted, tokenizer, text_encoder, job) -> dict:
    """The manifest (and rejects.jsonl) from every unit's marker and the demotion pass's."""
    markers = demotion.unit_markers(markers, demoted)
    rejects = [r for m in markers for r in m["rejects"]]
    shards.atomic_write_text(
        out / shards.REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
    )
    manifest = {
        "tokenizer": tokenizer.manifest_entry(),
        "tokenizer_config": job["tokenizer_config"],
        "text_encoder": {
            **text_encoder.manifest_entry(),
            "embed": job.get("text_embed", "tokenize"),
        },
        "source": {"name": job["source"]["name"], "num_inputs": job["num_inputs"]},
        "clip_options": job["clip_options"],
        "buckets": {},
        "rejects": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
    }
    if demoted:
        manifest["demotion"] = demotion.manifest_entry(demoted)
    if "holdout" in job:
        split = job["holdout"]
        manifest["holdout"] = holdout.manifest_entry(
            out, markers, bucket_list, tokenizer, split["fraction"], split["seed"]
        )
    if "native" in job:  # one shard per unit, shapes per record (native.py)
        opts = native.NativeOptions(**job["native"])
        manifest["mode"] = "native"
        manifest["native"] = native.manifest_entry(out, markers, opts)
        shards.write_manifest(out, manifest, schema_version=shards.NATIVE_SCHEMA_VERSION)
        return manifest
    for b in bucket_list:
        files = [
            str(shards.shard_path(out, b.name, m["unit"]).relative_to(out))
            for m in markers
            if m["counts"].get(b.name)
        ]
        manifest["buckets"][b.name] = {
            "shape": list(tokenizer.latent_shape(b.frames, b.height, b.width)),
            "pixel_shape": [b.frames, b.height, b.width, 3],
            "count": sum(m["counts"].get(b.name, 0) for m in markers),
            "files": files,
        }
    shards.write_manifest(out, manifest)
    return manifest


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenizes `config.data.source` into shards (this process's units); returns a summary:
    the manifest when the dataset is complete, and `stats` (this run's counts and times)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is not in [0, {process_count})")
    out = dataset_dir(config, workdir)
    out.mkdir(parents=True, exist_ok=True)
    bucket_list = buckets_lib.buckets_from_config(config.data)
    tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
    text_encoder = text_lib.build_text_encoder(config.text_encoder)
    options = sources.ClipOptions.from_config(config.data)
    is_native = native.mode(config) == "native"
    if is_native:
        native.check_supported(config)
        options = dataclasses.replace(options, native=native.options_from_config(config, tokenizer))
    source = sources.build_source(config.data.source, bucket_list, options)
    per_unit = int(tokenize_option(config, "inputs_per_shard", 1024))
    limit = float(tokenize_option(config, "max_reject_fraction", 0.05))
    if per_unit < 1:
        raise ValueError(f"data.tokenize.inputs_per_shard={per_unit} must be >= 1")
    job = _job_record(config, source, options, per_unit, tokenizer, text_encoder)
    _check_job(out, job)
    job["tokenizer_config"] = config.tokenizer.to_dict()

    num_units = -(-len(source) // per_unit)
    mine = [u for u in range(num_units) if u % process_count == process_index]
    todo = [u for u in mine if not units.unit_marker(out, u).exists()]
    held_out = holdout.predicate(source, config.data.source, *holdout.options(config))
    work = {u: range(u * per_unit, min((u + 1) * per_unit, len(source))) for u in todo}
    encoder = units.Encoder(
        tokenizer, text_encoder, batch_size, text_lib.embed_mode(config.text_encoder), is_native
    )
    timers: dict[str, float] = {}
    start = time.perf_counter()
    progress = tqdm(
        total=sum(len(r) for r in work.values()),
        desc=f"tokenize {out.name} [{process_index}/{process_count}]",
        unit="input",
        disable=not show_progress,
    )
    written: Counter = Counter()
    rejected = 0
    totals: Counter = Counter()
    for u, inputs in work.items():
        marker = units.run_unit(
            out, u, inputs, source, bucket_list, encoder, timers, progress, totals, held_out
        )
        written.update(marker["counts"])
        rejected += len(marker["rejects"])
    progress.close()

    markers = []
    for u in range(num_units):
        path = units.unit_marker(out, u)
        if path.is_file():
            markers.append(json.loads(path.read_text()))
    complete = len(markers) == num_units
    manifest, demoted = {}, None
    if complete:  # sparse buckets' clips to fuller ones, then the manifest (demotion.py)
        minimum = job["min_bucket_clips"]
        demoted = demotion.run(out, config, bucket_list, markers, encoder, timers, minimum)
        manifest = _assemble(out, bucket_list, markers, demoted, tokenizer, text_encoder, job)
    elapsed = time.perf_counter() - start
    inputs_done = sum(len(r) for r in work.values())
    summary = {
        **manifest,
        "stats": {
            "complete": complete,
            "units_done": len(markers),
            "units": num_units,
            "inputs": inputs_done,
            "clips_written": sum(written.values()),
            "clips_per_bucket": dict(written),
            "rejected": rejected,
            "seconds": elapsed,
            "inputs_per_s": inputs_done / elapsed if elapsed > 0 else None,
            "clips_per_s": sum(written.values()) / elapsed if elapsed > 0 else None,
            "time_split_s": {k: round(v, 3) for k, v in sorted(timers.items())},
        },
        # what the trainer will make of the buckets (format_summary's advice)
        "training": {
            "global_batch": demotion.batch_sizes(config, [b.name for b in bucket_list]),
            "bucket_weights": str(config.data.get("bucket_weights", "buckets")),
        },
    }
    # The limit over the whole dataset once complete, else over this process's work.
    total_rejects = manifest["rejects"] if complete else rejected
    total_inputs = len(source) if complete else inputs_done
    if total_inputs and total_rejects / total_inputs > limit:
        raise RejectLimitError(
            f"{total_rejects} of {total_inputs} inputs were rejected "
            f"({total_rejects / total_inputs:.1%} > data.tokenize.max_reject_fraction="
            f"{limit}); the reasons are in {out / shards.REJECTS} (one JSON line per input) "
            "and each unit's in its marker under "
            f"{out / UNITS}: fix the inputs or raise the limit"
        )
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-job summary: clips per bucket, rejects by reason, throughput, time split."""
    s = summary["stats"]
    lines = [
        f"tokenized {s['inputs']} inputs -> {s['clips_written']} clips in {s['seconds']:.1f} s "
        f"({s['inputs_per_s'] or 0:.2f} inputs/s, {s['clips_per_s'] or 0:.2f} clips/s); "
        f"units {s['units_done']}/{s['units']}" + ("" if s["complete"] else " (incomplete)"),
        "time split: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in s["time_split_s"].items()),
    ]
    if summary.get("buckets"):
        batches = summary.get("training", {}).get("global_batch", {})
        lines.append("clips per bucket (whole dataset; global batch; what the trainer does):")
        for name, b in summary["buckets"].items():
            g = batches.get(name, 0)
            fate = "" if not g else "trained" if b["count"] >= g else "left out: under one batch"
            fate = "empty" if not b["count"] else fate
            lines.append(
                f"  {name:>20}  {b['count']:>8}  in {len(b['files'])} shard(s)  {g or '-':>5}  "
                + fate
            )
        for m in (summary.get("demotion") or {}).get("moves", ()):
            lines.append(
                f"demoted (data.tokenize.min_bucket_clips): {m['from']} -> {m['to']}: "
                f"{m['inputs']} input(s), now {m['clips']} clip(s)"
            )
        counts = {n: b["count"] for n, b in summary["buckets"].items()}
        mode = summary.get("training", {}).get("bucket_weights", "buckets")
        lines += demotion.advice(counts, batches, mode)
        split = summary.get("holdout")
        if split:
            held = sum(b["count"] for b in split["buckets"].values())
            lines.append(
                f"held out (data.tokenize.holdout_fraction={split['fraction']}): {held} clip(s) "
                f"of {split['inputs']} input(s) in holdout/, never trained on: "
                + ", ".join(f"{n} {b['count']}" for n, b in split["buckets"].items())
            )
        by_reason = summary.get("rejects_by_reason") or {}
        lines.append(
            f"rejected inputs: {summary['rejects']}"
            + "".join(f"\n  {k:>20}  {v:>8}" for k, v in by_reason.items())
        )
    return "\n".join(lines)
