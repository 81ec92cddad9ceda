"""The I3D network (shapes, weights-file round trip and errors) and the FVD features."""

import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from sora_jax.data import synthetic
from sora_jax.evaluation import features, frechet, i3d, i3d_import


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


# --- the converter of published checkpoints (sora_jax.evaluation.i3d_import) ----------

GOLDEN = pathlib.Path(__file__).parent / "golden" / "i3d"


def test_published_layouts_name_every_tensor_with_its_shape():
    torch_names = i3d_import.name_map("pytorch")
    tf_names = i3d_import.name_map("tensorflow")
    # 57 units: conv + 4 norm tensors (PyTorch) or conv + 3 (TF: no scale); + the logits.
    assert len(torch_names) == 57 * 5 + 2 and len(tf_names) == 57 * 4 + 2
    assert torch_names["Conv3d_1a_7x7.conv3d.weight"] == (
        "params/Conv3d_1a_7x7/conv/kernel",
        (64, 3, 7, 7, 7),
    )
    assert torch_names["Mixed_4f.b1b.conv3d.weight"][1] == (320, 160, 3, 3, 3)
    assert torch_names["Mixed_5c.b3b.bn.running_var"] == (
        "batch_stats/Mixed_5c/Branch_3/Conv3d_0b_1x1/bn/var",
        (128,),
    )
    assert torch_names["logits.conv3d.weight"][1] == (400, 1024, 1, 1, 1)
    assert tf_names["Mixed_5c/Branch_2/Conv3d_0b_3x3/conv_3d/w"][1] == (3, 3, 3, 48, 128)
    assert tf_names["Logits/Conv3d_0c_1x1/conv_3d/w"][1] == (1, 1, 1, 1024, 400)


def _as_source(variables, layout):
    """The variables written in a source layout: the inverse of the converter's map."""
    flat = i3d._flatten(variables)
    out = {}
    for name, (target, shape) in i3d_import.name_map(layout, width_divisor=8).items():
        value = flat[target]
        if layout == "pytorch":
            if value.ndim == 5:  # (T, H, W, in, out) -> (out, in, T, H, W)
                value = value.transpose(4, 3, 0, 1, 2)
            elif name == "logits.conv3d.weight":  # Dense [D, classes] -> (classes, D, 1, 1, 1)
                value = value.T.reshape(shape)
            out[f"module.{name}"] = value
        else:
            # Norm statistics as [1, 1, 1, 1, C], as some exports store them.
            stats = name.endswith(("moving_mean", "moving_variance"))
            out[f"RGB/inception_i3d/{name}"] = value.reshape((1, 1, 1, 1, -1) if stats else shape)
    return out


@pytest.mark.parametrize("layout", ["pytorch", "tensorflow"])
def test_converter_round_trips_both_layouts(layout):
    variables = i3d.init_variables(seed=1, width_divisor=8)
    source = _as_source(variables, layout)
    got, report = i3d_import.convert(source)  # layout and width detected
    assert report.ok and not report.unexpected, str(report)
    want = i3d._flatten(variables)
    for name, value in i3d._flatten(got).items():
        if layout == "tensorflow" and name.endswith("bn/scale"):
            np.testing.assert_array_equal(value, np.ones_like(value))
        else:
            np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_converter_reports_and_errors_name_file_and_tensors(tmp_path):
    source = _as_source(i3d.init_variables(seed=1, width_divisor=8), "pytorch")
    del source["module.Mixed_4c.b2b.bn.running_mean"]
    source["module.Mixed_4c.extra.weight"] = np.zeros(3, np.float32)
    source["module.Conv3d_2b_1x1.bn.bias"] = np.zeros(7, np.float32)
    source["module.Conv3d_2b_1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)
    variables, report = i3d_import.convert(source, source="ckpt.pt")
    assert variables is None and not report.ok
    assert report.missing == ["Mixed_4c.b2b.bn.running_mean"]
    assert report.unexpected == ["module.Mixed_4c.extra.weight"]
    assert report.mismatched == [("module.Conv3d_2b_1x1.bn.bias", (8,), (7,))]
    assert report.ignored == ["module.Conv3d_2b_1x1.bn.num_batches_tracked"]
    np.savez(tmp_path / "bad.npz", **source)
    with pytest.raises(ValueError, match=r"(?s)bad\.npz.*Mixed_4c\.b2b\.bn\.running_mean"):
        i3d_import.import_weights(tmp_path / "bad.npz", tmp_path / "out.npz")
    with pytest.raises(FileNotFoundError, match="absent.pt.*nothing is downloaded"):
        i3d_import.read_tensors(tmp_path / "absent.pt")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w\.h5: unknown file type '\.h5'"):
        i3d_import.read_tensors(tmp_path / "w.h5")
    with pytest.raises(ValueError, match="no I3D conv weights"):
        i3d_import.convert({"fc.weight": np.zeros((2, 2))})


def test_import_command_writes_weights_that_load(tmp_path):
    out = tmp_path / "i3d.npz"
    src = GOLDEN / "state_dict.safetensors"
    cmd = [sys.executable, "-m", "sora_jax.evaluate", f"--import_i3d={src}", f"--i3d_out={out}"]
    result = subprocess.run(
        [*cmd, "--i3d_bn_eps=1e-5"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "287 tensors loaded" in result.stdout and "ignored by design (57)" in result.stdout
    assert (tmp_path / "i3d.load_report.txt").read_text().startswith(f"{src}: 287 tensors")
    loaded = i3d._flatten(i3d.load_weights(out))
    want, _ = i3d_import.convert(
        safetensors.numpy.load_file(str(src)), bn_eps=1e-5, source=str(src)
    )
    want = i3d._flatten(want)
    assert loaded.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
