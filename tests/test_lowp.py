"""The half-precision conversions of ``kernels.lowp``: compiled code, the Python specification (what
the CUDA simulator runs) and NumPy / ml_dtypes agree bit for bit; the host half loops vectorize."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import narrow_half, widen_half
from numba import njit

from gpuadam import precision
from gpuadam.kernels import lowp

ml_dtypes = pytest.importorskip("ml_dtypes")


def _patterns(n_random: int = 4_000_000) -> np.ndarray:
    """float32 bit patterns: every rounding boundary of float16 and bfloat16 and their
    neighbourhoods (subnormals, the overflow threshold), specials, and random ones."""
    rng = np.random.default_rng(7)
    edges = [
        np.arange(0x33000000 - 4096, 0x38800000 + 4096, 3, dtype=np.uint32),  # float16 subnormals
        np.arange(0x477FE000, 0x47801000, dtype=np.uint32),  # 65504 .. 65536: the way to inf
        np.arange(0x7F7F0000, 0x7F800010, dtype=np.uint32),  # bfloat16's overflow, inf, NaNs
        np.array([0, 1, 0x7FFFFF, 0x800000, 0x7FC00000, 0x7FA00001, 0x7FFFFFFF, 0x3F808000, 0x3F818000],
                 dtype=np.uint32),
    ]
    bits = np.concatenate(edges + [rng.integers(0, 2**32, n_random, dtype=np.uint64).astype(np.uint32)])
    return np.concatenate([bits, bits | np.uint32(0x80000000)])  # and every one negated


def test_widening_is_exact_for_all_65536_patterns():
    h = np.arange(1 << 16, dtype=np.uint16)
    for fmt, dtype in ((lowp.FLOAT16, np.float16), (lowp.BFLOAT16, ml_dtypes.bfloat16)):
        compiled = np.empty(h.size, np.float32)
        widen_half(h, fmt, compiled)
        spec = np.array([lowp.load_half(int(x), fmt) for x in h], dtype=np.float32)
        want = h.view(dtype).astype(np.float32).view(np.uint32)
        if fmt == lowp.FLOAT16:  # NumPy keeps a signalling NaN signalling; we quiet it, as F16C does
            want = np.where(np.isnan(h.view(dtype)), want | 0x400000, want)
        np.testing.assert_array_equal(compiled.view(np.uint32), spec.view(np.uint32))
        np.testing.assert_array_equal(compiled.view(np.uint32), want)
        # the master copy's widening, in NumPy on the host
        np.testing.assert_array_equal(precision.widen_half(h, fmt).view(np.uint32), spec.view(np.uint32))


@pytest.mark.parametrize("fmt, dtype", [(lowp.FLOAT16, np.float16), (lowp.BFLOAT16, ml_dtypes.bfloat16)],
                         ids=["float16", "bfloat16"])
def test_narrowing_rounds_to_nearest_even_and_quiets_nan(fmt, dtype):
    bits = _patterns()
    x = bits.view(np.float32)
    got = np.empty(x.size, np.uint16)
    narrow_half(x, fmt, got)
    nan = np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype).view(np.uint16)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    sign = (bits[nan] >> 16).astype(np.uint16) & 0x8000
    if fmt == lowp.FLOAT16:
        np.testing.assert_array_equal(got[nan], sign | 0x7E00)  # the hardware's NaN, payload set
    else:
        np.testing.assert_array_equal(got[nan], ((bits[nan] >> 16) | 0x40).astype(np.uint16))
    # the Python specification (the simulator's code) on a spread of them, NaNs and boundaries included
    pick = np.r_[np.nonzero(nan)[0][:2000], np.arange(0, x.size, 97)]
    spec = np.array([lowp.store_half(x[i], fmt) for i in pick], dtype=np.uint16)
    np.testing.assert_array_equal(got[pick], spec)


@njit
def _stochastic(x, lp, out):
    for i in range(x.size):
        out[i] = lowp.store_param(x[i], lp, i)


def test_stochastic_rounding_compiled_is_the_specification():
    """The hash and the stochastic rounding in 32-bit machine arithmetic draw the bits the 64-bit
    Python specification draws, for seeds and counters past 2**31."""
    bits = _patterns(20_000)
    x = bits.view(np.float32)
    for seed, counter in ((0, 1), (1234, 17), (2**32 - 1, 2**31 + 5), (2**31, 2**40 + 3)):
        lp = (lowp.BFLOAT16, 1, seed, counter)
        got = np.empty(x.size, np.uint16)
        _stochastic(x, lp, got)
        pick = np.r_[0:3000, x.size - 3000 : x.size]
        spec = np.array([lowp.store_param(x[i], lp, int(i)) for i in pick], dtype=np.uint16)
        np.testing.assert_array_equal(got[pick], spec)
        finite = np.isfinite(x)
        up = got[finite] != (bits[finite] >> 16).astype(np.uint16)
        assert 0.2 < up.mean() < 0.8  # both ways, as the distances to the two neighbours say


_VECTORIZED = """
import re
from numba import types
from gpuadam.kernels import numba_cpu
from gpuadam.kernels.lowp import BFLOAT16, FLOAT16, ROUNDING_FIELDS
u16, f32 = types.uint16[::1], types.float32[::1]
tail = (types.UniTuple(types.float32, 12), types.UniTuple(types.int64, len(ROUNDING_FIELDS)), u16)
kernel = numba_cpu.KERNELS["adam/half"]
for key in kernel.variants:
    first = f32 if key[2] else u16  # the float32 master, or the half param itself
    sig = (first, u16, first, first) + tail
    serial = kernel.variants[key][1]
    serial.compile(sig)
    ir = serial.inspect_llvm(sig)
    print(key, len(re.findall(r"<\\d+ x float>", ir)))
"""


def test_every_host_half_loop_vectorizes(tmp_path):
    """Scalar half loops ran 3-22x slower (BENCHMARKS.md): each variant's LLVM IR must hold vector
    float math. Its own process with an empty cache: Numba cannot show the IR of cached code."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _VECTORIZED], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    counts = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in lines if line.strip()}
    assert len(counts) == 5, counts
    assert all(n > 0 for n in counts.values()), counts
