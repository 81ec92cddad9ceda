"""The I3D network (shapes, weights-file round trip and errors) and the FVD features."""

import ml_collections
import numpy as np
import pytest

from sora_jax.data import synthetic
from sora_jax.evaluation import features, frechet, i3d


@pytest.fixture(scope="module")
def variables():
    return i3d.init_variables(seed=0)


@pytest.fixture(scope="module")
def clip():
    return np.random.default_rng(0).uniform(-1, 1, (2, 8, 32, 32, 3)).astype(np.float32)


def test_i3d_layout_and_output_shapes(variables, clip):
    names = i3d.weight_names()
    assert names["params/Conv3d_1a_7x7/conv/kernel"] == (7, 7, 7, 3, 64)
    assert names["params/Mixed_5c/Branch_1/Conv3d_0b_3x3/conv/kernel"] == (3, 3, 3, 192, 384)
    assert names["params/Logits/kernel"] == (1, 1, 1, 1024, 400)
    # 9 mixed blocks of 6 units + 3 stem units, each conv + 4 batch-norm arrays, + logits.
    assert len(names) == (9 * 6 + 3) * 5 + 2
    logits = np.asarray(i3d.features_fn(variables, "logits")(clip))
    pool = np.asarray(i3d.features_fn(variables, "pool")(clip))
    assert logits.shape == (2, 400) and pool.shape == (2, 1024)
    assert np.isfinite(logits).all() and (pool >= 0).all()  # pooled ReLU outputs
    assert not np.allclose(logits[0], logits[1])  # different clips, different features


def test_weights_file_round_trip(variables, clip, tmp_path):
    path = i3d.save_weights(tmp_path / "i3d.npz", variables)
    loaded = i3d.load_weights(path)
    want = np.asarray(i3d.features_fn(variables)(clip))
    got = np.asarray(i3d.features_fn(loaded)(clip))
    np.testing.assert_array_equal(got, want)


def test_weights_file_errors_name_the_array(variables, tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights are downloaded"):
        i3d.load_weights(tmp_path / "absent.npz")
    flat = i3d._flatten(variables)
    flat["params/Logits/kernel"] = flat["params/Logits/kernel"].reshape(1, 1, 1, 1024, 400)
    renamed = dict(flat)
    renamed["params/Mixed_4c/Branch_2/Conv3d_0b_3x3/conv/kernels"] = renamed.pop(
        "params/Mixed_4c/Branch_2/Conv3d_0b_3x3/conv/kernel"
    )
    np.savez(tmp_path / "renamed.npz", **renamed)
    with pytest.raises(ValueError, match=r"missing arrays \['params/Mixed_4c/Branch_2/Conv3d_0b"):
        i3d.load_weights(tmp_path / "renamed.npz")
    with pytest.raises(ValueError, match="unexpected arrays.*conv/kernels"):
        i3d.load_weights(tmp_path / "renamed.npz")
    reshaped = dict(flat)
    reshaped["batch_stats/Conv3d_2b_1x1/bn/mean"] = np.zeros(63, np.float32)
    np.savez(tmp_path / "reshaped.npz", **reshaped)
    with pytest.raises(ValueError, match=r"Conv3d_2b_1x1/bn/mean has shape \(63,\)"):
        i3d.load_weights(tmp_path / "reshaped.npz")


def _config(**evaluate):
    c = ml_collections.ConfigDict()
    c.evaluate = ml_collections.ConfigDict(evaluate)
    return c


def test_i3d_features_need_a_weights_file():
    with pytest.raises(FileNotFoundError, match="evaluate.fvd_weights"):
        features.build(_config(fvd_features="i3d", fvd_weights=""))
    with pytest.raises(ValueError, match="known: \\['i3d', 'random_conv'\\]"):
        features.build(_config(fvd_features="inception"))


def test_fvd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    feats = features.build(_config(fvd_features="random_conv"))
    clips = np.stack([synthetic.synthetic_clip(i, 7, 5, 16, 16)["video"] for i in range(24)])
    real = feats(clips)
    assert real.shape == (24, 256)
    np.testing.assert_array_equal(feats(clips), real)  # fixed-seed weights: deterministic

    def fvd(shift):
        fake = feats(np.clip(clips + shift, -1, 1))
        stats = frechet.gaussian_stats(real), frechet.gaussian_stats(fake)
        return frechet.frechet_distance(*stats[0], *stats[1])

    values = [fvd(s) for s in (0.0, 0.1, 0.3, 0.6)]
    assert abs(values[0]) < 1e-8
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_clips_are_resampled_to_the_fvd_protocol_and_scores_name_their_network():
    clips = np.stack([synthetic.synthetic_clip(i, 7, 5, 16, 24)["video"] for i in range(2)])
    out = features.resample(clips, features.FVD_FRAMES, 32, 32)
    assert out.shape == (2, 16, 32, 32, 3)  # 5 frames -> 16: evenly spaced, repeated
    np.testing.assert_array_equal(features.resample(clips, 16, 16, 24)[:, -1], clips[:, -1])
    np.testing.assert_array_equal(features.resample(clips, 3, 16, 24), clips[:, [0, 2, 4]])
    assert features.score_key(_config(fvd_features="i3d")) == "fvd_i3d"
    assert features.score_key(_config(fvd_features="random_conv")) == "fd_random_conv"
