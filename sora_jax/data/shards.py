"""Tokenized shards on disk: ArrayRecord files per bucket plus a manifest (docs/formats.md).

    DATASET/manifest.json                               written last, atomically
    DATASET/<bucket>/<bucket>-<shard:05d>.array_record  one record per clip (records.py)
    DATASET/rejects.jsonl                               one line per unusable input

A shard is written under a temporary name (`….array_record.tmp`) and renamed when it is
complete, so a file with the final name is always whole: a killed tokenization job is
re-run and skips the shards that exist. The manifest carries `schema_version`, the
tokenizer and text encoder that made the records, and per bucket
`{"shape": [T', H', W', C], "count": n, "files": [paths relative to DATASET]}`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from array_record.python import array_record_module

from sora_jax.data import records

SCHEMA_VERSION = 1  # bucketed datasets: what the bucketed pipeline reads
# Native-shape datasets (sora_jax.data.native): `mode: 'native'`, a `native` section with
# every record's shape instead of `buckets`; read by the packer, refused by the pipeline.
NATIVE_SCHEMA_VERSION = 2
READABLE_VERSIONS = (SCHEMA_VERSION, NATIVE_SCHEMA_VERSION)
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
_SUFFIX = ".array_record"
_TMP_SUFFIX = ".tmp"
# group_size:1 makes every record its own chunk, which grain's random access needs for
# speed (it logs an error otherwise). Uncompressed: latents barely compress (zstd:3, the
# default, saved 7% on float32 latents) while it made reads 4x slower (106 vs 27 µs per
# 110 KB record on a 2-core CPU), and reading is the pipeline's main cost.
WRITER_OPTIONS = "group_size:1,uncompressed"


def shard_path(dataset_dir: str | os.PathLike, bucket: str, shard_index: int) -> pathlib.Path:
    """`DATASET/<bucket>/<bucket>-<shard:05d>.array_record`."""
    return pathlib.Path(dataset_dir) / bucket / f"{bucket}-{shard_index:05d}{_SUFFIX}"


def completed_shards(dataset_dir: str | os.PathLike, bucket: str) -> list[pathlib.Path]:
    """The bucket's finished (renamed) shards, sorted by name; temporary files excluded."""
    directory = pathlib.Path(dataset_dir) / bucket
    if not directory.is_dir():
        return []
    prefix = f"{bucket}-"
    return sorted(
        p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(_SUFFIX)
    )


class ShardWriter:
    """Writes one shard; it appears under its final name only if the `with` block succeeds.

    with ShardWriter(dataset_dir, '9x32x32', 3) as writer:
        for example in examples:
            writer.write(example)
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        bucket: str,
        shard_index: int,
        *,
        options: str = WRITER_OPTIONS,
    ):
        self.path = shard_path(dataset_dir, bucket, shard_index)
        self.options = options
        self.tmp_path = self.path.with_name(self.path.name + _TMP_SUFFIX)
        self.count = 0
        self._writer: Any = None

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = array_record_module.ArrayRecordWriter(str(self.tmp_path), self.options)
        return self

    def write(self, example: dict[str, Any]) -> None:
        if self._writer is None:
            raise RuntimeError(f"ShardWriter for {self.path} is not open: use it in a `with`")
        self._writer.write(records.encode_record(example))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except Exception:
            self.tmp_path.unlink(missing_ok=True)
            raise
        if exc_type is None:
            os.replace(self.tmp_path, self.path)  # atomic on POSIX filesystems
        else:
            self.tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Writes `text` to a temporary name beside `path`, then renames it over `path`."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{_TMP_SUFFIX}")  # per process: no races
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(
    dataset_dir: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    schema_version: int = SCHEMA_VERSION,
) -> pathlib.Path:
    """Writes `DATASET/manifest.json` atomically (sorted keys, `schema_version` set)."""
    path = pathlib.Path(dataset_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**manifest, "schema_version": schema_version}
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `DATASET/manifest.json`, checking that it exists and its schema version."""
    path = pathlib.Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no dataset manifest at {path}: tokenize the data first "
            "(python -m sora_jax.tokenize) or point data.dataset_dir at a tokenized dataset"
        )
    manifest = json.loads(path.read_text())
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has schema_version {version!r}, this code reads versions "
            f"{READABLE_VERSIONS}: re-tokenize the data with this version of sora_jax"
        )
    # Datasets written before `text_encoder.embed` existed hold embeddings.
    manifest.get("text_encoder", {}).setdefault("embed", "tokenize")
    return manifest


def _lookup(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "<missing>"
        value = value[part]
    return value


def check_manifest_matches(
    manifest: dict[str, Any],
    expected: dict[str, Any],
    *,
    dataset_dir: str | os.PathLike | None = None,
) -> None:
    """Raises ValueError listing every `expected` dotted field the manifest disagrees with.

    Args:
      manifest: as read by `read_manifest`.
      expected: dotted key -> value, e.g. `{'tokenizer.hash': 'ab12…', 'text_encoder.dim': 64}`.
      dataset_dir: named in the message, so a mix of datasets says which one differs.
    """
    diffs = []
    for key, want in expected.items():
        have = _lookup(manifest, key)
        if have != want:
            diffs.append(f"  {key}: dataset has {have!r}, config expects {want!r}")
    if diffs:
        where = f" {pathlib.Path(dataset_dir) / MANIFEST}" if dataset_dir is not None else ""
        raise ValueError(
            f"the tokenized dataset{where} does not match this config (the model would read "
            "latents or text embeddings it was not built for):\n"
            + "\n".join(diffs)
            + "\nre-tokenize the data with this config (python -m sora_jax.tokenize), or change "
            "the config's tokenizer / text_encoder to match the data"
        )
