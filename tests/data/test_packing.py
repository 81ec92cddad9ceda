"""The packer (sora_jax.data.packing): deterministic rows within the token budget, every
clip exactly once per epoch, tokens/segment ids/positions that match each clip's own
latents, a restart at any step and any process split giving identical rows, and the
padding fraction the report states."""

from __future__ import annotations

import numpy as np
import pytest

from sora_jax.data import native, packing, shards

PATCH = (1, 2, 2)
# latent shapes [T', H', W'] (C = 2): three aspect ratios, three durations, two sizes
SHAPES = [(1, 4, 4), (2, 4, 6), (3, 6, 4), (1, 2, 2), (2, 2, 4), (3, 4, 4), (1, 6, 6)]


def clip_latents(i: int, shape) -> np.ndarray:
    """Values that say where they are: clip, frame, row, column, channel (exact in float16)."""
    t, h, w = shape
    grid = np.mgrid[0:t, 0:h, 0:w, 0:2]
    return (i * 512 + grid[0] * 128 + grid[1] * 16 + grid[2] * 2 + grid[3]).astype(np.float16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A hand-written native dataset of 40 clips in two shard files."""
    out = tmp_path_factory.mktemp("packed")
    files, shapes = [], {}
    for unit in range(2):
        name = str(shards.shard_path(out, native.SHARD, unit).relative_to(out))
        files.append(name)
        shapes[name] = []
        with shards.ShardWriter(out, native.SHARD, unit) as writer:
            for k in range(20):
                i = unit * 20 + k
                shape = SHAPES[(i * 5) % len(SHAPES)]
                writer.write(
                    {
                        "latents": clip_latents(i, shape),
                        "text": np.full((4, 3), i, np.float32),
                        "text_mask": np.arange(4) < 1 + i % 4,
                        "caption": f"clip {i}",
                        "shape": np.asarray(shape, np.int32),
                    }
                )
                shapes[name].append(list(shape))
    manifest = {
        "mode": "native",
        "buckets": {},
        "text_encoder": {"embed": "tokenize"},
        "native": {"files": files, "shapes": shapes, "count": 40},
    }
    shards.write_manifest(out, manifest, schema_version=shards.NATIVE_SCHEMA_VERSION)
    return out


def tokens_of(shape) -> int:
    return int(np.prod(np.asarray(shape) // np.asarray(PATCH)))


OPTIONS = packing.PackingOptions(tokens_per_row=24, rows_per_batch=4, window=16, max_segments=6)


def test_plans_are_deterministic_complete_and_within_budget():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 25, size=300)
    a = packing.PackPlan(tokens, 7, OPTIONS)
    b = packing.PackPlan(tokens, 7, OPTIONS)
    other = packing.PackPlan(tokens, 8, OPTIONS)
    for e in range(3):
        steps = a.steps_in_epoch(e)
        start = sum(a.steps_in_epoch(x) for x in range(e))
        rows = [r for s in range(start, start + steps) for r in a.batch(s)]
        assert [r.tolist() for r in rows] == [r.tolist() for r in b.epoch(e)] + [[]] * (
            len(rows) - len(b.epoch(e))
        )
        seen = np.concatenate(rows)
        assert sorted(seen.tolist()) == list(range(300))  # every clip exactly once
        assert all(tokens[r].sum() <= 24 and len(r) <= 6 for r in rows)
        assert len(rows) - len(a.epoch(e)) < OPTIONS.rows_per_batch  # filler: last batch only
    assert [r.tolist() for r in a.epoch(0)] != [r.tolist() for r in other.epoch(0)]
    assert [r.tolist() for r in a.epoch(0)] != [r.tolist() for r in a.epoch(1)]


def test_padding_fraction_is_what_the_rows_leave_empty():
    tokens = np.random.default_rng(1).integers(1, 25, size=500)
    wide = packing.PackingOptions(24, 4, window=128, max_segments=6)
    plan = packing.PackPlan(tokens, 0, wide)
    report = plan.report(0)
    steps = report["steps"]
    empty = sum(24 - tokens[r].sum() for s in range(steps) for r in plan.batch(s))
    assert report["padding_fraction"] == pytest.approx(empty / (steps * 4 * 24))
    assert report["padding_fraction"] < 0.05  # first-fit decreasing over windows of 128
    # next-fit in shuffled order (no packing) would waste far more on these sizes
    free, rows = 0, 0
    for n in tokens[np.random.default_rng(0).permutation(500)]:
        if n > free:
            rows, free = rows + 1, 24
        free -= n
    assert report["padding_fraction"] < 1 - tokens.sum() / (rows * 24) - 0.1


def test_clips_longer_than_a_row_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="tokens_per_row=24"):
        packing.PackPlan([3, 30], 0, OPTIONS)


def test_rows_hold_each_clips_own_tokens_positions_and_caption(dataset):
    pipe = packing.PackedPipeline(dataset, OPTIONS, patch_size=PATCH, seed=3)
    seen = []
    for step in range(pipe.plan.steps_in_epoch(0)):
        batch = pipe.batch(step)
        assert batch["tokens"].shape == (4, 24, 8) and batch["segment_ids"].shape == (4, 24)
        for r in range(4):
            ids, pos = batch["segment_ids"][r], batch["positions"][r]
            k = int(ids.max())
            # segments are contiguous, numbered 1..k, padding (0) only at the end
            assert ids.tolist() == sorted(ids[ids > 0].tolist()) + [0] * int((ids == 0).sum())
            for j in range(k):
                i = int(batch["clip_index"][r, j])
                seen.append(i)
                shape = SHAPES[(i * 5) % len(SHAPES)]
                grid = np.asarray(shape) // np.asarray(PATCH)
                assert batch["segment_shapes"][r, j].tolist() == grid.tolist()
                mine = ids == j + 1
                assert mine.sum() == tokens_of(shape)
                lat = clip_latents(i, shape).astype(np.float32)
                for tok, (t, h, w) in zip(batch["tokens"][r][mine], pos[mine], strict=True):
                    block = lat[t, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]  # the patch
                    np.testing.assert_array_equal(tok, block.reshape(-1))
                assert batch["captions"][r][j] == f"clip {i}"
                assert (batch["text"][r, j] == i).all()
                assert batch["text_mask"][r, j].sum() == 1 + i % 4
            assert (batch["tokens"][r][ids == 0] == 0).all()
            assert (batch["clip_index"][r, k:] == -1).all()
    assert sorted(seen) == list(range(40))


def test_restart_at_a_step_and_another_process_count_give_identical_rows(dataset):
    def run(pipe, steps):
        return [next(pipe) for _ in range(steps)]

    whole = packing.PackedPipeline(dataset, OPTIONS, patch_size=PATCH, seed=3)
    first = run(whole, 9)  # crosses an epoch boundary (about 4 steps per epoch)
    assert whole.plan.steps_in_epoch(0) < 9
    state = packing.PackedPipeline(dataset, OPTIONS, patch_size=PATCH, seed=3)
    run(state, 5)
    saved = state.get_state()
    resumed = packing.PackedPipeline(dataset, OPTIONS, patch_size=PATCH, seed=3)
    resumed.set_state(saved)
    for a, b in zip(first[5:], run(resumed, 4), strict=True):
        for key in ("tokens", "segment_ids", "positions", "clip_index", "text"):
            np.testing.assert_array_equal(a[key], b[key])
    halves = [
        packing.PackedPipeline(
            dataset, OPTIONS, patch_size=PATCH, seed=3, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for p in halves:
        p.set_state(saved)
    for a, b0, b1 in zip(first[5:], run(halves[0], 4), run(halves[1], 4), strict=True):
        np.testing.assert_array_equal(a["tokens"], np.concatenate([b0["tokens"], b1["tokens"]]))
        assert a["captions"] == b0["captions"] + b1["captions"]
    other = packing.PackedPipeline(dataset, OPTIONS, patch_size=PATCH, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(saved)
