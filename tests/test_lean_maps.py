"""The 8-bit quantiser of lean optimizer state: bitsandbytes' maps, exact round trips, the nearest
code against a brute-force argmin, and the host loop vectorised."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from gpuadam.kernels import lean_maps as L

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


_VECTORIZED = """
import re
from numba import types
from gpuadam.kernels import lean_cpu
f32, u8, u16 = types.float32[::1], types.uint8[::1], types.uint16[::1]
c = types.UniTuple(types.float32, 12)
int8 = lean_cpu.KERNELS["adam/int8"]
sig = (f32, f32, u8, f32, u8, f32, c, f32, u8, f32, f32, u8, f32, types.int64, u16)
int8.serial.compile(sig)
print("int8", len(re.findall(r"<\\d+ x float>", int8.serial.inspect_llvm(sig))))
bf16 = lean_cpu.KERNELS["adam/bf16state"]
for key, (_, serial) in bf16.variants.items():
    sig = (f32, f32, u16, u16, c, types.UniTuple(types.int64, 3), types.int64, u16)
    serial.compile(sig)
    print("bf16", int(key), len(re.findall(r"<\\d+ x float>", serial.inspect_llvm(sig))))
"""


def test_lean_host_loops_vectorize(tmp_path):
    """The int8 block loop (dequantise, update, absmax, nearest code) and the bfloat16 loops hold
    vector float math. Own process, empty cache: Numba cannot show the IR of cached code."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _VECTORIZED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = {" ".join(line.split()[:-1]): int(line.split()[-1]) for line in out.stdout.splitlines() if line.strip()}
    assert set(counts) == {"int8", "bf16 0", "bf16 1"}, counts
    assert all(n > 0 for n in counts.values()), counts
    assert re.search(r"\d", out.stdout)
