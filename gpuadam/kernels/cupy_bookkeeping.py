"""The cupy backend's device-side bookkeeping: the gradients' norm and the per-step constants.

The same two kernels as ``numba_cuda.grad_sumsq`` and ``numba_cuda.prepare``, as CuPy
``RawKernel``s, so that clipping, ``skip_nonfinite`` and ``capturable`` on the cupy backend need no
Numba CUDA. The constants come from each rule's own constants function and ``grad_factor``,
translated to C by ``c_from_python`` (no hand-written copy). Both kernels run on CuPy's current
stream, where the update kernels run, so a captured graph holds them all.

``sumsq_source`` and ``prepare_source`` compile with g++ too (``tests/test_cupy_bookkeeping_host.py``
runs them on the host against the Python): a thread's strided loop and the one-thread preparation
are plain functions; only the warp reduction and the atomics are device code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpuadam.kernels.c_from_python import PREFIX, c_functions, tuple_length
from gpuadam.kernels.cupy_lowp import FN_SOURCE, LOWP_SOURCE
from gpuadam.kernels.lowp import BFLOAT16
from gpuadam.kernels.rules import N_CONSTANTS, SKIP, grad_factor

THREADS = 256
BLOCKS_PER_SM = 8

_LOADS = {None: "g[i]", "bf16": "lowp_bf16_to_f32(g[i])", "f16": "lowp_f16_to_f32(g[i])"}


def sumsq_source(dtype: Any, fmt: str | None, masked: bool) -> tuple[str, str]:
    """``(name, source)`` of the kernel adding the sum of squares of ``g * inv`` to ``sums[0]`` and
    its count of inf/NaN to ``sums[1]``: ``dtype`` is the gradients' (float32 for half bits, whose
    format ``fmt`` is "bf16" or "f16"); ``masked``: element ``i`` counts only when ``i % 16 <
    valid[i / 16]`` (a FlatBuffer's padding). Each thread sums in the gradients' precision (as the
    update forms ``g * inv``), the warp in float64, one atomic add per warp."""
    ctype = "double" if np.dtype(dtype) == np.float64 else "float"
    stored = "unsigned short" if fmt else ctype
    name = f"gpuadam_sumsq_{ctype}{'_' + fmt if fmt else ''}{'_masked' if masked else ''}"
    source = (LOWP_SOURCE if fmt else FN_SOURCE) + f"""
typedef {ctype} T;
typedef {stored} G;

GPUADAM_FN void sumsq_range(const G* g, const T inv, const unsigned char* valid, unsigned long long i,
                            const unsigned long long stride, const unsigned long long n, T* acc, double* count) {{
  (void)valid;  /* read only when masked */
  for (; i < n; i += stride) {{
    if ({"(i & 15ULL) >= valid[i >> 4]" if masked else "false"}) continue;
    const T y = {_LOADS[fmt]} * inv;
    *acc += y * y;
    if (!isfinite(y)) *count += 1.0;
  }}
}}

#ifdef __CUDACC__
extern "C" __global__ void {name}(const G* g, double* sums, const T inv, const unsigned char* valid,
                                  const unsigned long long n) {{
  T acc = T(0);
  double count = 0.0;
  sumsq_range(g, inv, valid, blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x,
              (unsigned long long)gridDim.x * blockDim.x, n, &acc, &count);
  double sum = acc;
  for (int offset = 16; offset > 0; offset /= 2) {{
    sum += __shfl_down_sync(0xFFFFFFFFu, sum, offset);
    count += __shfl_down_sync(0xFFFFFFFFu, count, offset);
  }}
  if ((threadIdx.x & 31u) == 0u) {{
    atomicAdd(sums, sum);
    atomicAdd(sums + 1, count);
  }}
}}
#endif
"""
    return name, source


def prepare_source(constants_fn: Callable) -> tuple[str, str]:
    """``(name, source)`` of the one-thread kernel that turns the sums into the clip factor and skip
    decision, then advances one slot's step count and writes its constants (float32 and float64
    rows), as ``numba_cuda.prepare`` does. ``constants_fn``'s tuple argument comes as separate
    scalars ``h0, h1...`` (``prepare_args``): a kernel argument, not memory a step must write."""
    fn = getattr(constants_fn, "py_func", constants_fn)
    n_hyper = tuple_length(fn)
    name = f"gpuadam_prepare_{fn.__name__}"
    hyper_params = "".join(f"const double h{k}, " for k in range(n_hyper))
    source = FN_SOURCE + c_functions(grad_factor) + c_functions(fn) + f"""
GPUADAM_FN void prepare_one(double* sums, const double* hyper, const double inv_scale, const double max_norm,
                            const double skip_nonfinite, const double* lr, const long long group, long long* steps,
                            const long long slot, float* consts32, double* consts64, double* norm,
                            long long* skipped, const long long last, const long long host_step) {{
  double factor[3];  /* norm, grad_mul, skip */
  {PREFIX}grad_factor(sums[0], sums[1], inv_scale, max_norm, skip_nonfinite, factor);
  if (last != 0) {{
    norm[0] = factor[0];
    sums[0] = 0.0;  /* ready for the next step's sums */
    sums[1] = 0.0;
  }}
  if (factor[2] != 0.0) {{
    consts32[{SKIP}] = 1.0f;
    consts64[{SKIP}] = 1.0;
    if (last != 0) skipped[0] += 1;
    return;
  }}
  if (host_step > 0) steps[slot] = host_step;
  else steps[slot] += 1;
  double h[{max(n_hyper, 1)}];
  for (int k = 0; k < {n_hyper}; ++k) h[k] = hyper[k];
  if (lr[group] >= 0.0) h[0] = lr[group];
  double c[{N_CONSTANTS}];
  {PREFIX}{fn.__name__}(static_cast<double>(steps[slot]), h, factor[1], c);
  for (int k = 0; k < {N_CONSTANTS}; ++k) {{
    consts32[k] = static_cast<float>(c[k]);
    consts64[k] = c[k];
  }}
}}

#ifdef __CUDACC__
extern "C" __global__ void {name}(double* sums, {hyper_params}const double inv_scale, const double max_norm,
                                  const double skip_nonfinite, const double* lr, const long long group,
                                  long long* steps, const long long slot, float* consts32, double* consts64,
                                  double* norm, long long* skipped, const long long last, const long long host_step) {{
  if (blockIdx.x * blockDim.x + threadIdx.x != 0) return;
  const double hyper[{max(n_hyper, 1)}] = {{{", ".join(f"h{k}" for k in range(n_hyper)) or "0.0"}}};
  prepare_one(sums, hyper, inv_scale, max_norm, skip_nonfinite, lr, group, steps, slot, consts32, consts64,
              norm, skipped, last, host_step);
}}
#endif
"""
    return name, source


def prepare_args(sums: Any, hyper: tuple, inv_scale: float, max_norm: float, skip_nonfinite: bool, lr: Any,
                 group: int, steps: Any, slot: int, c32: Any, c64: Any, norm: Any, skipped: Any, last: bool,
                 host_step: int) -> tuple:
    """The prepare kernel's arguments, typed as it declares them."""
    f64, i64 = np.float64, np.int64
    return (sums, *(f64(h) for h in hyper), f64(inv_scale), f64(max_norm), f64(skip_nonfinite), lr, i64(group),
            steps, i64(slot), c32, c64, norm, skipped, i64(last), i64(host_step))


# ---------------------------------------------------------------------------------------------
# Launching (CuPy is imported here only, so the sources above need no GPU stack)

#: nvcc/NVRTC contract a*b+c into one rounding by default; the bookkeeping keeps the host's roundings.
OPTIONS = ("--fmad=false",)
_kernels: dict = {}
_blocks_max: list = []


def _kernel(key: Any, make: Callable[[], tuple[str, str]]) -> Any:
    kernel = _kernels.get(key)
    if kernel is None:
        import cupy

        name, source = make()
        kernel = _kernels[key] = cupy.RawKernel(source, name, options=OPTIONS)
    return kernel


def _blocks(n: int) -> int:
    if not _blocks_max:
        import cupy

        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        _blocks_max.append(sms * BLOCKS_PER_SM)
    return max(1, min(_blocks_max[0], -(-n // THREADS)))


def grad_sumsq(g: Any, sums: Any, fmt: int | None, inv_scale: float, valid: Any = None) -> None:
    """Add ``g * inv_scale``'s sum of squares and non-finite count to ``sums`` (CuPy arrays), on
    CuPy's current stream; ``fmt``: ``lowp``'s format of half bits in ``g``; ``valid``: a
    FlatBuffer's per-16-element counts on the device."""
    half = None if fmt is None else ("bf16" if fmt == BFLOAT16 else "f16")
    dtype = np.dtype(np.float32) if half else np.dtype(g.dtype)
    masked = valid is not None
    kernel = _kernel(("sumsq", dtype.str, half, masked), lambda: sumsq_source(dtype, half, masked))
    n = int(g.size)
    kernel((_blocks(n),), (THREADS,), (g, sums, dtype.type(inv_scale), valid if masked else sums, np.uint64(n)))


def prepare(constants_fn: Callable, *args: Any) -> None:
    """Launch the one-thread preparation (``prepare_source``) with ``prepare_args(*args)``."""
    kernel = _kernel(("prepare", constants_fn), lambda: prepare_source(constants_fn))
    kernel((1,), (1,), prepare_args(*args))
