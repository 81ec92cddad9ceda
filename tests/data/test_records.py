"""Record serialization: exact round trips, clear errors."""

import ml_dtypes
import numpy as np
import pytest

from sora_jax.data import records

DTYPES = ["float32", "float16", "float64", ml_dtypes.bfloat16, "int32", "int64", "uint8", "bool"]
SHAPES = [(), (0,), (5,), (2, 3), (2, 3, 4, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_array_round_trip_is_exact(dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 100).astype(dtype)
    out = records.decode_record(records.encode_record({"x": x}))["x"]
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    assert out.tobytes() == x.tobytes()  # bit-exact, NaN payloads and -0.0 included


def test_layout_and_byte_order_do_not_matter():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    example = {"t": x.transpose(2, 0, 1), "s": x[:, ::2], "be": x.astype(">f4")}
    out = records.decode_record(records.encode_record(example))
    for k, v in example.items():
        np.testing.assert_array_equal(out[k], v)
    assert out["be"].dtype == np.float32


def test_scalars_and_strings_keep_their_types():
    example = {
        "caption": "a cat — 猫 🐈",
        "empty": "",
        "raw": b"\x00\xff",
        "fps": 23.976,
        "frames": 17,
        "big": 2**63 + 5,
        "neg": -(2**63),
        "flag": True,
        "np_scalar": np.int32(7),
    }
    out = records.decode_record(records.encode_record(example))
    assert {k: v for k, v in out.items() if k != "np_scalar"} == {
        k: v for k, v in example.items() if k != "np_scalar"
    }
    assert type(out["flag"]) is bool and type(out["frames"]) is int
    assert out["np_scalar"].shape == () and out["np_scalar"].dtype == np.int32


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "'bad' has unsupported type NoneType"),
        ([1, 2], "'bad' has unsupported type list"),
        ({"a": 1}, "'bad' has unsupported type dict"),
        (np.array(["a"]), "'bad': arrays of dtype <U1"),
        (np.array([1 + 2j]), "'bad': arrays of dtype complex128"),
        (2**64, "'bad': int .* does not fit in 64 bits"),
    ],
)
def test_unsupported_values_name_the_field(value, message):
    with pytest.raises(TypeError, match=message):
        records.encode_record({"ok": 1, "bad": value})


def test_keys_must_be_strings():
    with pytest.raises(TypeError, match="names must be str"):
        records.encode_record({1: 2})
