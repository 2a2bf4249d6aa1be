"""msgpack encoding of a dict of numpy arrays plus a small metadata dict: the on-disk and on-wire
format of replay chunks and replay checkpoints. Never pickle: decoding a payload runs no code.

Payload (one msgpack map, binary fields as msgpack `bin`):

    {"format": "choreo.arrays", "version": 1,
     "arrays": {name: {"dtype": "<f4", "shape": [50, 24], "data": <raw bytes, C order>}, ...},
     "meta": {plain values: None, bool, int, float, str, bytes, lists and str-keyed maps of them}}

Only plain numeric and bool dtypes travel (`ALLOWED_DTYPES`, little-endian); object, string,
structured and datetime arrays are refused on both sides. `decode` validates everything (types,
marker, version, dtype, shape, byte count, bool values) and raises `CodecError` naming the
problem and the key; random or truncated bytes raise `CodecError`, never another exception.

Zero copy: `encode` hands contiguous arrays' memory to msgpack without an intermediate copy, and
`decode` returns arrays that are READ-ONLY views (`np.frombuffer`) into the payload's bytes.
Copy them (`arr.copy()`) before writing into them; `ReplayShard.add` copies into its own storage.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

FORMAT = "choreo.arrays"
"""Marker in every payload; anything else is refused."""
VERSION = 1
"""Payload layout version; a payload of another version is refused."""

ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (
    np.bool_, np.uint8, np.int8, "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"))
"""dtype strings (numpy `dtype.str`) that may be encoded and decoded."""

_MAX_META_DEPTH = 32


class CodecError(ValueError):
    """A payload (or a value to encode) that is not a valid choreo.arrays payload."""


# ----------------------------------------------------------------------------- encode


def _wire_dtype(name: str, arr: np.ndarray) -> np.ndarray:
    """`arr` as a C-contiguous array of an allowed little-endian dtype (a copy only if needed)."""
    dt = arr.dtype
    if dt.str not in ALLOWED_DTYPES:
        swapped = dt.newbyteorder("<") if dt.kind in "biuf" and dt.fields is None and not dt.subdtype else None
        if swapped is None or swapped.str not in ALLOWED_DTYPES:
            raise CodecError(f"array {name!r}: dtype {dt} cannot be encoded (allowed: bool, int, uint, float)")
        arr = arr.astype(swapped)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """Checks (and lightly converts: numpy scalars, tuples) a metadata value to plain msgpack types."""
    if depth > _MAX_META_DEPTH:
        raise CodecError(f"meta {where}: nested deeper than {_MAX_META_DEPTH}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise CodecError(f"meta {where}: integer {value} does not fit 64 bits")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f"meta {where}: key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}", depth + 1)
        return out
    raise CodecError(f"meta {where}: value of type {type(value).__name__} is not a plain value")


def encode(arrays: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    """msgpack bytes holding `arrays` (raw bytes + dtype + shape each) and the plain `meta` dict."""
    if not isinstance(arrays, dict):
        raise CodecError(f"arrays must be a dict of numpy arrays, got {type(arrays).__name__}")
    packed = {}
    for name, arr in arrays.items():
        if not isinstance(name, str):
            raise CodecError(f"array name {name!r} is not a string")
        if not isinstance(arr, np.ndarray):
            raise CodecError(f"array {name!r}: expected a numpy array, got {type(arr).__name__}")
        arr = _wire_dtype(name, arr)
        data = memoryview(arr).cast("B") if arr.size else b""  # no copy of the array's memory
        packed[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": data}
    payload = {"format": FORMAT, "version": VERSION, "arrays": packed,
               "meta": _plain({} if meta is None else meta, "meta")}
    if not isinstance(payload["meta"], dict):
        raise CodecError(f"meta must be a dict, got {type(meta).__name__}")
    return msgpack.packb(payload, use_bin_type=True)


# ----------------------------------------------------------------------------- decode


def _check_meta(value: Any, where: str, depth: int = 0) -> None:
    if depth > _MAX_META_DEPTH:
        raise CodecError(f"meta {where}: nested deeper than {_MAX_META_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_meta(v, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f"meta {where}: key {k!r} is not a string")
            _check_meta(v, f"{where}.{k}", depth + 1)
        return
    raise CodecError(f"meta {where}: value of type {type(value).__name__} is not a plain value")


def _decode_array(name: str, spec: Any) -> np.ndarray:
    if not isinstance(spec, dict):
        raise CodecError(f"array {name!r}: expected a map, got {type(spec).__name__}")
    for field in ("dtype", "shape", "data"):
        if field not in spec:
            raise CodecError(f"array {name!r}: missing field {field!r}")
    extra = set(spec) - {"dtype", "shape", "data"}
    if extra:
        raise CodecError(f"array {name!r}: unknown fields {sorted(map(str, extra))}")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise CodecError(f"array {name!r}: dtype {dtype!r} is not allowed (allowed: {sorted(ALLOWED_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"array {name!r}: shape {shape!r} is not a list of non-negative integers")
    if len(shape) > 32:
        raise CodecError(f"array {name!r}: {len(shape)} dimensions (at most 32)")
    if not isinstance(data, bytes):
        raise CodecError(f"array {name!r}: data is {type(data).__name__}, expected bytes")
    dt = np.dtype(dtype)
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise CodecError(f"array {name!r}: {len(data)} bytes of data, shape {tuple(shape)} of {dt} "
                         f"needs {expected}")
    if dt.kind == "b" and data and np.frombuffer(data, np.uint8).max() > 1:
        raise CodecError(f"array {name!r}: bool data holds bytes other than 0 and 1")
    return np.frombuffer(data, dtype=dt).reshape(tuple(shape))


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) from `encode`'s bytes. Arrays are read-only views into `data` (zero copy).

    Raises CodecError naming the problem for anything that is not a valid payload.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(data).__name__}")
    try:
        payload = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for malformed input; all mean "not a payload"
        raise CodecError(f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise CodecError(f"payload is a msgpack {type(payload).__name__}, expected a map")
    if payload.get("format") != FORMAT:
        raise CodecError(f"payload format marker is {payload.get('format')!r}, expected {FORMAT!r}")
    if payload.get("version") != VERSION or type(payload.get("version")) is not int:
        raise CodecError(f"payload version {payload.get('version')!r} is not supported (expected {VERSION})")
    for field in ("arrays", "meta"):
        if field not in payload:
            raise CodecError(f"payload: missing field {field!r}")
        if not isinstance(payload[field], dict):
            raise CodecError(f"payload field {field!r} is a {type(payload[field]).__name__}, expected a map")
    extra = set(payload) - {"format", "version", "arrays", "meta"}
    if extra:
        raise CodecError(f"payload: unknown fields {sorted(map(str, extra))}")
    arrays = {}
    for name, spec in payload["arrays"].items():
        if not isinstance(name, str):
            raise CodecError(f"array name {name!r} is not a string")
        arrays[name] = _decode_array(name, spec)
    meta = payload["meta"]
    _check_meta(meta, "meta")
    return arrays, meta
