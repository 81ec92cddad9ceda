"""Bucket tables, assignment and fit geometry (sora_jax.data.buckets)."""

import math

import pytest

from sora_jax.data import buckets as B


def test_grid_rounds_sides_to_the_multiple_and_keeps_the_area():
    table = B.grid({"256px": 256}, {"1:1": 1.0, "16:9": 16 / 9}, (1, 17), multiple=16)
    assert set(table) == {"1x256x256", "17x256x256", "1x192x336", "17x192x336"}
    for spec in table.values():
        assert spec["height"] % 16 == 0 and spec["width"] % 16 == 0
        assert abs(spec["height"] * spec["width"] / 256**2 - 1) < 0.02


def _b(name, t, h, w, keep=1.0):
    return B.Bucket(name, t, h, w, keep_prob=keep)


BUCKETS = [
    _b("sq9", 9, 32, 32),
    _b("sq5", 5, 32, 32),
    _b("sq5s", 5, 16, 16),
    _b("wide9", 9, 24, 40),
    _b("tall9", 9, 40, 24),
    _b("img", 1, 32, 32),
]


@pytest.mark.parametrize(
    "frames,h,w,want",
    [
        (20, 100, 100, "sq9"),  # square: largest square bucket
        (6, 100, 100, "sq5"),  # too short for 9 frames
        (20, 90, 160, "wide9"),  # 16:9 -> the wide bucket
        (20, 160, 90, "tall9"),  # 9:16 -> the tall bucket
        (20, 17, 17, "sq5s"),  # too small for 32x32 without upscaling
        (1, 64, 64, "img"),  # an image
    ],
)
def test_assign_nearest_aspect_then_largest(frames, h, w, want):
    assert B.assign(frames, h, w, BUCKETS, key="x").name == want


def test_assign_none_when_nothing_fits_and_upscale_allows_more():
    assert B.assign(3, 8, 8, BUCKETS, key="x") is None
    assert B.assign(3, 8, 8, BUCKETS, key="x", max_upscale=4.0).name == "img"


def test_keep_prob_demotes_the_expected_fraction_deterministically():
    buckets = [_b("big", 9, 32, 32, keep=0.3), _b("small", 5, 32, 32)]
    picks = [B.assign(20, 64, 64, buckets, key=f"clip{i}").name for i in range(4000)]
    frac = picks.count("big") / len(picks)
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    again = [B.assign(20, 64, 64, buckets, key=f"clip{i}").name for i in range(4000)]
    assert picks == again
    # the smallest candidate always keeps
    assert B.assign(20, 64, 64, [_b("only", 9, 32, 32, keep=0.01)], key="z").name == "only"


@pytest.mark.parametrize("policy", B.FIT_POLICIES)
def test_fit_geometry(policy):
    b = _b("w", 9, 24, 40)
    g = B.fit_geometry(480, 853, b, policy)
    rh, rw = g.resize
    if policy == "crop":  # covers, centred
        assert rh >= 24 and rw >= 40 and min(rh - 24, rw - 40) == 0
        assert g.crop == ((rh - 24) // 2, (rw - 40) // 2)
    elif policy == "pad":  # fits inside, centred
        assert rh <= 24 and rw <= 40 and max(24 - rh, 40 - rw) >= 0
        assert g.pad == ((24 - rh) // 2, (40 - rw) // 2)
        assert abs(rw / rh - 853 / 480) < 0.1
    else:
        assert g.resize == (24, 40)


def test_bad_bucket_fields_are_named():
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(buckets={"a": dict(frames=5, height=8, width=8, keep_prob=0)})
    )
    with pytest.raises(ValueError, match="data.buckets.a: keep_prob"):
        B.buckets_from_config(cfg)
