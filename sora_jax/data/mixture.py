"""Datasets, bucket weights and batch sizes -> the table of buckets a run trains on.

**Datasets.** A run reads one tokenized dataset or mixes several, each `{dir, weight,
name}` (`data.datasets`). Their manifests must agree on every `tokenizer.*` and
`text_encoder.*` field, since one model consumes them all. With one dataset, bucket keys
are the manifest's bucket names (`'5x16x16'`); with several, each dataset's buckets are
**namespaced** `'<dataset>/<bucket>'` and scheduled separately, so a dataset's weight holds
exactly even where two datasets share a bucket shape (a shared shape still compiles once:
the step is the same function of the same shapes).

**Weights** (`data.bucket_weights`): `'size'` (records per bucket), `'uniform'`, or
explicit `{bucket: weight}` (also written `'a:1,b:0.5'`), keys being bucket keys or plain
bucket names that apply in every dataset; buckets absent from an explicit dict are not
trained on. A bucket's weight is `w_d · r_b / Σ_{b' ∈ d} r_b'`, with `w_d` the dataset's
weight and `r_b` the bucket's raw weight from the mode; with one dataset it is `r_b`.

**Batch sizes.** Every step has one shape, and the bucket drawn for the step sets its
global batch `G_b`: an explicit per-bucket size (`data.buckets.<b>.global_batch_size`)
wins; else with a token budget `data.tokens_per_device = K`, a bucket with `n_b = T'H'W' /
(p_t p_h p_w)` tokens per sample gets `⌊K / n_b⌋` samples per data-parallel device and
`G_b = ⌊K / n_b⌋ · D` (`D` = mesh `data × fsdp` devices); else `data.global_batch_size`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sora_jax.data import shards
from sora_jax.data.global_batch import RowLayout, process_blocks

# What the manifests of mixed datasets must agree on: the model reads all of them.
AGREED_SECTIONS = ("tokenizer", "text_encoder")


@dataclasses.dataclass(frozen=True)
class Dataset:
    dir: pathlib.Path
    weight: float = 1.0
    name: str = ""  # '' = the directory's name


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    key: str  # the bucket's name in the schedule: '<bucket>' or '<dataset>/<bucket>'
    name: str  # the bucket's name in its manifest
    dataset: Dataset
    shape: tuple[int, ...]  # latent [T', H', W', C]
    count: int  # records
    files: tuple[str, ...]  # shard paths relative to the dataset directory
    weight: float
    tokens: int  # video tokens per sample, T'H'W' / patch volume
    global_batch: int  # samples per step over all processes
    per_device: int | None  # samples per data-parallel device (None: devices unknown)
    batch_from: str  # the config field that set global_batch

    @property
    def batches_per_epoch(self) -> int:
        """`E_b = ⌊n_b / G_b⌋`: the remainder rule (pipeline.py) drops the rest."""
        return self.count // self.global_batch if self.global_batch else 0


@dataclasses.dataclass(frozen=True)
class Table:
    datasets: list[Dataset]
    buckets: list[BucketSpec]  # in schedule order
    manifest: dict[str, Any]  # the shared tokenizer / text encoder, buckets by plain name
    unused: list[str]  # manifest buckets left out by an explicit weight dict
    left_out: list[LeftOut] = dataclasses.field(default_factory=list)
    manifests: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per dataset


@dataclasses.dataclass(frozen=True)
class LeftOut:
    """A weighted bucket the run does not train on (not `strict`): no records, or fewer
    than one global batch. Its records count as "not trained on" in the report."""

    key: str
    records: int
    weight: float  # the weight it was given
    global_batch: int
    reason: str


def as_datasets(spec: str | os.PathLike | Sequence[Any]) -> list[Dataset]:
    """A directory, or a sequence of `Dataset`s or mappings `{dir, weight=1, name=''}`."""
    if isinstance(spec, str | os.PathLike):
        spec = [Dataset(pathlib.Path(spec))]
    out = []
    for i, d in enumerate(spec):
        if not isinstance(d, Dataset):
            d = dict(d.items())
            unknown = set(d) - {"dir", "weight", "name"}
            if unknown or "dir" not in d:
                raise ValueError(
                    f"data.datasets[{i}] = {d}: each entry is dict(dir=..., weight=1.0, "
                    f"name=''); {'unknown keys ' + str(sorted(unknown)) if unknown else 'no dir'}"
                )
            d = Dataset(pathlib.Path(d["dir"]), float(d.get("weight", 1.0)), d.get("name", ""))
        out.append(dataclasses.replace(d, name=d.name or d.dir.name))
    names = [d.name for d in out]
    if not out or len(set(names)) != len(names):
        raise ValueError(
            f"data.datasets names {names} must be non-empty and unique (they namespace the "
            "buckets): give the entries distinct `name`s"
        )
    if any(not d.weight >= 0 for d in out) or not any(d.weight > 0 for d in out):
        raise ValueError(
            f"dataset weights must be >= 0 and not all zero, got {names}: {[d.weight for d in out]}"
        )
    return out


def parse_weights(bucket_weights: str | Mapping[str, float] | None) -> str | dict[str, float]:
    """`'size'` | `'uniform'` | `{key: weight}` from a mode name, a dict or `'a:1,b:2'`."""
    if bucket_weights is None:
        return "size"
    if isinstance(bucket_weights, str):
        if bucket_weights in ("size", "uniform"):
            return bucket_weights
        try:
            pairs = [item.rsplit(":", 1) for item in bucket_weights.split(",") if item.strip()]
            weights = {k.strip(): float(w) for k, w in pairs}
        except ValueError:
            weights = {}
        if not weights:
            raise ValueError(
                f"data.bucket_weights={bucket_weights!r}: write 'size', 'uniform', or "
                "'bucket:weight,bucket:weight' (or a dict in the experiment file)"
            )
        bucket_weights = weights
    weights = {str(k): float(w) for k, w in bucket_weights.items()}
    bad = {k: w for k, w in weights.items() if not 0 <= w < float("inf")}
    if bad or not any(w > 0 for w in weights.values()):
        raise ValueError(
            f"bucket weights must be >= 0 and not all zero, got {weights}: fix "
            "data.bucket_weights (or the weights in data.buckets)"
        )
    return weights


def _read(ds: Dataset, expected: Mapping[str, Any] | None) -> dict[str, Any]:
    if not ds.dir.is_dir():
        raise FileNotFoundError(
            f"dataset directory {ds.dir} does not exist: tokenize the data first "
            "(python -m sora_jax.tokenize) or fix data.dataset_dir / data.datasets"
        )
    manifest = shards.read_manifest(ds.dir)
    if manifest.get("mode") == "native":
        raise ValueError(
            f"{ds.dir / shards.MANIFEST} is a native-shape dataset (data.tokenize.mode="
            "'native', clips of many shapes): the bucketed pipeline reads fixed-shape buckets "
            "only, and the packed pipeline (sora_jax.data.packing) is not yet wired into "
            "training; re-tokenize with data.tokenize.mode='buckets' to train on it"
        )
    if expected:
        shards.check_manifest_matches(manifest, dict(expected), dataset_dir=ds.dir)
    return manifest


def _check_agree(first: Dataset, a: dict, other: Dataset, b: dict) -> None:
    for section in AGREED_SECTIONS:
        x, y = a.get(section, {}), b.get(section, {})
        for field in sorted(set(x) | set(y)):
            if x.get(field, "<missing>") != y.get(field, "<missing>"):
                raise ValueError(
                    f"datasets {first.name!r} ({first.dir}) and {other.name!r} ({other.dir}) "
                    f"disagree on {section}.{field}: {x.get(field, '<missing>')!r} vs "
                    f"{y.get(field, '<missing>')!r}. One model reads every dataset of a mix: "
                    f"re-tokenize {other.name!r} with the {section} of {first.name!r}, or "
                    "drop it from data.datasets"
                )


def _select(
    datasets: list[Dataset], manifests: list[dict], mode: str | dict[str, float]
) -> list[tuple[int, str, float]]:
    """(dataset index, bucket name, raw weight r_b) of every bucket in schedule order."""
    if not isinstance(mode, dict):
        return [
            (i, name, float(m["buckets"][name]["count"]) if mode == "size" else 1.0)
            for i, m in enumerate(manifests)
            for name in sorted(m.get("buckets", {}))
        ]
    several = len(datasets) > 1
    chosen: dict[tuple[int, str], float] = {}
    unknown = []
    for key, w in mode.items():
        hits = [
            (i, name)
            for i, (d, m) in enumerate(zip(datasets, manifests))
            for name in m.get("buckets", {})
            if key == name or (several and key == f"{d.name}/{name}")
        ]
        unknown += [] if hits else [key]
        for hit in hits:  # an explicit 'dataset/bucket' key wins over a plain name
            if "/" in key or hit not in chosen:
                chosen[hit] = w
    if unknown:
        where = (
            f"{datasets[0].dir / shards.MANIFEST} (it has {sorted(manifests[0]['buckets'])})"
            if not several
            else f"any of the datasets {[d.name for d in datasets]} (keys are 'bucket' or "
            "'dataset/bucket')"
        )
        raise ValueError(
            f"buckets {unknown} are not in {where}: tokenize them or remove them from the weights "
            "(data.bucket_weights, or data.buckets when data.bucket_weights='buckets')"
        )
    return sorted(((i, n, w) for (i, n), w in chosen.items()), key=lambda x: x[0])


def _batch(
    key: str,
    name: str,
    tokens: int,
    *,
    global_batch_size: int | None,
    bucket_batch_sizes: Mapping[str, int],
    tokens_per_device: int,
    data_parallel: int | None,
) -> tuple[int | None, str]:
    """`(G_b, the field that set it)` by the precedence in the module docstring."""
    explicit = bucket_batch_sizes.get(key, bucket_batch_sizes.get(name))
    if explicit:
        return int(explicit), f"data.buckets.{name}.global_batch_size"
    if tokens_per_device > 0:
        if not data_parallel:
            raise ValueError(
                "data.tokens_per_device needs the data-parallel device count: pass "
                "data_parallel (the mesh's data x fsdp size) to the pipeline"
            )
        per_device = tokens_per_device // tokens
        return per_device * data_parallel, (
            f"data.tokens_per_device={tokens_per_device} // {tokens} tokens x {data_parallel} "
            "devices"
        )
    return global_batch_size, "data.global_batch_size"


def resolve(
    datasets: str | os.PathLike | Sequence[Any],
    *,
    bucket_weights: str | Mapping[str, float] | None = None,
    global_batch_size: int | None = None,
    bucket_batch_sizes: Mapping[str, int] | None = None,
    tokens_per_device: int = 0,
    patch_size: Sequence[int] = (1, 1, 1),
    data_parallel: int | None = None,
    process_count: int = 1,
    layout: RowLayout | None = None,
    expected: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> Table:
    """Reads and checks every manifest; returns the buckets with weights and batch sizes.

    A weighted bucket with no records, or fewer than one global batch, is left out (weight
    0, listed in `Table.left_out`); a dataset's remaining buckets share its weight. With
    `strict` each is an error instead. Every global batch must split into the blocks of
    `layout` (default: one block per process, `process_count`). Raises ValueError /
    FileNotFoundError naming the dataset, bucket and field, and the fix.
    """
    layout = layout or process_blocks(0, process_count)
    ds_list = as_datasets(datasets)
    manifests = [_read(d, expected) for d in ds_list]
    for d, m in zip(ds_list[1:], manifests[1:]):
        _check_agree(ds_list[0], manifests[0], d, m)
    mode = parse_weights(bucket_weights)
    several = len(ds_list) > 1
    patch_volume = int(np.prod(patch_size))
    sizes = dict(bucket_batch_sizes or {})
    rows, left_out = [], []
    for i, name, raw in _select(ds_list, manifests, mode):
        d, entry = ds_list[i], manifests[i]["buckets"][name]
        key = f"{d.name}/{name}" if several else name
        shape = tuple(int(n) for n in entry["shape"])
        live = raw > 0 and (d.weight > 0 or not several)
        if live and any(n % p for n, p in zip(shape[:3], patch_size)):
            raise ValueError(
                f"bucket {key!r} of {d.dir}: latent shape {list(shape)} is not divisible by "
                f"model.patch_size {tuple(patch_size)}: give it weight 0 or re-tokenize it at "
                "a size that is a multiple of tokenizer stride x patch"
            )
        tokens = max(int(np.prod(shape[:3])) // patch_volume, 1)  # T'H'W' / patch volume
        G, batch_from = _batch(
            key,
            name,
            tokens,
            global_batch_size=global_batch_size,
            bucket_batch_sizes=sizes,
            tokens_per_device=tokens_per_device,
            data_parallel=data_parallel,
        )
        spec = BucketSpec(
            key=key,
            name=name,
            dataset=d,
            shape=shape,
            count=int(entry["count"]),
            files=tuple(entry.get("files", ())),
            weight=float(raw),
            tokens=tokens,
            global_batch=int(G or 0),
            per_device=(G // data_parallel) if G and data_parallel else None,
            batch_from=batch_from,
        )
        if live:
            reason = _check_bucket(spec, layout, data_parallel, tokens_per_device, strict)
            if reason:
                left_out.append(LeftOut(key, spec.count, float(raw), spec.global_batch, reason))
                raw = 0.0
        rows.append((i, spec, raw))
    raw_sum = np.zeros(len(ds_list))
    for i, _, raw in rows:
        raw_sum[i] += raw
    for i, d in enumerate(ds_list):
        if (several and d.weight > 0 or not several) and raw_sum[i] == 0:
            _nothing_left(d, manifests[i], mode, left_out, several)
    buckets = [
        dataclasses.replace(s, weight=float(ds_list[i].weight * r / raw_sum[i] if several else r))
        for i, s, r in rows
    ]
    shared = {k: v for k, v in manifests[0].items() if k != "buckets"}
    shared["buckets"] = {}
    for m in manifests:
        for name, entry in m.get("buckets", {}).items():
            shared["buckets"].setdefault(name, entry)
    used = {(b.dataset.name, b.name) for b in buckets}
    unused = [
        f"{d.name}/{n}" if several else n
        for d, m in zip(ds_list, manifests)
        for n in sorted(m.get("buckets", {}))
        if (d.name, n) not in used
    ]
    return Table(ds_list, buckets, shared, unused, left_out, manifests)


def _nothing_left(d: Dataset, manifest: dict, mode, left_out: list[LeftOut], several: bool):
    """The error when a dataset that should be trained on keeps no weighted bucket."""
    mine = [f for f in left_out if not several or f.key.startswith(f"{d.name}/")]
    if not mine:  # no bucket had a weight in the first place
        raise ValueError(
            f"dataset {d.name!r} ({d.dir}) has weight {d.weight} but none of its buckets "
            f"has a non-zero weight under data.bucket_weights={mode!r}: weight some of "
            f"its buckets {sorted(manifest['buckets'])} or give the dataset weight 0"
        )
    fullest = max((f.records for f in mine), default=0)
    raise ValueError(
        f"dataset {d.name!r} ({d.dir}) has nothing to train on: every bucket it weights was "
        "left out for having no records or fewer than one global batch ("
        + ", ".join(f"{f.key}: {f.records} records, batch {f.global_batch}" for f in mine)
        + "). Lower data.global_batch_size (or data.buckets.<b>.global_batch_size) to at most "
        f"{fullest}, tokenize more clips, or weight other buckets (data.bucket_weights)"
        + (", or drop the dataset from data.datasets" if several else "")
    )


def _check_bucket(
    b: BucketSpec,
    layout: RowLayout,
    data_parallel: int | None,
    tokens_per_device: int,
    strict: bool = True,
) -> str:
    """Hard errors for a bucket that would be drawn but cannot give a full batch; without
    `strict`, why the bucket is left out instead ('' = it is trained on)."""
    if b.count == 0 or not b.files:
        if not strict:
            return "no records"
        raise ValueError(
            f"bucket {b.key!r} has weight {b.weight} but no records: remove it from the "
            f"weights or tokenize data for it ({b.dataset.dir})"
        )
    if b.batch_from.startswith("data.tokens_per_device") and b.global_batch == 0:
        raise ValueError(
            f"bucket {b.key!r} has {b.tokens} tokens per sample, more than "
            f"data.tokens_per_device={tokens_per_device}: not one sample fits, so every step "
            f"of it would be empty; raise data.tokens_per_device to >= {b.tokens} or give "
            "the bucket weight 0"
        )
    if b.global_batch <= 0 or b.global_batch % layout.shards:
        if not layout.axes:
            raise ValueError(
                f"bucket {b.key!r}: global batch {b.global_batch} (from {b.batch_from}) must be "
                f"a positive multiple of the process count {layout.shards}, since every "
                "process reads the same number of its rows; change that field"
            )
        raise ValueError(
            f"bucket {b.key!r}: global batch {b.global_batch} (from {b.batch_from}) must be a "
            f"positive multiple of {layout.where()}, since every batch shard holds the same "
            "number of rows; change that field or the mesh"
        )
    if data_parallel and b.global_batch % data_parallel:
        raise ValueError(
            f"bucket {b.key!r}: global batch {b.global_batch} (from {b.batch_from}) is not "
            f"divisible by the {data_parallel} data-parallel devices (mesh data x fsdp); "
            "change that field or the mesh"
        )
    if b.count < b.global_batch:
        if not strict:
            return f"fewer records than one global batch of {b.global_batch} ({b.batch_from})"
        raise ValueError(
            f"bucket {b.key!r} has {b.count} records, fewer than one global batch of "
            f"{b.global_batch} (from {b.batch_from}), so every sample would be dropped: "
            "tokenize more data for it, lower that batch, or give it weight 0"
        )
    return ""


def open_source(spec: BucketSpec) -> grain.sources.ArrayRecordDataSource:
    """The bucket's shards, checked against its manifest entry."""
    files = [spec.dataset.dir / f for f in spec.files]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(
            f"bucket {spec.key!r}: manifest lists missing shards {absent}: the dataset is "
            "incomplete, re-run the tokenization"
        )
    source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
    if len(source) != spec.count:
        raise ValueError(
            f"bucket {spec.key!r}: its shards hold {len(source)} records, the manifest in "
            f"{spec.dataset.dir} says {spec.count}: the dataset is incomplete or stale, "
            "re-tokenize it"
        )
    return source
