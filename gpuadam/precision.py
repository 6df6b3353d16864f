"""Which storage formats the kernels accept, and how half-precision params are declared.

float32 and float64 are computed in their own precision. float16 and bfloat16 (``ml_dtypes`` on the
host) are stored as 16-bit patterns and computed in float32, with float32 master weights when asked.
A GPU stack that cannot express bfloat16 (``__cuda_array_interface__`` has no such type) hands
over uint16 or int16 storage and declares it with ``half_format="bfloat16"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuadam.kernels.lowp import BFLOAT16, FLOAT16

NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
_BITS = (np.dtype(np.uint16), np.dtype(np.int16))
_DECLARED = {"bfloat16": BFLOAT16, "float16": FLOAT16}


def check_half_format(value: Any) -> int | None:
    """Validate the ``half_format`` option: None, ``"bfloat16"`` or ``"float16"``."""
    if value is None:
        return None
    if value not in _DECLARED:
        raise ValueError(f"half_format: expected None, 'bfloat16' or 'float16', got {value!r}")
    return _DECLARED[value]


def half_format(dtype: np.dtype, declared: int | None) -> int | None:
    """``lowp.BFLOAT16``/``FLOAT16`` for half-precision storage, None for float32/float64.

    Raises TypeError for anything else, saying what is accepted.
    """
    if dtype in NATIVE:
        return None
    if dtype == np.float16:
        return FLOAT16
    if dtype.name == "bfloat16":
        return BFLOAT16
    if dtype in _BITS and declared is not None:
        return declared
    extra = " (uint16/int16 storage needs half_format='bfloat16' or 'float16')" if dtype in _BITS else ""
    raise TypeError(f"expected dtype float32, float64, float16 or bfloat16, got {dtype}{extra}")


def widen_half(bits: np.ndarray, fmt: int) -> np.ndarray:
    """float32 values of host half-precision ``bits`` (uint16) in format ``fmt``, exactly as the
    kernels widen them (``lowp.load_half``: a float16 NaN keeps its payload and is made quiet): the
    master copy of half params, made once, on the host, whatever the backend."""
    bits = np.asarray(bits, np.uint16)
    if fmt == BFLOAT16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    out = bits.view(np.float16).astype(np.float32)  # exact, subnormals included
    nan = np.isnan(out)
    out.view(np.uint32)[nan] |= np.uint32(0x400000)
    return out
