"""Mixtures, weight modes, token-budget batches, elastic restore and the cross-host check."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sora_jax.data import mixture, shards
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.data import schedule as schedule_lib
from sora_jax.training import data_benchmark as benchmark_lib

S, D = 4, 8  # text tokens, text width
FIELDS = ("latents", "text", "text_mask", "id")
TOKENIZER = {"id": "vae-a", "hash": "h1", "latent_channels": 3}
TEXT = {"id": "hash_words", "hash": "t1", "dim": D, "max_length": S}
PATCH = (1, 2, 2)
ROOT = pathlib.Path(__file__).resolve().parents[2]
# Dataset 'x': a video bucket and an image bucket (T' = 1); dataset 'y' shares the video
# bucket's name and shape. Tokens per sample with PATCH: v 3*2*2 = 12, i 4, w 8.
X = {"v": ((3, 4, 4, 3), 48), "i": ((1, 4, 4, 3), 64)}
Y = {"v": ((3, 4, 4, 3), 40), "w": ((2, 4, 4, 3), 32)}
Y_IDS = 1000  # ids of y start here, so a row says which dataset it came from
# A budget of 48 tokens per device over 4 data-parallel devices: G = 16, 48, 24 for v, i, w.
BUDGET = dict(tokens_per_device=48, patch_size=PATCH, data_parallel=4)


def _write(root, buckets, *, first_id=0, tokenizer=TOKENIZER, text=TEXT):
    manifest = {"tokenizer": tokenizer, "text_encoder": text, "buckets": {}}
    next_id = first_id
    for name, (shape, count) in buckets.items():
        with shards.ShardWriter(root, name, 0) as writer:
            for _ in range(count):
                writer.write(
                    {
                        "latents": np.full(shape, next_id, np.float32),  # the row names its id
                        "text": np.full((S, D), next_id % 100, np.float16),
                        "text_mask": np.arange(S) < 1 + next_id % S,
                        "id": next_id,
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
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    _write(root / "x", X)
    _write(root / "y", Y, first_id=Y_IDS)
    return [{"dir": root / "x", "weight": 1.0}, {"dir": root / "y", "weight": 3.0}]


def _pipe(datasets, **kw):
    kw = {"seed": 0, "fields": FIELDS, "prefetch": 0, **kw}
    return pipeline_lib.Pipeline(datasets, **kw)


def _take(pipe, n):
    with pipe:
        return [next(pipe) for _ in range(n)]


def _freq(pipe, n=40_000):
    weights = [b.weight for b in pipe.buckets]
    drawn = schedule_lib.bucket_schedule(pipe.seed, np.arange(n), weights)
    return {b.key: float(np.mean(drawn == i)) for i, b in enumerate(pipe.buckets)}


# --- Weights and mixtures ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("size", {"i": 64 / 112, "v": 48 / 112}),
        ("uniform", {"i": 0.5, "v": 0.5}),
        ({"v": 3.0, "i": 1.0}, {"v": 0.75, "i": 0.25}),
        ("v:1,i:0", {"v": 1.0, "i": 0.0}),
    ],
)
def test_weight_modes_give_expected_frequencies(mix, mode, expected):
    pipe = _pipe(mix[0]["dir"], bucket_weights=mode, global_batch_size=16)
    freq = _freq(pipe)
    assert freq.keys() == expected.keys()
    for key, p in expected.items():
        assert abs(freq[key] - p) < 0.01, (key, freq)
    # The batches follow the schedule: each step is its bucket's shape, one shape per step.
    for b in _take(pipe, 12):
        spec = pipe.bucket_at(b["step"])
        assert b["bucket"] == spec.key and b["latents"].shape == (16, *spec.shape)


def test_mixture_draws_datasets_by_weight_and_namespaces_buckets(mix):
    pipe = _pipe(mix, global_batch_size=8)  # 'size' within each dataset, datasets 1 : 3
    assert [b.key for b in pipe.buckets] == ["x/i", "x/v", "y/v", "y/w"]
    freq = _freq(pipe)
    assert abs(freq["y/v"] + freq["y/w"] - 0.75) < 0.01
    assert abs(freq["x/i"] / (freq["x/i"] + freq["x/v"]) - 64 / 112) < 0.02
    assert abs(freq["y/v"] / (freq["y/v"] + freq["y/w"]) - 40 / 72) < 0.02
    batches = _take(pipe, 60)
    assert {b["bucket"] for b in batches} == {"x/i", "x/v", "y/v", "y/w"}
    for b in batches:
        # 'v' exists in both datasets with one shape; each key reads only its own records.
        in_y = b["id"] >= Y_IDS
        assert in_y.all() if b["bucket"].startswith("y/") else not in_y.any()
        np.testing.assert_array_equal(b["latents"][:, 0, 0, 0, 0], b["id"])
    # An explicit dict may name 'dataset/bucket' or a plain bucket name of every dataset.
    pipe = _pipe(mix, global_batch_size=8, bucket_weights={"v": 1.0, "y/w": 2.0})
    assert pipe.bucket_weights == {"x/v": 1.0, "y/v": 3.0 / 3, "y/w": 3.0 * 2 / 3}
    assert pipe.unused == ["x/i"] and "not trained on (no weight): ['x/i']" in pipe.report()


@pytest.mark.parametrize(
    "section, field, value",
    [("tokenizer", "hash", "h2"), ("text_encoder", "dim", 16), ("tokenizer", "latent_channels", 4)],
)
def test_mixed_manifests_must_agree(mix, tmp_path, section, field, value):
    other = {**(TOKENIZER if section == "tokenizer" else TEXT), field: value}
    kw = {"tokenizer": other} if section == "tokenizer" else {"text": other}
    _write(tmp_path / "z", {"v": X["v"]}, **kw)
    with pytest.raises(ValueError) as info:
        _pipe([mix[0], {"dir": tmp_path / "z", "weight": 1.0}], global_batch_size=8)
    message = str(info.value)
    assert f"disagree on {section}.{field}" in message
    assert "'x'" in message and "'z'" in message and "re-tokenize 'z'" in message


def test_manifest_not_matching_the_model_names_field_dataset_and_fix(mix):
    expected = {"tokenizer.latent_channels": 16, "text_encoder.dim": D}
    with pytest.raises(ValueError) as info:
        _pipe(mix, global_batch_size=8, expected_manifest=expected)
    message = str(info.value)
    assert "tokenizer.latent_channels: dataset has 3, config expects 16" in message
    assert str(mix[0]["dir"] / "manifest.json") in message and "re-tokenize" in message
    assert "text_encoder.dim" not in message  # only the differing field is listed


# --- Batch sizes --------------------------------------------------------------------------


def test_token_budget_sets_each_buckets_batch(mix):
    pipe = _pipe(mix, **BUDGET)
    sizes = {b.key: (b.tokens, b.per_device, b.global_batch) for b in pipe.buckets}
    # floor(48 / tokens) per device x 4 devices; the image bucket takes the largest batch.
    assert sizes == {
        "x/i": (4, 12, 48),
        "x/v": (12, 4, 16),
        "y/v": (12, 4, 16),
        "y/w": (8, 6, 24),
    }
    report = pipe.report()
    counts = {b.key: b.count for b in pipe.buckets}
    for key, (tokens, per_device, g) in sizes.items():
        row = next(line for line in report.splitlines() if line.strip().startswith(key))
        # Columns: ... /device, global, tokens/step, steps/epoch, skipped, 'N steps'.
        assert row.split()[-7:-3] == [
            str(per_device),
            str(g),
            str(g * tokens),
            str(counts[key] // g),
        ], row
    assert "data.tokens_per_device" in report
    batches = _take(pipe, 30)
    assert {b["bucket"] for b in batches} == set(sizes)
    for b in batches:
        spec = pipe.bucket_at(b["step"])
        assert b["latents"].shape == (spec.global_batch, *spec.shape)
        assert b["text"].shape == (spec.global_batch, S, D)
        assert b["id"].shape == (spec.global_batch,)
    # An explicit per-bucket batch wins over the budget.
    pipe = _pipe(mix, bucket_batch_sizes={"x/i": 8, "w": 4}, **BUDGET)
    assert {b.key: b.global_batch for b in pipe.buckets} == {
        "x/i": 8,
        "x/v": 16,
        "y/v": 16,
        "y/w": 4,
    }


def test_image_bucket_through_global_arrays(mix, devices):
    # T' = 1 buckets are images: the same path as video, shape [G, 1, H', W', C].
    mesh = jax.make_mesh(
        (8, 1, 1, 1),
        ("data", "fsdp", "context", "tensor"),
        axis_types=(jax.sharding.AxisType.Auto,) * 4,
    )
    pipe = _pipe(
        mix[0]["dir"], bucket_weights="i:1", tokens_per_device=8, patch_size=PATCH, data_parallel=8
    )
    assert [(b.key, b.tokens, b.per_device, b.global_batch) for b in pipe.buckets] == [
        ("i", 4, 2, 16)
    ]
    host = _take(pipe, 1)[0]
    batch = pipeline_lib.to_global_batch(host, mesh, fields=("latents", "id"))
    assert batch["bucket"] == "i" and batch["latents"].shape == (16, 1, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(batch["latents"])[:, 0, 0, 0, 0], host["id"])


def test_every_error_names_bucket_field_and_fix(mix, tmp_path):
    x = mix[0]["dir"]
    with pytest.raises(
        ValueError,
        match=r"'v' has 12 tokens per sample, more than "
        r"data.tokens_per_device=8.*raise data.tokens_per_device to >= 12",
    ):
        _pipe(x, tokens_per_device=8, patch_size=PATCH, data_parallel=8)
    with pytest.raises(
        ValueError,
        match=r"'i' has 64 records, fewer than one global batch of "
        r"96 \(from data.tokens_per_device.*every sample would be dropped",
    ):
        _pipe(x, tokens_per_device=48, patch_size=PATCH, data_parallel=8, strict_buckets=True)
    with pytest.raises(
        ValueError,
        match=r"'x/v': global batch 6 .* not divisible by the 4 "
        "data-parallel devices",
    ):
        _pipe(mix, global_batch_size=8, bucket_batch_sizes={"x/v": 6}, data_parallel=4)
    with pytest.raises(
        ValueError,
        match=r"'i' of .*latent shape \[1, 4, 4, 3\] is not divisible by "
        r"model.patch_size \(2, 2, 2\)",
    ):
        _pipe(x, global_batch_size=8, patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match=r"dataset 'y' .* has weight 3.0 but none of its buckets"):
        _pipe(mix, global_batch_size=8, bucket_weights="x/v:1")
    with pytest.raises(ValueError, match=r"\['q'\] are not in any of the datasets"):
        _pipe(mix, global_batch_size=8, bucket_weights="q:1")
    with pytest.raises(ValueError, match="names .* must be non-empty and unique"):
        _pipe([mix[0], {"dir": x, "weight": 1.0}], global_batch_size=8)
    with pytest.raises(ValueError, match="write 'size', 'uniform', or 'bucket:weight"):
        _pipe(x, global_batch_size=8, bucket_weights="sizes")
    # 'uniform' gives an empty bucket a weight: strict, a hard error; else left out, reported.
    _write(tmp_path / "e", {"v": X["v"], "e": ((1, 4, 4, 3), 0)})
    with pytest.raises(ValueError, match="bucket 'e' has weight 1.0 but no records"):
        _pipe(tmp_path / "e", global_batch_size=8, bucket_weights="uniform", strict_buckets=True)
    lenient = _pipe(tmp_path / "e", global_batch_size=8, bucket_weights="uniform")
    assert lenient.bucket_weights == {"e": 0.0, "v": 1.0}
    assert "e                           0 records: no records" in lenient.report()
    assert _pipe(tmp_path / "e", global_batch_size=8).bucket_weights == {"e": 0.0, "v": 48.0}


# --- Several processes ---------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_token_budget_mixture(mix, process_count):
    steps = 40
    single = _take(_pipe(mix, **BUDGET), steps)
    hosts = [
        _take(_pipe(mix, process_index=p, process_count=process_count, **BUDGET), steps)
        for p in range(process_count)
    ]
    pipe = _pipe(mix, **BUDGET)
    for s in range(steps):
        assert {h[s]["bucket"] for h in hosts} == {single[s]["bucket"]}  # one bucket per step
        g = pipe.bucket_at(s).global_batch
        assert all(h[s]["latents"].shape[0] == g // process_count for h in hosts)
        rows = np.concatenate([h[s]["id"] for h in hosts])
        assert sorted(rows.tolist()) == sorted(single[s]["id"].tolist())
    # Over one epoch of each bucket, the processes' union is each kept record exactly once.
    for b in pipe.buckets:
        epoch = [s for s in range(steps) if single[s]["bucket"] == b.key][: b.batches_per_epoch]
        assert len(epoch) == b.batches_per_epoch, b.key  # 40 steps cover an epoch of each
        ids = np.concatenate([h[s]["id"] for h in hosts for s in epoch])
        assert len(ids) == len(set(ids.tolist())) == b.batches_per_epoch * b.global_batch


# --- Elastic restore -----------------------------------------------------------------------


def _rows(hosts, s):
    return sorted(np.concatenate([h[s]["id"] for h in hosts]).tolist())


@pytest.mark.parametrize("new_count", [1, 4])
def test_restore_with_another_process_count_continues_exactly(mix, new_count):
    n, m = 10, 25
    reference = _take(_pipe(mix, **BUDGET), n + m)  # uninterrupted, one process
    first = [_pipe(mix, process_index=p, process_count=2, **BUDGET) for p in range(2)]
    for pipe in first:
        for _ in range(n):
            next(pipe)
    states = [json.loads(json.dumps(pipe.get_state())) for pipe in first]
    assert states[0] == states[1] and states[0]["step"] == n  # no per-process position
    for pipe in first:
        pipe.close()
    hosts = []
    for p in range(new_count):
        pipe = _pipe(mix, process_index=p, process_count=new_count, **BUDGET)
        pipe.set_state(states[0])
        hosts.append(_take(pipe, m))
    for s in range(m):
        assert hosts[0][s]["step"] == n + s and hosts[0][s]["bucket"] == reference[n + s]["bucket"]
        assert _rows(hosts, s) == sorted(reference[n + s]["id"].tolist())


def test_changed_global_batch_restarts_that_buckets_epoch(mix, caplog):
    # Saved with 4 data-parallel devices, restored with 2: the budget halves every
    # token-budget batch; 'x/i' has an explicit batch and keeps it.
    sizes = {"x/i": 16}
    saved = _pipe(mix, bucket_batch_sizes=sizes, **BUDGET)
    n = 23
    for _ in range(n):
        next(saved)
    state = json.loads(json.dumps(saved.get_state()))
    reference = _take(saved, 60)
    budget2 = {**BUDGET, "data_parallel": 2}
    resumed = _pipe(mix, bucket_batch_sizes=sizes, **budget2)
    with caplog.at_level(logging.WARNING, logger="sora_jax.data.pipeline"):
        resumed.set_state(state)
    warned = caplog.text
    for key in ("x/v", "y/v", "y/w"):
        assert f"bucket '{key}' had global batch" in warned
    assert "'x/i'" not in warned and "the other buckets continue exactly" in warned
    after = _take(resumed, 60)
    # The unchanged bucket continues byte-identically.
    for old, new in zip(reference, after):
        assert old["bucket"] == new["bucket"]
        if new["bucket"] == "x/i":
            assert old["id"].tolist() == new["id"].tolist()
    # A changed bucket starts a new epoch: its next E draws read distinct records, none
    # of them in the epoch that was interrupted.
    draws = resumed._reader.schedule.counts_before(n)
    base = resumed.get_state()["epoch_base"]
    for i, b in enumerate(resumed.buckets):
        if b.key == "x/i":
            assert b.key not in base
            continue
        k0, e0 = base[b.key]
        old_epoch, j = saved.epoch_and_batch(i, int(draws[i]))
        assert k0 == draws[i] and e0 == old_epoch + (j > 0)
        steps = [a for a in after if a["bucket"] == b.key][: b.batches_per_epoch]
        assert len(steps) >= 2 and all(len(a["id"]) == b.global_batch for a in steps)
        ids = np.concatenate([a["id"] for a in steps]).tolist()
        assert len(ids) == len(set(ids))
        # Its first draw after the restore is batch 0 of epoch e0 at the new batch size.
        first = resumed._reader.epoch_dataset(i, e0)[0]["id"]
        assert steps[0]["id"].tolist() == first.tolist()
    # The new base is part of the state: saving and restoring again continues exactly.
    again = _pipe(mix, bucket_batch_sizes=sizes, **budget2)
    mid = _pipe(mix, bucket_batch_sizes=sizes, **budget2)
    mid.set_state(state)
    for _ in range(7):
        next(mid)
    again.set_state(json.loads(json.dumps(mid.get_state())))
    assert [a["id"].tolist() for a in _take(again, 10)] == [a["id"].tolist() for a in after[7:17]]


def test_old_state_without_per_bucket_batches_resumes(mix):
    reference = _take(_pipe(mix[0]["dir"], global_batch_size=16), 12)
    pipe = _pipe(mix[0]["dir"], global_batch_size=16)
    old = {"step": 5, "seed": 0, "global_batch_size": 16, "bucket_weights": pipe.bucket_weights}
    pipe.set_state(old)
    assert [b["id"].tolist() for b in _take(pipe, 7)] == [b["id"].tolist() for b in reference[5:]]
    with pytest.raises(ValueError, match="bucket_weights: state has"):
        _pipe(mix[0]["dir"], global_batch_size=16, bucket_weights="uniform").set_state(old)


# --- Cross-host agreement ------------------------------------------------------------------


def test_schedule_fingerprint_agreement_one_process(mix):
    pipe = _pipe(mix, **BUDGET)
    fps = [pipeline_lib.check_schedule_agreement(pipe, s) for s in range(20)]
    assert fps == [schedule_lib.schedule_fingerprint(pipe, s) for s in range(20)]
    assert len(set(fps)) == 20
    # Every process of a job computes the same fingerprint, whatever its index and count.
    other = _pipe(mix, process_index=1, process_count=4, **BUDGET)
    assert [schedule_lib.schedule_fingerprint(other, s) for s in range(20)] == fps
    # A different seed or a different batch of any bucket changes it.
    seeded = _pipe(mix, **{**BUDGET, "seed": 1})
    assert all(schedule_lib.schedule_fingerprint(seeded, s) != fps[s] for s in range(20))
    resized = _pipe(mix, bucket_batch_sizes={"y/w": 8}, **BUDGET)
    assert all(schedule_lib.schedule_fingerprint(resized, s) != fps[s] for s in range(20))


_WORKER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
from sora_jax.data import pipeline as pipeline_lib
pipe = pipeline_lib.Pipeline(root, seed=0, global_batch_size=8, prefetch=0)
pipeline_lib.check_schedule_agreement(pipe, 3)  # same config everywhere: passes
print("agreed", flush=True)
odd = pipeline_lib.Pipeline(root, seed=pid, global_batch_size=8, prefetch=0)
try:
    pipeline_lib.check_schedule_agreement(odd, 3)
except RuntimeError as e:
    print("refused:", e, flush=True)
"""


def test_schedule_agreement_across_two_real_processes(mix, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), port, str(mix[0]["dir"])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
        assert "agreed" in out
        assert "refused: data: at step 3 processes [1] derive another batch plan" in out, out


# --- Data benchmark -----------------------------------------------------------------------


def test_data_benchmark_reports_speed_against_training(tmp_path, capsys):
    from sora_jax import config as config_lib
    from sora_jax.data import tokenization

    config = config_lib.load_config(str(ROOT / "experiments/demo.py") + ":tiny")
    tokenization.run(config, tmp_path)
    result = benchmark_lib.data_benchmark(config, tmp_path, seconds=0.3)
    out = capsys.readouterr().out
    assert "5x16x16" in out and "training  unknown: no perf/steps_per_s" in out
    assert result["samples_per_step"] == 16 and result["steps_per_s"] > 0
    # 16 samples of latents [5, 8, 8, 12] float16 + text [8, 64] float32 + mask [8] bool.
    assert result["mb_per_step"] == pytest.approx(16 * (5 * 8 * 8 * 12 * 2 + 8 * 64 * 4 + 8) / 1e6)
    lines = [
        {"step": 10, "perf/steps_per_s": 0.5},
        {"step": 20, "perf/steps_per_s": 4.0},
        {"step": 30, "perf/steps_per_s": 5.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = benchmark_lib.data_benchmark(config, tmp_path, seconds=0.3)
    out = capsys.readouterr().out
    assert result["train_steps_per_s"] == 4.0  # the median: the first interval compiles
    assert result["headroom"] == pytest.approx(result["steps_per_s"] / 4.0)
    assert f"headroom  {result['headroom']:.1f}x" in out


def test_resolved_table_and_shared_manifest(mix):
    table = mixture.resolve(mix, global_batch_size=8, process_count=2)
    assert [b.batches_per_epoch for b in table.buckets] == [64 // 8, 48 // 8, 40 // 8, 32 // 8]
    assert table.manifest["tokenizer"] == TOKENIZER and set(table.manifest["buckets"]) == {
        "i",
        "v",
        "w",
    }
