"""The grain input pipeline: determinism, resumption, process sharding, global arrays."""

import json

import jax
import numpy as np
import pytest

from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import schedule as schedule_lib
from sora_jax.data import shards

# bucket -> (latent shape [T', H', W', C], records, records per shard). 'b' and 'c' leave
# a remainder with global batch 4 (27 = 6*4 + 3, 22 = 5*4 + 2).
BUCKETS = {"a": ((2, 4, 4, 3), 40, 16), "b": ((3, 2, 2, 3), 27, 10), "c": ((1, 4, 2, 3), 22, 22)}
S, D = 4, 8  # text tokens, text width
FIELDS = ("latents", "text", "text_mask", "id")
G = 4  # global batch


def _write_dataset(root, buckets=BUCKETS):
    manifest = {"buckets": {}}
    next_id = 0
    for name, (shape, count, per_shard) in buckets.items():
        rng = np.random.default_rng(next_id)
        for k in range(0, -(-count // per_shard)):
            with shards.ShardWriter(root, name, k) as writer:
                for _ in range(min(per_shard, count - k * per_shard)):
                    writer.write(
                        {
                            # Latents and text carry the id, so rows can be checked against it.
                            "latents": np.full(shape, next_id, np.float32)
                            + rng.standard_normal(shape).astype(np.float32) * 1e-3,
                            "text": np.full((S, D), next_id, np.float16),
                            "text_mask": np.arange(S) < 1 + next_id % S,
                            "id": next_id,
                            "caption": f"clip {next_id}",
                        }
                    )
                    next_id += 1
        files = shards.completed_shards(root, name)
        manifest["buckets"][name] = {
            "shape": list(shape),
            "count": count,
            "files": [str(f.relative_to(root)) for f in files],
        }
    shards.write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("dataset"))


def _pipe(dataset, **kw):
    kw = {"global_batch_size": G, "seed": 0, "fields": FIELDS, "prefetch": 0, **kw}
    return pipeline_lib.Pipeline(dataset, **kw)


def _take(pipe, n):
    with pipe:
        return [next(pipe) for _ in range(n)]


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and x["bucket"] == y["bucket"] and x["step"] == y["step"]
        for k in FIELDS:
            assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


# --- bucket_schedule ---------------------------------------------------------------------


def test_bucket_schedule_frequencies_approach_weights():
    weights = [1.0, 3.0, 0.0, 6.0]
    buckets = pipeline_lib.bucket_schedule(7, np.arange(200_000), weights)
    freq = np.bincount(buckets, minlength=4) / buckets.size
    np.testing.assert_allclose(freq, np.array(weights) / 10, atol=0.005)
    assert freq[2] == 0


def test_bucket_schedule_is_pure_per_step():
    steps = np.arange(1000)
    full = pipeline_lib.bucket_schedule(3, steps, [1, 1, 1])
    np.testing.assert_array_equal(
        pipeline_lib.bucket_schedule(3, steps[::-7], [1, 1, 1]), full[::-7]
    )
    assert int(pipeline_lib.bucket_schedule(3, np.int64(500), [1, 1, 1])) == full[500]
    assert (pipeline_lib.bucket_schedule(4, steps, [1, 1, 1]) != full).mean() > 0.5
    with pytest.raises(ValueError, match="not all zero"):
        pipeline_lib.bucket_schedule(0, steps, [0, 0])


def test_schedule_draw_counts_match_brute_force():
    weights = [2.0, 1.0, 1.0]
    n = schedule_lib.CHUNK + 500  # crosses a chunk boundary
    buckets = pipeline_lib.bucket_schedule(11, np.arange(n), weights)
    schedule = schedule_lib.Schedule(11, weights)
    for step in [0, 1, 17, schedule_lib.CHUNK - 1, schedule_lib.CHUNK, n - 1, 5, 300]:
        b = int(buckets[step])
        assert schedule.locate(step) == (b, int(np.sum(buckets[:step] == b)))
        np.testing.assert_array_equal(
            schedule.counts_before(step), np.bincount(buckets[:step], minlength=3)
        )


# --- Batches -----------------------------------------------------------------------------


def test_batch_shapes_match_manifest(dataset):
    batches = _take(_pipe(dataset), 40)
    manifest = shards.read_manifest(dataset)
    assert {b["bucket"] for b in batches} == set(BUCKETS)
    for i, b in enumerate(batches):
        assert b["step"] == i
        assert b["latents"].shape == (G, *manifest["buckets"][b["bucket"]]["shape"])
        assert b["latents"].dtype == np.float32 and b["text"].dtype == np.float16
        assert b["text"].shape == (G, S, D) and b["text_mask"].shape == (G, S)
        assert b["text_mask"].dtype == bool and b["id"].shape == (G,)
        # Every row is the record its id names.
        np.testing.assert_allclose(b["latents"][:, 0, 0, 0, 0], b["id"], atol=0.01)
        np.testing.assert_array_equal(b["text"][:, 0, 0], b["id"])


def test_default_weights_are_record_counts(dataset):
    pipe = _pipe(dataset)
    assert pipe.bucket_weights == {n: float(c) for n, (_, c, _) in BUCKETS.items()}
    report = pipe.report()
    for name, (shape, count, _) in BUCKETS.items():
        assert name in report and str(list(shape)) in report and str(count) in report


@pytest.mark.parametrize("worker_count, prefetch", [(0, 3), (2, 0), (3, 2)])
def test_batches_do_not_depend_on_workers_or_prefetch(dataset, worker_count, prefetch):
    reference = _take(_pipe(dataset), 30)
    _same(_take(_pipe(dataset, worker_count=worker_count, prefetch=prefetch), 30), reference)


def test_seed_changes_the_stream(dataset):
    a, b = _take(_pipe(dataset, seed=0), 20), _take(_pipe(dataset, seed=1), 20)
    assert [x["bucket"] for x in a] != [x["bucket"] for x in b]
    assert [x["id"].tolist() for x in a] != [x["id"].tolist() for x in b]


def test_resume_is_byte_identical(dataset):
    reference = _take(_pipe(dataset), 25)
    first = _pipe(dataset, prefetch=3, worker_count=1)
    _same([next(first) for _ in range(10)], reference[:10])
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    assert state["step"] == 10
    _same([next(first) for _ in range(3)], reference[10:13])  # read ahead, then rewind
    first.set_state(state)
    _same([next(first) for _ in range(2)], reference[10:12])
    first.close()
    assert first._thread is None

    resumed = _pipe(dataset, prefetch=2)
    resumed.set_state(state)
    _same(_take(resumed, 15), reference[10:25])


def test_set_state_refuses_other_settings(dataset):
    state = _pipe(dataset, seed=0).get_state()
    with pytest.raises(ValueError, match="seed: state has 0, pipeline has 5"):
        _pipe(dataset, seed=5).set_state(state)


def test_epochs_reshuffle_and_follow_remainder_rule(dataset):
    # Bucket 'b' alone: 27 records, G=4 -> 6 steps per epoch, 3 records skipped per epoch.
    batches = _take(_pipe(dataset, bucket_weights={"b": 1.0}), 12)
    epochs = [np.concatenate([b["id"] for b in batches[e * 6 : (e + 1) * 6]]) for e in (0, 1)]
    ids_b = set(range(40, 67))
    for ids in epochs:
        assert len(ids) == len(set(ids)) == 24 and set(ids) <= ids_b
    assert epochs[0].tolist() != epochs[1].tolist()
    assert ids_b - set(epochs[0]) != ids_b - set(epochs[1])  # different records skipped


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_records(dataset, process_count):
    steps = 60
    single = _take(_pipe(dataset), steps)
    hosts = [
        _take(_pipe(dataset, process_index=p, process_count=process_count), steps)
        for p in range(process_count)
    ]
    for s in range(steps):
        assert len({h[s]["bucket"] for h in hosts}) == 1  # one bucket per global step
        assert hosts[0][s]["bucket"] == single[s]["bucket"]
        rows = np.concatenate([h[s]["id"] for h in hosts])
        assert all(h[s]["id"].shape == (G // process_count,) for h in hosts)
        # The global batch holds the same records whatever the process count.
        assert sorted(rows.tolist()) == sorted(single[s]["id"].tolist())
    # Over one epoch of a bucket, the processes' union is each kept record exactly once.
    for name, (_, count, _) in BUCKETS.items():
        epoch = [s for s in range(steps) if single[s]["bucket"] == name][: count // G]
        ids = np.concatenate([h[s]["id"] for h in hosts for s in epoch])
        assert len(ids) == len(set(ids.tolist())) == (count // G) * G


# --- Errors ------------------------------------------------------------------------------


def test_errors_say_what_to_do(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _pipe(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        _pipe(tmp_path)
    with pytest.raises(ValueError, match="positive multiple of the process count 3"):
        _pipe(dataset, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"\['z'\] are not in"):
        _pipe(dataset, bucket_weights={"a": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match="'c' has 22 records, fewer than one global batch of 24"):
        _pipe(
            dataset, global_batch_size=24, bucket_weights={"a": 1.0, "c": 1.0}, strict_buckets=True
        )
    # A zero weight excludes the small bucket instead.
    _pipe(dataset, global_batch_size=24, bucket_weights={"a": 1.0, "c": 0.0})
    with pytest.raises(ValueError, match="lack fields \\['nope'\\]"):
        next(_pipe(dataset, fields=("latents", "nope")))

    empty = tmp_path / "empty"
    _write_dataset(empty, {"a": BUCKETS["a"]})
    manifest = shards.read_manifest(empty)
    manifest["buckets"]["e"] = {"shape": [1, 1, 1, 3], "count": 0, "files": []}
    shards.write_manifest(empty, manifest)
    message = "bucket 'e' has weight 2.0 but no records: remove it from the weights or tokenize"
    with pytest.raises(ValueError, match=message):
        _pipe(empty, bucket_weights={"a": 1.0, "e": 2.0}, strict_buckets=True)


# --- Global arrays -----------------------------------------------------------------------


def test_to_global_batch_shards_rows(dataset, devices):
    mesh = jax.make_mesh(
        (2, 4, 1, 1),
        ("data", "fsdp", "context", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 4,
    )
    host = _take(_pipe(dataset, global_batch_size=8, bucket_weights={"a": 1.0}), 1)[0]
    batch = pipeline_lib.to_global_batch(host, mesh, fields=("latents", "text", "id"))
    assert batch["bucket"] == "a" and batch["step"] == 0
    assert isinstance(batch["text_mask"], np.ndarray)  # not in fields: passed through
    for k in ("latents", "text", "id"):
        x = batch[k]
        assert isinstance(x, jax.Array) and x.shape == host[k].shape
        assert len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            rows = shard.index[0]
            assert rows.stop - rows.start == 1  # 8 rows over data x fsdp = 8 devices
            np.testing.assert_array_equal(np.asarray(shard.data), host[k][rows])
        np.testing.assert_array_equal(np.asarray(x), host[k])

    default = pipeline_lib.to_global_batch(host, mesh)  # every numeric array
    assert {k for k, v in default.items() if isinstance(v, jax.Array)} == set(FIELDS)
    small = _take(_pipe(dataset, bucket_weights={"a": 1.0}), 1)[0]
    with pytest.raises(ValueError, match="4 global rows, not divisible by the 8 shards"):
        pipeline_lib.to_global_batch(small, mesh)
