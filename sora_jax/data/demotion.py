"""Sparse buckets at tokenization: demote their clips to a fuller bucket, and advise.

Real data leaves some buckets of a grid empty or nearly so, and the trainer can only use
a bucket that holds at least one global batch. Once every unit of the job is done
(tokenization.py), a bucket with fewer clips than its minimum (`data.tokenize.
min_bucket_clips`; -1 = its global batch, `data.buckets.<b>.global_batch_size` or
`data.global_batch_size`; 0 = never demote) is **closed**, and the inputs whose clips
went there are cut again with the closed buckets passed over (`buckets.assign`): each
goes to its next candidate that is open, the same aspect ratio, fewer frames or pixels,
as `keep_prob` demotes. An input with no open candidate keeps its clips where they were.

The pass is one extra unit: its shards are `<bucket>/<bucket>-<N:05d>.array_record`
(`N` = the number of units), its marker `_units/demoted.json` (the closed buckets, the
moves, its counts and rejects). The first-pass shards of the re-cut buckets are then
deleted and the manifest counts the pass instead; `manifest.demotion` lists the moves.
Everything is a function of the unit markers and the config, so a re-run, another
number of processes, or a kill at any point gives the same dataset. Its cost is the
decoding of the clips of the sparse buckets, few by definition.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections import Counter
from typing import Any

import ml_collections

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import shards, sources, units

DEMOTED = "demoted.json"  # the pass's marker, in _units/


def batch_sizes(config: ml_collections.ConfigDict, names: list[str]) -> dict[str, int]:
    """Each bucket's global batch when fixed by the config (0: set by a token budget)."""
    data = config.data
    if data.get("tokens_per_device", 0) > 0:
        default = 0
    else:
        default = int(data.get("global_batch_size", 0) or 0)
    return {n: int(data.buckets[n].get("global_batch_size", 0) or default) for n in names}


def thresholds(config: ml_collections.ConfigDict, names: list[str]) -> dict[str, int]:
    """`{bucket: min clips}` of `data.tokenize.min_bucket_clips` ({} = never demote)."""
    section = config.data.get("tokenize", None) or {}
    m = int(section.get("min_bucket_clips", -1))
    if m == 0:
        return {}
    if m > 0:
        return {n: m for n in names}
    return {n: g for n, g in batch_sizes(config, names).items() if g > 0}


def _plan(markers: list[dict], minimum: dict[str, int], names: list[str]):
    """(closed buckets, buckets to re-cut, {input: its bucket}); None when nothing moves."""
    if not minimum or any("inputs_by_bucket" not in m for m in markers):
        return None  # off, or units written before the pass existed
    counts = Counter()
    for m in markers:
        counts.update(m["counts"])
    closed = [n for n in names if n in minimum and counts[n] < minimum[n]]
    redo = [n for n in closed if counts[n] > 0]
    if not redo or len(closed) == len(names):
        return None
    origin = {i: n for m in markers for n in redo for i in m["inputs_by_bucket"].get(n, ())}
    return closed, redo, origin


def run(
    out: pathlib.Path,
    config: ml_collections.ConfigDict,
    bucket_list: list[buckets_lib.Bucket],
    markers: list[dict],
    encoder: units.Encoder,
    timers: dict[str, float],
    minimum: dict[str, int],
) -> dict[str, Any] | None:
    """The demotion pass over a complete job (idempotent); returns its marker, or None when
    no bucket is below its `minimum` clips (or the pass is off)."""
    path = out / units.UNITS / DEMOTED
    if path.is_file():
        return json.loads(path.read_text())
    names = [b.name for b in bucket_list]
    plan = _plan(markers, minimum, names)
    if plan is None:
        return None
    closed, redo, origin = plan
    table = [dataclasses.replace(b, closed=b.name in closed) for b in bucket_list]
    options = sources.ClipOptions.from_config(config.data)
    source = sources.build_source(config.data.source, table, options)
    unit = len(markers)
    tmp = out / units.UNITS / f"demote.{os.getpid()}.tmp"  # per process: no races
    shutil.rmtree(tmp, ignore_errors=True)
    done = units.run_unit(tmp, unit, sorted(origin), source, table, encoder, timers)
    for name in done["counts"]:  # identical files whichever process renames last
        shards.shard_path(out, name, unit).parent.mkdir(parents=True, exist_ok=True)
        os.replace(shards.shard_path(tmp, name, unit), shards.shard_path(out, name, unit))
    moved: dict[tuple[str, str], list] = {}
    now = {i: n for n, ids in done["inputs_by_bucket"].items() for i in ids}
    clips = Counter(i for ids in done["inputs_by_bucket"].values() for i in ids)
    for i, was in sorted(origin.items()):
        to = now.get(i, "rejected")
        if to != was:
            entry = moved.setdefault((was, to), [0, 0])
            entry[0], entry[1] = entry[0] + 1, entry[1] + clips[i]
    marker = {
        **done,
        "closed": closed,
        "min_clips": {n: minimum[n] for n in closed},
        "recut": redo,
        "moves": [
            {"from": a, "to": b, "inputs": n, "clips": c}
            for (a, b), (n, c) in sorted(moved.items())
        ],
    }
    shards.atomic_write_text(path, json.dumps(marker, sort_keys=True) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    for m in markers:  # the first-pass shards of the re-cut buckets: now in the pass's
        for name in redo:
            if m["counts"].get(name):
                shards.shard_path(out, name, m["unit"]).unlink(missing_ok=True)
    return marker


def unit_markers(markers: list[dict], demoted: dict[str, Any] | None) -> list[dict]:
    """The markers whose shards make the dataset: the first pass's, without the re-cut
    buckets, then the demotion pass's."""
    if not demoted:
        return markers
    recut = set(demoted["recut"])
    kept = [
        {**m, "counts": {n: c for n, c in m["counts"].items() if n not in recut}} for m in markers
    ]
    return [*kept, demoted]


def manifest_entry(demoted: dict[str, Any] | None) -> dict[str, Any] | None:
    """`manifest.demotion`: the closed buckets, their minimum and the moves."""
    if not demoted:
        return None
    return {k: demoted[k] for k in ("closed", "min_clips", "moves")}


def advice(counts: dict[str, int], batches: dict[str, int], weights_mode: str) -> list[str]:
    """Lines of the end-of-job summary on sparse buckets: what the trainer will leave out
    and the settings that would train on (nearly) every clip."""
    total = sum(counts.values())
    fixed = [g for g in batches.values() if g > 0]
    if not total or not fixed:
        return []
    short = {n: c for n, c in counts.items() if 0 < c < batches.get(n, 0)}
    empty = sorted(n for n, c in counts.items() if c == 0)
    lines = [f"empty buckets (nothing to train on): {empty}"] if empty else []
    if not short:
        return lines
    G = max(fixed)
    lines.append(
        f"sparse buckets: {len(short)} hold fewer clips than one global batch ("
        + ", ".join(f"{n}: {c} < {batches[n]}" for n, c in sorted(short.items()))
        + f"): the trainer leaves them out, {sum(short.values())} of {total} clips not "
        "trained on (data.strict_buckets=True makes that an error)"
    )

    def kept(g: int) -> int:
        return sum(c for c in counts.values() if c >= g)

    options = sorted(
        {c for c in counts.values() if 0 < c < G} | {2**k for k in range(G.bit_length())}
    )
    good = [g for g in options if g < G and kept(g) >= 0.9 * total] or [max(options, key=kept)]
    g = max(good)
    hint = [f"--config.data.global_batch_size={g} (trains on {kept(g)} of {total} clips)"]
    trained = [c for c in counts.values() if c >= g]
    if weights_mode == "buckets" and trained and max(trained) >= 4 * min(trained):
        hint.append(
            "--config.data.bucket_weights=size (bucket sizes differ "
            f"{max(trained) // min(trained)}x: equal weights would repeat the small ones)"
        )
    lines.append("suggested for training: " + " ".join(hint))
    return lines
