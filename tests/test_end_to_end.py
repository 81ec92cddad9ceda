"""The tiny demo config through every real entry point: tokenize → train → sample →
evaluate, each as its own process, as a user would run them."""

import json
import os
import pathlib
import subprocess
import sys

import av
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = "--config=experiments/demo.py:tiny"


def run(module, workdir, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", f"sora_jax.{module}", CONFIG, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_tiny_pipeline_end_to_end(tmp_path):
    work = tmp_path / "run"
    out = run("tokenize", work)
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["buckets"]["5x16x16"]["count"] == 256
    assert manifest["buckets"]["5x16x16"]["shape"] == [5, 8, 8, 12]
    assert json.loads(out.strip().splitlines()[-1])["clips_per_bucket"] == {"5x16x16": 256}

    run("train", work)
    for name in ("config.json", "command.txt", "env.json", "metrics.jsonl"):
        assert (work / name).is_file(), name
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40]
    assert all(np.isfinite(m["train/loss"]) for m in metrics)
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]
    assert (work / "checkpoints" / "40").is_dir()

    # Re-running resumes at the final step and trains nothing more.
    run("train", work)
    again = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert again == metrics

    out = run("sample", work, "--prompt=a red circle moving up quickly", "--steps=4")
    summary = json.loads(out[out.index("{") :])
    (video_path,) = summary["videos"]
    with av.open(video_path) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 5
    scale = 16  # sample.video_scale of the demo config
    assert frames[0].shape == (16 * scale, 16 * scale, 3)
    sidecar = json.loads(pathlib.Path(video_path).with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red circle moving up quickly"
    assert sidecar["num_steps"] == 4 and sidecar["step"] == 40

    out = run("evaluate", work)
    result = json.loads(out.strip().splitlines()[-1])
    report = json.loads((work / "eval" / "40.json").read_text())
    assert result["n"] == report["scores"]["n"] == 8
    assert 0.0 <= report["scores"]["both"] <= 1.0
    assert report["protocol"]["sampling"]["num_steps"] == 8

    # The validation-loss evaluator: the trainer eval hook's numbers, from the entry point.
    out = run("evaluate", work, "--config.evaluate.type=val_loss")
    report = json.loads((work / "eval" / "40.json").read_text())
    assert report["type"] == "val_loss"
    assert np.isfinite(report["scores"]["val_loss/5x16x16"])
    assert "val_loss_t=0.5/5x16x16" in report["scores"]
