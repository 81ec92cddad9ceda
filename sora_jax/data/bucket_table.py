"""`config.data` -> the arguments of the bucket table; the table -> what the researcher sees.

The pipeline (pipeline.py) trains on the table `mixture.resolve` builds. This module reads
the config fields that feed it (`pipeline_args`) and tells what became of every bucket:
the startup report (`report`) and the run file `WORKDIR/data_buckets.json`
(`decisions`, `write_decisions`), both derived from the manifests and the config alone.

Every bucket of every dataset has one fate: `trained`, `left out` (a weighted bucket with
no records or fewer than one global batch, unless `data.strict_buckets`), or `no weight`
(absent from explicit weights, or weight 0). Clips the tokenization job moved out of a
sparse bucket (`data.tokenize.min_bucket_clips`, the manifest's `demotion`) are listed
too. The record counts add up: every record of every dataset is either in a trained
bucket or counted as not trained on.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import mixture, shards

DECISIONS = "data_buckets.json"  # in the run's workdir


def pipeline_args(config: ml_collections.ConfigDict, default_dir: pathlib.Path) -> dict[str, Any]:
    """The Pipeline's table arguments from `config.data` (docs/data_pipeline.md)."""
    data = config.data
    datasets = [dict(d.items()) for d in data.get("datasets", ())] or [{"dir": default_dir}]
    for d in datasets:
        d["dir"] = d.get("dir") or default_dir  # '' = this config's own dataset
    weights = data.get("bucket_weights", "buckets")
    if weights == "buckets":  # the weights written in data.buckets
        weights = {b.name: b.weight for b in buckets_lib.buckets_from_config(data)}
    sizes = {
        n: int(s["global_batch_size"])
        for n, s in data.buckets.items()
        if s.get("global_batch_size", 0) > 0
    }
    return dict(
        dataset_dir=datasets,
        global_batch_size=data.global_batch_size,
        bucket_weights=weights,
        bucket_batch_sizes=sizes,
        tokens_per_device=data.get("tokens_per_device", 0),
        strict_buckets=bool(data.get("strict_buckets", False)),
    )


def _demotions(table: mixture.Table) -> list[tuple[str, dict[str, Any]]]:
    """(dataset name, move) of every move the tokenization job made, per dataset."""
    several = len(table.datasets) > 1
    out = []
    for d, m in zip(table.datasets, table.manifests):
        for move in (m.get("demotion") or {}).get("moves", ()):
            out.append((d.name if several else "", move))
    return out


def decisions(table: mixture.Table, *, strict: bool) -> dict[str, Any]:
    """Every bucket's fate and the record totals: the content of WORKDIR/data_buckets.json."""
    left = {f.key: f for f in table.left_out}
    rows = []
    for b in table.buckets:
        row = {"bucket": b.key, "records": b.count, "weight": b.weight}
        if b.key in left:
            f = left[b.key]
            row.update(fate="left out", reason=f.reason, weight=0.0, requested_weight=f.weight)
        elif b.weight > 0:
            skipped = b.count - b.batches_per_epoch * b.global_batch
            row.update(fate="trained", global_batch=b.global_batch, skipped_per_epoch=skipped)
        else:
            row.update(fate="no weight")
        rows.append(row)
    counts = {b.key: b.count for b in table.buckets}
    several = len(table.datasets) > 1
    for d, m in zip(table.datasets, table.manifests):
        for name in sorted(m.get("buckets", {})):
            key = f"{d.name}/{name}" if several else name
            if key not in counts:  # not selected by explicit weights
                n = int(m["buckets"][name]["count"])
                rows.append({"bucket": key, "records": n, "weight": 0.0, "fate": "no weight"})
    total = sum(r["records"] for r in rows)
    trained = sum(r["records"] for r in rows if r["fate"] == "trained")
    by_fate = {
        fate: sum(r["records"] for r in rows if r["fate"] == fate)
        for fate in ("left out", "no weight")
    }
    return {
        "strict_buckets": strict,
        "records": {
            "total": total,
            "trained_on": trained,
            "skipped_per_epoch": sum(r.get("skipped_per_epoch", 0) for r in rows),
            "not_trained_on": total - trained,
            "left_out": by_fate["left out"],
            "no_weight": by_fate["no weight"],
        },
        "buckets": rows,
        "tokenization_moves": [
            {"dataset": name, **move} if name else dict(move) for name, move in _demotions(table)
        ],
    }


def write_decisions(workdir: str | os.PathLike, content: dict[str, Any]) -> pathlib.Path:
    """WORKDIR/data_buckets.json, atomically."""
    path = pathlib.Path(workdir) / DECISIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    shards.atomic_write_text(path, json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path


def report(table: mixture.Table, *, seed: int, processes: int, strict: bool) -> str:
    """What the run will read: per bucket records, weight, batch, tokens, epoch length;
    then the buckets left out or merged, and the record totals."""
    left = {f.key: f for f in table.left_out}
    buckets = [b for b in table.buckets if b.key not in left]
    total = sum(b.weight for b in buckets)
    live = [b for b in buckets if b.weight > 0]
    mean_g = sum(b.weight * b.global_batch for b in live) / total
    mean_tokens = sum(b.weight * b.global_batch * b.tokens for b in live) / total
    sources = {b.batch_from.split("=")[0].split(" ")[0] for b in live}
    lines = [
        f"data: seed {seed}, {processes} process(es), global batch per "
        f"bucket from {', '.join(sorted(sources))}; per step on average {mean_g:.1f} "
        f"samples, {mean_tokens:,.0f} video tokens"
    ]
    for d in table.datasets:
        lines.append(f"  dataset {d.name!r:<14} weight {d.weight:<6g} {d.dir}")
    lines.append(
        f"  {'bucket':<20} {'latent shape':<16} {'tokens':>6} {'records':>8} {'weight':>6} "
        f"{'/device':>7} {'global':>6} {'tokens/step':>11} {'steps/epoch':>11} "
        f"{'skipped':>7} {'epoch every':>11}"
    )
    for b in buckets:
        p = b.weight / total
        every = f"{b.batches_per_epoch / p:,.0f} steps" if p > 0 else "never"
        lines.append(
            f"  {b.key:<20} {str(list(b.shape)):<16} {b.tokens:>6} {b.count:>8} {p:>6.3f} "
            f"{b.per_device if b.per_device is not None else '-':>7} {b.global_batch:>6} "
            f"{b.global_batch * b.tokens:>11,} {b.batches_per_epoch:>11} "
            f"{b.count - b.batches_per_epoch * b.global_batch:>7} {every:>11}"
        )
    lines.append(
        "  (tokens: video tokens per sample; skipped: records each epoch leaves out, the "
        "remainder rule; epoch every: global steps per pass over the bucket)"
    )
    if left:
        lines.append(
            f"  left out, not trained on (data.strict_buckets={strict}; True makes each an error):"
        )
        for f in table.left_out:
            lines.append(f"    {f.key:<20} {f.records:>8} records: {f.reason}")
    if table.unused:
        lines.append(f"  not trained on (no weight): {table.unused}")
    for name, m in _demotions(table):
        where = f"{name}: " if name else ""
        lines.append(
            f"  merged when tokenized (data.tokenize.min_bucket_clips): {where}{m['from']} -> "
            f"{m['to']}: {m['inputs']} input(s), {m['clips']} clip(s)"
        )
    r = decisions(table, strict=strict)["records"]
    lines.append(
        f"  records: {r['total']} = {r['trained_on']} in trained buckets ({r['skipped_per_epoch']}"
        f" of them skipped each epoch by the remainder rule) + {r['not_trained_on']} not "
        f"trained on ({r['left_out']} left out, {r['no_weight']} without weight)"
    )
    return "\n".join(lines)
