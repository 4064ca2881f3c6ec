"""safetensors dtype strings <-> numpy dtypes (BF16 and FP8 through ml_dtypes)."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ._exceptions import UnsupportedDtypeError

__all__ = ["DTYPE_BITS", "dtype_from_numpy", "expected_nbytes", "numpy_dtype"]

# Bits per element of every dtype safetensors defines. Sub-byte types (F4, F6_*)
# are stored packed, so they have no numpy array form, but their byte length is
# still known and checked.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

_PLAIN: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_ML_DTYPES = {  # safetensors name -> ml_dtypes attribute
    "BF16": "bfloat16",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


@functools.cache
def _tables() -> tuple[dict[str, np.dtype[Any]], dict[np.dtype[Any], str]]:
    # ml_dtypes costs ~0.6 s to import: only when a BF16/FP8 dtype is actually used.
    import ml_dtypes

    table = dict(_PLAIN)
    table.update({name: np.dtype(getattr(ml_dtypes, attr)) for name, attr in _ML_DTYPES.items()})
    return table, {dt: name for name, dt in table.items()}


def numpy_dtype(dtype: str, *, tensor: str = "") -> np.dtype[Any]:
    """The numpy dtype for a safetensors dtype string, or :class:`UnsupportedDtypeError`."""
    plain = _PLAIN.get(dtype)
    if plain is not None:
        return plain
    try:
        return _tables()[0][dtype]
    except KeyError:
        where = f" of tensor {tensor!r}" if tensor else ""
        known = "packed sub-byte type" if dtype in DTYPE_BITS else "unknown dtype"
        raise UnsupportedDtypeError(
            f"dtype {dtype!r}{where} has no numpy equivalent ({known}); its bytes are kept "
            "byte-identical by pack/unpack, but it cannot be returned as an array"
        ) from None


def dtype_from_numpy(dtype: np.dtype[np.generic]) -> str:
    """The safetensors dtype string for a numpy dtype (native little-endian only)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">" or (dt.byteorder == "=" and np.little_endian is False):
        raise UnsupportedDtypeError(f"big-endian dtype {dt} cannot be stored in safetensors")
    dt = dt.newbyteorder("<") if dt.byteorder not in ("|", "<") else dt
    try:
        return _tables()[1][dt]
    except KeyError:
        raise UnsupportedDtypeError(f"numpy dtype {dt} has no safetensors equivalent") from None


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this dtype and shape occupies, or None for unknown dtypes."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        return None
    return (math.prod(shape) * bits + 7) // 8
