"""Training on packed rows: one compiled step for the run, shape-class metrics, sampling at
native shapes within the packed budget, `--mode=plan`, and a SIGKILL resume that continues
bit-identically (the packer's state in the checkpoint)."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sora_jax import config as config_lib
from sora_jax.data import native, records, shards, tokenization
from sora_jax.evaluation import generate
from sora_jax.evaluation import requests as requests_lib
from sora_jax.training import loop, plan, resume

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments" / "demo.py")
# Crops of the demo's [5, 8, 8, 12] latents: landscape, portrait, square, images, durations.
CROPS = [(5, 8, 8), (3, 4, 8), (2, 8, 4), (1, 8, 8), (4, 6, 4), (1, 4, 6), (3, 6, 6), (2, 4, 4)]


def packed_config(**overrides):
    config = config_lib.load_config(f"{DEMO}:tiny,packed")
    config.log_every_steps = 1
    config.checkpoint_every_steps = 4
    config.total_steps = 8
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def native_dataset(tmp_path_factory):
    """The tiny demo's clips cropped to many shapes, as a native (schema 2) dataset."""
    work = tmp_path_factory.mktemp("tokenized")
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.data.source.num_clips = 64
    tokenization.run(config, work)
    src = work / "data"
    manifest = shards.read_manifest(src)
    files = [src / f for b in manifest["buckets"].values() for f in b["files"]]
    source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
    out = tmp_path_factory.mktemp("native") / "data"
    name = str(shards.shard_path(out, native.SHARD, 0).relative_to(out))
    shapes = []
    with shards.ShardWriter(out, native.SHARD, 0) as writer:
        for i in range(len(source)):
            rec = records.decode_record(source[i])
            t, h, w = CROPS[i % len(CROPS)]
            rec["latents"] = np.asarray(rec["latents"])[:t, :h, :w]
            rec["shape"] = np.asarray((t, h, w), np.int32)
            writer.write(rec)
            shapes.append([t, h, w])
    manifest = {k: v for k, v in manifest.items() if k not in ("buckets", "schema_version")}
    manifest.update(
        mode="native",
        buckets={},
        native={"files": [name], "shapes": {name: shapes}, "count": len(shapes)},
    )
    shards.write_manifest(out, manifest, schema_version=shards.NATIVE_SCHEMA_VERSION)
    return out


def _workdir(tmp_path, dataset, name="run"):
    work = tmp_path / name
    work.mkdir()
    shutil.copytree(dataset, work / "data")
    return work


def test_a_packed_run_compiles_one_step_and_reports_shape_classes(
    native_dataset, tmp_path, monkeypatch
):
    compiles = []
    real = jax.stages.Lowered.compile
    monkeypatch.setattr(
        jax.stages.Lowered,
        "compile",
        lambda self, *a, **k: compiles.append(1) or real(self, *a, **k),
    )
    work = _workdir(tmp_path, native_dataset)
    summary = loop.train(packed_config(), work)
    assert summary["final_step"] == 8 and np.isfinite(summary["final_loss"])
    assert len(compiles) == 1  # one train-step executable for every mix of clip shapes
    metrics = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    classes = {k for m in metrics for k in m if k.startswith("train/loss_class/")}
    assert classes == {
        f"train/loss_class/{c}" for c in ("image", "landscape", "portrait", "square")
    }
    assert all(0 < m["train/useful_tokens"] <= 8 * 160 for m in metrics)  # B = 8, L = 160
    assert len({m["train/useful_tokens"] for m in metrics}) > 1  # rows of different mixes

    # Sampling the run at native shapes within its budget (L = 160 tokens of 4x4 px).
    config = packed_config()
    gen = generate.Generator.from_workdir(work, config, ema_decay=0)
    base = requests_lib.SampleOptions.from_config(config.sample, num_steps=2)

    def check(frames, height, width):
        options = dataclasses.replace(base, num_frames=frames, height=height, width=width)
        request = requests_lib.Request("a red square moving left slowly", options)
        requests_lib.validate_requests(config, work, [request], tokenizer=gen.tokenizer)
        return options

    for shape in ((5, 16, 16), (3, 8, 24)):  # 80 and 36 tokens: the bucket's and a wide one
        videos, _ = gen.generate(["a red square moving left slowly"], check(*shape))
        assert videos.shape == (1, *shape, 3) and np.isfinite(videos).all()
    with pytest.raises(ValueError, match=r"--num_frames=5 --resolution=32x32 is 320 video "):
        check(5, 32, 32)  # 5 x 8 x 8 tokens > 160
    with pytest.raises(ValueError, match=r"tokens_per_row=160 .*use --num_frames <= 2"):
        check(5, 32, 32)


def test_plan_of_a_packed_config_is_one_step(capsys):
    plans = plan.plan(packed_config(), devices=jax.devices()[:1])
    assert [p.bucket for p in plans] == ["packed"] and plans[0].tokens == 160
    assert "packed" in capsys.readouterr().out


def _train_cli(work, *extra, code=ROOT, **popen):
    cmd = [sys.executable, "-m", "sora_jax.train", "--config=experiments/demo.py:tiny,packed"]
    cmd += [f"--workdir={work}", "--config.log_every_steps=1", "--config.checkpoint_every_steps=4"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen([*cmd, *extra], cwd=code, env=env, **popen)


def test_sigkill_then_resume_is_bit_identical(native_dataset, code, tmp_path):
    straight, resumed = (
        _workdir(tmp_path, native_dataset, "a"),
        _workdir(tmp_path, native_dataset, "b"),
    )
    steps = ["--config.total_steps=24", "--config.data.packing.rows_per_batch=16"]
    assert _train_cli(straight, *steps, code=code).wait(timeout=900) == 0
    proc = _train_cli(
        resumed, *steps, code=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (resumed / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "checkpoints" / "24").exists()
    assert _train_cli(resumed, *steps, code=code).wait(timeout=900) == 0
    # One compiled step in the three processes (training/resume.py's record).
    records = [
        json.loads(x)["steps"]
        for w in (straight, resumed)
        for x in (w / resume.STEPS_FILE).read_text().splitlines()
    ]
    assert len(records) == 3 and all(r == records[0] for r in records), records
    restore = lambda w: ocp.StandardCheckpointer().restore(w / "checkpoints" / "24" / "state")  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, restore(straight), restore(resumed))
    keys = lambda w: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k.startswith("train/")}
        for x in (w / "metrics.jsonl").read_text().splitlines()
    ]
    assert keys(straight) == keys(resumed)
