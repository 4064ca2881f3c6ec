"""Tests for asyncload._dtypes: safetensors dtype strings <-> numpy / ml_dtypes dtypes."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from asyncload._dtypes import DTYPE_BITS, dtype_from_numpy, expected_nbytes, numpy_dtype
from asyncload._exceptions import AsyncloadError, UnsupportedDtypeError
from asyncload._format import build_header, parse_header

EXPECTED: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
SUB_BYTE = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

# The little-endian encoding of 1.0 in each 1- and 2-byte float format: pins the
# exact ml_dtypes variant (fn vs fnuz vs plain differ in bias and in these bits).
ONE = {
    "BF16": b"\x80\x3f",
    "F16": b"\x00\x3c",
    "F8_E4M3": b"\x38",
    "F8_E5M2": b"\x3c",
    "F8_E8M0": b"\x7f",
    "F8_E4M3FNUZ": b"\x40",
    "F8_E5M2FNUZ": b"\x40",
}


def _safetensors_dtypes() -> list[str]:
    """The dtype names the installed safetensors knows, read from its own error message."""
    bad = build_header([("t", "NOT_A_DTYPE", (1,), 1)]) + b"\0"
    with pytest.raises(safetensors.SafetensorError) as ei:
        safetensors.deserialize(bad)
    m = re.search(r"expected one of (.*?) at line", str(ei.value))
    if m is None:
        pytest.skip("this safetensors version does not list its dtypes in the error")
    return re.findall(r"`([A-Z0-9_]+)`", m.group(1))


@pytest.mark.parametrize(("name", "dt"), sorted(EXPECTED.items()))
def test_numpy_dtype_table(name: str, dt: np.dtype) -> None:
    got = numpy_dtype(name)
    assert got == dt
    assert got.itemsize * 8 == DTYPE_BITS[name]
    assert got.byteorder in ("=", "|", "<")


@pytest.mark.parametrize(("name", "raw"), sorted(ONE.items()))
def test_float_formats_decode_one(name: str, raw: bytes) -> None:
    assert float(np.frombuffer(raw, dtype=numpy_dtype(name))[0]) == 1.0


def test_every_safetensors_dtype_is_known() -> None:
    names = _safetensors_dtypes()
    assert "BF16" in names and "F32" in names
    for name in names:
        assert name in DTYPE_BITS, name
        if name in SUB_BYTE:
            assert DTYPE_BITS[name] == SUB_BYTE[name]
        else:
            assert numpy_dtype(name) == EXPECTED[name], name


@pytest.mark.parametrize("name", sorted(DTYPE_BITS))
def test_expected_nbytes_agrees_with_safetensors(name: str) -> None:
    shape = (2, 4)  # 8 elements: byte-aligned for every sub-byte type
    n = expected_nbytes(name, shape)
    assert n == 8 * DTYPE_BITS[name] // 8
    data = bytes(range(n))
    ((tname, info),) = safetensors.deserialize(build_header([("t", name, shape, n)]) + data)
    assert (tname, info["dtype"], list(info["shape"]), bytes(info["data"])) == ("t", name, [2, 4], data)
    # and safetensors refuses one byte more: the length check is the same one
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(build_header([("t", name, shape, n + 1)]) + data + b"\0")


@pytest.mark.parametrize(
    "arr",
    [
        np.array([True, False, True]),
        np.arange(7, dtype=np.uint8),
        np.arange(-3, 4, dtype=np.int8),
        np.arange(6, dtype=np.int16).reshape(2, 3),
        np.arange(6, dtype=np.uint16),
        np.linspace(-1, 1, 5, dtype=np.float16),
        np.arange(4, dtype=np.int32),
        np.arange(4, dtype=np.uint32),
        np.linspace(-2, 2, 6, dtype=np.float32).reshape(3, 2),
        np.arange(3, dtype=np.int64),
        np.arange(3, dtype=np.uint64),
        np.linspace(0, 1, 3, dtype=np.float64),
        np.array([1 + 2j, -3.5j], dtype=np.complex64),
    ],
    ids=lambda a: str(a.dtype),
)
def test_safetensors_numpy_files_decode_with_our_dtypes(arr: np.ndarray) -> None:
    buf = safetensors.numpy.save({"x": arr})
    (t,) = parse_header(buf, file_size=len(buf)).tensors
    assert t.dtype == dtype_from_numpy(arr.dtype)
    got = np.frombuffer(buf[t.begin : t.end], dtype=numpy_dtype(t.dtype)).reshape(t.shape)
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dtype_from_numpy_is_the_inverse(name: str) -> None:
    dt = numpy_dtype(name)
    assert dtype_from_numpy(dt) == name
    assert dtype_from_numpy(dt.newbyteorder("<")) == name
    assert dtype_from_numpy(dt.type) == name  # a scalar type is accepted like a dtype


@pytest.mark.parametrize("spec", [">u2", ">i2", ">f2", ">i4", ">u4", ">f4", ">f8", ">i8", ">u8", ">c8"])
def test_big_endian_rejected(spec: str) -> None:
    with pytest.raises(UnsupportedDtypeError, match="big-endian"):
        dtype_from_numpy(np.dtype(spec))


def test_single_byte_types_have_no_byte_order() -> None:
    assert dtype_from_numpy(np.dtype(">u1")) == "U8"
    assert dtype_from_numpy(np.dtype(">i1")) == "I8"
    assert dtype_from_numpy(np.dtype(">?")) == "BOOL"


@pytest.mark.parametrize("spec", ["<c16", "U4", "S3", "O", "<m8[s]", "<M8[D]", "V4"])
def test_dtype_from_numpy_rejects_types_safetensors_lacks(spec: str) -> None:
    with pytest.raises(UnsupportedDtypeError) as ei:
        dtype_from_numpy(np.dtype(spec))
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, AsyncloadError)


@pytest.mark.parametrize("name", ["XYZ", "f32", "float32", "", "F8_E4M3FN", "I128"])
def test_unknown_dtype_names_the_tensor(name: str) -> None:
    with pytest.raises(UnsupportedDtypeError) as ei:
        numpy_dtype(name, tensor="model.layers.0.weight")
    msg = str(ei.value)
    assert "'model.layers.0.weight'" in msg and repr(name) in msg and "unknown dtype" in msg
    assert isinstance(ei.value, TypeError)


@pytest.mark.parametrize("name", sorted(SUB_BYTE))
def test_sub_byte_types_have_no_array_form(name: str) -> None:
    with pytest.raises(UnsupportedDtypeError, match="packed sub-byte") as ei:
        numpy_dtype(name, tensor="w4")
    assert "'w4'" in str(ei.value)


def test_unknown_dtype_without_tensor_name() -> None:
    with pytest.raises(UnsupportedDtypeError, match="'XYZ'"):
        numpy_dtype("XYZ")


@pytest.mark.parametrize(
    ("dtype", "shape", "n"),
    [
        ("F4", (4,), 2),
        ("F4", (3,), 2),  # packed, rounded up to a whole byte
        ("F4", (1,), 1),
        ("F4", (2, 3), 3),
        ("F6_E2M3", (4,), 3),
        ("F6_E3M2", (1,), 1),
        ("F6_E3M2", (5,), 4),
        ("F4", (0,), 0),
        ("F6_E2M3", (), 1),
        ("U8", (), 1),
        ("F32", (), 4),
        ("F64", (3, 0, 2), 0),
        ("C64", (2, 2), 32),
    ],
)
def test_expected_nbytes(dtype: str, shape: tuple[int, ...], n: int) -> None:
    assert expected_nbytes(dtype, shape) == n


def test_expected_nbytes_unknown_dtype_is_none() -> None:
    assert expected_nbytes("XYZ", (3,)) is None


@given(
    st.sampled_from(sorted(DTYPE_BITS)),
    st.lists(st.integers(0, 10**6), max_size=6).map(tuple),
)
def test_expected_nbytes_is_ceil_of_bits(dtype: str, shape: tuple[int, ...]) -> None:
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    n = expected_nbytes(dtype, shape)
    assert n is not None
    assert n * 8 >= numel * DTYPE_BITS[dtype] > (n - 1) * 8 or n == numel == 0
