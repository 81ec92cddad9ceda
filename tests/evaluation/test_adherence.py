"""Prompt adherence from pixels: ground-truth clips measure back as their captions say
(colour, direction, shape, speed), clips of another shape or speed do not, shuffled
captions score near chance, and unreadable videos never match. The wrap measure reads
wrapping clips back (objects straddling an edge included) and gives the straight
measure's words on straight videos."""

import dataclasses

import numpy as np
import pytest

from sora_jax import video_io
from sora_jax.data import synthetic
from sora_jax.evaluation import adherence


def _clips(n, shape, seed=0):
    items = [synthetic.synthetic_clip(i, seed, *shape) for i in range(n)]
    return [c["video"] for c in items], [c["caption"] for c in items]


KEYS = ("colour", "direction", "shape", "speed", "both", "all")


@pytest.mark.parametrize(
    "shape", [(9, 16, 16), (9, 32, 32), (5, 24, 40), (17, 32, 32), (5, 12, 12)]
)
def test_ground_truth_clips_score_perfectly(shape):
    videos, captions = _clips(200, shape)
    result = adherence.score(videos, captions)
    assert result["n"] == 200
    assert [result[k] for k in KEYS] == [1.0] * 6, [
        r for r in result["per_video"] if not r["all_match"]
    ][:5]
    # The same holds through uint8, the format of decoded files.
    uint8 = adherence.score([video_io.to_uint8(v) for v in videos], captions)
    assert uint8["all"] == 1.0


def _centred(spec, speed):
    """`spec` at `speed`, its path centred along the motion so any speed fits the frame."""
    ux, uy = synthetic.DIRECTION_VECTORS[spec.direction]
    d = synthetic.SPEEDS[speed]
    start = tuple(0.5 - u * d / 2 if u else s for u, s in zip((ux, uy), spec.start, strict=True))
    return dataclasses.replace(spec, speed=speed, start=start)


@pytest.mark.parametrize("size", [(9, 16, 16), (9, 32, 32)])
def test_clips_of_another_shape_or_speed_score_zero_on_it(size):
    specs = [synthetic.clip_spec(i, seed=1) for i in range(90)]
    captions = [s.caption for s in specs]
    shapes = synthetic.SHAPES
    other_shape = [
        synthetic.render(
            dataclasses.replace(s, shape=shapes[(shapes.index(s.shape) + 1) % 3]), *size
        )
        for s in specs
    ]
    result = adherence.score(other_shape, captions)
    assert result["shape"] == 0.0 and result["all"] == 0.0
    assert (result["colour"], result["direction"], result["speed"]) == (1.0, 1.0, 1.0)
    flip = {"slowly": "quickly", "quickly": "slowly"}
    right = [synthetic.render(_centred(s, s.speed), *size) for s in specs]
    wrong = [synthetic.render(_centred(s, flip[s.speed]), *size) for s in specs]
    assert adherence.score(right, captions)["all"] == 1.0  # centring keeps the caption true
    result = adherence.score(wrong, captions)
    assert result["speed"] == 0.0 and result["all"] == 0.0
    assert (result["colour"], result["direction"], result["shape"]) == (1.0, 1.0, 1.0)
    # The measured travel is the caption's unit: fraction of the frame, first to last frame.
    for s, r in zip(specs, adherence.score(right, captions)["per_video"], strict=True):
        assert r["travel"] == pytest.approx(synthetic.SPEEDS[s.speed], abs=0.04)


def test_every_colour_and_direction_measures_back():
    for colour in synthetic.COLOURS:
        for direction in synthetic.DIRECTIONS:
            for shape in synthetic.SHAPES:
                ux, uy = synthetic.DIRECTION_VECTORS[direction]
                start = (0.5 - ux * 0.14, 0.5 - uy * 0.14)
                spec = synthetic.ClipSpec(colour, shape, direction, "slowly", 0.3, start)
                got = adherence.measure(synthetic.render(spec, 9, 16, 16))
                words = {k: got[k] for k in adherence.ATTRIBUTES}
                assert words == dict(
                    colour=colour, direction=direction, shape=shape, speed="slowly"
                ), spec


def test_shuffled_captions_score_near_chance():
    videos, captions = _clips(600, (9, 16, 16))
    shuffled = list(np.random.default_rng(0).permutation(captions))
    result = adherence.score(videos, shuffled)
    # Chance is 1/6, 1/4, 1/24; with n=600 the std of an accuracy is <= 0.018.
    assert abs(result["colour"] - result["chance_colour"]) < 0.06
    assert abs(result["direction"] - result["chance_direction"]) < 0.07
    assert abs(result["shape"] - result["chance_shape"]) < 0.07
    assert abs(result["speed"] - result["chance_speed"]) < 0.08
    assert result["both"] < 0.1 and result["all"] < 0.03
    assert result["chance_both"] == pytest.approx(1 / 24)
    assert result["chance_all"] == pytest.approx(1 / 144)


def test_unreadable_videos_never_match():
    black = -np.ones((9, 16, 16, 3), np.float32)
    assert set(adherence.measure(black).values()) == {None}
    spec = synthetic.clip_spec(0)
    static = np.repeat(synthetic.render(spec, 1, 16, 16), 9, axis=0)
    got = adherence.measure(static)
    assert (got["colour"], got["shape"]) == (spec.colour, spec.shape)
    assert got["direction"] is None and got["speed"] is None and got["travel"] < 1e-6
    image = synthetic.render(spec, 1, 16, 16)
    assert adherence.measure(image)["direction"] is None
    assert adherence.measure(image)["speed"] is None
    result = adherence.score([black, static], [spec.caption, spec.caption])
    assert result["colour"] == 0.5 and result["direction"] == 0.0 and result["both"] == 0.0
    assert result["shape"] == 0.5 and result["speed"] == 0.0 and result["all"] == 0.0
    assert result["nonfinite_videos"] == 0
    diverged = synthetic.render(spec, 9, 16, 16)
    diverged[4:] = np.nan
    result = adherence.score([diverged], [spec.caption])
    assert result["nonfinite_videos"] == 1 and result["direction"] == 0.0
    assert result["per_video"][0]["nonfinite_values"] == 5 * 16 * 16 * 3


def test_dim_colour_reads_by_hue_and_noise_below_threshold_is_background():
    spec = synthetic.ClipSpec("cyan", "circle", "up", "quickly", 0.33, (0.4, 0.7))
    video = synthetic.render(spec, 9, 32, 32)
    # 60% cyan, (0, 0.6, 0.6) in [0, 1] units, is nearer to blue (0, 0.35, 1) than to cyan
    # in raw RGB; dividing by the brightest channel recovers the hue.
    dim = 0.6 * (video + 1) - 1
    noise = np.random.default_rng(0).uniform(-1, -0.2, video.shape).astype(np.float32)
    noisy = np.maximum(dim, noise)  # background noise stays below 0.4 in [0, 1] units
    got = adherence.measure(noisy)
    assert (got["colour"], got["direction"]) == ("cyan", "up")


def test_score_validates_its_inputs():
    videos, captions = _clips(2, (9, 16, 16))
    with pytest.raises(ValueError, match="2 videos for 1 captions"):
        adherence.score(videos, captions[:1])
    with pytest.raises(ValueError, match="no videos"):
        adherence.score([], [])
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        adherence.score(videos[:1], ["a purple square moving left slowly"])
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        adherence.measure(videos[0][0])


def _wrap_clips(n, shape, seed=0):
    items = [synthetic.synthetic_clip(i, seed, *shape, motion="wrap") for i in range(n)]
    return [c["video"] for c in items], [c["caption"] for c in items]


@pytest.mark.parametrize("shape", [(5, 16, 16), (9, 32, 32), (20, 16, 16), (5, 24, 40)])
def test_wrapping_clips_read_back_with_the_wrap_measure(shape):
    videos, captions = _wrap_clips(120, shape)
    result = adherence.score(videos, captions, motion="wrap")
    assert [result[k] for k in KEYS] == [1.0] * 6, [
        r for r in result["per_video"] if not r["all_match"]
    ][:5]
    assert adherence.score([video_io.to_uint8(v) for v in videos], captions, "wrap")["all"] == 1
    for r in result["per_video"]:
        want = synthetic.SPEEDS[synthetic.parse_caption(r["caption"])["speed"]]
        assert r["travel"] == pytest.approx(want, abs=0.04)
    # The straight measure is fooled by the objects that cross an edge.
    assert adherence.score(videos, captions)["all"] < 0.9


def test_objects_straddling_the_edge_read_back_in_every_direction():
    """Paths centred on the edge: the object is split across it mid-clip (and on the
    first and last frames too at 'slowly')."""
    for direction in synthetic.DIRECTIONS:
        for shape in synthetic.SHAPES:
            for speed in synthetic.SPEEDS:
                ux, uy = synthetic.DIRECTION_VECTORS[direction]
                d = synthetic.SPEEDS[speed] / 2  # from -d to +d about the edge
                start = (np.mod(-ux * d, 1.0) if ux else 0.4, np.mod(-uy * d, 1.0) if uy else 0.6)
                spec = synthetic.ClipSpec("red", shape, direction, speed, 0.34, start, "wrap")
                cov = synthetic.coverage(spec, 9, 16, 16)
                lo, hi = (cov[:, :, 0], cov[:, :, -1]) if ux else (cov[:, 0], cov[:, -1])
                split = (lo.max(-1) > 0) & (hi.max(-1) > 0)  # [T]
                assert split[4] and split.sum() >= (9 if speed == "slowly" else 3), split
                video = synthetic.render(spec, 9, 16, 16)
                got = adherence.measure(video, "wrap")
                assert (got["direction"], got["shape"], got["speed"]) == (direction, shape, speed)
                reverse = adherence.measure(video[::-1], "wrap")
                assert reverse["direction"] != direction
                assert adherence.measure(video)["direction"] != direction  # straight is fooled


@pytest.mark.parametrize("shape", [(9, 16, 16), (5, 24, 40)])
def test_wrap_measure_equals_the_straight_measure_on_straight_videos(shape):
    """On objects that never cross an edge the two measures give the same words, for
    ground truth, wrong shapes and speeds, dim and noisy videos, and static ones."""
    specs = [synthetic.clip_spec(i, seed=4) for i in range(60)]
    flip = {"slowly": "quickly", "quickly": "slowly"}
    shapes = synthetic.SHAPES
    rng = np.random.default_rng(0)
    for i, s in enumerate(specs):
        videos = [
            synthetic.render(s, *shape),
            synthetic.render(_centred(s, flip[s.speed]), *shape),
            synthetic.render(dataclasses.replace(s, shape=shapes[(i + 1) % 3]), *shape),
            np.repeat(synthetic.render(s, 1, *shape[1:]), shape[0], axis=0),
        ]
        # Dim, on background noise below SHAPE_THRESHOLD (0.25 in [0, 1] units).
        noisy = np.maximum(0.7 * (videos[0] + 1) - 1, rng.uniform(-1, -0.55, videos[0].shape))
        for video in [*videos, noisy.astype(np.float32)]:
            straight, wrap = adherence.measure(video), adherence.measure(video, "wrap")
            words = [straight[k] for k in adherence.ATTRIBUTES]
            assert words == [wrap[k] for k in adherence.ATTRIBUTES], (s, straight, wrap)
            if straight["travel"] is not None:
                assert wrap["travel"] == pytest.approx(straight["travel"], abs=0.02)
    with pytest.raises(ValueError, match="adherence.measure\\(motion\\)='bounce'"):
        adherence.measure(videos[0], "bounce")
