"""Previews of a tokenized dataset: what it holds, as the model will see it
(`tokenize --mode=inspect`).

`inspect(dataset_dir)` reads the manifest, every bucket's record count, the frame-rate
and caption-length statistics of its first `STATS_RECORDS` records, and `rejects.jsonl`; it decodes
the first `per_bucket` records of each bucket back through the tokenizer that made them
and writes them as `<bucket>/<k>.gif` and a `<bucket>/contact_sheet.png`. The tokenizer is
rebuilt from the manifest's `tokenizer_config` and must hash as the manifest says (else
pass a config whose tokenizer does).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections import Counter
from typing import Any

import grain
import ml_collections
import numpy as np

from sora_jax import video_io
from sora_jax.data import records, shards
from sora_jax.models import tokenizer as tokenizer_lib

STATS_RECORDS = 2000  # records per bucket read for the statistics (the first ones)


def _tokenizer(manifest: dict[str, Any], config, dataset: pathlib.Path):
    section = config.tokenizer if config is not None else manifest.get("tokenizer_config")
    if section is None:
        raise ValueError(
            f"{dataset / shards.MANIFEST} records no tokenizer_config: pass --config with "
            "the tokenizer that made the dataset to decode previews"
        )
    tok = tokenizer_lib.build_tokenizer(ml_collections.ConfigDict(dict(section)))
    if tok.hash != manifest["tokenizer"]["hash"]:
        raise ValueError(
            f"the tokenizer {tok.id} hashes {tok.hash}, but {dataset} was made by "
            f"{manifest['tokenizer']['id']} ({manifest['tokenizer']['hash']}): pass --config "
            "with the tokenizer that made it (tokenizer.path moved or changed?)"
        )
    return tok


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max())}


def inspect(
    dataset_dir: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    per_bucket: int = 4,
    config: ml_collections.ConfigDict | None = None,
) -> dict[str, Any]:
    """Statistics of a tokenized dataset, and decoded previews written under `output`."""
    dataset = pathlib.Path(dataset_dir)
    manifest = shards.read_manifest(dataset)
    output = pathlib.Path(output) if output else dataset / "inspect"
    tok = _tokenizer(manifest, config, dataset) if per_bucket > 0 else None
    report: dict[str, Any] = {"dataset": str(dataset), "output": str(output), "buckets": {}}
    total = sum(b["count"] for b in manifest["buckets"].values())
    for name, b in manifest["buckets"].items():
        files = [str(dataset / f) for f in b["files"]]
        entry: dict[str, Any] = {
            "count": b["count"],
            "fraction": b["count"] / total if total else 0.0,
            "pixel_shape": b["pixel_shape"],
            "latent_shape": b["shape"],
            "shards": len(files),
        }
        if files:
            source = grain.sources.ArrayRecordDataSource(files)
            if len(source) != b["count"]:
                raise ValueError(
                    f"bucket {name}: the manifest counts {b['count']} records, its shards hold "
                    f"{len(source)}: the dataset is damaged; re-tokenize it"
                )
            n = min(len(source), STATS_RECORDS)
            recs = [records.decode_record(source[i]) for i in range(n)]
            entry["stats_records"] = n
            entry["fps"] = _stats([float(r["fps"]) for r in recs])
            entry["caption_words"] = _stats([len(r["caption"].split()) for r in recs])
            entry["sources"] = len({r["source_id"].split("#")[0] for r in recs})
            if tok is not None:
                picks = recs[:per_bucket]
                latents = np.stack([np.asarray(r["latents"], np.float32) for r in picks])
                videos = np.clip(np.asarray(tok.decode(latents)), -1.0, 1.0)
                out = output / name
                previews = []
                for k, (video, r) in enumerate(zip(videos, picks, strict=True)):
                    fps = float(r["fps"]) or 8.0
                    previews.append(str(video_io.write_video(out / f"{k}.gif", video, fps=fps)))
                sheet = video_io.contact_sheet(list(videos))
                video_io.write_png(out / "contact_sheet.png", sheet)
                entry["previews"] = previews
                entry["captions"] = [r["caption"] for r in picks]
        report["buckets"][name] = entry
    rejects_path = dataset / shards.REJECTS
    lines = rejects_path.read_text().splitlines() if rejects_path.is_file() else []
    reasons = Counter(json.loads(line)["reason"] for line in lines if line.strip())
    report["rejects"] = dict(sorted(reasons.items()))
    report["inputs"] = manifest.get("source", {}).get("num_inputs")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A bucket histogram and the statistics, one bucket per line."""
    lines = [f"dataset {report['dataset']}  (inputs: {report.get('inputs')})"]
    width = 40
    for name, b in report["buckets"].items():
        bar = "#" * round(width * b["fraction"])
        fps = b.get("fps", {})
        lines.append(
            f"  {name:>18} {b['count']:>8} {bar:<{width}} shards {b['shards']}"
            + (f"  fps {fps['min']:.3g}-{fps['max']:.3g}" if fps else "")
        )
        for k, caption in enumerate(b.get("captions", [])):
            lines.append(f"  {'':>18}   {b['previews'][k]}: {caption!r}")
    lines.append("rejects: " + (json.dumps(report["rejects"]) if report["rejects"] else "none"))
    lines.append(f"previews in {report['output']}")
    return "\n".join(lines)
