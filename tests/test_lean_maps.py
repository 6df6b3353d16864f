"""The 8-bit quantiser of lean optimizer state: bitsandbytes' maps, exact round trips, the nearest
code against a brute-force argmin, and the host loop vectorised."""

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit, prange

from gpuadam.kernels import lean_maps as L
from gpuadam.kernels import lean_rules
from gpuadam.kernels.lowp import f32_from_bits

MAPS = {"signed": (L.SIGNED, L.SIGNED_BUCKETS, L.SIGNED_THRESHOLDS),
        "unsigned": (L.UNSIGNED, L.UNSIGNED_BUCKETS, L.UNSIGNED_THRESHOLDS)}


@njit(cache=False)
def _codes_of(x, table, thr):
    out = np.empty(x.size, np.uint8)
    for i in range(x.size):
        out[i] = L.nearest_code(x[i], table, thr)
    return out


def _brute_force(x, codes):
    """argmin over the 256 codes of the float64 distance, the first (lower) code on a tie."""
    d = np.abs(x.astype(np.float64)[:, None] - codes.astype(np.float64)[None, :])
    return np.argmin(d, axis=1)


def _hard_inputs(codes, thr):
    """Every code, every midpoint and its float32 neighbours, each bucket's edges, random values
    over the range and far outside it, zeros of both signs."""
    mids = thr[:-1]
    near = np.concatenate([mids, np.nextafter(mids, np.float32(-2)), np.nextafter(mids, np.float32(2)),
                           np.nextafter(np.nextafter(mids, np.float32(2)), np.float32(2))])
    tops = np.arange(0x3400, 0x3F81, dtype=np.uint32) << 16
    edges = np.concatenate([tops, tops | 0xFFFF, tops | 0x80000000, tops | 0x8000FFFF]).view(np.float32)
    rng = np.random.default_rng(0)
    rand = np.concatenate([rng.uniform(-1.2, 1.2, 20000),
                           rng.choice([-1, 1], 20000) * 10 ** rng.uniform(-9, 0.2, 20000)])
    extra = np.array([0.0, -0.0, 1.0, -1.0, 5.0, -5.0, 1e-30, -1e-30, 1e6, -1e6], np.float64)
    return np.concatenate([codes, near, edges, rand.astype(np.float32), extra.astype(np.float32)]).astype(np.float32)


def test_maps_are_bitsandbytes_dynamic_maps():
    """Our maps are, bit for bit, those of bitsandbytes' ``create_dynamic_map`` (built here from its
    definition: 7 decades of linear grids, 0 and 1)."""
    for name, (codes, _, _) in MAPS.items():
        assert codes.dtype == np.float32 and codes.size == 256 and np.unique(codes).size == 256, name
        assert np.all(np.diff(codes) > 0), name
    assert abs(float(L.SIGNED[L.SIGNED > 0].min()) - 5.5e-7) < 1e-12
    assert L.SIGNED[-1] == 1.0 and L.SIGNED[0] > -1.0 and L.UNSIGNED[0] == 0.0
    bnb = pytest.importorskip("bitsandbytes.functional")
    for signed, codes in ((True, L.SIGNED), (False, L.UNSIGNED)):
        theirs = bnb.create_dynamic_map(signed=signed).numpy()
        assert np.array_equal(theirs.view(np.uint32), codes.view(np.uint32)), signed


@pytest.mark.parametrize("name", sorted(MAPS))
def test_every_code_round_trips(name):
    codes, table, thr = MAPS[name]
    assert np.array_equal(_codes_of(codes, table, thr), np.arange(256))
    # through a block's absmax too: codes -> values -> codes
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, 8 * L.BLOCK).astype(np.uint8)
    q[:: L.BLOCK] = 255  # the block's absmax is then its scale exactly
    absmax = (10.0 ** rng.uniform(-8, 3, 8)).astype(np.float32)
    values = L.dequantize(q, absmax, codes)
    again, absmax_again = L.quantize(values, codes)
    assert np.array_equal(absmax_again, absmax) and np.array_equal(again, q)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_nearest_code_is_the_argmin(name):
    codes, table, thr = MAPS[name]
    x = _hard_inputs(codes, thr)
    got = _codes_of(x, table, thr)
    want = _brute_force(x, codes)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (x[bad[:5]], got[bad[:5]], want[bad[:5]])
    # and the NumPy quantiser (searchsorted) agrees with the compiled one
    assert np.array_equal(np.searchsorted(L.thresholds(codes), x, side="left"), got)


def test_a_bucket_spanning_three_codes_is_refused():
    t = L.SIGNED_THRESHOLDS[200]
    crowded = np.sort(np.concatenate([L.SIGNED_THRESHOLDS[:-1], [np.nextafter(t, np.float32(2))]]))
    with pytest.raises(ValueError, match="spans codes"):
        L.bucket_table(crowded)


def _estimate_misses(estimate):
    """``misses(first_bits, last_bits, sign, table, thr)``: over every float32 with magnitude bits
    in ``[first_bits, last_bits)`` and the given sign, how many ``estimate_code`` gets wrong
    without marking them unsure, and how many it marks."""
    rows, ties, zero = estimate  # frozen into the loop (a parallel loop takes no nested tuples)

    @njit(parallel=True, cache=False)
    def misses(first_bits, last_bits, sign, table, thr):
        wrong = 0
        marked = 0
        for k in prange(last_bits - first_bits):
            x = f32_from_bits((first_bits + k) | (sign << 31))
            code, unsure = L.estimate_code(x, rows, ties, zero)
            if unsure:
                marked += 1
            elif code != L.nearest_code(x, table, thr):
                wrong += 1
        return wrong, marked

    return misses


_TINY = 0x33000000  # 2**-25: below it every magnitude is under the first midpoint (checked below)
_ONE = 0x3F800001


@pytest.mark.parametrize("name", sorted(MAPS))
def test_estimate_code_is_nearest_code_for_every_float(name):
    """The vectorisable estimate equals ``nearest_code`` on every float32 of magnitude 2**-25 to 1,
    both signs, except where it says it is unsure; and it is unsure rarely."""
    codes, table, thr = MAPS[name]
    estimate = L.SIGNED_ESTIMATE if name == "signed" else L.UNSIGNED_ESTIMATE
    rows, ties, zero = estimate
    assert float(thr[0 if name == "unsigned" else 127]) > 2.0**-25 * 4  # the first midpoint above 0
    misses = _estimate_misses(estimate)
    for sign in (0, 1):
        wrong, marked = misses(_TINY, _ONE, sign, table, thr)
        assert wrong == 0, (name, sign, wrong)
        assert marked < 2e-4 * (_ONE - _TINY), (name, sign, marked)
    # the rest, sampled: tiny and huge magnitudes, infinities, NaNs, zeros
    rng = np.random.default_rng(3)
    bits = np.concatenate([rng.integers(0, _TINY, 20000), rng.integers(_ONE, 0x7FFFFFFF, 20000),
                           [0, 0x7F800000, 0x7FC00000, 0x7F800001, 0x3F800000]]).astype(np.uint32)
    x = np.concatenate([bits, bits | 0x80000000]).view(np.float32)
    got = _estimates(x, rows, ties, zero)
    sure = got[:, 1] == 0
    assert np.array_equal(got[sure, 0], _codes_of(x, table, thr)[sure])


@njit(cache=False)
def _estimates(x, rows, ties, zero):
    out = np.empty((x.size, 2), np.int32)
    for i in range(x.size):
        out[i, 0], out[i, 1] = L.estimate_code(x[i], rows, ties, zero)
    return out


def test_the_every_float_check_finds_a_wrong_grid():
    """The check above can fail: a decade's grid shifted by a tenth of a step (and its estimate
    then trusted to the same margin) gives wrong codes that it reports."""
    rows, ties, zero = L.SIGNED_ESTIMATE
    d = 5
    boundary, inv_step, offset, top = rows[d]
    shifted = (boundary, inv_step, np.float32(offset - np.float32(0.1)), top)
    bad_rows = rows[:d] + (shifted,) + rows[d + 1:]
    lo = int(np.float32(rows[d][0]).view(np.uint32))
    hi = int(np.float32(rows[d + 1][0]).view(np.uint32))
    wrong, _ = _estimate_misses((bad_rows, ties, zero))(lo, hi, 0, L.SIGNED_BUCKETS, L.SIGNED_THRESHOLDS)
    assert wrong > 1000


def test_a_map_off_its_grid_is_refused():
    codes = L.SIGNED.copy()
    codes[200] = np.nextafter(np.float32((codes[199] + codes[201]) / 2), np.float32(2)) * np.float32(1.0001)
    with pytest.raises(ValueError, match="not a linear grid"):
        L.estimate_tables(codes)


_VECTORIZED = """
import re
from numba import njit, types
from gpuadam.kernels import lean_cpu, lean_maps, lean_rules
f32, u8, u16 = types.float32[::1], types.uint8[::1], types.uint16[::1]
c = types.UniTuple(types.float32, 12)

def report(name, fn, sig):
    fn.compile(sig)
    ir = fn.inspect_llvm(sig)
    print(name, len(re.findall(r"<\\d+ x float>", ir)), len(re.findall(r"masked.gather", ir)),
          len(re.findall(r"llvm.sqrt.v\\d+f32", ir)))

@njit
def quantize(x, absmax, q, unsure):
    lean_cpu.quantize_block(x, absmax, lean_maps.SIGNED_ESTIMATE, lean_maps.SIGNED_BUCKETS,
                            lean_maps.SIGNED_THRESHOLDS, q, unsure)

report("int8 quantize", quantize, (f32, types.float32, u8, u8))
for rule in lean_rules.RULES:
    report(f"{rule} int8 kernel", lean_cpu.KERNELS[rule + "/int8"].serial,
           (f32, f32, u8, f32, u8, f32, c, f32, u8, f32, f32, u8, f32, types.int64, u16))
    for key, (_, serial) in lean_cpu.KERNELS[rule + "/bf16state"].variants.items():
        report(f"{rule} bf16 {int(key)}", serial,
               (f32, f32, u16, u16, c, types.UniTuple(types.int64, 3), types.int64, u16))
"""


def test_lean_host_loops_vectorize(tmp_path):
    """The int8 block's quantiser (the estimate, with no gathers) and its update (a vector square
    root in the kernel), and the bfloat16 loops, hold vector float math, for every rule with lean
    kernels. Own process, empty cache: Numba cannot show the IR of cached code."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _VECTORIZED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {" ".join(line.split()[:-3]): tuple(map(int, line.split()[-3:])) for line in out.stdout.splitlines()
            if line.strip()}
    assert set(rows) == {"int8 quantize"} | {f"{r} {k}" for r in lean_rules.RULES
                                            for k in ("int8 kernel", "bf16 0", "bf16 1")}, rows
    assert all(vectors > 0 for vectors, _, _ in rows.values()), rows
    assert rows["int8 quantize"][1] == 0, rows  # no gathers
    for r in lean_rules.RULES:  # the update's sqrt on vectors
        assert rows[f"{r} int8 kernel"][2] > 0 and rows[f"{r} bf16 1"][2] > 0, rows
