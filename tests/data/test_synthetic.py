"""Synthetic captioned clips: captions parse back, rendering is deterministic, the object
stays inside the frame, and it travels the distance its speed word promises; wrapping
clips equal a 3 x 3 tiled straight render folded onto the frame (exact on the torus)."""

import dataclasses
import itertools
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.data import buckets, sources, synthetic, tokenization

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_caption_round_trip_over_every_attribute_combination():
    for colour, shape, direction, speed in itertools.product(
        synthetic.COLOURS, synthetic.SHAPES, synthetic.DIRECTIONS, synthetic.SPEEDS
    ):
        spec = synthetic.ClipSpec(colour, shape, direction, speed, 0.3, (0.5, 0.5))
        assert synthetic.parse_caption(spec.caption) == dict(
            colour=colour, shape=shape, direction=direction, speed=speed
        )
    assert synthetic.parse_caption("a red square moving left slowly")["colour"] == "red"


@pytest.mark.parametrize(
    "caption, message",
    [
        ("a purple square moving left slowly", "unknown colour 'purple'"),
        ("a red hexagon moving left slowly", "unknown shape 'hexagon'"),
        ("a red square moving sideways slowly", "unknown direction 'sideways'"),
        ("a red square moving left fast", "unknown speed 'fast'"),
        ("red square left", "does not read"),
    ],
)
def test_parse_caption_errors_name_the_caption_and_allowed_words(caption, message):
    with pytest.raises(ValueError, match=message) as info:
        synthetic.parse_caption(caption)
    assert repr(caption) in str(info.value)
    if "unknown colour" in message:
        assert "magenta" in str(info.value)  # the allowed words are listed


def test_clip_spec_is_deterministic_and_covers_the_vocabulary():
    specs = [synthetic.clip_spec(i, seed=0) for i in range(600)]
    assert specs == [synthetic.clip_spec(i, seed=0) for i in range(600)]
    assert specs[:50] != [synthetic.clip_spec(i, seed=1) for i in range(50)]
    for field, vocab in [
        ("colour", synthetic.COLOURS),
        ("shape", synthetic.SHAPES),
        ("direction", synthetic.DIRECTIONS),
        ("speed", synthetic.SPEEDS),
    ]:
        counts = {w: sum(getattr(s, field) == w for s in specs) for w in vocab}
        # Uniform: each word within 40% of its expected count over 600 draws.
        expected = len(specs) / len(vocab)
        assert all(abs(c - expected) < 0.4 * expected for c in counts.values()), (field, counts)
    assert all(synthetic.MIN_SIZE <= s.size <= synthetic.MAX_SIZE for s in specs)


def test_render_is_deterministic_and_clips_differ():
    a = synthetic.synthetic_clip(7, 3, 9, 32, 32)
    b = synthetic.synthetic_clip(7, 3, 9, 32, 32)
    c = synthetic.synthetic_clip(8, 3, 9, 32, 32)
    np.testing.assert_array_equal(a["video"], b["video"])
    assert not np.array_equal(a["video"], c["video"])
    assert a["source_id"] == "synthetic/3/7"
    assert a["caption"] == synthetic.clip_spec(7, 3).caption
    assert a["fps"] == 8.0  # 9 frames span CLIP_SECONDS = 1 s
    assert a["attributes"]["colour"] in a["caption"]


@pytest.mark.parametrize("shape", [(9, 16, 16), (9, 32, 32), (5, 24, 40), (9, 40, 24), (1, 32, 32)])
def test_render_range_colour_and_object_stays_in_frame(shape):
    num_frames, height, width = shape
    for i in range(60):
        spec = synthetic.clip_spec(i, seed=5)
        video = synthetic.render(spec, num_frames, height, width)
        assert video.shape == (num_frames, height, width, 3) and video.dtype == np.float32
        assert video.min() >= -1.0 and video.max() <= 1.0
        cov = synthetic.coverage(spec, num_frames, height, width)  # [T, H, W]
        # Every pixel is a blend of black and the caption's colour.
        rgb = np.asarray(synthetic.COLOURS[spec.colour], np.float32)
        np.testing.assert_allclose(video, cov[..., None] * 2 * rgb - 1, atol=1e-6)
        # Fully inside on every frame: the rendered area is the same on every frame (to the
        # supersampling error) and, from 24 px up, the MARGIN keeps the border empty.
        mass = cov.sum(axis=(1, 2))
        assert np.ptp(mass) <= 0.06 * mass.mean(), (spec, mass)
        if min(height, width) >= 24:
            border = np.concatenate([cov[:, 0], cov[:, -1], cov[:, :, 0], cov[:, :, -1]], 1)
            assert border.max() == 0, spec
        # The object is about size * min(H, W) across (area of a triangle is half).
        side = spec.size * min(height, width)
        factor = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[spec.shape]
        assert mass.mean() == pytest.approx(factor * side**2, rel=0.15)


def test_image_shows_the_start_position():
    spec = synthetic.clip_spec(3)
    image = synthetic.render(spec, 1, 32, 32)
    clip = synthetic.render(spec, 9, 32, 32)
    np.testing.assert_array_equal(image[0], clip[0])


def test_clips_start_on_the_side_they_move_away_from():
    """Along the motion the start is within START_JITTER of the trailing margin; across it
    the start spreads over the frame."""
    across = []
    for i in range(400):
        spec = synthetic.clip_spec(i)
        ux, uy = synthetic.DIRECTION_VECTORS[spec.direction]
        sign, along = (ux, spec.start[0]) if ux else (uy, spec.start[1])
        across.append(spec.start[1] if ux else spec.start[0])
        edge = synthetic.MARGIN + spec.size / 2  # nearest allowed centre to an edge
        trailing = edge if sign > 0 else 1.0 - edge
        assert abs(along - trailing) <= synthetic.START_JITTER + 1e-9, spec
    assert np.ptp(across) > 0.5  # free across the motion


@pytest.mark.parametrize("speed, lo", [("slowly", 0.25), ("quickly", 0.45)])
def test_displacement_is_measurable_and_in_the_caption_direction(speed, lo):
    for direction in synthetic.DIRECTIONS:
        # A path centred in the frame, so the largest object fits at either speed.
        ux, uy = synthetic.DIRECTION_VECTORS[direction]
        d = synthetic.SPEEDS[speed]
        start = (0.5 - ux * d / 2, 0.5 - uy * d / 2)
        spec = synthetic.ClipSpec("red", "square", direction, speed, 0.36, start)
        cov = synthetic.coverage(spec, 9, 32, 32)  # [T, H, W]
        centres = (np.arange(32) + 0.5) / 32  # pixel centres, fraction of the side
        cx = (cov.sum(1) * centres).sum(1) / cov.sum((1, 2))  # [T]
        cy = (cov.sum(2) * centres).sum(1) / cov.sum((1, 2))  # [T]
        along, across = (cx, cy) if ux else (cy, cx)
        sign = ux or uy
        assert sign * (along[-1] - along[0]) >= lo, (direction, along)
        assert np.ptp(across) < 0.01, (direction, across)  # straight line
        assert np.all(sign * np.diff(along) > 0)  # monotone: no bouncing, no wrap


def test_bad_render_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_frames=0"):
        synthetic.render(synthetic.clip_spec(0), 0, 32, 32)
    with pytest.raises(ValueError, match="must be >= 0"):
        synthetic.clip_spec(-1)


def _torus_reference(spec, num_frames, height, width):
    """Coverage of a wrapping clip from straight renders only: each frame's object drawn
    (as an image, same size in pixels) in the middle tile of a 3 x 3 canvas of frames and
    the tiles summed."""
    frames = []
    for cx, cy in spec.centres(num_frames):  # on the torus, in [0, 1)
        start = ((1 + cx) / 3, (1 + cy) / 3)
        still = dataclasses.replace(spec, motion="straight", start=start, size=spec.size / 3)
        big = synthetic.coverage(still, 1, 3 * height, 3 * width)[0]  # [3H, 3W]
        frames.append(big.reshape(3, height, 3, width).sum(axis=(0, 2)))
    return np.stack(frames)


@pytest.mark.parametrize("shape", [(5, 16, 16), (20, 16, 16), (9, 24, 40)])
def test_wrapping_clips_are_exact_on_the_torus_and_keep_the_straight_attributes(shape):
    straddled = 0
    for i in range(40):
        spec = synthetic.clip_spec(i, seed=2, motion="wrap")
        straight = synthetic.clip_spec(i, seed=2)
        assert spec == synthetic.clip_spec(i, seed=2, motion="wrap")  # deterministic
        # Same draws: only the start along the motion differs.
        assert dataclasses.replace(straight, motion="wrap", start=spec.start) == spec
        ux, _ = synthetic.DIRECTION_VECTORS[spec.direction]
        assert spec.start[1 if ux else 0] == straight.start[1 if ux else 0]
        cov = synthetic.coverage(spec, *shape)
        np.testing.assert_allclose(cov, _torus_reference(spec, *shape), atol=1e-6)
        # The object never leaves: the same area on every frame, wrapped pieces included.
        mass = cov.sum(axis=(1, 2))
        assert np.ptp(mass) <= 0.06 * mass.mean(), (spec, mass)
        # Straddling: some frame covers both edges across the motion axis.
        first, last = (cov[:, :, 0], cov[:, :, -1]) if ux else (cov[:, 0], cov[:, -1])
        straddled += int(((first.max(1) > 0) & (last.max(1) > 0)).any())
    assert straddled >= 5  # the set shows objects across the edge


def test_wrapping_starts_spread_along_the_motion_and_motion_is_validated():
    along = []
    for i in range(400):
        spec = synthetic.clip_spec(i, motion="wrap")
        ux, _ = synthetic.DIRECTION_VECTORS[spec.direction]
        along.append(spec.start[0] if ux else spec.start[1])
    assert min(along) < 0.05 and max(along) > 0.95  # anywhere, not only the trailing side
    clip = synthetic.synthetic_clip(7, 3, 9, 16, 16, motion="wrap")
    assert clip["caption"] == synthetic.synthetic_clip(7, 3, 9, 16, 16)["caption"]
    assert clip["attributes"]["motion"] == "wrap"
    with pytest.raises(ValueError, match="clip_spec\\(motion\\)='bounce'.*straight"):
        synthetic.clip_spec(0, motion="bounce")
    config = ml_collections.ConfigDict({"data": {"source": {"name": "synthetic"}}})
    assert synthetic.motion_of(config) == "straight"  # absent: the default
    config.data.source.motion = "bounce"
    with pytest.raises(ValueError, match="data.source.motion='bounce'"):
        synthetic.motion_of(config)
    # The source renders what `data.source.motion` says.
    bucket = buckets.Bucket("5x16x16", 5, 16, 16)
    source = sources.build_source(sources.source_config("synthetic", motion="wrap"), [bucket])
    np.testing.assert_array_equal(
        source.clips(7)[0].video, synthetic.synthetic_clip(7, 0, 5, 16, 16, "wrap")["video"]
    )
    with pytest.raises(ValueError, match="data.source.motion='bounce'"):
        sources.build_source(sources.source_config("synthetic", motion="bounce"), [bucket])


def test_tokenize_records_motion_only_when_it_wraps(tmp_path):
    """Datasets tokenized before the option (no `motion` in _units/job.json) resume under
    the default; a wrap config is refused on them, naming the source."""
    config = config_lib.load_config(f"{ROOT}/experiments/demo.py:tiny")
    config.data.source.num_clips = 8
    tokenization.run(config, tmp_path / "run")
    job = json.loads((tmp_path / "run/data/_units/job.json").read_text())
    assert "motion" not in job["source"]
    tokenization.run(config, tmp_path / "run")  # resumes: nothing differs
    config.data.source.motion = "wrap"
    with pytest.raises(ValueError, match="differs in \\['source'\\]"):
        tokenization.run(config, tmp_path / "run")
    tokenization.run(config, tmp_path / "wrap")
    job = json.loads((tmp_path / "wrap/data/_units/job.json").read_text())
    assert job["source"]["motion"] == "wrap"
