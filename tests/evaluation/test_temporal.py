"""Temporal consistency (sora_jax/evaluation/temporal.py): ground-truth long clips are
steady and adhere in every segment; a colour change, a fade to black and rising noise are
each caught by the measure meant for them; the evaluator is registered."""

import numpy as np
import pytest

from sora_jax.data import synthetic
from sora_jax.evaluation import evaluators, temporal


def _clip(index=0, frames=20, size=16):
    clip = synthetic.synthetic_clip(index, seed=3, num_frames=frames, height=size, width=size)
    return clip["video"], clip["caption"]  # uint8 [T, H, W, 3]


def test_ground_truth_long_clips_are_steady_and_adhere_in_every_segment():
    records = [temporal.record(*_clip(i), segment=5) for i in range(6)]
    for r in records:
        assert r["segments"] == 4
        assert r["colour_drift_max"] < 0.05 and r["histogram_drift_max"] < 0.05
        assert 0.5 < r["flicker_ratio"] < 2.0
    summary = temporal.summarize(records)
    for segment in summary["per_segment"]:
        assert segment["colour"] == 1.0 and segment["direction"] == 1.0
    assert summary["max_drop_colour"] == 0.0 and summary["max_drop_direction"] == 0.0


def test_drift_is_caught():
    video, caption = _clip(0)
    recoloured = video.copy()
    recoloured[10:] = np.roll(recoloured[10:], 1, axis=-1)  # RGB -> BRG halfway: a new hue
    r = temporal.record(recoloured, caption, segment=5)
    assert r["colour_drift"] > 0.2 and r["histogram_drift"] > 0.02
    assert [m["colour"] for m in r["segment_matches"]] == [True, True, False, False]
    faded = (video * np.linspace(1, 0, 20)[:, None, None, None]).astype(np.uint8)
    assert temporal.measure(faded, 5)["colour_drift"] > temporal.measure(video, 5)["colour_drift"]
    noisy = video.astype(np.float32) / 127.5 - 1
    noisy[15:] += np.random.default_rng(0).normal(0, 0.5, noisy[15:].shape)
    assert temporal.measure(noisy, 5)["flicker_ratio"] > 3


def test_segments_and_errors():
    video, _ = _clip(0, frames=12)
    assert [len(s) for s in temporal.segments(video, 5)] == [5, 5]  # the partial one dropped
    with pytest.raises(ValueError, match="no 20-frame segment"):
        temporal.measure(video, 20)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        temporal.measure(video[..., 0], 5)
    assert np.isnan(temporal.measure(np.zeros((10, 4, 4, 3), np.uint8), 5)["flicker_ratio"])
    assert "temporal_consistency" in evaluators.EVALUATORS


def test_wrapping_long_clips_adhere_in_every_segment_with_the_wrap_measure():
    """Ground-truth 20-frame wrapping clips keep direction in every segment when read on
    the torus; read straight, segments where the object crosses an edge are lost."""
    clips = [synthetic.synthetic_clip(i, 3, 20, 16, 16, motion="wrap") for i in range(24)]
    wrap = temporal.summarize([temporal.record(c["video"], c["caption"], 5, "wrap") for c in clips])
    for segment in wrap["per_segment"]:
        assert segment["colour"] == segment["direction"] == 1.0
    assert wrap["max_drop_direction"] == 0.0
    straight = temporal.summarize([temporal.record(c["video"], c["caption"], 5) for c in clips])
    assert min(s["direction"] for s in straight["per_segment"]) < 0.9
