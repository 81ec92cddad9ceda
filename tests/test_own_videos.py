"""The README's "Your own videos" path on a folder of real encoded videos (several codecs,
sizes, aspect ratios and frame rates, one broken file; tests/data/video_fixtures.py),
with the shipped `experiments/videos.py:tiny` and no override but the paths and steps:
tokenize -> train -> sample -> evaluate, each as its own process. Real data leaves buckets
of the grid empty or sparse: the tokenizer demotes, the trainer leaves out and reports,
and every clip is accounted for; `data.strict_buckets=True` keeps the errors. The tiny
preset holds out 15% of the inputs (data.tokenize.holdout_fraction): its `config.evals`
score validation loss, reconstruction and Fréchet distance on them, in training on their
schedules and offline on the checkpoint, with identical numbers."""

import json
import os
import pathlib
import subprocess
import sys

import av
import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.data import pipeline as pipeline_lib
from sora_jax.evaluation import evaluators
from sora_jax.evaluation import requests as requests_lib
from sora_jax.training import metrics as metrics_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
import video_fixtures as fx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 4
# Final clips per bucket (video_fixtures.FOLDER): 5x32x32's two clips demoted to 1x32x32;
# the inputs held out (relative path hashed with data.tokenize.seed 0) in HELD.
COUNTS = {"1x32x32": 6, "9x24x40": 6, "9x32x32": 4, "9x40x24": 1, "5x24x40": 1, "5x16x16": 1}
HELD = {"9x32x32": 2, "9x40x24": 1}
TRAINED = {"1x32x32", "9x24x40", "9x32x32"}


def spec(media: pathlib.Path) -> str:
    return f"experiments/videos.py:tiny,folder={media},steps={STEPS}"


def run(module: str, media, workdir, *extra) -> str:
    # One CPU device, as on a researcher's laptop (the suite's processes fake 8 devices).
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    proc = subprocess.run(
        [sys.executable, "-m", f"sora_jax.{module}", f"--config={spec(media)}",
         f"--workdir={workdir}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", "XLA_FLAGS": flags},
    )  # fmt: skip
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    media = fx.make_folder(tmp_path_factory.mktemp("media"))
    work = tmp_path_factory.mktemp("run")
    out = {"media": media, "work": work}
    out["tokenize"] = run("tokenize", media, work)
    out["train"] = run("train", media, work)
    # What the trainer evaluated, kept apart: the offline run must compute it all again.
    (work / "eval").rename(work / "eval_in_training")
    out["sample"] = run("sample", media, work, "--prompt=a clip named a from wide", "--steps=2")
    out["evaluate"] = run("evaluate", media, work)
    return out


def test_tokenize_demotes_and_accounts_for_every_input(chain):
    data = chain["work"] / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    counts = {n: b["count"] for n, b in manifest["buckets"].items() if b["count"]}
    assert counts == COUNTS
    inputs = len(fx.FOLDER) + len(fx.FOLDER_BROKEN)
    assert manifest["source"]["num_inputs"] == inputs
    # One clip per good input (clip_stride 0), one reject per broken one: nothing lost.
    held = {n: b["count"] for n, b in manifest["holdout"]["buckets"].items()}
    assert held == HELD and manifest["holdout"]["inputs"] == sum(HELD.values())
    assert sum(counts.values()) + sum(held.values()) == len(fx.FOLDER)
    for name, b in manifest["holdout"]["buckets"].items():
        assert all(f.startswith(f"holdout/{name}/") and (data / f).is_file() for f in b["files"])
    assert manifest["rejects_by_reason"] == {"unreadable": len(fx.FOLDER_BROKEN)}
    assert manifest["demotion"]["moves"] == [
        {"from": "5x32x32", "to": "1x32x32", "inputs": 2, "clips": 2}
    ]
    assert "5x32x32" in manifest["demotion"]["closed"]
    assert not list((data / "5x32x32").glob("*.array_record"))  # its first-pass shards gone
    for name, b in manifest["buckets"].items():  # the manifest's files hold its counts
        assert all((data / f).is_file() for f in b["files"]), name
    text = chain["tokenize"]
    assert "demoted (data.tokenize.min_bucket_clips): 5x32x32 -> 1x32x32: 2 input(s)" in text
    assert "3 of 19 clips not trained on" in text
    assert "held out (data.tokenize.holdout_fraction=0.15): 3 clip(s) of 3 input(s)" in text


def test_train_reports_and_records_every_bucket(chain):
    report = chain["train"]
    for name in ("1x16x16", "1x24x40", "1x40x24", "5x32x32", "5x40x24"):
        assert f"{name:<20} {0:>8} records: no records" in report
    for name in ("5x16x16", "5x24x40", "9x40x24"):
        assert f"{COUNTS[name]:>8} records: fewer records than one global batch of 4" in report
    assert "merged when tokenized (data.tokenize.min_bucket_clips): 5x32x32 -> 1x32x32" in report
    assert "records: 19 = 16 in trained buckets" in report
    assert "+ 3 not trained on (3 left out, 0 without weight)" in report

    decisions = json.loads((chain["work"] / "data_buckets.json").read_text())
    fates = {b["bucket"]: b for b in decisions["buckets"]}
    assert {k for k, b in fates.items() if b["fate"] == "trained"} == TRAINED
    assert all(fates[k]["fate"] == "left out" for k in fates if k not in TRAINED)
    r = decisions["records"]
    assert r["total"] == sum(COUNTS.values()) == r["trained_on"] + r["not_trained_on"]
    assert r["trained_on"] == sum(COUNTS[k] for k in TRAINED)
    assert r["left_out"] == sum(b["records"] for b in fates.values() if b["fate"] == "left out")
    assert decisions["tokenization_moves"][0]["to"] == "1x32x32"

    metrics = [json.loads(x) for x in (chain["work"] / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "train/loss" in m]  # the rest: the evals' rows
    assert metrics and all(np.isfinite(m["train/loss"]) for m in metrics)
    assert (chain["work"] / "checkpoints" / str(STEPS)).is_dir()


def test_sample_and_evaluate(chain):
    out = chain["sample"]
    (video,) = json.loads(out[out.index("{") :])["videos"]
    with av.open(video) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 5  # sample.bucket: the first 1:1 video bucket, 5x32x32
    report = json.loads((chain["work"] / "eval" / str(STEPS) / "val_loss.json").read_text())
    scores = report["scores"]  # on the held-out split: its buckets, trained on or not
    assert report["protocol"]["split"] == "holdout"
    assert {k: v["rows"] for k, v in report["protocol"]["batches"].items()} == HELD
    assert {k.split("/")[1] for k in scores if k.startswith("val_loss/")} == set(HELD)
    assert all(np.isfinite(v) for v in scores.values())


def test_evals_run_in_training_on_their_schedule_and_offline_give_the_same_numbers(chain):
    work = chain["work"]
    trained, offline = work / "eval_in_training", work / "eval"
    # tiny: val_loss every 2 steps, reconstruction and fd every 4.
    assert sorted(p.name for p in (trained / "2").glob("*.json")) == ["val_loss.json"]
    names = ["fd.json", "reconstruction.json", "val_loss.json"]
    assert sorted(p.name for p in (trained / str(STEPS)).glob("*.json")) == names
    assert sorted(p.name for p in (offline / str(STEPS)).glob("*.json")) == names
    rows: dict[int, dict] = {}  # step -> every metric written at it
    for m in metrics_lib.read_metrics(work):
        rows.setdefault(m["step"], {}).update(m)
    for name in names:
        a = json.loads((trained / str(STEPS) / name).read_text())
        b = json.loads((offline / str(STEPS) / name).read_text())
        assert a["scores"] == b["scores"] and a["protocol"] == b["protocol"], name
        assert a["weights"] == b["weights"] and a["checkpoint_step"] == b["checkpoint_step"]
        assert a["protocol"].get("reference", a["protocol"].get("split")) == "holdout"
        logged = {k: v for k, v in rows[STEPS].items() if k.startswith(f"eval/{a['name']}/")}
        assert logged == evaluators.scalars(a["name"], a) and logged, name
    assert a["weights"] == "ema 0.99"  # val_loss: the EMA weights, as sample.ema_decay says
    fd = json.loads((offline / str(STEPS) / "fd.json").read_text())
    assert fd["scores"]["n"] == sum(HELD.values()) and np.isfinite(fd["scores"]["fd_random_conv"])
    assert [k for k in rows[2] if k.startswith("eval/")] and not [
        k for k in rows[2] if k.startswith(("eval/fd/", "eval/reconstruction/"))
    ]
    assert "perf/eval_s" in rows[STEPS]  # evaluation time is reported, not training time


def test_offline_evaluation_on_the_held_out_clips(chain, tmp_path):
    media, work = chain["media"], chain["work"]
    config = _config(media, work)
    options = requests_lib.SampleOptions.from_config(config.sample, num_steps=2)
    config.evaluate.type = "reconstruction"  # the pixels tokenizer: lossless
    rec = evaluators.evaluate(config, work, options, eval_dir=tmp_path / "rec")
    assert rec["protocol"]["reference"] == "holdout" and rec["scores"]["n"] == sum(HELD.values())
    clips = rec["protocol"]["holdout_clips"]  # [bucket, input id, k], in input order
    assert sorted(b for b, _, _ in clips) == ["9x32x32", "9x32x32", "9x40x24"]
    assert rec["scores"]["psnr_min"] > 40
    config.evaluate.type = "fvd"
    fd = evaluators.evaluate(config, work, options, eval_dir=tmp_path / "fd")
    assert (
        fd["protocol"]["reference"] == "holdout" and fd["protocol"]["score_key"] == "fd_random_conv"
    )
    assert not [k for k in fd["scores"] if k.startswith("fvd")]  # random features: never FVD
    assert np.isfinite(fd["scores"]["fd_random_conv"]) and fd["scores"]["n"] == 3


def _config(media, work, **data) -> ml_collections.ConfigDict:
    c = config_lib.load_config(f"{ROOT}/{spec(media)}")
    c.data.prefetch = 0
    for k, v in data.items():
        c.data[k] = v
    return c


def test_strict_mode_keeps_the_errors(chain):
    media, work = chain["media"], chain["work"]
    strict = _config(media, work, strict_buckets=True)
    with pytest.raises(
        ValueError,
        match=r"bucket '1x16x16' has weight 1.0 but no records: remove it from the weights "
        r"or tokenize data for it",
    ):
        pipeline_lib.from_config(strict, work, data_parallel=1)
    sized = _config(media, work, strict_buckets=True, bucket_weights="size")
    with pytest.raises(
        ValueError,
        match=r"bucket '5x16x16' has 1 records, fewer than one global batch of 4 \(from "
        r"data.global_batch_size\), so every sample would be dropped",
    ):
        pipeline_lib.from_config(sized, work, data_parallel=1)
    # Without strict mode, a batch no bucket can fill names the field to change.
    big = _config(media, work, global_batch_size=8)
    with pytest.raises(ValueError, match=r"nothing to train on.*data.global_batch_size.* 6"):
        pipeline_lib.from_config(big, work, data_parallel=1)
