"""msgpack codec: exact round trips, strict validation, and no crash on hostile bytes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from choreo.buffer.codec import FORMAT, VERSION, CodecError, decode, encode

DTYPES = [np.float32, np.uint8, np.bool_, np.int32, np.int64, np.float64, np.int8, np.uint16, np.float16]


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((5, 3)).astype(np.float32),
        "u8": rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8),
        "b": rng.random(7) > 0.5,
        "i32": rng.integers(-(2**31), 2**31 - 1, (4,), dtype=np.int32),
        "i64": np.array([-(2**63), 2**63 - 1, 0], np.int64),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 24), np.float32),
        "empty_bool": np.zeros((3, 0), bool),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (2, 3, 4)])
def test_round_trip_exact(dtype, shape):
    rng = np.random.default_rng(1)
    arr = np.asarray((rng.random(shape) * 200).astype(dtype) if dtype is not np.bool_ else rng.random(shape) > 0.5)
    out, meta = decode(encode({"x": arr}))
    assert meta == {}
    assert out["x"].dtype == arr.dtype and out["x"].shape == arr.shape
    assert out["x"].tobytes() == arr.tobytes()


def test_round_trip_many_keys_and_meta():
    arrays = _sample_arrays()
    meta = {"stream": 3, "name": "walker", "ok": True, "x": 1.5, "none": None, "nested": {"a": [1, 2, "b"]},
            "np": np.int64(7), "tuple": (1, 2)}
    out, got = decode(encode(arrays, meta))
    assert set(out) == set(arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(out[k], a)
        assert out[k].dtype == a.dtype
    assert got == {**meta, "np": 7, "tuple": [1, 2]}


def test_decoded_arrays_are_read_only_views():
    out, _ = decode(encode({"x": np.arange(10, dtype=np.float32)}))
    assert not out["x"].flags.writeable
    with pytest.raises(ValueError):
        out["x"][0] = 1.0


def test_non_contiguous_and_big_endian_inputs():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    b = np.arange(5, dtype=">i4")
    out, _ = decode(encode({"a": a, "b": b}))
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)
    assert out["b"].dtype == np.dtype("<i4")


@pytest.mark.parametrize("bad", [np.array([{"a": 1}], dtype=object), np.array(["x"]),
                                 np.array([1 + 2j]), np.zeros(2, dtype=[("a", "<f4")]),
                                 np.array(["2020-01-01"], dtype="datetime64[D]")])
def test_encode_refuses_non_numeric(bad):
    with pytest.raises(CodecError, match="'x'"):
        encode({"x": bad})


def test_encode_refuses_bad_inputs():
    with pytest.raises(CodecError, match="numpy array"):
        encode({"x": [1, 2]})
    with pytest.raises(CodecError, match="not a string"):
        encode({1: np.zeros(2)})
    with pytest.raises(CodecError, match="plain value"):
        encode({}, {"f": object()})
    with pytest.raises(CodecError, match="not a string"):
        encode({}, {1: 2})


def _payload(arrays: dict, meta: dict | None = None, **top) -> bytes:
    body = {"format": FORMAT, "version": VERSION, "arrays": arrays, "meta": {} if meta is None else meta}
    body.update(top)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...}, use_bin_type=True)


def test_decode_refuses_object_dtype():
    data = _payload({"obs": {"dtype": "|O", "shape": [1], "data": b"\x00" * 8}})
    with pytest.raises(CodecError, match=r"'obs'.*not allowed"):
        decode(data)


@pytest.mark.parametrize("spec, match", [
    ({"dtype": "<f4", "shape": [2, 3], "data": b"\x00" * 20}, r"'obs'.*20 bytes.*needs 24"),
    ({"dtype": "<f4", "shape": [2, -3], "data": b""}, r"'obs'.*shape"),
    ({"dtype": "<f4", "shape": "23", "data": b""}, r"'obs'.*shape"),
    ({"dtype": "<f4", "shape": [True], "data": b"\x00" * 4}, r"'obs'.*shape"),
    ({"dtype": "<f4", "shape": [1]}, r"'obs'.*missing field 'data'"),
    ({"shape": [1], "data": b"\x00" * 4}, r"'obs'.*missing field 'dtype'"),
    ({"dtype": "<f4", "shape": [1], "data": "abcd"}, r"'obs'.*data is str"),
    ({"dtype": "|b1", "shape": [2], "data": b"\x00\x07"}, r"'obs'.*bool"),
    ({"dtype": ">f4", "shape": [1], "data": b"\x00" * 4}, r"'obs'.*not allowed"),
    ({"dtype": "<f4", "shape": [1], "data": b"\x00" * 4, "extra": 1}, r"'obs'.*unknown fields"),
    ([1, 2], r"'obs'.*expected a map"),
])
def test_decode_validates_arrays(spec, match):
    with pytest.raises(CodecError, match=match):
        decode(_payload({"obs": spec}))


def test_decode_validates_envelope():
    with pytest.raises(CodecError, match="format marker"):
        decode(_payload({}, format="other"))
    with pytest.raises(CodecError, match="version"):
        decode(_payload({}, version=99))
    with pytest.raises(CodecError, match="missing field 'meta'"):
        decode(_payload({}, meta=...))
    with pytest.raises(CodecError, match="'arrays'.*expected a map"):
        decode(_payload([]))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="expected a map"):
        decode(msgpack.packb([1, 2, 3]))
    with pytest.raises(CodecError, match="plain value"):
        decode(_payload({}, {"t": msgpack.ExtType(5, b"xx")}))
    with pytest.raises(CodecError, match="bytes"):
        decode("a string")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="not valid msgpack"):
        decode(encode({"x": np.zeros(3)}) + b"\x00")  # trailing bytes


def test_every_truncation_raises_codec_error():
    data = encode(_sample_arrays(), {"stream": 1, "k": [1, 2.5, "x"]})
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_codec_error_only(data):
    try:
        decode(data)
    except CodecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_payload_raises_codec_error_or_decodes(data):
    payload = bytearray(encode({"obs": np.arange(6, dtype=np.float32).reshape(2, 3),
                                "flag": np.array([True, False])}, {"stream": 2}))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        arrays, meta = decode(bytes(payload))
    except CodecError:
        return
    for a in arrays.values():  # whatever decodes is well-formed
        assert isinstance(a, np.ndarray) and a.dtype.str in {"<f4", "|b1", "<f2", "<i4", "<u4", "|u1", "|i1",
                                                              "<i2", "<u2", "<i8", "<u8", "<f8"}
    assert isinstance(meta, dict)
