r"""The held-out split, made at tokenization time (docs/tokenize.md, docs/formats.md).

An input is held out when a hash of its id and the split's seed, read as a number in
[0, 1), is below `data.tokenize.holdout_fraction`:

    u(id) = int(sha256(f"{seed}:{id}")[:8]) / 2**64,   held out  <=>  u(id) < fraction

The `id` is the input's id (`source.input_id`: the file path, `<part>:<id>` in a mixture)
with the source's folder (or the manifest's directory) removed, so `clips/a.mp4` keeps its
side when the data moves. The decision depends on nothing but that id and the seed, so it
is the same across a restart, any number of processes and a re-tokenization with more
inputs. Every clip of a
held-out input is held out (no near-duplicate windows on both sides). A count ("hold out
100 inputs") is not offered: it would need the whole input list, and adding inputs would
move earlier ones across the split.

Held-out clips are records like the training ones, written by the same work unit to
`DATASET/holdout/<bucket>/<bucket>-<unit:05d>.array_record` and listed only in the
manifest's `holdout` section, never in `buckets`, whose files are all the training
pipeline reads. Sparse-bucket demotion (demotion.py) counts and moves training clips only.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from sora_jax.data import records, shards

HOLDOUT = "holdout"  # the split's directory under DATASET
RULE = "int(sha256(f'{seed}:{id}')[:8]) / 2**64 < fraction, id = input id without the source root"


def options(config) -> tuple[float, int]:
    """`(data.tokenize.holdout_fraction, data.tokenize.seed)`, the fraction checked."""
    section = config.data.get("tokenize", None) or {}
    fraction = float(section.get("holdout_fraction", 0.0))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f"data.tokenize.holdout_fraction={fraction} must be in [0, 1) (0 = no held-out "
            "split; 0.05 holds out about 5% of the inputs)"
        )
    return fraction, int(section.get("seed", 0))


def held_out(input_id: str, seed: int, fraction: float) -> bool:
    """Whether the input `input_id` belongs to the held-out split (module docstring)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{input_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _roots(section) -> list[str]:
    """The folders and manifest directories named anywhere in a `data.source` section."""
    out = []
    if section.get("folder"):
        out.append(str(pathlib.Path(section["folder"])))
    if section.get("manifest"):
        out.append(str(pathlib.Path(section["manifest"]).parent))
    for part in (section.get("parts") or {}).values():
        out += _roots(part)
    return out


def key(source_config, input_id: str) -> str:
    """The id the split hashes: `input_id` without the source's root directories."""
    section = source_config.to_dict() if hasattr(source_config, "to_dict") else source_config
    for root in sorted(_roots(section), key=len, reverse=True):
        input_id = input_id.replace(root.rstrip("/") + "/", "")
    return input_id


def predicate(source, source_config, fraction: float, seed: int) -> Callable[[int], bool] | None:
    """`input index -> held out?` for `source` (built from `source_config`), or None when
    there is no split."""
    if fraction <= 0.0:
        return None
    return lambda i: held_out(key(source_config, source.input_id(i)), seed, fraction)


def directory(dataset_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(dataset_dir) / HOLDOUT


def _inputs(marker: dict) -> dict[str, list[int]]:
    # the demotion pass's marker has none: it re-cuts training inputs only
    return marker.get("holdout_inputs_by_bucket", {})


def manifest_entry(
    out: pathlib.Path, markers: list[dict], bucket_list, tokenizer, fraction: float, seed: int
) -> dict[str, Any]:
    """`manifest.holdout`: the rule, and per bucket its clips, shards and each clip's input."""
    entry: dict[str, Any] = {
        "fraction": fraction,
        "seed": seed,
        "rule": RULE,
        "inputs": len({i for m in markers for v in _inputs(m).values() for i in v}),
        "buckets": {},
    }
    for b in bucket_list:
        inputs = [i for m in markers for i in _inputs(m).get(b.name, ())]
        if not inputs:
            continue
        entry["buckets"][b.name] = {
            "shape": list(tokenizer.latent_shape(b.frames, b.height, b.width)),
            "pixel_shape": [b.frames, b.height, b.width, 3],
            "count": len(inputs),
            "files": [
                str(shards.shard_path(directory(out), b.name, m["unit"]).relative_to(out))
                for m in markers
                if _inputs(m).get(b.name)
            ],
            "inputs": inputs,  # the input index of every clip, in file order
        }
    return entry


def split(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `holdout` section, or an empty one for a dataset without a split."""
    return manifest.get("holdout") or {"fraction": 0.0, "buckets": {}}


def read_bucket(
    dataset_dir: str | pathlib.Path,
    manifest: dict[str, Any],
    bucket: str,
    fields: Sequence[str],
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """The first `limit` held-out records of `bucket` (file order), `fields` stacked."""
    entry = split(manifest)["buckets"][bucket]
    files = [str(pathlib.Path(dataset_dir) / f) for f in entry["files"]]
    source = grain.sources.ArrayRecordDataSource(files)
    n = len(source) if limit is None else min(int(limit), len(source))
    rows = [records.decode_record(source[i]) for i in range(n)]
    return {f: np.stack([r[f] for r in rows]) for f in fields}


def clip_list(manifest: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Every held-out clip as `(bucket, input index, k)` (its input's `k`-th clip in the
    bucket), ordered by input then bucket name then `k`: the items of the evaluators."""
    out = []
    for name, entry in split(manifest)["buckets"].items():
        seen: dict[int, int] = {}
        for i in entry["inputs"]:
            out.append((name, i, seen.get(i, 0)))
            seen[i] = seen.get(i, 0) + 1
    return sorted(out, key=lambda x: (x[1], x[0], x[2]))
