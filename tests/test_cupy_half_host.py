"""The CuPy backend's float16/bfloat16 kernels without a GPU.

1. ``cupy_lowp.LOWP_SOURCE`` compiled with g++ is bit for bit ``kernels.lowp`` (run by Numba on the
   CPU): every half pattern widened, float32 patterns narrowed around every rounding boundary and
   at random, the hash, stochastic rounding.
2. The half kernels' ``cuda_source`` — the very text compiled to PTX — compiled with g++ (the grid
   is one thread there) and run against the Numba CPU half kernels, for every rule, both layouts,
   scalar and device constants, with and without stochastic rounding: bit for bit.
3. The same sources as PTX (NVRTC, in a child process): float32 only, no local memory, one pass
   over each element, full occupancy, and CuPy's own generated kernel does the same.
"""

from __future__ import annotations

import collections
import ctypes
import re
import zlib

import numpy as np
import pytest
from family_cases import CASES, case_id, describe
from helpers import build_host_library, narrow_half, ptx_from_child, ptx_instructions, widen_half
from numba import njit

from gpuadam.hyper import AdamHyper
from gpuadam.kernels import cupy_elementwise as ce
from gpuadam.kernels import lowp
from gpuadam.kernels.cupy_lowp import LOWP_SOURCE
from gpuadam.kernels.numba_cpu import KERNELS
from gpuadam.kernels.rules import SKIP

FORMATS = {"bfloat16": lowp.BFLOAT16, "float16": lowp.FLOAT16}
MASK32 = 0xFFFFFFFF


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
    lib = build_host_library(tmp_path_factory, "lowp", _WRAPPERS)
    vp, n, i32, u32 = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_uint
    lib.widen.argtypes = [vp, vp, n, i32]
    lib.narrow.argtypes = [vp, vp, n, i32]
    lib.random16.argtypes = [vp, vp, vp, vp, n]
    lib.stochastic.argtypes = [vp, vp, vp, n]
    lib.store_param.argtypes = [vp, vp, n, i32, i32, u32, u32, n]
    return lib



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
    widen_half(h, FORMATS[fmt], want)
    _assert_same_bits(_c_widen(clib, h, FORMATS[fmt]).view(np.uint32), want.view(np.uint32), h)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_float32_narrows_like_lowp_at_every_boundary_and_at_random(clib, fmt):
    rng = np.random.default_rng(11)
    bits = np.concatenate([_rounding_patterns(), rng.integers(0, 1 << 32, 3_000_000, dtype=np.uint32)])
    x = bits.view(np.float32)
    want = np.empty(x.size, np.uint16)
    narrow_half(x, FORMATS[fmt], want)
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


# ---------------------------------------------------------------------------------------------
# 2. The kernels' CUDA source on the host, against the Numba CPU half kernels

# The CUDA names a kernel's text uses, for a grid of one thread.
_HOST_CUDA = """
#include <algorithm>
#include <cmath>
#include <cstddef>
using std::fabs;
using std::max;
using std::sqrt;
#define __global__
struct HostDim { unsigned int x; };
static const HostDim blockIdx = {0}, threadIdx = {0}, blockDim = {1}, gridDim = {1};
"""

LAYOUTS = ce.HALF_LAYOUTS
_C_ARG = {"float32": ctypes.c_float, "int32": ctypes.c_int, "uint32": ctypes.c_uint}


def _host_kernels_source() -> str:
    """One translation unit: the half preamble once, then every half kernel's ``cuda_source``."""
    parts = [_HOST_CUDA, ce.HALF_PREAMBLE]
    for rule in ce.SNIPPETS:
        for layout in LAYOUTS:
            for device_constants in (False, True):
                _, source = ce.cuda_source(rule, "float32", device_constants, layout)
                assert source.startswith(ce.HALF_PREAMBLE)
                parts.append(source[len(ce.HALF_PREAMBLE):])
    return "".join(parts)


@pytest.fixture(scope="module")
def klib(tmp_path_factory):
    return build_host_library(tmp_path_factory, "half_kernels", _host_kernels_source())


def _c_kernel(lib, rule, layout, device_constants):
    """The kernel as ``cupy_elementwise.launch`` calls it: ``(arrays, c, lp, p16)``."""
    fn = getattr(lib, ce.kernel_name(rule, device_constants, layout))
    ins, outs = ce.kernel_params(rule, device_constants, layout)
    fn.argtypes = [ctypes.c_void_p if raw else _C_ARG[t] for raw, t, _ in ins + outs] + [ctypes.c_ssize_t]
    fn.restype = None

    def run(arrays, c, lp, p16):
        p, g, *state = arrays
        fmt, stochastic, seed, counter, base = lp
        if device_constants:
            c = np.ascontiguousarray(c, np.float32)
            constants = [_ptr(c)]
        else:
            constants = [c[k] for k, _ in ce.constant_params(rule)]
        scalars = [fmt, stochastic, seed & MASK32, counter & MASK32, base & MASK32] if layout == "half" else [fmt]
        out = [p, *state] + ([p16] if layout == "master" else [])
        fn(_ptr(g), *constants, *scalars, *(_ptr(a) for a in out), p.size)

    return run


# ``(id, optimizer name, keywords)``: the family's cases (Adam's flag grid among them)
CASE_LIST = [(case_id(c), *c) for c in CASES]
SIZES = (1, 7, 1001)
STEPS = 8


def _halves(x: np.ndarray, fmt: int) -> np.ndarray:
    out = np.empty(x.size, np.uint16)
    narrow_half(np.ascontiguousarray(x, np.float32), fmt, out)
    return out


def _start(rng, size, fmt, layout, names, init):
    """A param, gradients and the state, as the optimizer would hold them in ``layout``."""
    # magnitudes from 1e-5 (float16 subnormals) to 1e2, signs mixed, a few exact zeros in p
    p = rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(-5, 2, size)
    p[rng.random(size) < 0.05] = 0.0
    grads = [_halves(rng.choice([-1.0, 1.0], size) * 10.0 ** rng.uniform(-4, 1.5, size), fmt) for _ in range(STEPS)]
    p16 = _halves(p, fmt)
    if layout == "half":
        state = [_halves(np.full(size, init.get(n, 0.0)), fmt) for n in names]
        return p16, grads, state, p16
    master = np.empty(size, np.float32)
    widen_half(p16, fmt, master)
    state = [np.full(size, init.get(n, 0.0), np.float32) for n in names]
    return master, grads, state, p16


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASE_LIST, ids=[c[0] for c in CASE_LIST])
def test_half_kernel_source_matches_numba_cpu_bit_for_bit(klib, case, layout, fmt):
    """Every rule, both layouts, scalar and device constants, RNE and (bfloat16 half state)
    stochastic rounding, with a counter that wraps past 2**32: the same bits as Numba's loops."""
    case_name, name, kw = case
    hyper, rule, names, init = describe(name, kw)
    numba_kernel = KERNELS[f"{rule}/half"]

    def numba_run(arrays, c, lp, p16):
        numba_kernel(*arrays, c, lp, p16)

    f = FORMATS[fmt]
    rng = np.random.default_rng(zlib.crc32(f"{case_name}-{layout}-{fmt}".encode()))
    for size in SIZES:
        p0, grads, state0, p16_0 = _start(rng, size, f, layout, names, init)
        for device_constants in (False, True):
            c_run = _c_kernel(klib, rule, layout, device_constants)
            for stochastic in (0, 1) if layout == "half" else (0,):
                results = []
                for run in (c_run, numba_run):
                    p, state = p0.copy(), [s.copy() for s in state0]
                    p16 = p if layout == "half" else p16_0.copy()  # half state: the param is its own copy
                    for t, g in enumerate(grads, start=1):
                        # the counter wraps mid-run, and so does the index base (a shard's first index)
                        lp = (f, stochastic, 2**32 - 2, 2**32 - 4 + t, 2**32 - 3)
                        run((p, g, *state), hyper.constants(t, np.float32), lp, p16)
                    results.append([p, *state, p16])
                for k, (a, b) in enumerate(zip(*results)):
                    bits = np.uint16 if a.dtype == np.uint16 else np.uint32
                    np.testing.assert_array_equal(a.view(bits), b.view(bits), err_msg=(
                        f"array {k} of (p, *state, p16), size {size}, device constants {device_constants}, "
                        f"stochastic {stochastic}"))
                if size == SIZES[-1]:
                    assert not np.array_equal(results[0][0], p0), "the params did not move"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_skipped_step_changes_nothing(klib, layout):
    """The skip flag (a non-finite gradient under skip_nonfinite) returns before any store."""
    hyper, rule, names, init = describe("Adam", {"amsgrad": True})
    rng = np.random.default_rng(15)
    p, grads, state, p16 = _start(rng, 101, lowp.BFLOAT16, layout, names, init)
    c = list(hyper.constants(1, np.float32))
    c[SKIP] = np.float32(1)
    for device_constants in (False, True):
        before = [a.copy() for a in (p, *state, p16)]
        _c_kernel(klib, rule, layout, device_constants)((p, grads[0], *state), tuple(c), (0, 1, 3, 4, 0), p16)
        for a, b in zip((p, *state, p16), before):
            np.testing.assert_array_equal(a, b)


def test_stochastic_rounding_draws_per_element_and_per_step(klib):
    """bfloat16 half state with stochastic rounding: a step far below one ulp moves some elements
    and not others, and the next counter moves a different set (not one draw for all)."""
    hyper, rule, names, _ = describe("SGD", {"lr": 2.0**-12})
    kernel = _c_kernel(klib, rule, "half", False)
    moved = []
    for counter in (1, 2):
        p = _halves(np.ones(4096), lowp.BFLOAT16)
        kernel((p, _halves(np.ones(4096), lowp.BFLOAT16)), hyper.constants(1, np.float32),
               (lowp.BFLOAT16, 1, 9, counter, 0), p)
        moved.append(p != _halves(np.ones(1), lowp.BFLOAT16)[0])
    # an update of 2**-12 against an ulp of 2**-8 below 1.0: a sixteenth of the elements move
    for m in moved:
        assert 150 < m.sum() < 370
    assert not np.array_equal(moved[0], moved[1])


def test_launch_hands_the_kernel_what_numba_gets():
    """``launch`` without CuPy's kernels: the layout from the param's dtype, the 32-bit words, the
    outputs in place (the kernel objects are replaced by recorders)."""
    calls = []

    class Recorder:
        def __init__(self, key):
            self.key = key

        def __call__(self, *args, size):
            calls.append((self.key, args, size))

    saved = dict(ce._kernels)
    try:
        for rule in ("adam", "sgd"):
            for dc in (False, True):
                for layout in (None, *LAYOUTS):
                    ce._kernels[rule, dc, layout] = Recorder((rule, dc, layout))
        p16, g, m16, v16 = (np.zeros(5, np.uint16) for _ in range(4))
        master, m, v = (np.zeros(5, np.float32) for _ in range(3))
        c = AdamHyper().constants(1, np.float32)
        ce.launch("adam/half", (p16, g, m16, v16), c, (1, 1, 2**32 + 0xF0000003, 2**33 + 0xF0000009, 2**32 + 7), p16)
        (key, args, size), = calls[-1:]
        assert key == ("adam", False, "half") and size == 5
        assert args[0] is g and args[1:13] == c
        assert [type(a) for a in args[13:18]] == [np.int32, np.int32, np.uint32, np.uint32, np.uint32]
        # seed, counter and index base as the hash's 32-bit words
        assert args[13:18] == (1, 1, 0xF0000003, 0xF0000009, 7)
        assert [a is b for a, b in zip(args[18:], (p16, m16, v16))] == [True] * 3 and len(args) == 21
        ce.launch("adam/half", (master, g, m, v), c, (0, 0, 5, 6, 0), p16)
        (key, args, size), = calls[-1:]
        assert key == ("adam", False, "master") and args[13] == 0 and type(args[13]) is np.int32
        assert [a is b for a, b in zip(args[14:], (master, m, v, p16))] == [True] * 4 and len(args) == 18
        sgd = describe("SGD", {})[0].constants(1, np.float32)
        ce.launch("sgd/half", (master, g), sgd, (0, 0, 5, 6, 0), p16)
        (key, args, size), = calls[-1:]
        assert key == ("sgd", False, "master") and args[1:6] == (sgd[0], sgd[1], sgd[2], sgd[SKIP], 0)
        ce.launch("sgd", (master, master), sgd)
        assert calls[-1][0] == ("sgd", False, None)
    finally:
        ce._kernels.clear()
        ce._kernels.update(saved)


def test_kernel_names_parse_and_refuse():
    assert ce.parse_kernel("adam") == ("adam", False, None)
    assert ce.parse_kernel("adam/device-constants") == ("adam", True, None)
    assert ce.parse_kernel("radam/master") == ("radam", False, "master")
    assert ce.parse_kernel("sgd/half/device-constants") == ("sgd", True, "half")
    for bad in ("adam/quarter", "adam/device-constants/half", "nope/half", "adam/half/master"):
        with pytest.raises(ValueError):
            ce.parse_kernel(bad)
    with pytest.raises(TypeError, match="float32"):
        ce.cuda_source("adam", "float64", layout="half")


def test_no_float_literal_or_double_in_the_c_sources():
    """g++ -Wdouble-promotion catches a double in what the host compiles; a float literal could
    still hide in a float context: none may appear (hex integer literals are the bit patterns)."""
    for text in (LOWP_SOURCE, ce.HALF_PREAMBLE, *(ce.operation(r, layout=lay) for r in ce.SNIPPETS for lay in LAYOUTS)):
        code = re.sub(r"0x[0-9A-Fa-f]+u?", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))
        assert not re.search(r"(?<![\w.])\d+\.\d*|\d+[eE][-+]?\d|\bdouble\b", code), code


# ---------------------------------------------------------------------------------------------
# 3. The half kernels as PTX (compiled in a child process)

ARCH = "sm_90"
VARIANTS = [f"/{layout}{dc}" for layout in LAYOUTS for dc in ("", "/device-constants")]

_COMPILE = """
import json, sys
from gpuadam import machine_code as mc
from gpuadam.kernels import cupy_elementwise as ce
try:
    import cupy  # noqa: F401  (CuPy's own generator needs CuPy, not a GPU)
except Exception:
    cupy = None
out = {}
for rule in ce.SNIPPETS:
    for variant in VARIANTS:
        kernel = rule + variant
        sources = {"ours": mc.cupy_ptx(kernel, "float32", ARCH)}
        if cupy is not None:
            for bits in (32, 64):
                name, src, options = ce.cupy_generated_source(kernel, "float32", index_32_bits=bits == 32)
                sources[f"cupy{bits}"] = mc.compile_source_ptx(src, name, ARCH, options)
        for origin, ptx in sources.items():
            try:
                resources = mc.ptxas_resources(ptx, ARCH)
            except mc.ToolMissing:
                resources = None
            out[f"{kernel}|{origin}"] = {"ptx": ptx, "resources": resources}
json.dump(out, sys.stdout)
""".replace("ARCH", repr(ARCH)).replace("VARIANTS", repr(VARIANTS))


@pytest.fixture(scope="module")
def ptx():
    return ptx_from_child(_COMPILE)



def _loop_traffic(text: str) -> list[tuple[int, int]]:
    """``(global loads, global stores)`` of each element loop: from a label that heads a not-unrolled
    loop (the kernels' ``#pragma unroll 1``) to the last branch back to it. The conversions' merge
    blocks make other backward branches inside the loop: they are no loops of their own."""
    loops = []
    for head in re.finditer(r"^(\$L__\w+):\s*\.pragma \"nounroll\";", text, re.M):
        latches = [b for b in re.finditer(rf"\bbra(?:\.uni)?\s+{re.escape(head.group(1))};", text)
                   if b.start() > head.end()]
        if latches:
            body = ptx_instructions(text[head.end() : latches[-1].start()])
            loops.append((sum(i.startswith("ld.global") for i in body), sum(i.startswith("st.global") for i in body)))
    return loops


def _per_element(rule: str, layout: str) -> tuple[int, int]:
    """Loads and stores per element: g, p and the state in; p and the state out (and p16)."""
    arrays = 1 + len(ce.OUTPUTS[rule])
    return arrays, arrays - 1 + (layout == "master")


def _math(text: str) -> collections.Counter:
    """The float arithmetic and the global loads/stores from the loops on, register numbers erased."""
    body = re.sub(r"%(\w+?)\d+", r"%\1", text[text.index('.pragma "nounroll"'):])
    return collections.Counter(i for i in ptx_instructions(body) if re.search(r"\.f32\b|^(ld|st)\.global", i))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", list(ce.SNIPPETS))
def test_half_ptx_is_float32_one_pass_full_occupancy(ptx, rule, variant):
    """Every half kernel, ours and CuPy's generated one: no float64, no local memory, each element
    read and written once per loop (a flag the loop does not change, such as the format, may copy
    the loop once per value), the device constants read once before it, and at most 32 registers
    with no spill (full occupancy on sm_90), device constants included."""
    layout = variant.split("/")[1]
    per_element = _per_element(rule, layout)
    constants = len(ce.constant_params(rule)) if variant.endswith("/device-constants") else 0
    origins = [k.split("|")[1] for k in ptx if k.startswith(f"{rule}{variant}|")]
    assert "ours" in origins
    for origin in origins:
        entry = ptx[f"{rule}{variant}|{origin}"]
        text = entry["ptx"]
        assert re.findall(r"\.entry\s+(\w+)", text) == [ce.kernel_name(rule, bool(constants), layout)]
        code = ptx_instructions(text)
        loops = _loop_traffic(text)
        assert loops and all(t == per_element for t in loops) and len(loops) <= 2, (origin, loops, per_element)
        loads = sum(i.startswith("ld.global") for i in code)
        stores = sum(i.startswith("st.global") for i in code)
        assert (loads, stores) == (len(loops) * per_element[0] + constants, len(loops) * per_element[1]), origin
        assert not [i for i in code if re.match(r"(ld|st)\.local", i)], origin
        assert not [i for i in code if re.search(r"\.f64\b", i)], origin
        if entry["resources"] is not None:
            registers, spills, stack = entry["resources"]
            assert (spills, stack) == (0, 0), origin
            assert registers <= 32, (origin, registers)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", list(ce.SNIPPETS))
def test_half_cuda_source_does_cupys_arithmetic(ptx, rule, variant):
    """``cuda_source`` is faithful: CuPy's generated kernel has the very same float instructions and
    global loads/stores. Not the same loop text, as for the float32/float64 kernels: around the loops
    copied per format, the integer and predicate code for CuPy's ``CArray``/``CIndexer`` structs
    lands in other blocks than for plain pointers (and the labels are numbered differently)."""
    if f"{rule}{variant}|cupy32" not in ptx:
        pytest.skip("CuPy is not importable here")
    ours = _math(ptx[f"{rule}{variant}|ours"]["ptx"])
    for bits in (32, 64):
        assert _math(ptx[f"{rule}{variant}|cupy{bits}"]["ptx"]) == ours
