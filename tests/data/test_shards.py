"""Shard files and the manifest: atomic writes, schema checks, model/data mismatch errors."""

import json

import grain
import numpy as np
import pytest

from sora_jax.data import records, shards


def _example(i):
    return {"latents": np.full((2, 2, 1), i, np.float16), "id": i, "caption": f"clip {i}"}


def test_writer_renames_on_success(tmp_path):
    with shards.ShardWriter(tmp_path, "b1", 3) as writer:
        assert writer.tmp_path.exists() and not writer.path.exists()
        for i in range(5):
            writer.write(_example(i))
    assert writer.path == tmp_path / "b1" / "b1-00003.array_record"
    assert writer.path.exists() and not writer.tmp_path.exists() and writer.count == 5
    source = grain.sources.ArrayRecordDataSource([str(writer.path)])
    ids = [records.decode_record(source[i])["id"] for i in range(len(source))]
    assert ids == list(range(5))


def test_writer_removes_temp_file_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with shards.ShardWriter(tmp_path, "b1", 0) as writer:
            writer.write(_example(0))
            raise RuntimeError("boom")
    assert not writer.path.exists() and not writer.tmp_path.exists()
    assert shards.completed_shards(tmp_path, "b1") == []


def test_writer_error_on_bad_record_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="'bad'"):
        with shards.ShardWriter(tmp_path, "b1", 0) as writer:
            writer.write({"bad": object()})
    assert list((tmp_path / "b1").iterdir()) == []


def test_completed_shards_sorted_and_ignores_temp_files(tmp_path):
    for k in (2, 0, 1):
        with shards.ShardWriter(tmp_path, "b1", k) as writer:
            writer.write(_example(k))
    (tmp_path / "b1" / "b1-00003.array_record.tmp").write_bytes(b"partial")
    assert shards.completed_shards(tmp_path, "b1") == [
        shards.shard_path(tmp_path, "b1", k) for k in (0, 1, 2)
    ]
    assert shards.completed_shards(tmp_path, "absent") == []


def test_manifest_round_trip(tmp_path):
    manifest = {
        "tokenizer": {"id": "vae", "hash": "abc", "latent_channels": 4},
        "buckets": {
            "b1": {"shape": [2, 4, 4, 4], "count": 7, "files": ["b1/b1-00000.array_record"]}
        },
        "rejects": 0,
    }
    path = shards.write_manifest(tmp_path, manifest)
    assert path == tmp_path / "manifest.json"
    assert shards.read_manifest(tmp_path) == {**manifest, "schema_version": 1}
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp left


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/manifest.json.*tokenize"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match=f"{tmp_path}/manifest.json has schema_version 99"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="schema_version None"):
        shards.read_manifest(tmp_path)


def test_check_manifest_matches_lists_every_difference():
    manifest = {
        "tokenizer": {"id": "vae-a", "hash": "h1", "latent_channels": 4},
        "text_encoder": {"id": "t5", "hash": "h2", "dim": 64},
    }
    same = {"tokenizer.id": "vae-a", "tokenizer.latent_channels": 4, "text_encoder.dim": 64}
    shards.check_manifest_matches(manifest, same)
    expected = {
        "tokenizer.id": "vae-a",
        "tokenizer.hash": "h9",
        "tokenizer.latent_channels": 16,
        "text_encoder.id": "t5",
        "text_encoder.hash": "h2",
        "text_encoder.dim": 128,
        "text_encoder.max_length": 77,
    }
    with pytest.raises(ValueError) as info:
        shards.check_manifest_matches(manifest, expected)
    message = str(info.value)
    assert "tokenizer.hash: dataset has 'h1', config expects 'h9'" in message
    assert "tokenizer.latent_channels: dataset has 4, config expects 16" in message
    assert "text_encoder.dim: dataset has 64, config expects 128" in message
    assert "text_encoder.max_length: dataset has '<missing>', config expects 77" in message
    assert "tokenizer.id" not in message and "text_encoder.id" not in message
    assert "re-tokenize" in message and "change the config" in message
