"""Long videos end to end on a tiny causal run (experiments/demo.py:tiny,causal, 4 steps):
`sora_jax.sample` rolls it out to twice its trained length, the temporal_consistency
evaluator scores such videos per segment, and a full-attention run continues itself."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.data import tokenization
from sora_jax.evaluation import adherence, evaluators, generate, long_video
from sora_jax.evaluation import requests as requests_lib
from sora_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    config = config_lib.load_config(f"{ROOT}/experiments/demo.py:tiny,causal")
    config.total_steps = 4
    config.checkpoint_every_steps = 4
    config.data.source.num_clips = 32
    config.sample.num_steps = 2
    config.evaluate.num_videos = 2
    work = tmp_path_factory.mktemp("causal_run") / "run"
    tokenization.run(config, work)
    loop.train(config, work)
    return work, config


def test_sample_cli_rolls_out_beyond_the_trained_length(causal_run, tmp_path):
    work, _ = causal_run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sora_jax.sample", "--config=experiments/demo.py:tiny,causal"]
    cmd += [f"--workdir={work}", "--num_frames=10"]
    cmd += ["--prompt=a red circle moving up quickly", f"--output={out}", "--steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    (video,) = summary["videos"]
    sidecar = json.loads((out / video.split("/")[-1]).with_suffix(".json").read_text())
    assert sidecar["sampler"] == "rollout" and sidecar["shape"] == [10, 16, 16, 3]
    assert sidecar["rollout_window"] == 4  # the demo's: W + 1 chunks fill a 5-frame clip


def test_temporal_consistency_scores_segments(causal_run, monkeypatch):
    """Scored per segment, with the measure of the run's data: a run whose
    `data.source.motion` is 'wrap' is read on the torus by both adherence evaluators."""
    work, config = causal_run
    config = config.copy_and_resolve_references()
    config.evaluate.type = "temporal_consistency"
    config.evaluate.long_frames = 10
    config.data.source.motion = "wrap"
    motions = []
    measure = adherence.measure
    monkeypatch.setattr(
        adherence, "measure", lambda v, m="straight": motions.append(m) or measure(v, m)
    )
    options = requests_lib.SampleOptions.from_config(config.sample)
    report = evaluators.evaluate(config, work, options, ema_decay=0.0)
    scores = report["scores"]
    assert scores["n"] == 2 and scores["segments"] == 2 and len(scores["per_segment"]) == 2
    assert report["protocol"]["generation"].startswith("KV-cache rollout")
    assert report["protocol"]["motion"] == "wrap" and motions == ["wrap"] * 4  # 2 x 2 segments
    config.evaluate.type = "prompt_adherence"
    report = evaluators.evaluate(config, work, options, ema_decay=0.0)
    assert report["protocol"]["motion"] == "wrap" and motions == ["wrap"] * 6


def test_continuation_videos_of_a_full_attention_run(causal_run):
    """The sliding-window baseline: the first clip from text, then clips given the last k
    frames, cut to the requested length."""
    work, config = causal_run
    config = config.copy_and_resolve_references()
    config.model.causal_chunk_frames = 0  # the same weights as a full-attention model
    gen = generate.Generator.from_workdir(work, config)
    options = requests_lib.SampleOptions.from_config(config.sample)
    video, _ = long_video.continuation_videos(gen, ["a red circle moving up quickly"], options, 11)
    assert video.shape == (1, 11, 16, 16, 3) and np.isfinite(video).all()
