"""Record serialization for tokenized shards: msgpack, no pickle (docs/design.md, Decisions).

A record is a flat dict from field name to a value:

    {'latents': float16[T', H', W', C], 'text': float32[S, D_text], 'text_mask': bool[S],
     'caption': str, 'source_id': str, 'fps': float, 'num_frames': int}

It is written as one msgpack map. Python `str`, `bytes`, `int`, `float` and `bool` are
msgpack's own types; a numpy array (or numpy scalar, stored as a 0-d array) is a msgpack
extension of type `_NDARRAY_EXT` whose payload is the msgpack array
`[dtype name, shape, little-endian C-order bytes]`. Nothing in a record can run code when
it is read, unlike pickle, and the format is readable from any msgpack implementation.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import msgpack
import numpy as np

# msgpack extension type code of a numpy array (application codes are 0..127).
_NDARRAY_EXT = 1

# dtype name -> dtype for every array dtype a record may hold. bfloat16 comes from
# ml_dtypes (the dtype JAX uses), since numpy has no bfloat16 of its own.
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)

Value = np.ndarray | np.generic | str | bytes | int | float | bool


def _pack_array(key: str, array: np.ndarray) -> msgpack.ExtType:
    name = array.dtype.name
    if name not in _DTYPES:
        raise TypeError(
            f"record field {key!r}: arrays of dtype {array.dtype} are not supported; "
            f"cast it to one of {sorted(_DTYPES)}"
        )
    # Stored little-endian in C order (tobytes' default), so the bytes are the same on
    # every host whatever the array's memory layout.
    raw = np.asarray(array, dtype=_DTYPES[name].newbyteorder("<")).tobytes(order="C")
    payload = msgpack.packb([name, list(array.shape), raw], use_bin_type=True)
    return msgpack.ExtType(_NDARRAY_EXT, payload)


def _unpack_ext(code: int, payload: bytes) -> Any:
    if code != _NDARRAY_EXT:
        raise ValueError(f"record holds an unknown msgpack extension type {code}")
    name, shape, raw = msgpack.unpackb(payload, raw=False)
    if name not in _DTYPES:
        raise ValueError(f"record holds an array of unknown dtype {name!r}")
    return np.frombuffer(raw, dtype=_DTYPES[name].newbyteorder("<")).reshape(shape)


def encode_record(example: dict[str, Value]) -> bytes:
    """Serializes one example to bytes.

    Args:
      example: field name -> numpy array (dtypes in `_DTYPES`, any shape including 0-d),
        numpy scalar (stored as a 0-d array), str, bytes, int (64-bit), float or bool.

    Raises:
      TypeError: naming the field whose key or value cannot be stored.
    """
    if not isinstance(example, dict):
        raise TypeError(f"a record is a dict of fields, got {type(example).__name__}")
    packed: dict[str, Any] = {}
    for key, value in example.items():
        if not isinstance(key, str):
            raise TypeError(f"record field names must be str, got {key!r}")
        if isinstance(value, np.ndarray | np.generic):
            packed[key] = _pack_array(key, np.asarray(value))
        elif isinstance(value, bool | int):
            if isinstance(value, int) and not -(2**63) <= value < 2**64:
                raise TypeError(f"record field {key!r}: int {value} does not fit in 64 bits")
            packed[key] = value
        elif isinstance(value, str | bytes | float):
            packed[key] = value
        else:
            raise TypeError(
                f"record field {key!r} has unsupported type {type(value).__name__}; "
                "supported: numpy arrays, str, bytes, int, float, bool"
            )
    return msgpack.packb(packed, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`.

    Arrays come back with their dtype and shape, as read-only views of `data` (no copy;
    batching copies them anyway). Take `np.array(x)` for a writable one.
    """
    return msgpack.unpackb(data, raw=False, ext_hook=_unpack_ext, strict_map_key=True)
