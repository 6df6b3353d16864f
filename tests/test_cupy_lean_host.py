"""The CuPy int8-state kernel's C source (``kernels/cupy_lean.py``) without a GPU: its element
functions compiled with g++ around a serial block reduction, bit for bit the Numba host kernel;
the whole source compiled for sm_90 with NVRTC: no float64, no spills, no local memory."""

import ctypes

import numpy as np
import pytest
from helpers import build_host_library

from gpuadam import machine_code
from gpuadam.hyper import AdamHyper
from gpuadam.kernels import cupy_lean, lean_cpu
from gpuadam.kernels import lean_maps as L
from gpuadam.kernels.rules import N_CONSTANTS

MAPS = (L.SIGNED, L.SIGNED_BUCKETS, L.SIGNED_THRESHOLDS, L.UNSIGNED, L.UNSIGNED_BUCKETS, L.UNSIGNED_THRESHOLDS)

HOST_DRIVER = r"""
extern "C" void host_adam_int8(float* p, const float* g, unsigned char* mq, float* m_absmax,
    unsigned char* vq, float* v_absmax, const float* c, const float* smap, const unsigned char* sb,
    const float* sthr, const float* umap, const unsigned char* ub, const float* uthr, long long n) {
  if (c[LEAN_SKIP]) return;
  float x[LEAN_BLOCK], m[LEAN_BLOCK], v[LEAN_BLOCK];
  for (long long b = 0; b < (n + LEAN_BLOCK - 1) / LEAN_BLOCK; ++b) {
    unsigned int m_top = 0, v_top = 0;
    for (int t = 0; t < LEAN_BLOCK; ++t) {  /* the threads of one block, then its reduction */
      const long long i = b * LEAN_BLOCK + t;
      x[t] = m[t] = v[t] = lowp_f32_from_bits(0u);
      if (i < n) lean_int8_update(i, b, p, g, mq, m_absmax, vq, v_absmax, c, smap, umap, x[t], m[t], v[t]);
      m_top = std::max(m_top, lean_magnitude_bits(m[t]));
      v_top = std::max(v_top, lean_magnitude_bits(v[t]));
    }
    const float new_ma = lowp_f32_from_bits(m_top), new_va = lowp_f32_from_bits(v_top);
    for (int t = 0; t < LEAN_BLOCK; ++t) {
      const long long i = b * LEAN_BLOCK + t;
      if (i < n) lean_int8_store(i, x[t], m[t], v[t], new_ma, new_va, p, mq, vq, sb, sthr, ub, uthr);
    }
    m_absmax[b] = new_ma;
    v_absmax[b] = new_va;
  }
}
"""


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    source = ("#include <algorithm>\n#include <cmath>\nusing std::max;\nusing std::sqrt;\n"
              + cupy_lean.INT8_SOURCE + HOST_DRIVER)
    fn = build_host_library(tmp_path_factory, "lean", source).host_adam_int8
    fn.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_longlong]
    fn.restype = None
    return fn


def _case(seed, n, skip=False):
    rng = np.random.default_rng(seed)
    hyper = AdamHyper.from_kwargs(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
                                  maximize=seed % 2 == 1, eps_root=0.0, bias_correction=True,
                                  decoupled_weight_decay=seed % 2 == 0)
    c = np.array(hyper.constants(5, np.float32, 1.0), np.float32)
    c[-1] = 1.0 if skip else 0.0
    blocks = -(-n // L.BLOCK)
    arrays = [rng.standard_normal(n).astype(np.float32),
              (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0, n)).astype(np.float32),
              rng.integers(0, 256, n).astype(np.uint8), rng.uniform(0.01, 0.1, blocks).astype(np.float32),
              rng.integers(0, 256, n).astype(np.uint8), rng.uniform(1e-4, 1e-3, blocks).astype(np.float32)]
    arrays[3][0] = 0.0
    return arrays, c


@pytest.mark.parametrize("seed, n", [(0, 3 * L.BLOCK + 40), (1, 4096 + 17)])
def test_c_source_is_the_host_kernel_bit_for_bit(host_lib, seed, n):
    arrays, c = _case(seed, n)
    ours = [a.copy() for a in arrays]
    host_lib(*(a.ctypes.data for a in ours), c.ctypes.data, *(m.ctypes.data for m in MAPS), n)
    numba = [a.copy() for a in arrays]
    lean_cpu.KERNELS["adam/int8"](*numba, tuple(np.float32(x) for x in c))
    for got, want in zip(ours, numba):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not np.array_equal(ours[0], arrays[0])  # it did step


def test_c_source_skips(host_lib):
    arrays, c = _case(2, 1000, skip=True)
    ours = [a.copy() for a in arrays]
    host_lib(*(a.ctypes.data for a in ours), c.ctypes.data, *(m.ctypes.data for m in MAPS), 1000)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, ours))


def test_cuda_source_for_sm_90():
    try:
        machine_code.find_ptxas()
        ptx = machine_code.compile_source_ptx(cupy_lean.INT8_SOURCE, cupy_lean.NAME, "sm_90")
    except (machine_code.ToolMissing, RuntimeError) as exc:
        pytest.skip(f"no NVRTC/nvcc or ptxas: {exc}")
    f64, loads, stores = machine_code.ptx_counts(ptx)
    registers, spills, stack = machine_code.ptxas_resources(ptx, "sm_90")
    assert f64 == 0 and spills == 0 and stack == 0, (f64, spills, stack)
    # p, g, two codes, six table lookups, two absmax, and the twelve constants once each
    assert stores == 5 and loads == 4 + 6 + 2 + N_CONSTANTS, (loads, stores)
    assert registers <= 32  # as every other kernel: full occupancy
