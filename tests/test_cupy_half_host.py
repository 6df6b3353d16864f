"""The CuPy backend's float16/bfloat16 code without a GPU.

1. ``cupy_lowp.LOWP_SOURCE`` compiled with g++ is bit for bit ``kernels.lowp`` (run by Numba on the
   CPU): every half pattern widened, float32 patterns narrowed around every rounding boundary and
   at random, the hash, stochastic rounding.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from numba import njit

from gpuadam.kernels import lowp
from gpuadam.kernels.cupy_lowp import LOWP_SOURCE

FORMATS = {"bfloat16": lowp.BFLOAT16, "float16": lowp.FLOAT16}
MASK32 = 0xFFFFFFFF

# -ffp-contract=off: each operation rounds once, as Numba's CPU loops do; -Wdouble-promotion
# -Werror: a float silently widened to double is an error.
GXX_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra",
             "-Wdouble-promotion", "-Werror"]


def _build(tmp_path_factory, name: str, source: str) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH: cannot compile the C sources for the host")
    tmp = tmp_path_factory.mktemp(name)
    src, lib = tmp / f"{name}.cpp", tmp / f"{name}.so"
    src.write_text(source)
    cmd = [gxx, *GXX_FLAGS, "-o", str(lib), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


# ---------------------------------------------------------------------------------------------
# 1. The conversions and the hash, bit for bit

_WRAPPERS = """
#include <cstddef>
""" + LOWP_SOURCE + """
extern "C" {
void widen(const unsigned short* h, float* out, ptrdiff_t n, int fmt) {
  for (ptrdiff_t i = 0; i < n; ++i) out[i] = lowp_load_half(h[i], fmt);
}
void narrow(const float* x, unsigned short* out, ptrdiff_t n, int fmt) {
  for (ptrdiff_t i = 0; i < n; ++i) out[i] = lowp_store_half(x[i], fmt);
}
void random16(const unsigned int* seed, const unsigned int* step, const unsigned int* index, unsigned int* out,
              ptrdiff_t n) {
  for (ptrdiff_t i = 0; i < n; ++i) out[i] = lowp_random16(seed[i], step[i], index[i]);
}
void stochastic(const float* x, const unsigned int* bits16, unsigned short* out, ptrdiff_t n) {
  for (ptrdiff_t i = 0; i < n; ++i) out[i] = lowp_f32_to_bf16_stochastic(x[i], bits16[i]);
}
void store_param(const float* x, unsigned short* out, ptrdiff_t n, int fmt, int stochastic, unsigned int seed,
                 unsigned int step, ptrdiff_t first_index) {
  for (ptrdiff_t i = 0; i < n; ++i)
    out[i] = lowp_store_param(x[i], fmt, stochastic, seed, step, static_cast<unsigned int>(first_index + i));
}
}
"""


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    lib = _build(tmp_path_factory, "lowp", _WRAPPERS)
    vp, n, i32, u32 = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_uint
    lib.widen.argtypes = [vp, vp, n, i32]
    lib.narrow.argtypes = [vp, vp, n, i32]
    lib.random16.argtypes = [vp, vp, vp, vp, n]
    lib.stochastic.argtypes = [vp, vp, vp, n]
    lib.store_param.argtypes = [vp, vp, n, i32, i32, u32, u32, n]
    return lib


@njit
def _lowp_widen(h, fmt, out):
    for i in range(h.size):
        out[i] = lowp.load_half(h[i], fmt)


@njit
def _lowp_narrow(x, fmt, out):
    for i in range(x.size):
        out[i] = lowp.store_half(x[i], fmt)


@njit
def _lowp_random16(seed, step, index, out):
    for i in range(seed.size):
        out[i] = lowp.random16(seed[i], step[i], index[i])


@njit
def _lowp_stochastic(x, bits16, out):
    for i in range(x.size):
        out[i] = lowp.f32_to_bf16_stochastic(x[i], bits16[i])


@njit
def _lowp_store_param(x, lp, first_index, out):
    for i in range(x.size):
        out[i] = lowp.store_param(x[i], lp, first_index + i)


def _c_widen(lib, h, fmt):
    out = np.empty(h.size, np.float32)
    lib.widen(_ptr(h), _ptr(out), h.size, fmt)
    return out


def _c_narrow(lib, x, fmt):
    out = np.empty(x.size, np.uint16)
    lib.narrow(_ptr(x), _ptr(out), x.size, fmt)
    return out


def _assert_same_bits(got, want, inputs):
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{bad.size} differ; first inputs {inputs[bad[:5]]!r}: "
                           f"C {got[bad[:5]]!r} vs lowp {want[bad[:5]]!r}")


def _rounding_patterns() -> np.ndarray:
    """float32 bit patterns at every rounding boundary of both half formats, and specials.

    Every value of the high 20 bits with the low 12 in {0, 1, 0x7FF, 0x800, 0x801, 0xFFF}: with
    bits 12 and up free, that puts an exact tie, one below and one above it at every rounding
    position from bit 13 (float16 normals) over bit 16 (bfloat16) to float16's subnormals
    (bits 14-24), for every sign, exponent and kept mantissa: 6.3M patterns.
    """
    high = np.arange(1 << 20, dtype=np.uint32) << 12
    low = np.array([0, 1, 0x7FF, 0x800, 0x801, 0xFFF], np.uint32)
    grid = (high[:, None] | low[None, :]).reshape(-1)
    specials = np.array([
        0, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF,  # NaNs, payloads
        0x7FC0DEAD, 0x7F80BEEF, 0x7FFF8000, 0x7F808000,  # NaN payloads in and below bfloat16's bits
        1, 0x007FFFFF, 0x00800000, 0x80000001, 0x7F7FFFFF, 0xFF7FFFFF,  # float32 subnormals, extremes
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FFFFF, 0x47800000,  # 65504 .. 65520 .. 65536
        0x38800000, 0x387FFFFF, 0x387FF000, 0x387FE000, 0x38800001,  # around float16's smallest normal
        0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x33C00000, 0x33400000,  # its smallest subnormal
        0x3F800000, 0xBF800000, 0x3F808000, 0x3F818000, 0x3F800FFF, 0x3F801000, 0x3F803000,  # 1.0 and ties
    ], np.uint32)
    return np.concatenate([specials, grid])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_every_half_pattern_widens_like_lowp(clib, fmt):
    h = np.arange(1 << 16, dtype=np.uint16)
    want = np.empty(h.size, np.float32)
    _lowp_widen(h, FORMATS[fmt], want)
    _assert_same_bits(_c_widen(clib, h, FORMATS[fmt]).view(np.uint32), want.view(np.uint32), h)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_float32_narrows_like_lowp_at_every_boundary_and_at_random(clib, fmt):
    rng = np.random.default_rng(11)
    bits = np.concatenate([_rounding_patterns(), rng.integers(0, 1 << 32, 3_000_000, dtype=np.uint32)])
    x = bits.view(np.float32)
    want = np.empty(x.size, np.uint16)
    _lowp_narrow(x, FORMATS[fmt], want)
    _assert_same_bits(_c_narrow(clib, x, FORMATS[fmt]), want, bits)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_every_half_value_round_trips(clib, fmt):
    """A fixed point of the C functions themselves: a half value widened and narrowed is itself
    (NaNs aside: float16's come back canonical)."""
    h = np.arange(1 << 16, dtype=np.uint16)
    x = _c_widen(clib, h, FORMATS[fmt])
    keep = ~np.isnan(x)
    assert keep.sum() > 60_000
    np.testing.assert_array_equal(_c_narrow(clib, x, FORMATS[fmt])[keep], h[keep])


def test_random16_matches_lowp_over_a_grid_and_at_random(clib):
    """``launch`` hands the kernels seed and counter as 32-bit words (``& 0xFFFFFFFF``) and the kernel
    the index as ``unsigned int``: lowp masks its int64 arguments the same way."""
    rng = np.random.default_rng(12)
    edges = np.array([0, 1, 2, 5, 1000, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3], np.int64)
    seeds = np.concatenate([edges[:9], rng.integers(0, 2**32, 4)])  # the optimizer's seed is < 2**32
    steps = np.concatenate([edges, rng.integers(0, 2**48, 4)])
    indices = np.concatenate([np.arange(1024), edges, rng.integers(0, 2**32, 64)])
    grid = [a.reshape(-1) for a in np.meshgrid(seeds, steps, indices, indexing="ij")]
    randoms = [rng.integers(0, 2**32, 1_000_000, dtype=np.int64) for _ in range(3)]
    seed, step, index = (np.concatenate([g, r]) for g, r in zip(grid, randoms))
    want = np.empty(seed.size, np.int64)
    _lowp_random16(seed, step, index, want)
    as32 = [np.ascontiguousarray(a & MASK32).astype(np.uint32) for a in (seed, step, index)]
    got = np.empty(seed.size, np.uint32)
    clib.random16(*(_ptr(a) for a in as32), _ptr(got), seed.size)
    _assert_same_bits(got.astype(np.int64), want, np.stack([seed, step, index], axis=1))
    assert np.unique(got[-1_000_000:]).size == 1 << 16  # every 16-bit value drawn


def test_stochastic_rounding_matches_lowp(clib):
    rng = np.random.default_rng(13)
    patterns = _rounding_patterns()
    bits = np.concatenate([patterns[rng.integers(0, patterns.size, 2_000_000)],
                           rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint32), patterns[:64]])
    x = bits.view(np.float32)
    random = rng.integers(0, 1 << 16, x.size, dtype=np.uint32)
    random[-64:] = 0xFFFF  # the largest draw on every special
    want = np.empty(x.size, np.uint16)
    _lowp_stochastic(x, random.astype(np.int64), want)
    got = np.empty(x.size, np.uint16)
    clib.stochastic(_ptr(x), _ptr(random), _ptr(got), x.size)
    _assert_same_bits(got, want, bits)


@pytest.mark.parametrize("lp", [(lowp.BFLOAT16, 1, 7, 3), (lowp.BFLOAT16, 1, 2**32 - 1, 2**32 + 5),
                                (lowp.BFLOAT16, 0, 7, 3), (lowp.FLOAT16, 1, 7, 3), (lowp.FLOAT16, 0, 0, 0)])
def test_store_param_matches_lowp_across_the_index_wrap(clib, lp):
    """The param's rounding as a kernel does it, for element indices that cross 2**32."""
    rng = np.random.default_rng(14)
    x = (rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 17, 200_000))).astype(np.float32)
    first = 2**32 - 100_000
    want = np.empty(x.size, np.uint16)
    _lowp_store_param(x, lp, first, want)
    got = np.empty(x.size, np.uint16)
    clib.store_param(_ptr(x), _ptr(got), x.size, lp[0], lp[1], lp[2] & MASK32, lp[3] & MASK32, first)
    _assert_same_bits(got, want, x.view(np.uint32))
