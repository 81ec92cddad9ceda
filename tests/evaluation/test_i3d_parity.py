"""The Flax I3D against an independent PyTorch implementation on random weights, through
the converter of published checkpoints (goldens: scripts/make_i3d_goldens.py)."""

import pathlib

import numpy as np
import pytest
import safetensors.numpy

from sora_jax.evaluation import features, i3d, i3d_import

GOLDEN = pathlib.Path(__file__).parent / "golden" / "i3d"
UPSAMPLE = 8  # as the script: exact nearest-neighbour upsampling of the stored uint8 clip


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "io.npz") as f:
        io = {k: f[k] for k in f.files}
    return io, safetensors.numpy.load_file(str(GOLDEN / "state_dict.safetensors"))


def test_converted_reference_weights_reproduce_the_reference(golden):
    io, state = golden
    k = int(io["width_divisor"])
    variables, report = i3d_import.convert(
        state, bn_eps=float(io["bn_eps"]), width_divisor=k, source="golden"
    )
    assert report.ok, str(report)
    # Every conv + norm of the 57 units and the logits; the counters are ignored by design.
    assert len(report.loaded) == 57 * 5 + 2 and len(report.ignored) == 57
    video = io["video_u8"].repeat(UPSAMPLE, axis=2).repeat(UPSAMPLE, axis=3)
    video = video.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # [B, 24, 224, 224, 3]
    out = i3d.apply(variables, video)
    ref_logits, ref_pool = io["logits"], io["pool"]
    assert ref_logits.std() > 1.0  # the golden is not degenerate
    np.testing.assert_allclose(np.asarray(out["pool"]), ref_pool, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref_logits, rtol=1e-4, atol=1e-4)
    # The eps matters at this tolerance: converting as if the source used 1e-3 does not match.
    wrong, _ = i3d_import.convert(state, bn_eps=1e-3, width_divisor=k)
    assert not np.allclose(np.asarray(i3d.apply(wrong, video)["logits"]), ref_logits, atol=1e-4)


def test_fvd_resize_is_the_reference_preprocessing(golden):
    io, _ = golden
    video = io["resize_u8"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    got = features.resample(video, video.shape[1], 24, 24, antialias=False)
    np.testing.assert_allclose(got, io["resize_out"], atol=1e-5)
    # The default (antialiased) filter differs when shrinking: the protocol must not use it.
    assert not np.allclose(features.resample(video, 5, 24, 24), io["resize_out"], atol=1e-2)
